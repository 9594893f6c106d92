"""Property tests: however a valid manifest is mangled, the loader returns a DesiredState or raises
ManifestValidationError with well-formed errors; it never crashes with anything else.

Two kinds of mangling: (a) text edits (characters and lines deleted, inserted, replaced, YAML tokens
sprinkled in) and (b) structure edits (any node replaced by an arbitrary value, keys deleted or added)
dumped back to YAML. Derandomized so CI sees the same examples every run.
"""

from __future__ import annotations

import copy
import re
import string
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmstack.manifests import DesiredState, ManifestValidationError, load_manifests

GOOD = sorted((Path(__file__).parent / "manifests" / "good").glob("*.yaml"))
TEXTS = {path.name: path.read_text() for path in GOOD}
INVENTORY = frozenset({"gpu-a", "gpu-b", "gpu-c"})

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check(files: dict[str, str | bytes]) -> DesiredState | ManifestValidationError:
    """The property: success, or a ManifestValidationError whose every error is well formed."""
    try:
        state = load_manifests(files, inventory_hosts=INVENTORY)
    except ManifestValidationError as exc:
        assert exc.errors, "a ManifestValidationError must carry at least one error"
        for error in exc.errors:
            assert error.file in files, error
            assert isinstance(error.line, int) and error.line >= 1, error
            assert isinstance(error.path, str) and isinstance(error.message, str) and error.message, error
            rendered = str(error)
            assert rendered.startswith(f"{error.file}:{error.line}: "), rendered
            assert len(error.message) < 2000, "messages must not echo huge inputs"
        assert str(exc).endswith("found")
        return exc
    assert isinstance(state, DesiredState)
    for (kind, name), origin in state.origins.items():
        assert origin.file in files and origin.line >= 1
        assert name in (state.workers if kind == "Worker" else state.deployments)
    return state


# --- (a) text edits ----------------------------------------------------------------------------------

YAML_TOKENS = [
    ":", ": ", "-", "- ", "[", "]", "{", "}", ",", "#", "&a ", "*a", "!!", "!!python/object:os.system ",
    "!!int ", "!!binary ", "<<: ", "---\n", "...\n", "|", ">", "?", "'", '"', "%YAML 1.1\n", "\t", "  ",
    "\n", "\n  ", "~", "null", "true", "yes", "0x1F", "1e3", ".inf", "2024-01-01", "\\", "\x00", "\x85",
    "\ufeff", "\u2028", "é", "😀", "apiVersion: lmstack.dev/v1\n", "kind: Worker\n", "spec:\n  host: gpu-a\n",
]

TAGS = ["!!int", "!!float", "!!bool", "!!null", "!!str", "!!timestamp", "!!binary", "!!seq", "!!map", "!!set",
        "!!omap", "!!pairs", "!!merge", "!!value", "!!python/tuple", "!!python/object:os.system", "!local",
        "!<tag:yaml.org,2002:int>", "!!python/name:os.system"]


@st.composite
def edited_text(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(st.sampled_from(sorted(TEXTS)))
    text = TEXTS[name]
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["delete", "insert", "replace", "token", "tag", "drop_line", "dup_line",
                                   "swap_lines", "indent", "dedent"]))
        position = draw(st.integers(0, len(text)))
        values = [match.end() for match in re.finditer(r": |- ", text)]
        if op == "tag" and values:  # an explicit tag on a value: `replicas: !!int two`
            position = values[draw(st.integers(0, len(values) - 1))]
            text = text[:position] + draw(st.sampled_from(TAGS)) + " " + text[position:]
        elif op == "delete":
            text = text[:position] + text[position + draw(st.integers(1, 20)):]
        elif op == "insert":
            text = text[:position] + draw(st.text(max_size=10)) + text[position:]
        elif op == "replace":
            text = text[:position] + draw(st.characters()) + text[position + 1:]
        elif op == "token":
            text = text[:position] + draw(st.sampled_from(YAML_TOKENS)) + text[position:]
        else:
            lines = text.split("\n")
            index = draw(st.integers(0, len(lines) - 1))
            if op == "drop_line":
                del lines[index]
            elif op == "dup_line":
                lines.insert(index, lines[index])
            elif op == "swap_lines":
                other = draw(st.integers(0, len(lines) - 1))
                lines[index], lines[other] = lines[other], lines[index]
            elif op == "indent":
                lines[index] = " " * draw(st.integers(1, 4)) + lines[index]
            else:
                lines[index] = lines[index].lstrip()
            text = "\n".join(lines)
    return name, text


@FUZZ
@given(edited_text(), st.booleans())
def test_text_edits_never_crash(edit: tuple[str, str], as_bytes: bool) -> None:
    name, text = edit
    content: str | bytes = text.encode("utf-8", errors="surrogatepass") if as_bytes else text
    check({name: content, "other.yaml": TEXTS[GOOD[0].name]})


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    check({"random.yaml": data})


_DEPLOYMENT = ("apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: d}\n"
               "spec: {backend: vllm, model: m, ")
HOSTILE = [
    ("[" * 5000 + "]" * 5000, "nested more than 100 levels deep"),
    ("a: " + "[" * 5000 + "]" * 5000, "nested more than 100 levels deep"),
    ("{" * 3000, "nested more than 100 levels deep"),
    ("- " * 3000 + "x", "nested more than 100 levels deep"),
    ("a:\n" + "".join(" " * i + "b:\n" for i in range(1, 2000)), "nested more than 100 levels deep"),
    ("&a [*a]", "alias refers to a node that contains it"),
    ("a: &a\n  b: *a\n", "alias refers to a node that contains it"),
    ("\x00", "character #x0000 is not allowed"),
    ("\ufeffapiVersion: lmstack.dev/v1\n", "kind: is required"),
    ("apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {name: " + "a" * 100_000 + "}\n"
     "spec: {host: gpu-a}\n", "at most 63 characters (this one has 100000)"),
    (_DEPLOYMENT + "replicas: " + "9" * 5000 + "}\n", "is too long for a number"),
    (_DEPLOYMENT + "resources: {gpuMemory: '" + "9" * 5000 + "'}}\n", "too large"),
    (_DEPLOYMENT + "health: {startupTimeout: '" + "9" * 5000 + "h'}}\n", "is not a duration"),
    (_DEPLOYMENT + "replicas: !!float nan}\n", "must be an integer, not the number nan"),
    (_DEPLOYMENT + "replicas: .inf}\n", "must be an integer, not the number inf"),
    (_DEPLOYMENT + "args: !!binary aGVsbG8=}\n", "must be a list, not a bytes"),
    (_DEPLOYMENT + "image: 2024-01-01}\n", "spec.image: must be a string, not a date"),
    (_DEPLOYMENT + "env: {A: !!null x}}\n", "spec.env.A: must be a string"),
    ("? !!python/name:os.system\n: 1\n", "YAML tag !!python/name:os.system is not supported"),
    ("!!python/object/new:os.system [ls]\n", "YAML tag !!python/object/new:os.system is not supported"),
    ("--- !!map\n", "YAML tag !!map is not supported"),
    ("%TAG ! tag:example.com,2000:\n--- !foo 1\n", "YAML tag tag:example.com,2000:foo is not supported"),
    ("a: !!timestamp 2024-99-99\n", "'2024-99-99' is not a valid !!timestamp"),
    ("a: !!bool maybe\n", "'maybe' is not a valid !!bool"),
    ("? [a, b]\n: c\n", "mapping keys must be plain strings"),
    ("1: x\ntrue: y\n~: z\n", "apiVersion: is required"),
]


@pytest.mark.parametrize(("text", "message"), HOSTILE, ids=[f"hostile-{i}" for i in range(len(HOSTILE))])
def test_hostile_texts(text: str, message: str) -> None:
    for content in (text, text.encode("utf-8")):
        started = time.perf_counter()
        result = check({"hostile.yaml": content})
        assert time.perf_counter() - started < 2.0
        assert isinstance(result, ManifestValidationError)
        assert any(message in str(error) for error in result.errors), str(result)


# --- (b) structure edits -----------------------------------------------------------------------------

BASE_DOCUMENTS = [doc for text in TEXTS.values() for doc in yaml.safe_load_all(text) if doc is not None]

KEYS = st.one_of(
    st.sampled_from(["apiVersion", "kind", "metadata", "spec", "name", "labels", "host", "gpus", "backend",
                     "model", "servedName", "replicas", "resources", "gpuMemory", "placement", "workers",
                     "selector", "strategy", "args", "env", "fromEnv", "fromFile", "health", "startupTimeout",
                     "rollout", "maxUnavailable", "replica", "gpu_memory", "<<", "", " ", "0"]),
    st.text(max_size=12),
    st.text(alphabet=string.ascii_letters + string.digits + "-_./", min_size=1, max_size=70),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2, 2**64), st.floats(),
    st.text(max_size=20), st.text(alphabet="0123456789.KMGTPikmgtpbBhms -", max_size=8),
    st.sampled_from(["all", "vllm", "sglang", "ollama", "binpack", "spread", "24Gi", "20m", "gpu-a", "gpu-b",
                     "lmstack.dev/v1", "Worker", "Deployment", "", " ", "\n", "é", "😀", "\x00", "null"]),
    st.integers(1_000, 100_000).map(lambda n: "x" * n),  # very long strings
    st.integers(1, 150).map(lambda depth: _nested(depth)),  # deeply nested
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(KEYS, children, max_size=4)),
    max_leaves=10,
)


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every node's path (the root included), stopping at a bounded depth."""
    found = [path]
    if len(path) > 8:
        return found
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


def _parent(root: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        root = root[part]
    return root


@st.composite
def edited_documents(draw: st.DrawFn) -> list[Any]:
    count = draw(st.integers(1, 4))
    documents = [copy.deepcopy(draw(st.sampled_from(BASE_DOCUMENTS))) for _ in range(count)]
    for _ in range(draw(st.integers(1, 5))):
        index = draw(st.integers(0, len(documents) - 1))
        paths = _paths(documents[index])
        path = paths[draw(st.integers(0, len(paths) - 1))]
        op = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        container = _parent(documents[index], path) if path else None
        if not path:
            if op == "replace":
                documents[index] = draw(VALUES)
            continue
        if op == "replace":
            container[path[-1]] = draw(VALUES)
        elif op == "delete":
            del container[path[-1]]
        elif op == "add":
            target = container if isinstance(container, dict) else None
            node = container[path[-1]]
            if isinstance(node, dict):
                target = node
            if target is not None:
                target[draw(KEYS)] = draw(VALUES)
            elif isinstance(node, list):
                node.append(draw(VALUES))
        elif op == "rename" and isinstance(container, dict):
            container[draw(KEYS)] = container.pop(path[-1])
    return documents


@FUZZ
@given(edited_documents(), st.booleans())
def test_structure_edits_never_crash(documents: list[Any], as_bytes: bool) -> None:
    try:
        text = yaml.safe_dump_all(documents, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, RecursionError):
        assume(False)
        return
    content: str | bytes = text.encode("utf-8", errors="surrogatepass") if as_bytes else text
    result = check({"edited.yaml": content})
    if isinstance(result, DesiredState):
        # Whatever passed validation is usable: names are unique and every Deployment has a served name.
        assert len({d.served_name for d in result.deployments.values()}) == len(result.deployments)


@FUZZ
@given(edited_documents())
def test_edits_in_one_file_leave_others_alone(documents: list[Any]) -> None:
    """Errors are only ever reported for the file they are in."""
    try:
        text = yaml.safe_dump_all(documents, allow_unicode=True)
    except (yaml.YAMLError, RecursionError):
        assume(False)
        return
    result = check({"a.yaml": text, "b.yaml": "# nothing here\n"})
    if isinstance(result, ManifestValidationError):
        assert {error.file for error in result.errors} == {"a.yaml"}

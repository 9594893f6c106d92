"""Manifest validation: a corpus of bad files with the errors they must produce, good files with the values
they must parse to, the JSON Schema, and quantity/duration parsing.

tests/manifests/bad/*.yaml start with comment lines stating every expected error:

    # expect: LINE: KEY.PATH: substring of the message

(`-` as the path for an error about the whole document or the file's YAML). The set of (line, path)
reported must equal the expected set exactly, and each message must contain its substring. Files are
loaded one at a time, against the inventory hosts gpu-a (at 10.0.0.5), gpu-b and gpu-c, and the operator's
default limits (PushLimits(): secrets, Docker endpoints, mount roots).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmstack.manifests import (
    Deployment,
    DesiredState,
    ManifestError,
    ManifestValidationError,
    Worker,
    json_schema,
    load_manifests,
)
from lmstack.manifests.policy import PushLimits
from lmstack.manifests.quantity import (
    MAX_DURATION,
    MAX_QUANTITY,
    exact_quantity,
    format_duration,
    format_quantity,
    parse_duration,
    parse_quantity,
)
from lmstack.manifests.schema import DeploymentSpec, EnvFromEnv, EnvFromFile

CORPUS = Path(__file__).parent / "manifests"
BAD = sorted((CORPUS / "bad").glob("*.yaml"))
GOOD = sorted((CORPUS / "good").glob("*.yaml"))
INVENTORY = {"gpu-a": "10.0.0.5", "gpu-b": "10.0.0.6", "gpu-c": "gpu-c.example"}  # name -> address
DEFAULT_LIMITS = PushLimits()
_EXPECT = re.compile(r"^# expect: (\d+): (.+?): (.+)$")

GiB = 2**30
MiB = 2**20


def _expectations(text: str) -> list[tuple[int, str, str]]:
    expected = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        match = _EXPECT.match(line)
        if match is not None:
            number, path, substring = match.groups()
            expected.append((int(number), "" if path == "-" else path, substring))
        else:
            assert not line.startswith("# expect"), f"malformed expectation: {line!r}"
    return expected


def _load(files: dict[str, str | bytes], inventory: dict[str, str] | None = INVENTORY,
          limits: PushLimits = DEFAULT_LIMITS) -> DesiredState:
    return load_manifests(files, inventory_hosts=inventory, limits=limits)


def _errors(files: dict[str, str | bytes]) -> tuple[ManifestError, ...]:
    with pytest.raises(ManifestValidationError) as info:
        _load(files)
    return info.value.errors


def _load_good(path: Path) -> DesiredState:
    return _load({path.name: path.read_text()})


# --- the corpus ----------------------------------------------------------------------------------------


def test_corpus_is_big_enough() -> None:
    assert len(BAD) >= 45
    assert len(GOOD) >= 3


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_manifest(path: Path) -> None:
    raw = path.read_bytes()
    expected = _expectations(raw.decode())
    assert expected, f"{path.name} states no `# expect:` lines"
    started = time.perf_counter()
    errors = _errors({path.name: raw})
    assert time.perf_counter() - started < 2.0, "validation must be fast, even for hostile input"

    report = "\n".join(str(error) for error in errors)
    assert all(error.file == path.name for error in errors)
    assert {(e.line, e.path) for e in errors} == {(line, p) for line, p, _ in expected}, report
    for line, key_path, substring in expected:
        messages = [e.message for e in errors if (e.line, e.path) == (line, key_path)]
        assert any(substring in message for message in messages), (
            f"{path.name}:{line}: {key_path}: no message contains {substring!r}:\n{report}")
    for error in errors:  # no pydantic wording or internals leak out
        assert error.line >= 1
        for leak in ("Input should", "pydantic", "function-", "[key]", "from-env-ref", "Extra inputs"):
            assert leak not in str(error), str(error)


def test_bad_corpus_renders_file_line_path_message() -> None:
    errors = _errors({"replicas_negative.yaml": (CORPUS / "bad" / "replicas_negative.yaml").read_text()})
    assert [str(e) for e in errors] == [
        "replicas_negative.yaml:9: spec.replicas: must be greater than or equal to 0"]


def test_yaml_error_renders_without_path() -> None:
    errors = _errors({"x.yaml": "a: [1, 2\n"})
    assert str(errors[0]).startswith("x.yaml:1: YAML syntax error: ")


@pytest.mark.parametrize("path", GOOD, ids=[p.stem for p in GOOD])
def test_good_manifest_loads(path: Path) -> None:
    state = _load_good(path)
    assert state.workers or state.deployments


def test_good_full() -> None:
    """Every optional field set, several documents, comments, quotes, both env reference kinds."""
    state = _load_good(CORPUS / "good" / "full.yaml")
    assert sorted(state.workers) == ["gpu-a", "gpu-b"]
    assert sorted(state.deployments) == ["llama", "qwen-7b"]

    gpu_a = state.workers["gpu-a"]
    assert gpu_a.spec.host == "gpu-a"
    assert gpu_a.spec.gpus == [0, 2]
    assert gpu_a.spec.docker_host == "ssh://deploy@10.0.0.5:2222"
    assert gpu_a.spec.model_cache == "/var/lib/lmstack/fast-models"
    assert gpu_a.metadata.labels == {"rack": "r1", "lmstack.dev/gpu": "h100"}
    assert state.workers["gpu-b"].spec.gpus == "all"

    qwen = state.deployments["qwen-7b"]
    spec = qwen.spec
    assert spec.backend == "vllm"
    assert spec.model == "Qwen/Qwen2.5-7B-Instruct"
    assert spec.served_name == "qwen"
    assert qwen.served_name == "qwen"
    assert spec.image == "vllm/vllm-openai:v0.6.3"
    assert spec.replicas == 2
    assert spec.resources.gpus == 2
    assert spec.resources.gpu_memory == 24 * GiB
    assert spec.placement.workers == ["gpu-a", "gpu-b"]
    assert spec.placement.selector == {"rack": "r1"}
    assert spec.placement.strategy == "spread"
    assert spec.args == ["--max-model-len", "8192", "--enable-prefix-caching"]
    assert spec.env == {
        "VLLM_LOGGING_LEVEL": "DEBUG",
        "HF_TOKEN": EnvFromEnv(from_env="LMSTACK_SECRET_HF_TOKEN"),
        "API_KEY": EnvFromFile(from_file="search/api-key"),
        "NUMBER": "8",
    }
    assert spec.health.startup_timeout == 1800 + 30
    assert spec.rollout.max_unavailable == 1

    llama = state.deployments["llama"]
    assert llama.spec.resources.gpu_memory == 512 * MiB
    assert llama.spec.health.startup_timeout == 90

    # Origins point at each document's first line.
    text = (CORPUS / "good" / "full.yaml").read_text().splitlines()
    for (kind, name), origin in state.origins.items():
        assert origin.file == "full.yaml"
        assert text[origin.line - 1].startswith("apiVersion:"), (kind, name, origin)


def test_good_minimal_defaults() -> None:
    """Only the required fields: every default applied."""
    state = _load_good(CORPUS / "good" / "minimal.yaml")
    worker = state.workers["gpu-c"]
    assert worker.spec.gpus == "all"
    assert worker.spec.docker_host is None
    assert worker.spec.model_cache == "/var/lib/lmstack/models"
    assert worker.metadata.labels == {}

    deployment = state.deployments["phi"]
    spec = deployment.spec
    assert deployment.served_name == "phi"  # defaults to metadata.name
    assert spec.served_name is None
    assert spec.image is None
    assert spec.replicas == 1
    assert spec.resources.gpus == 1
    assert spec.resources.gpu_memory is None
    assert spec.placement.workers == []
    assert spec.placement.selector == {}
    assert spec.placement.strategy == "binpack"
    assert spec.args == []
    assert spec.env == {}
    assert spec.health.startup_timeout == 20 * 60
    assert spec.rollout.max_unavailable == 0  # never stop a serving replica before its replacement is ready


def test_good_quantities_and_durations() -> None:
    state = _load_good(CORPUS / "good" / "quantities.yaml")
    memory = {name: d.spec.resources.gpu_memory for name, d in state.deployments.items()}
    timeout = {name: d.spec.health.startup_timeout for name, d in state.deployments.items()}
    assert memory == {
        "bytes": 17179869184,
        "binary": 80 * GiB,
        "decimal": 80 * 10**9,
        "fraction": 1536 * MiB,
        "mebi": 512 * MiB,
        "cpu-only": None,
    }
    assert timeout == {"bytes": 600, "binary": 3600, "decimal": 5400, "fraction": 45, "mebi": 3600 + 60 + 1,
                       "cpu-only": 1200}
    assert state.deployments["cpu-only"].spec.resources.gpus == 0
    assert state.deployments["cpu-only"].spec.replicas == 0


def test_good_aliases_and_unicode() -> None:
    qwen = _load_good(CORPUS / "good" / "unicode_and_anchors.yaml").deployments["qwen"]
    assert qwen.metadata.labels == {"owner": "Zoë"}
    assert qwen.spec.args == ["--served-model-name", "Qwen/Qwen2.5-7B-Instruct", "--chat-template=模板"]
    assert qwen.spec.env == {"GREETING": "héllo, wörld", "EMPTY": ""}


def test_quoted_number_says_remove_the_quotes() -> None:
    errors = _errors({"x.yaml": ("apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: d}\n"
                                 "spec: {backend: vllm, model: m, replicas: '2'}\n")})
    assert [e.message for e in errors] == ["must be an integer, not the string '2' (remove the quotes)"]


def test_empty_files_are_valid() -> None:
    for text in ("", "\n", "# only a comment\n", "---\n", "---\n---\n", "--- # nothing\n...\n"):
        state = _load({"empty.yaml": text})
        assert state.workers == {} and state.deployments == {}
    assert _load({}).workers == {}


def test_bytes_and_str_give_the_same_result() -> None:
    text = (CORPUS / "good" / "full.yaml").read_text()
    assert _load({"a.yaml": text}) == _load({"a.yaml": text.encode()})


def test_no_inventory_skips_the_host_check() -> None:
    text = "apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {name: w}\nspec: {host: anywhere}\n"
    assert _load({"w.yaml": text}, inventory=None).workers["w"].spec.host == "anywhere"
    errors = _errors({"w.yaml": text})
    assert [e.path for e in errors] == ["spec.host"]


def test_good_roundtrip_through_model_dump() -> None:
    """What effective specs store (model_dump, JSON mode) validates back to the same spec."""
    for path in GOOD:
        for deployment in _load_good(path).deployments.values():
            dumped = deployment.spec.model_dump(by_alias=True, mode="json")
            assert DeploymentSpec.model_validate(json.loads(json.dumps(dumped))) == deployment.spec


# --- several files at once ----------------------------------------------------------------------------


def test_errors_of_several_files_reported_at_once() -> None:
    files = {
        "b/deployments.yaml": (
            "apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: qwen}\n"
            "spec:\n  backend: vllm\n  model: m\n  replicas: -1\n"
            "---\napiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: qwen}\n"
            "spec: {backend: vllm, model: m, servedName: other}\n"
        ),
        "a/workers.yaml": (
            "apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {name: gpu-a}\nspec: {host: gpu-x}\n"
        ),
        "c/broken.yaml": "apiVersion: [\n",
        "d/fine.yaml": (
            "apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {name: gpu-b}\nspec: {host: gpu-b}\n"
        ),
    }
    with pytest.raises(ManifestValidationError) as info:
        _load(files)
    errors = info.value.errors
    assert [(e.file, e.line, e.path) for e in errors] == [
        ("a/workers.yaml", 4, "spec.host"),
        ("b/deployments.yaml", 7, "spec.replicas"),
        ("c/broken.yaml", 1, ""),
    ]
    assert errors == tuple(sorted(errors))
    rendered = str(info.value).splitlines()
    assert rendered[0] == ("a/workers.yaml:4: spec.host: host 'gpu-x' is not in the inventory "
                           "(inventory hosts: gpu-a, gpu-b, gpu-c)")
    assert rendered[-1] == "3 errors found"


def test_duplicate_name_across_files_names_the_first_file() -> None:
    worker = "apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {{name: gpu-a}}\nspec: {{host: {host}}}\n"
    errors = _errors({"one.yaml": worker.format(host="gpu-a"),
                      "two.yaml": "# second\n" + worker.format(host="gpu-b")})
    assert [str(e) for e in errors] == [
        "two.yaml:4: metadata.name: Worker 'gpu-a' is already defined at one.yaml:1"]


def test_same_name_different_kinds_is_fine() -> None:
    text = ("apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {name: gpu-a}\nspec: {host: gpu-a}\n---\n"
            "apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: gpu-a}\n"
            "spec: {backend: ollama, model: phi3, resources: {gpus: 0}}\n")
    state = _load({"x.yaml": text})
    assert set(state.workers) == set(state.deployments) == {"gpu-a"}


def test_yaml_errors_do_not_hide_schema_errors_elsewhere() -> None:
    errors = _errors({"x.yaml": (
        "apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {name: w, name: v}\nspec: {host: gpu-a}\n---\n"
        "apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: d}\n"
        "spec: {backend: vllm, model: m, replicas: x, placement: {workers: [w]}}\n")})
    # The Worker with a duplicate key still counts as declared: no "unknown worker 'w'".
    assert [(e.line, e.path) for e in errors] == [(3, "metadata.name"), (9, "spec.replicas")]


def test_snake_case_keys_are_unknown_but_python_may_use_names() -> None:
    errors = _errors({"x.yaml": ("apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: d}\n"
                                 "spec: {backend: vllm, model: m, served_name: x}\n")})
    assert [(e.path, e.message) for e in errors] == [
        ("spec.served_name", "unknown key; did you mean 'servedName'?")]
    assert DeploymentSpec(backend="vllm", model="m", served_name="x").served_name == "x"


# --- JSON Schema -----------------------------------------------------------------------------------------


def _good_documents() -> list[Any]:
    documents = []
    for path in GOOD:
        documents.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
    return documents


def test_json_schema_is_json_and_well_formed() -> None:
    schema = json_schema()
    text = json.dumps(schema)  # plain JSON, no Python objects
    assert json.loads(text) == schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    defs = schema["$defs"]
    assert isinstance(defs, dict)
    assert {"Worker", "Deployment", "WorkerSpec", "DeploymentSpec", "Metadata"} <= set(defs)
    for ref in re.findall(r'"\$ref": "([^"]+)"', text):  # every reference resolves
        assert ref.startswith("#/$defs/") and ref.removeprefix("#/$defs/") in defs, ref
    for name in ("Worker", "Deployment"):
        model = defs[name]
        assert model["additionalProperties"] is False
        assert set(model["required"]) == {"apiVersion", "kind", "metadata", "spec"}
        assert model["properties"]["apiVersion"]["const"] == "lmstack.dev/v1"
    spec = defs["DeploymentSpec"]["properties"]
    assert set(spec) == {"backend", "model", "servedName", "image", "replicas", "resources", "placement",
                         "args", "env", "health", "rollout"}  # camelCase, as written in YAML
    assert defs["Metadata"]["properties"]["name"]["maxLength"] == 63
    assert "pattern" in defs["Metadata"]["properties"]["name"]


def test_json_schema_validates_good_manifests_and_rejects_bad_ones() -> None:
    schema = json_schema()
    documents = _good_documents()
    assert len(documents) >= 6
    for document in documents:
        assert _schema_errors(schema, document) == [], document
    worker = next(d for d in documents if d["kind"] == "Worker")
    for bad in (
        {**worker, "extra": 1},
        {**worker, "apiVersion": "lmstack.dev/v2"},
        {**worker, "metadata": {"name": "Bad_Name"}},
        {**worker, "spec": {**worker["spec"], "gpus": [0, "1"]}},
        {key: value for key, value in worker.items() if key != "spec"},
    ):
        assert _schema_errors(schema, bad), bad


def test_json_schema_with_jsonschema_package() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for document in _good_documents():
        validator.validate(document)


def _schema_errors(schema: dict[str, Any], value: Any, root: dict[str, Any] | None = None,
                   where: str = "$") -> list[str]:
    """A small JSON Schema checker for the keywords json_schema() uses (jsonschema is not installed)."""
    root = root or schema
    errors: list[str] = []
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        errors += _schema_errors(target, value, root, where)
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        checks = {"string": lambda v: isinstance(v, str), "integer": lambda v: type(v) is int,
                  "number": lambda v: type(v) in (int, float), "boolean": lambda v: type(v) is bool,
                  "array": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict),
                  "null": lambda v: v is None}
        if not any(checks[name](value) for name in names):
            errors.append(f"{where}: not {types}")
            return errors
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            errors.append(f"{where}: does not match {schema['pattern']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: too long")
    if type(value) in (int, float):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: below minimum")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: above maximum")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += _schema_errors(schema["items"], item, root, f"{where}[{index}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{where}.{key}: required" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            if key in properties:
                errors += _schema_errors(properties[key], item, root, f"{where}.{key}")
                continue
            matched = [sub for pattern, sub in schema.get("patternProperties", {}).items()
                       if re.search(pattern, key)]
            for sub in matched:
                errors += _schema_errors(sub, item, root, f"{where}.{key}")
            extra = schema.get("additionalProperties", True)
            if not matched and extra is False:
                errors.append(f"{where}.{key}: not allowed")
            elif not matched and isinstance(extra, dict):
                errors += _schema_errors(extra, item, root, f"{where}.{key}")
    if "anyOf" in schema and all(_schema_errors(s, value, root, where) for s in schema["anyOf"]):
        errors.append(f"{where}: matches none of anyOf")
    if "oneOf" in schema:
        matching = sum(1 for s in schema["oneOf"] if not _schema_errors(s, value, root, where))
        if matching != 1:
            errors.append(f"{where}: matches {matching} of oneOf")
    return errors


# --- quantities and durations --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), (0, 0), (1024, 1024), ("1024", 1024), ("512Mi", 512 * MiB), ("24Gi", 24 * GiB),
    ("1.5Gi", 1536 * MiB), ("1Ki", 1024), ("2Ti", 2 * 2**40), ("1Pi", 2**50), ("80G", 80 * 10**9),
    ("80M", 80 * 10**6), ("1k", 1000), ("1K", 1000), ("3T", 3 * 10**12), (" 24Gi ", 24 * GiB),
    ("24 Gi", 24 * GiB), ("0.5Ki", 512), ("1.0001K", 1001),  # fractions of a byte round up
    ("1024Pi", 2**60), (2**60, 2**60),
])
def test_parse_quantity(text: object, size: int) -> None:
    assert parse_quantity(text) == size


@pytest.mark.parametrize(("value", "message"), [
    ("24GB", "write 24Gi for 24 GiB (powers of 1024) or 24G for 24 GB (powers of 1000)"),
    ("24GiB", "write 24Gi"), ("24gi", "write 24Gi"), ("512mb", "write 512Mi"), ("1.5 kB", "write 1.5Ki"),
    ("lots", "'lots' is not a memory quantity"), ("", "is not a memory quantity"),
    ("1e9", "is not a memory quantity"), ("-1Gi", "is not a memory quantity"),
    ("Gi", "not a memory quantity"),
    ("٣Gi", "is not a memory quantity"),  # \d must not match other scripts' digits
    (-1, "must not be negative"), (True, "not a boolean"), (1.5, "must be a memory quantity"),
    (None, "must be a memory quantity"), ([1], "must be a memory quantity"),
    ("2048Pi", "is too large"), (2**60 + 1, "is too large"), ("9" * 5000, "is too large"),
    ("x" * 10_000, "is not a memory quantity"),
])
def test_parse_quantity_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        parse_quantity(value)
    assert len(str(info.value)) < 200


def test_format_quantity_is_for_people() -> None:
    assert format_quantity(24 * GiB) == "24Gi"
    assert format_quantity(int(23.5 * GiB)) == "23.5Gi"
    assert format_quantity(10**9) == "953.7Mi"
    assert format_quantity(100) == "100"


@pytest.mark.parametrize(("size", "text"), [
    (0, "0"), (1, "1"), (1023, "1023"), (1024, "1Ki"), (1536, "1536"), (24 * GiB, "24Gi"),
    (1536 * MiB, "1.5Gi"), (1537 * MiB, "1537Mi"), (10**9, "1G"), (80 * 10**9, "80G"), (2500 * 10**6, "2.5G"),
    (2**60, "1024Pi"), (10**9 + 1, "1000000001"),
])
def test_exact_quantity(size: int, text: str) -> None:
    assert exact_quantity(size) == text
    assert parse_quantity(text) == size


def test_exact_quantity_roundtrips() -> None:
    for size in [*range(0, 5000, 7), *(n * 10**k for n in (1, 3, 25, 999) for k in range(3, 16)),
                 *(n * 2**k + d for n in (1, 3, 25, 999) for k in (10, 20, 30, 40) for d in (0, 1, 512))]:
        if size <= MAX_QUANTITY:
            assert parse_quantity(exact_quantity(size)) == size, size


@pytest.mark.parametrize(("text", "seconds"), [
    ("20m", 1200), ("90s", 90), ("1h", 3600), ("1h30m", 5400), ("1h0m5s", 3605), ("2m30s", 150),
    (" 5m ", 300), (0, 0), (45, 45), ("0s", 0), ("720h", MAX_DURATION), (MAX_DURATION, MAX_DURATION),
])
def test_parse_duration(text: object, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("value", "message"), [
    ("20", "is not a duration"),
    ("20 minutes", "'20 minutes' is not a duration (use e.g. 20m, 90s or 1h30m)"),
    ("", "is not a duration"), ("m", "is not a duration"), ("30s1m", "is not a duration"),
    ("1d", "not a duration"), ("1.5h", "is not a duration"), ("-5m", "is not a duration"),
    (-1, "must not be negative"), (True, "not a boolean"), (1.5, "must be a duration such as 20m or 90s"),
    (None, "must be a duration"), ([1], "must be a duration"),
    ("٣m", "not a duration"), ("721h", "is too long (at most 720h)"), (MAX_DURATION + 1, "is too long"),
    ("9" * 5000 + "h", "not a duration"),
])
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        parse_duration(value)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (59, "59s"), (60, "1m"), (1200, "20m"), (3600, "1h"), (5400, "1h30m"), (3661, "1h1m1s")])
def test_format_duration(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


# --- the models directly ----------------------------------------------------------------------------------


def test_models_are_frozen_and_typed() -> None:
    state = _load_good(CORPUS / "good" / "minimal.yaml")
    assert isinstance(state.workers["gpu-c"], Worker)
    assert isinstance(state.deployments["phi"], Deployment)
    with pytest.raises(ValueError, match="frozen"):
        state.deployments["phi"].spec.replicas = 3  # type: ignore[misc]


def test_docker_host_address_checked_only_when_the_inventory_gives_addresses() -> None:
    """The inventory's addresses decide where ssh:// may go; with names only (no addresses at hand) the form
    is still checked, and other schemes are refused either way."""
    def worker(url: str) -> str:
        return ("apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {name: w}\n"
                f"spec: {{host: gpu-a, dockerHost: '{url}'}}\n")

    assert _load({"w.yaml": worker("ssh://10.0.0.5")}).workers["w"].spec.docker_host == "ssh://10.0.0.5"
    assert [e.path for e in _errors({"w.yaml": worker("ssh://10.0.0.9")})] == ["spec.dockerHost"]
    names_only = load_manifests({"w.yaml": worker("ssh://10.0.0.9")}, inventory_hosts=set(INVENTORY))
    assert names_only.workers["w"].spec.docker_host == "ssh://10.0.0.9"
    with pytest.raises(ManifestValidationError, match=r"spec\.dockerHost"):
        load_manifests({"w.yaml": worker("unix:///var/run/docker.sock")}, inventory_hosts=None)

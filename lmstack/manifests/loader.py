"""Manifest files -> a validated DesiredState, or every error at once as `FILE:LINE: key.path: message`."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from pydantic import BaseModel, Tag, ValidationError

from lmstack.manifests.errors import ManifestError, ManifestValidationError
from lmstack.manifests.modelref import parse_model_file
from lmstack.manifests.policy import DEFAULT_LIMITS, PushLimits
from lmstack.manifests.schema import (
    API_VERSION,
    GPU_REQUIRED_BACKENDS,
    KINDS,
    MODEL_FILE_BACKENDS,
    Deployment,
    EnvFromEnv,
    EnvFromFile,
    Worker,
    closest,
)
from lmstack.manifests.yamlsource import Document, Path, dotted, load_documents


@dataclass(frozen=True)
class Origin:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class DesiredState:
    """What a commit declares: workers and deployments by name, each with where it was written."""

    workers: Mapping[str, Worker]
    deployments: Mapping[str, Deployment]
    origins: Mapping[tuple[str, str], Origin]


@dataclass
class _Parsed:
    document: Document
    resource: Worker | Deployment


def load_manifests(
    files: Mapping[str, bytes | str], *, inventory_hosts: Mapping[str, str] | Collection[str] | None,
    limits: PushLimits = DEFAULT_LIMITS,
) -> DesiredState:
    """Validate every document in `files` (repository-relative path -> content).

    `inventory_hosts` is the inventory host names workers may refer to: a mapping name -> address also
    checks that an ssh:// dockerHost goes to the worker's own address (a plain collection of names checks
    only its form); None skips the host checks (when no inventory is at hand). `limits` are the operator's
    (secrets, Docker endpoints, mounts); the default is the strictest. Raises ManifestValidationError
    listing every problem found.
    """
    errors: list[ManifestError] = []
    parsed: list[_Parsed] = []
    for file in sorted(files):
        documents, yaml_errors = load_documents(file, files[file])
        errors.extend(yaml_errors)
        for document in documents:
            resource = _validate_document(document, errors)
            if resource is not None:
                parsed.append(_Parsed(document, resource))
    state = _check_references(parsed, inventory_hosts, errors)
    _check_limits(state, parsed, inventory_hosts, limits, errors)
    if errors:
        raise ManifestValidationError(errors)
    return state


def _validate_document(document: Document, errors: list[ManifestError]) -> Worker | Deployment | None:
    data = document.data
    file = document.file
    if not isinstance(data, dict):
        if document.is_readable(()):
            errors.append(ManifestError(file, document.line_of(()), "",
                                        "a manifest document must be a mapping with apiVersion, kind, "
                                        f"metadata and spec, not {_describe(data)}"))
        return None
    api_version = data.get("apiVersion")
    if api_version != API_VERSION:
        if document.is_readable(("apiVersion",)):
            message = ("is required" if api_version is None
                       else f"unknown apiVersion {_short(api_version)} (expected {API_VERSION})"
                       if isinstance(api_version, str)
                       else f"must be {API_VERSION}, not {_describe(api_version)}")
            errors.append(ManifestError(file, document.line_of(("apiVersion",)), "apiVersion", message))
        return None
    kind = data.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        if document.is_readable(("kind",)):
            expected = " or ".join(KINDS)
            close = closest(kind, KINDS) if isinstance(kind, str) else []
            hint = f"; did you mean {close[0]!r}?" if close else f" (expected {expected})"
            message = ("is required" if kind is None else f"unknown kind {_short(kind)}{hint}"
                       if isinstance(kind, str) else f"must be {expected}, not {_describe(kind)}")
            errors.append(ManifestError(file, document.line_of(("kind",)), "kind", message))
        return None
    # A document with YAML errors (already reported) that validates still takes part in the reference
    # checks, so that a duplicate key in a Worker does not also make every placement naming it "unknown".
    try:
        # by_name=False: YAML keys are camelCase only (`served_name` is an unknown key, with a hint).
        return model.model_validate(data, by_alias=True, by_name=False)
    except ValidationError as exc:
        errors.extend(_convert(exc, document, model))
        return None


def _convert(exc: ValidationError, document: Document, model: type[BaseModel]) -> list[ManifestError]:
    converted: list[ManifestError] = []
    raw = exc.errors(include_url=False)
    # An unknown key that is a near miss of a missing one says it all: no "is required" beside it.
    suggested: set[Path] = set()
    messages: list[tuple[Path, str]] = []
    for error in raw:
        path = _data_path(document.data, error["loc"])
        message, suggestion = _message(error, path, model)
        if suggestion is not None:
            suggested.add((*path[:-1], suggestion))
        messages.append((path, message))
    for (path, message), error in zip(messages, raw, strict=True):
        if error["type"] == "missing" and (path in suggested or document.may_lack(path)):
            continue
        if not document.is_readable(path):
            continue
        converted.append(ManifestError(document.file, document.line_of(path), dotted(path), message))
    return converted


def _data_path(data: Any, loc: tuple[int | str, ...]) -> Path:
    """The error location as a path in the data: drops pydantic's union-member and tag segments."""
    path: list[str | int] = []
    current = data
    for part in loc:
        if _has(current, part):
            path.append(part)
            current = current[part]
        elif (isinstance(part, str) and not part.isidentifier()) or part in _PYDANTIC_TAGS:
            continue  # a union member or tag name such as `list[int]` or `from-env-ref`
        else:
            path.append(part)  # a missing key: the line falls back to its parent
            current = None
    return tuple(path)


def _has(container: Any, part: int | str) -> bool:
    if isinstance(container, dict):
        return part in container
    return isinstance(container, list) and isinstance(part, int) and 0 <= part < len(container)


_PYDANTIC_TAGS = {"all-gpus", "gpu-index-list", "plain-value", "from-env-ref", "from-file-ref"}

# pydantic's wording for type errors, in words for people who write YAML.
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "a whole number",
    "string_type": "a string", "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
    "model_attributes_type": "a mapping", "bool_type": "true or false", "bool_parsing": "true or false",
    "float_type": "a number", "float_parsing": "a number", "none_required": "null",
}


def _message(error: Any, path: Path, model: type[BaseModel]) -> tuple[str, str | None]:
    """A message for one pydantic error, and the key it suggests instead (for an unknown key)."""
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        key = str(path[-1]) if path else ""
        if allowed:
            close = closest(key, allowed)
            if close:
                return f"unknown key; did you mean {close[0]!r}?", close[0]
            return f"unknown key (allowed: {', '.join(sorted(allowed))})", None
        return "unknown key", None
    if kind == "missing":
        return "is required", None
    if kind in _EXPECTED:
        message = f"must be {_EXPECTED[kind]}, not {_describe(value)}"
        if kind == "string_type" and isinstance(value, int | float):
            message += " (put it in quotes)"  # bool too: `yes`, `on` and `true` are booleans in YAML
        elif kind == "int_type" and isinstance(value, str) and value.strip().isdecimal():
            message += " (remove the quotes)"
        return message, None
    if kind == "literal_error":
        expected = str(error.get("ctx", {}).get("expected", ""))
        choices = re.findall(r"'((?:[^'\\]|\\.)*)'", expected)
        close = closest(value, choices) if isinstance(value, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        shown = _short(value) if isinstance(value, str) else _describe(value)
        return f"must be {expected}, not {shown}{hint}", None
    message = str(error["msg"]).removeprefix("Value error, ")
    if message.startswith("Input should be "):
        message = "must be " + message.removeprefix("Input should be ")
    if kind.endswith("_form"):  # the schema's discriminated unions (`gpus_form`, `env_form`)
        message += f", not {_describe(value)}"
        if message.startswith("must be a string") and isinstance(value, int | float):
            message += " (put it in quotes)"
    return message[:1].lower() + message[1:], None


def _describe(value: Any) -> str:
    if value is None:
        return "null (empty)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"the integer {_short(value)}"
    if isinstance(value, float):
        return f"the number {_short(value)}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} ({_short(value)})"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _allowed_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys accepted where pydantic's `loc` points (for `did you mean` hints).

    Walks the type annotations along `loc`: field names, dict keys, list indices, and the tags of
    discriminated unions (so `spec.env.X` with a `from-env-ref` tag finds EnvFromEnv).
    """
    current: Any = model
    for part in loc:
        current = _step(current, part)
        if current is None:
            return []
    found = _strip(current)
    if isinstance(found, type) and issubclass(found, BaseModel):
        return [f.alias or name for name, f in found.model_fields.items()]
    return []


def _step(annotation: Any, part: int | str) -> Any:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = next((f for name, f in annotation.model_fields.items() if part in (name, f.alias)), None)
        return field.annotation if field is not None else None
    if origin in (Union, types.UnionType):
        members = typing.get_args(annotation)
        for member in members:  # a discriminated union: the tag names the member
            metadata = typing.get_args(member)[1:] if typing.get_origin(member) is typing.Annotated else ()
            if any(isinstance(item, Tag) and item.tag == part for item in metadata):
                return member
        real = [m for m in members if m is not type(None)]
        return _step(real[0], part) if len(real) == 1 else None  # `X | None` has no segment of its own
    if origin is dict:
        return typing.get_args(annotation)[1]
    if origin is list:
        return typing.get_args(annotation)[0]
    return None


def _strip(annotation: Any) -> Any:
    """The type inside `Annotated[...]` and `X | None`."""
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if typing.get_origin(annotation) in (Union, types.UnionType):
            real = [m for m in typing.get_args(annotation) if m is not type(None)]
            if len(real) == 1:
                annotation = real[0]
                continue
        return annotation


def _check_references(
    parsed: Iterable[_Parsed], inventory_hosts: Collection[str] | None, errors: list[ManifestError]
) -> DesiredState:
    workers: dict[str, Worker] = {}
    deployments: dict[str, Deployment] = {}
    origins: dict[tuple[str, str], Origin] = {}
    documents: dict[tuple[str, str], Document] = {}
    hosts_seen: dict[str, str] = {}
    served: dict[str, str] = {}

    def error(document: Document, path: Path, message: str) -> None:
        errors.append(ManifestError(document.file, document.line_of(path), dotted(path), message))

    for item in parsed:
        resource, document = item.resource, item.document
        key = (resource.kind, resource.metadata.name)
        if key in origins:
            error(document, ("metadata", "name"),
                  f"{resource.kind} {resource.metadata.name!r} is already defined at {origins[key]}")
            continue
        origins[key] = Origin(document.file, document.line_of(()))
        documents[key] = document
        if isinstance(resource, Worker):
            workers[resource.metadata.name] = resource
        else:
            deployments[resource.metadata.name] = resource

    hosts = set(inventory_hosts) if inventory_hosts is not None else None
    for name, worker in workers.items():
        document = documents[("Worker", name)]
        host = worker.spec.host
        if hosts is not None and host not in hosts:
            close = closest(host, hosts)
            hint = f"; did you mean {close[0]!r}?" if close else f" (inventory hosts: {_few(hosts)})"
            error(document, ("spec", "host"), f"host {_short(host)} is not in the inventory{hint}")
        if host in hosts_seen:
            first = hosts_seen[host]
            error(document, ("spec", "host"), f"host {_short(host)} is already used by Worker {first!r} "
                  f"at {origins[('Worker', first)]}")
        else:
            hosts_seen[host] = name

    for name, deployment in deployments.items():
        document = documents[("Deployment", name)]
        spec = deployment.spec
        served_name = deployment.served_name
        if served_name in served:
            first = served[served_name]
            error(document, ("spec", "servedName") if spec.served_name else ("metadata", "name"),
                  f"servedName {served_name!r} is already served by Deployment {first!r} "
                  f"at {origins[('Deployment', first)]}")
        else:
            served[served_name] = name
        if spec.backend in GPU_REQUIRED_BACKENDS and spec.resources.gpus == 0 and spec.image is None:
            error(document, ("spec", "resources", "gpus"),
                  f"backend {spec.backend}'s default image needs GPUs; set spec.image to a CPU build to run "
                  "with gpus: 0")
        if spec.backend in MODEL_FILE_BACKENDS:
            try:
                parse_model_file(spec.model)
            except ValueError as exc:
                error(document, ("spec", "model"), f"backend {spec.backend} takes one model file: {exc}")
        for index, worker_name in enumerate(spec.placement.workers):
            if worker_name not in workers:
                close = closest(worker_name, workers)
                hint = (f"; did you mean {close[0]!r}?" if close else f" (workers: {_few(workers)})"
                        if workers else " (no Worker is declared)")
                error(document, ("spec", "placement", "workers", index),
                      f"unknown worker {worker_name!r}{hint}")
        _check_possible(document, deployment, workers, error)
    return DesiredState(workers=workers, deployments=deployments, origins=origins)


def _check_limits(state: DesiredState, parsed: Iterable[_Parsed],
                  inventory_hosts: Mapping[str, str] | Collection[str] | None, limits: PushLimits,
                  errors: list[ManifestError]) -> None:
    """What a push may reach: the lmstack host's secrets, Docker endpoints, directories mounted on workers."""
    addresses = inventory_hosts if isinstance(inventory_hosts, Mapping) else {}
    for item in parsed:
        resource, document = item.resource, item.document
        declared = state.workers if isinstance(resource, Worker) else state.deployments
        if declared.get(resource.metadata.name) is not resource:
            continue  # a duplicate, already reported
        found: list[tuple[Path, str | None]] = []
        if isinstance(resource, Worker):
            spec = resource.spec
            found.append((("spec", "modelCache"), limits.model_cache_problem(spec.model_cache)))
            if spec.docker_host is not None:
                found.append((("spec", "dockerHost"),
                              limits.docker_host_problem(spec.docker_host, addresses.get(spec.host))))
        else:
            found.append((("spec", "health", "startupTimeout"),
                          limits.wait_problem("startupTimeout", resource.spec.health.startup_timeout)))
            found.append((("spec", "rollout", "drainTimeout"),
                          limits.wait_problem("drainTimeout", resource.spec.rollout.drain_timeout)))
            for name, value in resource.spec.env.items():
                if isinstance(value, EnvFromEnv):
                    found.append((("spec", "env", name, "fromEnv"), limits.env_name_problem(value.from_env)))
                elif isinstance(value, EnvFromFile):
                    found.append((("spec", "env", name, "fromFile"), limits.secret_file_problem(value.from_file)))
        for path, problem in found:
            if problem is not None:
                errors.append(ManifestError(document.file, document.line_of(path), dotted(path), problem))


def _check_possible(document: Document, deployment: Deployment, workers: Mapping[str, Worker],
                    error: Callable[[Document, Path, str], None]) -> None:
    """Reject a GPU count no candidate worker could ever offer (only knowable when all list their GPUs)."""
    wanted = deployment.spec.resources.gpus
    placement = deployment.spec.placement
    candidates = [
        worker for name, worker in workers.items()
        if (not placement.workers or name in placement.workers)
        and all(worker.metadata.labels.get(k) == v for k, v in placement.selector.items())
    ]
    if wanted == 0 or not candidates:
        return
    listed = [(w.metadata.name, w.spec.gpus) for w in candidates if w.spec.gpus != "all"]
    if len(listed) < len(candidates):
        return  # a worker with `gpus: all` may have any number
    most_name, most = max(listed, key=lambda item: len(item[1]))
    if len(most) < wanted:
        error(document, ("spec", "resources", "gpus"),
              f"needs {wanted} GPUs per replica but no worker it may run on lists that many "
              f"(most: {most_name} with {len(most)})")


def _few(names: Iterable[str], limit: int = 8) -> str:
    ordered = sorted(names)
    if not ordered:
        return "none"
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more

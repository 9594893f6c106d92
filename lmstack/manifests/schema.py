"""The manifest documents (apiVersion lmstack.dev/v1): Worker and Deployment.

Strict: unknown keys are errors. YAML keys are camelCase; Python attributes snake_case.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Strict,
    Tag,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

from lmstack.manifests.quantity import exact_quantity, format_duration, parse_duration, parse_quantity

API_VERSION = "lmstack.dev/v1"
BackendName = Literal["vllm", "sglang", "ollama", "llamacpp"]
BACKEND_NAMES: tuple[str, ...] = ("vllm", "sglang", "ollama", "llamacpp")
# Backends whose default (pinned) image is a GPU build. Every backend may run with `resources.gpus: 0`,
# but these only with `spec.image` set (their engines have CPU builds; their default images are not).
GPU_REQUIRED_BACKENDS = frozenset({"vllm", "sglang"})
# Backends whose `model` names one model file (see lmstack.manifests.modelref), checked when loading.
MODEL_FILE_BACKENDS = frozenset({"llamacpp"})

_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
_LABEL_KEY_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_./]{0,61}[A-Za-z0-9])?$"
_ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_MAX_NAME = 63


def closest(word: str, choices: Iterable[str]) -> list[str]:
    """The choice `word` most likely means (`vLLM` -> `vllm`, `replica` -> `replicas`), as a 0/1 list.

    Case is ignored; a tie (`gpu-x` is as close to `gpu-a` as to `gpu-b`) suggests nothing.
    """
    folded = word.casefold()
    scored: dict[float, list[str]] = {}
    for choice in choices:
        matcher = difflib.SequenceMatcher(None, folded, choice.casefold())
        if matcher.real_quick_ratio() >= 0.6 and matcher.quick_ratio() >= 0.6:
            scored.setdefault(matcher.ratio(), []).append(choice)
    best = max(scored, default=0.0)
    return scored[best] if best >= 0.6 and len(scored[best]) == 1 else []


def _no_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _matching(pattern: str, what: str, rule: str, max_length: int | None = None) -> AfterValidator:
    """A pattern check whose error says what is wrong in words (pydantic's quotes the regex)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if max_length is not None and len(value) > max_length:
            raise ValueError(f"{what} must be at most {max_length} characters (this one has {len(value)})")
        if compiled.fullmatch(value) is None:
            raise ValueError(f"{value!r} is not a valid {what}: {rule}")
        return value

    return AfterValidator(check)


_NAME_RULE = "use lower-case letters, digits and '-', starting and ending with a letter or digit"
Name = Annotated[
    str,
    _matching(_NAME_PATTERN, "name", _NAME_RULE, _MAX_NAME),
    WithJsonSchema({"type": "string", "pattern": _NAME_PATTERN, "maxLength": _MAX_NAME,
                    "description": "lower-case letters, digits and '-', at most 63 characters"}),
]
LabelKey = Annotated[
    str,
    _matching(_LABEL_KEY_PATTERN, "label key",
              "use letters, digits, '-', '_', '.' and '/', starting and ending with a letter or digit",
              _MAX_NAME),
    WithJsonSchema({"type": "string", "pattern": _LABEL_KEY_PATTERN, "maxLength": _MAX_NAME}),
]
EnvName = Annotated[
    str,
    _matching(_ENV_NAME_PATTERN, "environment variable name",
              "use letters, digits and '_', not starting with a digit"),
    WithJsonSchema({"type": "string", "pattern": _ENV_NAME_PATTERN}),
]
NonBlank = Annotated[str, AfterValidator(_no_blank)]
# YAML gives real integers: `true` or "2" where a count belongs is a mistake, not something to coerce.
Count = Annotated[int, Strict()]
MemoryQuantity = Annotated[
    int,
    BeforeValidator(parse_quantity),
    PlainSerializer(exact_quantity, return_type=str),
    WithJsonSchema({"type": ["string", "integer"], "pattern": r"^\d+(\.\d+)?([KMGTP]i|[kKMGTP])?$",
                    "examples": ["24Gi", "512Mi"]}),
]
Duration = Annotated[
    int,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": ["string", "integer"], "pattern": r"^(\d+h)?(\d+m)?(\d+s)?$",
                    "examples": ["20m", "90s"]}),
]


class StrictModel(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=False,
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        validate_default=True,
    )


class Metadata(StrictModel):
    name: Name
    labels: dict[LabelKey, str] = Field(default_factory=dict)


def _unique_indices(indices: list[int]) -> list[int]:
    twice = sorted(index for index, count in Counter(indices).items() if count > 1)
    if twice:
        raise ValueError(f"lists GPU {'indices' if len(twice) > 1 else 'index'} "
                         f"{', '.join(map(str, twice))} more than once")
    return indices


def _gpus_form(value: object) -> str | None:
    # A callable discriminator keeps errors to one branch (no "should be 'all'" beside "should be a list").
    if value == "all":
        return "all-gpus"
    if isinstance(value, list):
        return "gpu-index-list"
    return None


WorkerGpus = Annotated[
    Annotated[Literal["all"], Tag("all-gpus")]
    | Annotated[list[Annotated[Count, Field(ge=0, le=1023)]], AfterValidator(_unique_indices),
                Tag("gpu-index-list")],
    Discriminator(_gpus_form, custom_error_type="gpus_form",
                  custom_error_message="must be 'all' or a list of GPU indices"),
]


class WorkerSpec(StrictModel):
    host: NonBlank = Field(description="an inventory host; its connection vars come from the inventory")
    gpus: WorkerGpus = Field(default="all",
                             description="'all', or the GPU indices lmstack may use on this worker")
    docker_host: str | None = Field(
        default=None, description="default ssh://<ansible_user>@<ansible_host>:<port>"
    )
    model_cache: NonBlank = Field(default="/var/lib/lmstack/models", description="model cache directory")


class Worker(StrictModel):
    api_version: Literal["lmstack.dev/v1"]
    kind: Literal["Worker"]
    metadata: Metadata
    spec: WorkerSpec


class Resources(StrictModel):
    gpus: Count = Field(default=1, ge=0, le=64, description="GPUs per replica (tensor parallel size)")
    gpu_memory: MemoryQuantity | None = Field(
        default=None, description="free memory needed on each of those GPUs, e.g. 24Gi"
    )


class Placement(StrictModel):
    workers: list[Name] = Field(default_factory=list, description="only these workers (empty: any)")
    selector: dict[LabelKey, str] = Field(default_factory=dict, description="worker labels to match")
    strategy: Literal["binpack", "spread"] = "binpack"


class EnvFromEnv(StrictModel):
    from_env: NonBlank


class EnvFromFile(StrictModel):
    from_file: NonBlank


_ENV_REF_TAGS = {"fromEnv": "from-env-ref", "from_env": "from-env-ref",
                 "fromFile": "from-file-ref", "from_file": "from-file-ref"}


def _env_form(value: object) -> str | None:
    if isinstance(value, str):
        return "plain-value"
    if isinstance(value, dict):
        tags = {_ENV_REF_TAGS[key] for key in value if key in _ENV_REF_TAGS}
        if not tags:
            # `{fromEnvv: X}`: validate as the reference it nearly is, so the error says "did you mean".
            for key in value:
                close = closest(str(key), ["fromEnv", "fromFile"])
                if close:
                    return _ENV_REF_TAGS[close[0]]
        return tags.pop() if len(tags) == 1 else None
    if isinstance(value, EnvFromEnv):
        return "from-env-ref"
    if isinstance(value, EnvFromFile):
        return "from-file-ref"
    return None


EnvValue = Annotated[
    Annotated[str, Tag("plain-value")]
    | Annotated[EnvFromEnv, Tag("from-env-ref")]
    | Annotated[EnvFromFile, Tag("from-file-ref")],
    Discriminator(_env_form, custom_error_type="env_form",
                  custom_error_message="must be a string, {fromEnv: NAME} or {fromFile: PATH}"),
]


class Health(StrictModel):
    startup_timeout: Duration = Field(default=1200, description="how long a replica may take to be ready")


class Rollout(StrictModel):
    """How replicas are replaced. A replica whose spec needs a restart is replaced by a new one started beside
    it first (a surge) when a GPU (or, for `gpus: 0`, a Ready worker) fits; otherwise it is stopped first,
    at most `maxUnavailable` of the deployment at a time. The default, 0, never stops a serving replica
    before its replacement is ready (a rollout with no room for a surge waits, and the plan says why); 1
    lets a full machine roll one replica at a time (a 1-replica deployment is then down while it restarts:
    the plan says so)."""

    max_unavailable: Count = Field(default=0, ge=0, le=1000,
                                   description="replicas that may be down at once when no GPU is free for a surge")
    drain_timeout: Duration = Field(default=30, ge=0, le=24 * 3600,
                                    description="how long requests in flight may take to finish before a "
                                                "replica is stopped (it gets no new ones meanwhile)")


class DeploymentSpec(StrictModel):
    backend: BackendName
    model: NonBlank
    served_name: Name | None = Field(default=None,
                                     description="the model name clients send; default metadata.name")
    image: NonBlank | None = Field(default=None, description="default: the backend's pinned image")
    replicas: Count = Field(default=1, ge=0, le=1000)
    resources: Resources = Field(default_factory=Resources)
    placement: Placement = Field(default_factory=Placement)
    args: list[str] = Field(default_factory=list, description="extra engine arguments")
    env: dict[EnvName, EnvValue] = Field(default_factory=dict)
    health: Health = Field(default_factory=Health)
    rollout: Rollout = Field(default_factory=Rollout)


class Deployment(StrictModel):
    api_version: Literal["lmstack.dev/v1"]
    kind: Literal["Deployment"]
    metadata: Metadata
    spec: DeploymentSpec

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def served_name(self) -> str:
        return self.spec.served_name or self.metadata.name


KINDS: dict[str, type[Worker] | type[Deployment]] = {"Worker": Worker, "Deployment": Deployment}


def json_schema() -> dict[str, object]:
    """One JSON Schema for any manifest document, for editors (yaml-language-server)."""
    worker = Worker.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
    deployment = Deployment.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
    defs: dict[str, object] = {}
    for schema in (worker, deployment):
        defs.update(schema.pop("$defs", {}))
    defs["Worker"] = worker
    defs["Deployment"] = deployment
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "lmstack manifest",
        "oneOf": [{"$ref": "#/$defs/Worker"}, {"$ref": "#/$defs/Deployment"}],
        "$defs": defs,
    }

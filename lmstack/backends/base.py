"""What a backend is: data (pinned image, port, which spec fields need a restart) and a little behaviour
(the container for a replica, when it is ready, what to do after it starts, the model name upstream).

Each engine is one small module (vllm.py, sglang.py, ollama.py, llamacpp.py) with a subclass of Backend that
overrides `engine_command` and, where the engine differs, the hooks below it. Everything here is pure:
no I/O; the executors in `lmstack.nodes` carry out what these methods describe.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lmstack.backends.container import (
    LABEL_DEPLOYMENT,
    LABEL_PORT,
    LABEL_REPLICA,
    LABEL_REVISION,
    LABEL_SERVED_NAME,
    LABEL_SPEC_HASH,
    ContainerSpec,
)
from lmstack.backends.spec import EffectiveSpec

# The Hugging Face cache inside vLLM's and SGLang's images (HF_HOME is set to it, so it holds either way).
HF_CACHE = "/root/.cache/huggingface"


@dataclass(frozen=True)
class ReplicaContext:
    """What the reconciler decided for one replica, beyond its spec: where it runs and what it is."""

    deployment: str
    ordinal: int
    served_name: str
    gpus: tuple[int, ...]  # the exact GPU indices the scheduler chose; empty: a CPU replica
    port: int  # chosen by the executor (host networking: the engine listens on it)
    model_cache: str  # host path on the worker, mounted at the engine's cache path
    revision: str | None  # the Git commit SHA the replica was created from, if known
    spec_hash: str
    # The bearer key the engine demands on its API (None: none). Only the gateway (and lmstack's readiness
    # checks) hold it, so nobody else on the network can use the engine directly.
    engine_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.ordinal < 0:
            raise ValueError(f"replica ordinal must be >= 0, not {self.ordinal}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be between 1 and 65535, not {self.port}")

    @property
    def container_name(self) -> str:
        return f"lmstack-{self.deployment}-{self.ordinal}"


@dataclass(frozen=True)
class HttpCall:
    """One HTTP request to a replica's engine (on its port), made by the executor; any 2xx is success."""

    method: str
    path: str
    json: Mapping[str, Any] | None = None
    timeout_s: float = 30.0


@dataclass(frozen=True)
class ModelDownload:
    """A model file to fetch into each worker's model cache before replicas start (`lmstack prepare`)."""

    source: str  # the reference as the manifest gives it, e.g. hf://owner/repo/file.gguf
    url: str
    path: str  # where it goes, relative to the model cache
    sha256: str | None = None  # lower-case hex; checked after the download when given


@dataclass(frozen=True)
class Backend(ABC):
    name: str
    default_image: str
    default_port: int
    # Paths in the effective spec's JSON form (camelCase, dotted) whose change needs a new container.
    restart_fields: tuple[str, ...]
    # Paths the running engine can take without a restart (e.g. Ollama pulls another model).
    in_place_fields: tuple[str, ...] = ()
    # Where the engine keeps downloaded models inside the container; the worker's model cache goes there.
    cache_path: str = HF_CACHE
    # GET this path on the replica's port to learn whether it serves its model (see is_ready).
    ready_path: str = "/v1/models"
    # When set, GET this path first: the replica is ready only if it answers 200 too (llama.cpp's
    # /health says 503 while the model loads, whatever /v1/models lists).
    health_path: str | None = None
    # The default image for a replica with GPUs, where it differs from `default_image` (a CPU build).
    default_gpu_image: str | None = None
    shm_size: str = "16g"
    # The image's own entrypoint is kept unless a backend names one.
    entrypoint: tuple[str, ...] | None = None
    # How the engine takes its API key: an environment variable (kept out of `ps` and of the command line
    # shown to users), else a command-line flag. Neither: the engine cannot require a key (Ollama).
    engine_key_env: str | None = None
    engine_key_flag: str | None = None

    @property
    def takes_engine_key(self) -> bool:
        return self.engine_key_env is not None or self.engine_key_flag is not None

    def classify(self, path: str) -> str:
        """'restart', 'in-place' or 'controller' (replicas, placement, health: no replica is touched)."""
        if _matches(path, self.restart_fields):
            return "restart"
        if _matches(path, self.in_place_fields):
            return "in-place"
        return "controller"

    # --- what each engine says differently ---------------------------------------------------------

    def image_for(self, gpus: int) -> str:
        """The pinned image a replica with `gpus` GPUs gets when the spec names none."""
        return self.default_gpu_image if gpus > 0 and self.default_gpu_image else self.default_image

    def model_download(self, spec: EffectiveSpec) -> ModelDownload | None:
        """A file `lmstack prepare` must place in the worker's model cache before a replica can start."""
        return None

    @abstractmethod
    def engine_command(self, spec: EffectiveSpec, replica: ReplicaContext) -> list[str]:
        """The engine's command line (after the image and its entrypoint), without the user's `args`."""

    def engine_env(self, spec: EffectiveSpec, replica: ReplicaContext) -> dict[str, str]:
        """Environment the engine needs from lmstack (cache location, listen address)."""
        return {}

    def upstream_model(self, spec: EffectiveSpec) -> str:
        """The `model` the gateway sends upstream: the served name, which the engine was started with."""
        return spec.served_name

    def after_start(self, spec: EffectiveSpec) -> list[HttpCall]:
        """Calls to make once the engine answers HTTP, before it can be ready (e.g. a model pull)."""
        return []

    def lists_model(self, listed: str, model: str) -> bool:
        """Whether an id in /v1/models names `model` (engines may spell it differently)."""
        return listed == model

    # --- shared -------------------------------------------------------------------------------------

    def container(self, spec: EffectiveSpec, replica: ReplicaContext, env: Mapping[str, str]) -> ContainerSpec:
        """The replica's container. `env` is the spec's env, already resolved (values may be secrets).

        The user's `args` come last so that they can override any flag lmstack sets (the engines'
        parsers keep the last value given). The environment lmstack sets wins over the user's: it must
        agree with the port and the cache mount that lmstack chose.
        """
        wanted = spec.resources.gpus
        if len(replica.gpus) != wanted:
            raise ValueError(f"{replica.container_name}: the spec asks for {wanted} GPUs but "
                             f"{len(replica.gpus)} were given ({list(replica.gpus)})")
        lmstack_env = self.engine_env(spec, replica)
        command = self.engine_command(spec, replica)
        if replica.engine_key is not None:
            if self.engine_key_env is not None:
                lmstack_env[self.engine_key_env] = replica.engine_key
            elif self.engine_key_flag is not None:
                command += [self.engine_key_flag, replica.engine_key]
            else:
                raise ValueError(f"{replica.container_name}: backend {self.name} cannot require an API key")
        if not replica.gpus:
            # A CPU replica: where Docker's default runtime is nvidia, images that say
            # NVIDIA_VISIBLE_DEVICES=all (the CUDA and Ollama images do) would otherwise see every GPU.
            lmstack_env["NVIDIA_VISIBLE_DEVICES"] = "void"
        labels = {
            LABEL_DEPLOYMENT: replica.deployment,
            LABEL_REPLICA: str(replica.ordinal),
            LABEL_SPEC_HASH: replica.spec_hash,
            LABEL_PORT: str(replica.port),
            LABEL_SERVED_NAME: replica.served_name,
        }
        if replica.revision is not None:
            labels[LABEL_REVISION] = replica.revision
        return ContainerSpec(
            name=replica.container_name,
            image=spec.image,
            command=(*command, *spec.args),
            port=replica.port,
            gpus=replica.gpus,
            env={**env, **lmstack_env},
            labels=labels,
            volumes={replica.model_cache: self.cache_path},
            shm_size=self.shm_size,
            restart_policy="unless-stopped",
            entrypoint=self.entrypoint,
        )

    def is_ready(self, status: int | None, payload: object, model: str) -> bool:
        """Whether the answer to GET `ready_path` says the engine serves `model`.

        `model` is `upstream_model(spec)`: the served name for vLLM and SGLang, the model for Ollama.
        `status` None means no HTTP answer at all. An OpenAI-style list is expected:
        `{"object": "list", "data": [{"id": "qwen-7b", ...}, ...]}`.
        """
        if status != 200 or not isinstance(payload, dict):
            return False
        data = payload.get("data")
        if not isinstance(data, list):
            return False
        return any(isinstance(item, dict) and isinstance(item.get("id"), str)
                   and self.lists_model(item["id"], model) for item in data)


def tensor_parallel(replica: ReplicaContext) -> int:
    """One replica spans its GPUs with tensor parallelism; 1 (no flag) on one GPU or on CPU."""
    return max(len(replica.gpus), 1)


def _matches(path: str, fields: tuple[str, ...]) -> bool:
    return any(path == name or path.startswith((name + ".", name + "[")) for name in fields)

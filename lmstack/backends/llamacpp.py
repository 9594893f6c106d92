"""llama.cpp's llama-server: one GGUF file per replica, on CPU or with every layer on the replica's GPUs.

The upstream images (ghcr.io/ggml-org/llama.cpp, `server-b<build>` for CPU, `server-cuda-b<build>` for
CUDA) have ENTRYPOINT ["/app/llama-server"], so the command line is the server's flags. `model` names the
file (lmstack.manifests.modelref): a path in the worker's model cache, mounted at /models; an absolute
path inside the container; or `hf://OWNER/REPO/FILE.gguf[@sha256:...]`, which `lmstack prepare` downloads
into the model cache (under hf/OWNER/REPO/) before replicas start. The engine never downloads anything.

Readiness: /health answers 200 (it says 503 while the model loads) and /v1/models lists the alias.
"""

from __future__ import annotations

from lmstack.backends.base import Backend, ModelDownload, ReplicaContext
from lmstack.backends.spec import EffectiveSpec
from lmstack.manifests.modelref import HfFile, parse_model_file

MODELS_PATH = "/models"
DEFAULT_PARALLEL = 4  # slots: requests served at once
DEFAULT_CONTEXT = 4096  # tokens, shared by the slots
ALL_LAYERS = "999"  # -ngl: more layers than any model has, so all of them go to the GPUs


def model_path(model: str) -> str:
    """Where the engine finds the model file inside the container."""
    ref = parse_model_file(model)
    if isinstance(ref, HfFile):
        return f"{MODELS_PATH}/{ref.cache_path}"
    return ref.path if not ref.in_cache else f"{MODELS_PATH}/{ref.path.strip('/')}"


class LlamaCpp(Backend):
    def engine_command(self, spec: EffectiveSpec, replica: ReplicaContext) -> list[str]:
        # -np and -c are defaults: the user's args come after them, and llama-server keeps the last value.
        command = ["-m", model_path(spec.model), "--alias", replica.served_name,
                   "--host", "0.0.0.0", "--port", str(replica.port),  # noqa: S104 - other hosts reach it
                   "-np", str(DEFAULT_PARALLEL), "-c", str(DEFAULT_CONTEXT)]
        if replica.gpus:
            command += ["-ngl", ALL_LAYERS]
        return command

    def model_download(self, spec: EffectiveSpec) -> ModelDownload | None:
        ref = parse_model_file(spec.model)
        if not isinstance(ref, HfFile):
            return None
        return ModelDownload(source=spec.model, url=ref.url(), path=ref.cache_path, sha256=ref.sha256)


BACKEND = LlamaCpp(
    name="llamacpp",
    default_image="ghcr.io/ggml-org/llama.cpp:server-b10133",
    default_gpu_image="ghcr.io/ggml-org/llama.cpp:server-cuda-b10133",
    default_port=8080,
    restart_fields=("backend", "image", "model", "servedName", "args", "env", "resources.gpus",
                    "resources.gpuMemory"),
    cache_path=MODELS_PATH,
    health_path="/health",
    shm_size="1g",
    engine_key_env="LLAMA_API_KEY",
)

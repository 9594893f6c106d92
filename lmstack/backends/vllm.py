"""vLLM: one container per replica, tensor parallel over the replica's GPUs.

The official image (vllm/vllm-openai) has ENTRYPOINT ["vllm", "serve"], so the command line starts with
the model (positional) and then `vllm serve`'s flags. A CPU build (`resources.gpus: 0` with `image` set)
takes the same command line.
"""

from __future__ import annotations

from lmstack.backends.base import HF_CACHE, Backend, ReplicaContext, tensor_parallel
from lmstack.backends.spec import EffectiveSpec


class Vllm(Backend):
    def engine_command(self, spec: EffectiveSpec, replica: ReplicaContext) -> list[str]:
        command = [spec.model, "--served-model-name", replica.served_name,
                   "--host", "0.0.0.0", "--port", str(replica.port)]  # noqa: S104 - other hosts reach it
        if tensor_parallel(replica) > 1:
            command += ["--tensor-parallel-size", str(tensor_parallel(replica))]
        # resources.gpuMemory is a placement requirement (free memory on a GPU the replica has to
        # itself), not a budget: --gpu-memory-utilization is left to the engine's default or to `args`.
        return command

    def engine_env(self, spec: EffectiveSpec, replica: ReplicaContext) -> dict[str, str]:
        return {"HF_HOME": HF_CACHE}


BACKEND = Vllm(
    name="vllm",
    default_image="vllm/vllm-openai:v0.11.0",
    default_port=8000,
    restart_fields=("backend", "image", "model", "servedName", "args", "env", "resources.gpus",
                    "resources.gpuMemory"),
    engine_key_env="VLLM_API_KEY",
)

"""SGLang: one container per replica, tensor parallel over the replica's GPUs.

The official image (lmsysorg/sglang) sets no server entrypoint of its own (the CUDA base image's
entrypoint runs the command it is given), so the command is the server module itself, as in SGLang's
documented `docker run ... lmsysorg/sglang python3 -m sglang.launch_server --model-path ...`.
"""

from __future__ import annotations

from lmstack.backends.base import HF_CACHE, Backend, ReplicaContext, tensor_parallel
from lmstack.backends.spec import EffectiveSpec


class Sglang(Backend):
    def engine_command(self, spec: EffectiveSpec, replica: ReplicaContext) -> list[str]:
        command = ["python3", "-m", "sglang.launch_server", "--model-path", spec.model,
                   "--served-model-name", replica.served_name,
                   "--host", "0.0.0.0", "--port", str(replica.port)]  # noqa: S104 - other hosts reach it
        if tensor_parallel(replica) > 1:
            command += ["--tp-size", str(tensor_parallel(replica))]
        # resources.gpuMemory is a placement requirement, not a budget; --mem-fraction-static counts only
        # weights and KV cache, so it cannot be derived from it honestly: leave it to `args`.
        return command

    def engine_env(self, spec: EffectiveSpec, replica: ReplicaContext) -> dict[str, str]:
        return {"HF_HOME": HF_CACHE}


BACKEND = Sglang(
    name="sglang",
    default_image="lmsysorg/sglang:v0.5.3-cu126",
    default_port=30000,
    restart_fields=("backend", "image", "model", "servedName", "args", "env", "resources.gpus",
                    "resources.gpuMemory"),
    engine_key_flag="--api-key",
)

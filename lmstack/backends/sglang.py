"""SGLang: one container per replica, tensor parallel over the replica's GPUs."""

from lmstack.backends.base import Backend

BACKEND = Backend(
    name="sglang",
    default_image="lmsysorg/sglang:v0.5.3-cu126",
    default_port=30000,
    restart_fields=("backend", "image", "model", "servedName", "args", "env", "resources.gpus",
                    "resources.gpuMemory"),
)

"""vLLM: one container per replica, tensor parallel over the replica's GPUs."""

from lmstack.backends.base import Backend

BACKEND = Backend(
    name="vllm",
    default_image="vllm/vllm-openai:v0.11.0",
    default_port=8000,
    restart_fields=("backend", "image", "model", "servedName", "args", "env", "resources.gpus",
                    "resources.gpuMemory"),
)

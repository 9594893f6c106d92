"""Ollama: the engine pulls models at run time, so a model change needs a pull, not a new container."""

from lmstack.backends.base import Backend

BACKEND = Backend(
    name="ollama",
    default_image="ollama/ollama:0.12.6",
    default_port=11434,
    restart_fields=("backend", "image", "args", "env", "resources.gpus"),
    in_place_fields=("model", "servedName", "resources.gpuMemory"),
)

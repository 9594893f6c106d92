"""Ollama: the engine pulls models at run time, so a model change needs a pull, not a new container.

The official image (ollama/ollama) has ENTRYPOINT ["/bin/ollama"] and CMD ["serve"]; the listen address
comes from OLLAMA_HOST, and models live under /root/.ollama. Ollama serves the model under its own name
(`phi3` is listed as `phi3:latest`), so the gateway sends the model, not the served name, upstream.

Ollama has no API key option, so unlike the other engines its port answers anyone who can reach the worker:
allow only the lmstack host to reach the workers' engine ports (README, "Security model").
"""

from __future__ import annotations

from lmstack.backends.base import Backend, HttpCall, ReplicaContext
from lmstack.backends.spec import EffectiveSpec

_REGISTRY_PREFIXES = ("registry.ollama.ai/library/", "registry.ollama.ai/")


class Ollama(Backend):
    def engine_command(self, spec: EffectiveSpec, replica: ReplicaContext) -> list[str]:
        return ["serve"]

    def engine_env(self, spec: EffectiveSpec, replica: ReplicaContext) -> dict[str, str]:
        return {"OLLAMA_HOST": f"0.0.0.0:{replica.port}"}

    def upstream_model(self, spec: EffectiveSpec) -> str:
        return spec.model

    def after_start(self, spec: EffectiveSpec) -> list[HttpCall]:
        # Blocking pull (stream false: one JSON answer, {"status": "success"}); a big model may take
        # as long as the replica is allowed to take to start.
        return [HttpCall("POST", "/api/pull", {"model": spec.model, "stream": False},
                         float(spec.health.startup_timeout))]

    def lists_model(self, listed: str, model: str) -> bool:
        return _canonical(listed) == _canonical(model)


def _canonical(name: str) -> str:
    """`phi3`, `phi3:latest` and `registry.ollama.ai/library/phi3:latest` are one model (case aside)."""
    name = name.strip().casefold()
    for prefix in _REGISTRY_PREFIXES:
        if name.startswith(prefix):
            name = name.removeprefix(prefix)
            break
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


BACKEND = Ollama(
    name="ollama",
    default_image="ollama/ollama:0.12.6",
    default_port=11434,
    restart_fields=("backend", "image", "args", "env", "resources.gpus"),
    in_place_fields=("model", "servedName", "resources.gpuMemory"),
    cache_path="/root/.ollama",
    shm_size="1g",
)

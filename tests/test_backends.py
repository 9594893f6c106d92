"""Backends: the exact container (as its `docker run` line) each engine gets for a replica, readiness on
real-shaped /v1/models answers, Ollama's model pull, the model name sent upstream, the registry, the
`resources.gpus: 0` rule and `lmstack plan --show-commands` (render_commands), with each worker's Docker endpoint
and each container's mounts (plan_reach)."""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest
from rich.console import Console

from lmstack.backends import (
    BACKENDS,
    EffectiveSpec,
    HttpCall,
    ModelDownload,
    ReplicaContext,
    backend_for,
    effective_spec,
    normalize_applied,
    spec_hash,
)
from lmstack.backends.base import Backend
from lmstack.backends.container import (
    LABEL_DEPLOYMENT,
    LABEL_PORT,
    LABEL_REPLICA,
    LABEL_REVISION,
    LABEL_SERVED_NAME,
    LABEL_SPEC_HASH,
    ContainerSpec,
)
from lmstack.cli.render import plan_document, plan_reach, render_commands, render_plan
from lmstack.manifests import ManifestValidationError, load_manifests
from lmstack.manifests.policy import PushLimits
from lmstack.manifests.schema import BACKEND_NAMES, GPU_REQUIRED_BACKENDS, BackendName, DeploymentSpec
from lmstack.reconcile.access import WorkerAccess
from lmstack.reconcile.model import Action, ActionKind, Placement, Plan

SHA = "4f1c2e0b9d8a7c6b5e4f3a2b1c0d9e8f7a6b5c4d"
CACHE = "/var/lib/lmstack/models"
SECRET = "hf_s3cr3t-value-never-shown"


def _spec(name: str, **fields: Any) -> EffectiveSpec:
    return effective_spec(name, DeploymentSpec.model_validate(fields))


def _replica(spec: EffectiveSpec, *, gpus: tuple[int, ...], port: int | None = None, ordinal: int = 0,
             revision: str | None = SHA) -> ReplicaContext:
    return ReplicaContext(
        deployment=spec.served_name, ordinal=ordinal,
        served_name=spec.served_name, gpus=gpus, port=port or backend_for(spec.backend).default_port,
        model_cache=CACHE, revision=revision, spec_hash=spec_hash(spec),
    )


def _container(spec: EffectiveSpec, replica: ReplicaContext, env: dict[str, str] | None = None) -> ContainerSpec:
    return backend_for(spec.backend).container(spec, replica, env if env is not None else {})


# --- vLLM ----------------------------------------------------------------------------------------------


def test_vllm_one_gpu() -> None:
    spec = _spec("qwen-7b", backend="vllm", model="Qwen/Qwen2.5-7B-Instruct",
                 resources={"gpus": 1, "gpuMemory": "24Gi"},
                 args=["--max-model-len", "8192", "--enable-prefix-caching"],
                 env={"HF_TOKEN": {"fromEnv": "LMSTACK_SECRET_HF_TOKEN"}, "VLLM_LOGGING_LEVEL": "DEBUG"})
    replica = _replica(spec, gpus=(3,), port=8001)
    container = _container(spec, replica, {"HF_TOKEN": SECRET, "VLLM_LOGGING_LEVEL": "DEBUG"})
    assert container.docker_run() == (
        "docker run -d --name lmstack-qwen-7b-0 --network host --restart unless-stopped --shm-size 16g --init "
        '--gpus "device=3" -v /var/lib/lmstack/models:/root/.cache/huggingface '
        "-e HF_HOME -e HF_TOKEN -e VLLM_LOGGING_LEVEL "
        f"--label lmstack.deployment=qwen-7b --label lmstack.port=8001 --label lmstack.replica=0 "
        f"--label lmstack.revision={SHA} --label lmstack.served-name=qwen-7b "
        f"--label lmstack.spec-hash={spec_hash(spec)} "
        "vllm/vllm-openai:v0.11.0 "
        "Qwen/Qwen2.5-7B-Instruct --served-model-name qwen-7b --host 0.0.0.0 --port 8001 "
        "--max-model-len 8192 --enable-prefix-caching"
    )
    assert SECRET not in container.docker_run()
    # The container itself carries the values (the executor passes them to Docker).
    assert container.env == {"HF_TOKEN": SECRET, "VLLM_LOGGING_LEVEL": "DEBUG",
                             "HF_HOME": "/root/.cache/huggingface"}
    assert container.entrypoint is None  # the image's own: ["vllm", "serve"]
    assert container.gpus == (3,)
    assert container.port == 8001
    assert container.restart_policy == "unless-stopped"
    assert container.volumes == {CACHE: "/root/.cache/huggingface"}
    assert container.labels == {
        LABEL_DEPLOYMENT: "qwen-7b", LABEL_REPLICA: "0", LABEL_SPEC_HASH: spec_hash(spec),
        LABEL_REVISION: SHA, LABEL_PORT: "8001", LABEL_SERVED_NAME: "qwen-7b",
    }


def test_vllm_two_gpus_is_tensor_parallel_and_args_come_last() -> None:
    spec = _spec("qwen-72b", backend="vllm", model="Qwen/Qwen2.5-72B-Instruct-AWQ", servedName="qwen",
                 image="vllm/vllm-openai:v0.10.2", resources={"gpus": 2},
                 args=["--quantization", "awq", "--gpu-memory-utilization", "0.85", "--port", "9000"])
    replica = ReplicaContext(deployment="qwen-72b", ordinal=1, served_name="qwen", gpus=(2, 5), port=8000,
                             model_cache="/data/models", revision=None, spec_hash="abc123")
    assert _container(spec, replica).docker_run() == (
        "docker run -d --name lmstack-qwen-72b-1 --network host --restart unless-stopped --shm-size 16g --init "
        '--gpus "device=2,5" -v /data/models:/root/.cache/huggingface -e HF_HOME '
        "--label lmstack.deployment=qwen-72b --label lmstack.port=8000 --label lmstack.replica=1 "
        "--label lmstack.served-name=qwen --label lmstack.spec-hash=abc123 "
        "vllm/vllm-openai:v0.10.2 "
        "Qwen/Qwen2.5-72B-Instruct-AWQ --served-model-name qwen --host 0.0.0.0 --port 8000 "
        "--tensor-parallel-size 2 "
        # The user's args last: the engine keeps the last value, so they override (here even the port).
        "--quantization awq --gpu-memory-utilization 0.85 --port 9000"
    )
    assert LABEL_REVISION not in _container(spec, replica).labels  # no revision known: no label


def test_vllm_cpu_build_with_the_standin_image() -> None:
    """The test suite's stand-in engine runs as a `backend: vllm` deployment with gpus 0."""
    spec = _spec("standin", backend="vllm", model="standin-model", image="lmstack-standin:test",
                 resources={"gpus": 0})
    container = _container(spec, _replica(spec, gpus=(), port=18000))
    assert container.docker_run() == (
        "docker run -d --name lmstack-standin-0 --network host --restart unless-stopped --shm-size 16g --init "
        "-v /var/lib/lmstack/models:/root/.cache/huggingface -e HF_HOME -e NVIDIA_VISIBLE_DEVICES "
        "--label lmstack.deployment=standin --label lmstack.port=18000 --label lmstack.replica=0 "
        f"--label lmstack.revision={SHA} --label lmstack.served-name=standin "
        f"--label lmstack.spec-hash={spec_hash(spec)} "
        "lmstack-standin:test standin-model --served-model-name standin --host 0.0.0.0 --port 18000"
    )
    assert container.gpus == ()
    # Where nvidia is Docker's default runtime, a CPU replica must still see no GPU.
    assert container.env["NVIDIA_VISIBLE_DEVICES"] == "void"

    from testbed.standin import parse_args  # the stand-in takes the engines' command-line shape

    parsed = parse_args(list(container.command))
    assert (parsed.model, parsed.served_model_names, parsed.host, parsed.port) == (
        "standin-model", ["standin"], "0.0.0.0", 18000)


# --- SGLang --------------------------------------------------------------------------------------------


def test_sglang_two_gpus() -> None:
    spec = _spec("llama", backend="sglang", model="meta-llama/Llama-3.1-8B-Instruct", resources={"gpus": 2},
                 args=["--mem-fraction-static", "0.8", "--context-length", "32768"],
                 env={"HF_TOKEN": {"fromFile": "hf-token"}})
    replica = _replica(spec, gpus=(0, 1))
    assert _container(spec, replica, {"HF_TOKEN": SECRET}).docker_run() == (
        "docker run -d --name lmstack-llama-0 --network host --restart unless-stopped --shm-size 16g --init "
        '--gpus "device=0,1" -v /var/lib/lmstack/models:/root/.cache/huggingface -e HF_HOME -e HF_TOKEN '
        "--label lmstack.deployment=llama --label lmstack.port=30000 --label lmstack.replica=0 "
        f"--label lmstack.revision={SHA} --label lmstack.served-name=llama "
        f"--label lmstack.spec-hash={spec_hash(spec)} "
        "lmsysorg/sglang:v0.5.3-cu126 "
        "python3 -m sglang.launch_server --model-path meta-llama/Llama-3.1-8B-Instruct "
        "--served-model-name llama --host 0.0.0.0 --port 30000 --tp-size 2 "
        "--mem-fraction-static 0.8 --context-length 32768"
    )


def test_sglang_one_gpu_has_no_tensor_parallel_flag() -> None:
    spec = _spec("llama", backend="sglang", model="meta-llama/Llama-3.1-8B-Instruct")
    container = _container(spec, _replica(spec, gpus=(7,), port=30001))
    assert container.command == ("python3", "-m", "sglang.launch_server",
                                 "--model-path", "meta-llama/Llama-3.1-8B-Instruct",
                                 "--served-model-name", "llama", "--host", "0.0.0.0", "--port", "30001")
    assert container.env == {"HF_HOME": "/root/.cache/huggingface"}
    assert container.entrypoint is None


# --- Ollama --------------------------------------------------------------------------------------------


def test_ollama_on_cpu() -> None:
    spec = _spec("phi", backend="ollama", model="phi3:3.8b", resources={"gpus": 0},
                 env={"OLLAMA_KEEP_ALIVE": "24h", "OLLAMA_HOST": "127.0.0.1:1"})
    container = _container(spec, _replica(spec, gpus=(), port=11500),
                           {"OLLAMA_KEEP_ALIVE": "24h", "OLLAMA_HOST": "127.0.0.1:1"})
    assert container.docker_run() == (
        "docker run -d --name lmstack-phi-0 --network host --restart unless-stopped --shm-size 1g --init "
        "-v /var/lib/lmstack/models:/root/.ollama -e NVIDIA_VISIBLE_DEVICES -e OLLAMA_HOST -e OLLAMA_KEEP_ALIVE "
        "--label lmstack.deployment=phi --label lmstack.port=11500 --label lmstack.replica=0 "
        f"--label lmstack.revision={SHA} --label lmstack.served-name=phi "
        f"--label lmstack.spec-hash={spec_hash(spec)} "
        "ollama/ollama:0.12.6 serve"
    )
    # The listen address follows the port lmstack chose, whatever the user's env says.
    assert container.env == {"OLLAMA_KEEP_ALIVE": "24h", "OLLAMA_HOST": "0.0.0.0:11500",
                             "NVIDIA_VISIBLE_DEVICES": "void"}


def test_ollama_with_gpus_has_no_tensor_parallel_flag() -> None:
    spec = _spec("llama-70b", backend="ollama", model="llama3.1:70b", resources={"gpus": 2})
    container = _container(spec, _replica(spec, gpus=(0, 1)))
    assert container.command == ("serve",)
    assert container.gpus == (0, 1)
    assert container.env == {"OLLAMA_HOST": "0.0.0.0:11434"}
    assert '--gpus "device=0,1"' in container.docker_run()


def test_ollama_pulls_its_model_after_start() -> None:
    spec = _spec("phi", backend="ollama", model="phi3", health={"startupTimeout": "1h"})
    assert backend_for("ollama").after_start(spec) == [
        HttpCall(method="POST", path="/api/pull", json={"model": "phi3", "stream": False}, timeout_s=3600.0)]
    # The default startup timeout (20m) bounds a pull too.
    default = _spec("phi", backend="ollama", model="phi3")
    assert backend_for("ollama").after_start(default)[0].timeout_s == 1200.0
    for name in ("vllm", "sglang"):
        assert backend_for(name).after_start(_spec("m", backend=name, model="m")) == []


def test_upstream_model() -> None:
    assert backend_for("vllm").upstream_model(
        _spec("qwen-7b", backend="vllm", model="Qwen/Qwen2.5-7B-Instruct", servedName="qwen")) == "qwen"
    assert backend_for("sglang").upstream_model(_spec("llama", backend="sglang", model="meta/llama")) == "llama"
    # Ollama serves a model under its own name: the gateway must send that, not the served name.
    assert backend_for("ollama").upstream_model(
        _spec("phi", backend="ollama", model="phi3:3.8b", servedName="chat")) == "phi3:3.8b"


# --- llama.cpp -----------------------------------------------------------------------------------------


def test_llamacpp_on_cpu_with_a_file_in_the_model_cache() -> None:
    spec = _spec("smollm2", backend="llamacpp", model="smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                 resources={"gpus": 0}, args=["-c", "2048", "--temp", "0"])
    container = _container(spec, _replica(spec, gpus=(), port=8081))
    assert container.docker_run() == (
        "docker run -d --name lmstack-smollm2-0 --network host --restart unless-stopped --shm-size 1g --init "
        "-v /var/lib/lmstack/models:/models -e NVIDIA_VISIBLE_DEVICES "
        "--label lmstack.deployment=smollm2 --label lmstack.port=8081 --label lmstack.replica=0 "
        f"--label lmstack.revision={SHA} --label lmstack.served-name=smollm2 "
        f"--label lmstack.spec-hash={spec_hash(spec)} "
        "ghcr.io/ggml-org/llama.cpp:server-b10133 "  # the CPU build: no GPUs, no -ngl
        "-m /models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --alias smollm2 --host 0.0.0.0 --port 8081 "
        "-np 4 -c 4096 "
        "-c 2048 --temp 0"  # the user's args last: llama-server keeps the last -c
    )
    assert container.entrypoint is None  # the image's own: /app/llama-server
    assert container.env == {"NVIDIA_VISIBLE_DEVICES": "void"}
    assert backend_for("llamacpp").upstream_model(spec) == "smollm2"
    assert backend_for("llamacpp").after_start(spec) == []
    assert backend_for("llamacpp").model_download(spec) is None  # already in the cache: nothing to fetch


def test_llamacpp_with_gpus_and_a_hugging_face_file() -> None:
    digest = "ab" * 32
    spec = _spec("qwen", backend="llamacpp", servedName="qwen-small", resources={"gpus": 2},
                 model=f"hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf@sha256:{digest}")
    container = _container(spec, _replica(spec, gpus=(1, 3)))
    assert container.image == "ghcr.io/ggml-org/llama.cpp:server-cuda-b10133"  # GPUs: the CUDA build
    assert container.command == (
        "-m", "/models/hf/Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf",
        "--alias", "qwen-small", "--host", "0.0.0.0", "--port", "8080", "-np", "4", "-c", "4096",
        "-ngl", "999")  # every layer on the replica's GPUs
    assert container.gpus == (1, 3) and container.env == {}
    assert container.volumes == {CACHE: "/models"}
    assert backend_for("llamacpp").model_download(spec) == ModelDownload(
        source=f"hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf@sha256:{digest}",
        url="https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/main/qwen2.5-0.5b-instruct-q4_k_m.gguf",
        path="hf/Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf", sha256=digest)
    # An image the spec names wins, with GPUs or without; an absolute model path is the container's own.
    own = _spec("own", backend="llamacpp", model="/opt/model.gguf", image="llama:local", resources={"gpus": 1})
    assert _container(own, _replica(own, gpus=(0,))).command[:2] == ("-m", "/opt/model.gguf")
    assert _container(own, _replica(own, gpus=(0,))).image == "llama:local"


def test_llamacpp_is_ready_only_when_healthy_and_listing_its_alias() -> None:
    llamacpp = backend_for("llamacpp")
    assert (llamacpp.health_path, llamacpp.ready_path) == ("/health", "/v1/models")
    assert {name for name, backend in BACKENDS.items() if backend.health_path} == {"llamacpp"}
    listed = {"object": "list", "data": [{"id": "smollm2", "object": "model", "owned_by": "llamacpp"}]}
    assert llamacpp.is_ready(200, listed, "smollm2")
    assert not llamacpp.is_ready(200, listed, "other")
    assert not llamacpp.is_ready(503, {"error": {"code": 503, "message": "Loading model"}}, "smollm2")


def test_llamacpp_runs_on_cpu_with_its_default_image_and_checks_its_model() -> None:
    state = load_manifests({"d.yaml": _deployment("{backend: llamacpp, model: m.gguf, resources: {gpus: 0}}")},
                           inventory_hosts=None)
    assert effective_spec("d", state.deployments["d"].spec).image == "ghcr.io/ggml-org/llama.cpp:server-b10133"
    with pytest.raises(ManifestValidationError) as info:
        load_manifests({"d.yaml": _deployment("{backend: llamacpp, model: 'hf://just-a-repo/x', "
                                              "resources: {gpus: 0}}")}, inventory_hosts=None)
    assert [str(error) for error in info.value.errors] == [
        "d.yaml:4: spec.model: backend llamacpp takes one model file: 'hf://just-a-repo/x' is not a Hugging "
        "Face file: use hf://OWNER/REPO/FILE.gguf"]


# --- readiness -----------------------------------------------------------------------------------------

VLLM_MODELS = {"object": "list", "data": [{
    "id": "qwen-7b", "object": "model", "created": 1730000000, "owned_by": "vllm",
    "root": "Qwen/Qwen2.5-7B-Instruct", "parent": None, "max_model_len": 32768,
    "permission": [{"id": "modelperm-1", "object": "model_permission", "created": 1730000000,
                    "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                    "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                    "organization": "*", "group": None, "is_blocking": False}],
}]}
SGLANG_MODELS = {"object": "list", "data": [
    {"id": "llama", "object": "model", "created": 1730000000, "owned_by": "sglang", "root": "llama",
     "max_model_len": 131072}]}
OLLAMA_MODELS = {"object": "list", "data": [
    {"id": "nomic-embed-text:latest", "object": "model", "created": 1730000000, "owned_by": "library"},
    {"id": "phi3:latest", "object": "model", "created": 1730000100, "owned_by": "library"}]}
NOT_READY = {"object": "error", "message": "Service Unavailable", "type": "ServiceUnavailableError",
             "code": 503}


def test_ready_path() -> None:
    assert {name: backend.ready_path for name, backend in BACKENDS.items()} == {
        "vllm": "/v1/models", "sglang": "/v1/models", "ollama": "/v1/models", "llamacpp": "/v1/models"}


@pytest.mark.parametrize(("backend", "status", "payload", "model", "ready"), [
    ("vllm", 200, VLLM_MODELS, "qwen-7b", True),
    ("vllm", 200, VLLM_MODELS, "Qwen/Qwen2.5-7B-Instruct", False),  # served under its served name only
    ("vllm", 200, VLLM_MODELS, "qwen-14b", False),
    ("vllm", 503, NOT_READY, "qwen-7b", False),
    ("vllm", 503, VLLM_MODELS, "qwen-7b", False),
    ("vllm", None, None, "qwen-7b", False),  # no HTTP answer (still loading, connection refused)
    ("vllm", 0, None, "qwen-7b", False),
    ("vllm", 200, {"object": "list", "data": []}, "qwen-7b", False),
    ("vllm", 200, None, "qwen-7b", False),  # not JSON
    ("vllm", 200, ["qwen-7b"], "qwen-7b", False),
    ("vllm", 200, {"data": "qwen-7b"}, "qwen-7b", False),
    ("vllm", 200, {"data": [{"name": "qwen-7b"}, "qwen-7b", {"id": 7}]}, "qwen-7b", False),
    ("sglang", 200, SGLANG_MODELS, "llama", True),
    ("sglang", 200, SGLANG_MODELS, "qwen-7b", False),
    ("sglang", 503, NOT_READY, "llama", False),
    # Ollama: listed by its own model name, once the pull is done.
    ("ollama", 200, OLLAMA_MODELS, "phi3", True),
    ("ollama", 200, OLLAMA_MODELS, "phi3:latest", True),
    ("ollama", 200, OLLAMA_MODELS, "PHI3", True),
    ("ollama", 200, OLLAMA_MODELS, "registry.ollama.ai/library/phi3:latest", True),
    ("ollama", 200, OLLAMA_MODELS, "phi3:3.8b", False),
    ("ollama", 200, OLLAMA_MODELS, "llama3.1", False),
    ("ollama", 200, {"object": "list", "data": []}, "phi3", False),  # started, pull not done
    ("ollama", 503, NOT_READY, "phi3", False),
])
def test_is_ready(backend: str, status: int | None, payload: object, model: str, ready: bool) -> None:
    assert backend_for(backend).is_ready(status, payload, model) is ready


def test_ollama_names_with_namespaces_and_tags() -> None:
    payload = {"object": "list", "data": [{"id": "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"},
                                          {"id": "someuser/mymodel:latest"}]}
    ollama = backend_for("ollama")
    assert ollama.is_ready(200, payload, "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M")
    assert ollama.is_ready(200, payload, "someuser/mymodel")
    assert not ollama.is_ready(200, payload, "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF")
    assert not ollama.is_ready(200, payload, "mymodel")


# --- the replica context and the spec it is given --------------------------------------------------------


def test_gpu_count_must_match_the_spec() -> None:
    spec = _spec("qwen-7b", backend="vllm", model="m", resources={"gpus": 2})
    with pytest.raises(ValueError, match=r"lmstack-qwen-7b-0: the spec asks for 2 GPUs but 1 were given \(\[0\]\)"):
        _container(spec, _replica(spec, gpus=(0,)))


@pytest.mark.parametrize(("ordinal", "port", "message"), [
    (-1, 8000, "ordinal must be >= 0"), (0, 0, "port must be between 1 and 65535"),
    (0, 65536, "port must be between 1 and 65535")])
def test_replica_context_is_checked(ordinal: int, port: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReplicaContext(deployment="d", ordinal=ordinal, served_name="d", gpus=(), port=port,
                       model_cache=CACHE, revision=None, spec_hash="h")


def test_a_stored_spec_builds_the_same_container() -> None:
    """The executor may build from a spec read back from the database (JSON): same container."""
    spec = _spec("qwen-7b", backend="vllm", model="Qwen/Qwen2.5-7B-Instruct", resources={"gpus": 2},
                 args=["--max-model-len", "8192"], env={"A": "1"})
    stored = normalize_applied("qwen-7b", json.loads(json.dumps(spec.to_json())))
    assert stored is not None
    replica = _replica(spec, gpus=(0, 1))
    assert _container(stored, replica, {"A": "1"}) == _container(spec, replica, {"A": "1"})


# --- registry and schema agree ---------------------------------------------------------------------------


def test_registry_and_schema_names_agree() -> None:
    assert set(BACKENDS) == set(BACKEND_NAMES) == set(typing.get_args(BackendName))
    assert GPU_REQUIRED_BACKENDS.issubset(BACKENDS)
    for name, backend in BACKENDS.items():
        assert isinstance(backend, Backend)
        assert backend.name == name
        assert backend_for(name) is backend


def test_default_images_are_pinned() -> None:
    images = {name: backend.default_image for name, backend in BACKENDS.items()}
    assert images == {"vllm": "vllm/vllm-openai:v0.11.0", "sglang": "lmsysorg/sglang:v0.5.3-cu126",
                      "ollama": "ollama/ollama:0.12.6", "llamacpp": "ghcr.io/ggml-org/llama.cpp:server-b10133"}
    ports = {name: backend.default_port for name, backend in BACKENDS.items()}
    assert ports == {"vllm": 8000, "sglang": 30000, "ollama": 11434, "llamacpp": 8080}


def test_declared_fields_are_effective_spec_paths() -> None:
    for name, backend in BACKENDS.items():
        spec = _spec("d", backend=name, model="m", resources={"gpus": 1, "gpuMemory": "1Gi"}).to_json()
        for path in (*backend.restart_fields, *backend.in_place_fields):
            value: Any = spec
            for part in path.split("."):
                assert isinstance(value, dict) and part in value, f"{name}: {path} is not in the effective spec"
                value = value[part]
        assert not set(backend.restart_fields) & set(backend.in_place_fields)
    assert BACKENDS["ollama"].classify("model") == "in-place"
    assert BACKENDS["vllm"].classify("model") == "restart"


# --- resources.gpus: 0 -----------------------------------------------------------------------------------


def _deployment(spec: str) -> str:
    return f"apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {{name: d}}\nspec: {spec}\n"


@pytest.mark.parametrize("backend", sorted(GPU_REQUIRED_BACKENDS))
def test_gpus_zero_needs_an_image_for_gpu_built_defaults(backend: str) -> None:
    with pytest.raises(ManifestValidationError) as info:
        load_manifests({"d.yaml": _deployment(f"{{backend: {backend}, model: m, resources: {{gpus: 0}}}}")},
                       inventory_hosts=None)
    assert [str(error) for error in info.value.errors] == [
        f"d.yaml:4: spec.resources.gpus: backend {backend}'s default image needs GPUs; set spec.image to a "
        "CPU build to run with gpus: 0"]
    state = load_manifests({"d.yaml": _deployment(
        f"{{backend: {backend}, model: m, image: 'lmstack-standin:test', resources: {{gpus: 0}}}}")},
        inventory_hosts=None)
    assert state.deployments["d"].spec.resources.gpus == 0


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_gpus_one_or_more_needs_no_image(backend: str) -> None:
    state = load_manifests({"d.yaml": _deployment(f"{{backend: {backend}, model: m, resources: {{gpus: 1}}}}")},
                           inventory_hosts=None)
    assert state.deployments["d"].spec.image is None


def test_ollama_runs_on_cpu_with_its_default_image() -> None:
    state = load_manifests({"d.yaml": _deployment("{backend: ollama, model: phi3, resources: {gpus: 0}}")},
                           inventory_hosts=None)
    assert effective_spec("d", state.deployments["d"].spec).image == "ollama/ollama:0.12.6"


# --- render_commands (lmstack plan --show-commands) ------------------------------------------------------

FLEET = """\
apiVersion: lmstack.dev/v1
kind: Worker
metadata: {name: gpu-a}
spec: {host: gpu-a, modelCache: /data/models}
---
apiVersion: lmstack.dev/v1
kind: Worker
metadata: {name: gpu-b}
spec: {host: gpu-b}
---
apiVersion: lmstack.dev/v1
kind: Deployment
metadata: {name: qwen-7b}
spec:
  backend: vllm
  model: Qwen/Qwen2.5-7B-Instruct
  replicas: 2
  resources: {gpus: 2}
  args: ["--max-model-len", "8192"]
  env: {HF_TOKEN: {fromEnv: LMSTACK_SECRET_TEST_UNSET}, PLAIN: "visible-value-not-shown"}
---
apiVersion: lmstack.dev/v1
kind: Deployment
metadata: {name: phi}
spec: {backend: ollama, model: phi3, resources: {gpus: 0}}
"""


def _plan() -> tuple[Plan, Any]:
    # gpu-a's /data/models is allowed by the operator here (the default root is /var/lib/lmstack only).
    desired = load_manifests({"fleet.yaml": FLEET}, inventory_hosts=None,
                             limits=PushLimits(mount_roots=("/var/lib/lmstack", "/data")))
    qwen = effective_spec("qwen-7b", desired.deployments["qwen-7b"].spec)
    return Plan(actions=(
        Action(ActionKind.CREATE, "qwen-7b", 0, "new replica", Placement("gpu-a", (0, 1)),
               spec_hash=spec_hash(qwen)),
        Action(ActionKind.RECREATE, "qwen-7b", 1, "spec changed: args", Placement("gpu-b", (2, 3)),
               Placement("gpu-b", (2, 3)), spec_hash=spec_hash(qwen)),
        Action(ActionKind.NOOP, "phi", 0, "up to date", Placement("gpu-b", ()), Placement("gpu-b", ())),
        Action(ActionKind.DELETE, "old", 0, "deployment removed", None, Placement("gpu-a", (4,))),
        Action(ActionKind.CREATE, "phi", 1, "scale up 1 -> 2", Placement("gpu-a", ())),
    )), desired


def test_render_commands() -> None:
    plan, desired = _plan()
    qwen_hash = spec_hash(effective_spec("qwen-7b", desired.deployments["qwen-7b"].spec))
    phi_hash = spec_hash(effective_spec("phi", desired.deployments["phi"].spec))
    qwen = ("docker run -d --name lmstack-qwen-7b-{n} --network host --restart unless-stopped --shm-size 16g --init "
            '--gpus "device={gpus}" -v {cache}:/root/.cache/huggingface -e HF_HOME -e HF_TOKEN -e PLAIN '
            "--label lmstack.deployment=qwen-7b --label lmstack.port=8000 --label lmstack.replica={n} "
            f"--label lmstack.served-name=qwen-7b --label lmstack.spec-hash={qwen_hash} "
            "vllm/vllm-openai:v0.11.0 Qwen/Qwen2.5-7B-Instruct --served-model-name qwen-7b --host 0.0.0.0 "
            "--port 8000 --tensor-parallel-size 2 --max-model-len 8192")
    assert render_commands(plan, desired) == [
        ("qwen-7b/0", qwen.format(n=0, gpus="0,1", cache="/data/models")),  # the worker's modelCache
        ("qwen-7b/1", qwen.format(n=1, gpus="2,3", cache="/var/lib/lmstack/models")),  # the default
        ("phi/1", "docker run -d --name lmstack-phi-1 --network host --restart unless-stopped --shm-size 1g --init "
                  "-v /data/models:/root/.ollama -e NVIDIA_VISIBLE_DEVICES -e OLLAMA_HOST "
                  "--label lmstack.deployment=phi --label lmstack.port=11434 --label lmstack.replica=1 "
                  f"--label lmstack.served-name=phi --label lmstack.spec-hash={phi_hash} "
                  "ollama/ollama:0.12.6 serve"),
    ]
    text = "\n".join(line for _, line in render_commands(plan, desired))
    assert "visible-value-not-shown" not in text and "LMSTACK_SECRET_TEST_UNSET" not in text


def test_render_commands_model_cache_callable() -> None:
    plan, desired = _plan()
    lines = render_commands(plan, desired, model_cache=lambda worker: f"/mnt/{worker}/cache")
    assert [line.split(" -v ")[1].split(" ")[0] for _, line in lines] == [
        "/mnt/gpu-a/cache:/root/.cache/huggingface", "/mnt/gpu-b/cache:/root/.cache/huggingface",
        "/mnt/gpu-a/cache:/root/.ollama"]


def test_render_commands_of_a_plan_without_changes() -> None:
    _, desired = _plan()
    assert render_commands(Plan(actions=()), desired) == []


def test_plan_shows_docker_endpoints_and_mounts() -> None:
    """What a reviewer must see before a commit reaches the workers: each worker's Docker endpoint and what
    each new container mounts from it (the model cache apply will use: the target's, else the manifest's)."""
    plan, desired = _plan()
    workers = {"gpu-a": WorkerAccess("gpu-a", "ssh://root@10.0.0.5:22", "10.0.0.5", "/data/models"),
               "gpu-b": WorkerAccess("gpu-b", "ssh://deploy@10.0.0.6:2222", "10.0.0.6", "/var/lib/lmstack/b")}
    reach = plan_reach(plan, desired, workers)
    assert reach.mounts == {
        ("qwen-7b", 0): (("/data/models", "/root/.cache/huggingface"),),
        ("qwen-7b", 1): (("/var/lib/lmstack/b", "/root/.cache/huggingface"),),
        ("phi", 1): (("/data/models", "/root/.ollama"),),
    }
    console = Console(record=True, width=200, color_system=None)
    render_plan(console, plan, header="Plan for fleet", reach=reach)
    lines = console.export_text().splitlines()
    assert lines[2:5] == ["Docker endpoints:", "  gpu-a  ssh://root@10.0.0.5:22", "  gpu-b  ssh://deploy@10.0.0.6:2222"]
    created = lines.index(next(line for line in lines if "qwen-7b/1" in line))
    assert lines[created + 1].strip() == "mount /var/lib/lmstack/b -> /root/.cache/huggingface"
    assert sum("mount " in line for line in lines) == 3  # creates and recreates only: not the delete, not a noop

    document = plan_document(plan, reach)
    assert document["workers"] == [
        {"name": "gpu-a", "dockerHost": "ssh://root@10.0.0.5:22", "modelCache": "/data/models"},
        {"name": "gpu-b", "dockerHost": "ssh://deploy@10.0.0.6:2222", "modelCache": "/var/lib/lmstack/b"}]
    assert [a["mounts"] for a in document["actions"]] == [
        [{"host": "/data/models", "container": "/root/.cache/huggingface"}],
        [{"host": "/var/lib/lmstack/b", "container": "/root/.cache/huggingface"}], [], [],
        [{"host": "/data/models", "container": "/root/.ollama"}]]


def test_plan_without_targets_mounts_the_manifests_model_cache() -> None:
    plan, desired = _plan()
    reach = plan_reach(plan, desired, {})
    assert reach.endpoints == {} and reach.mounts[("qwen-7b", 1)] == (("/var/lib/lmstack/models",
                                                                         "/root/.cache/huggingface"),)

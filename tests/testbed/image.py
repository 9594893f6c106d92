"""The stand-in engine image, made without any registry and without a Docker daemon.

No registry can be reached from the test machines, so the image is written here as a `docker save`
archive (manifest.json + image config + one layer tar) and `docker load`-ed into each test host's
dockerd. The layer holds the merged-/usr symlinks (bin, lib, lib64, sbin -> usr/...), empty tmp, proc,
sys, dev and etc, the host's own /usr/bin/python3 with the shared libraries it needs, only the standard
library modules the stand-in server loads (found by running it once through every route), and
standin.py itself. So the image is self-contained (a few MB): a container of it needs no volume, which
lets lmstack create it exactly like a real engine's container. Running it with the host's
`-v /usr:/usr:ro` works too (same interpreter). The archive is deterministic for a given host, so every
test host gets the same image ID.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from lmstack.nodes.docker.archive import ImageArchive, Layer, shared_libraries, under_usr, write_archive

STANDIN_IMAGE = "lmstack-standin:test"
STANDIN_SOURCE = Path(__file__).with_name("standin.py")
IMAGE_STANDIN_PATH = "/opt/lmstack-standin/standin.py"
PYTHON = Path("/usr/bin/python3")
# Imports the stand-in must not pull into the image: http.client falls back without ssl, hashlib uses the
# built-in sha256 without OpenSSL's _hashlib. Blocking them when listing keeps OpenSSL out of the image.
BLOCKED_MODULES = ("ssl", "_ssl", "_hashlib")


def _stdlib_files(python: Path) -> list[Path]:
    """The module files the stand-in loads, found by running it once through every route."""
    script = (
        "import runpy, sys\n"
        f"for name in {BLOCKED_MODULES!r}: sys.modules[name] = None\n"
        f"sys.argv = [{str(STANDIN_SOURCE)!r}, '--list-modules']\n"
        f"runpy.run_path({str(STANDIN_SOURCE)!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([str(python), "-s", "-B", "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"listing the stand-in's modules failed: {proc.stderr.strip()[-2000:]}")
    files = []
    for line in proc.stdout.splitlines():
        path = Path(line)
        if line.startswith("/usr/") and path.is_file() and path != STANDIN_SOURCE:
            files.append(path)
    return files


def _layer(python: Path) -> Layer:
    layer = Layer.skeleton("opt")
    real_python = python.resolve()
    # The real mtimes keep Debian's __pycache__ files valid for their sources.
    layer.add_file(under_usr(str(real_python)), real_python, keep_mtime=True)
    if real_python.name != "python3":
        layer.add_link("usr/bin/python3", real_python.name)
    shared = set(shared_libraries(real_python))
    files = _stdlib_files(python)
    for path in files:
        layer.add_file(under_usr(str(path)), path, keep_mtime=True)
        if path.suffix == ".py":  # Debian ships byte-compiled files: take them (faster start-up)
            pyc = path.parent / "__pycache__" / f"{path.stem}.{_cache_tag(python)}.pyc"
            if pyc.is_file():
                layer.add_file(under_usr(str(pyc)), pyc, keep_mtime=True)
        elif path.suffix == ".so":
            shared.update(shared_libraries(path))
    for lib in sorted(shared):
        layer.add_file(under_usr(lib), Path(lib).resolve(), 0o755, keep_mtime=True)
    layer.add_file(IMAGE_STANDIN_PATH.lstrip("/"), STANDIN_SOURCE, 0o644, keep_mtime=True)
    return layer


_CACHE_TAGS: dict[Path, str] = {}


def _cache_tag(python: Path) -> str:
    if python not in _CACHE_TAGS:
        _CACHE_TAGS[python] = subprocess.run(
            [str(python), "-c", "import sys; print(sys.implementation.cache_tag)"],
            capture_output=True, text=True, check=True).stdout.strip()
    return _CACHE_TAGS[python]


def build_standin_archive(dest: Path, name: str = STANDIN_IMAGE, python: Path = PYTHON) -> ImageArchive:
    """Write a `docker load`-able archive of the stand-in image to `dest` (a .tar file)."""
    if not python.exists():
        raise FileNotFoundError(f"{python} is missing: the stand-in image carries the host's Python")
    return write_archive(dest, _layer(python), name=name, port=8000, title="lmstack stand-in engine (tests only)",
                         entrypoint=["/usr/bin/python3", "-u", "-s", "-B", IMAGE_STANDIN_PATH],
                         created_by="tests/testbed/image.py")

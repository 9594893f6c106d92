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

import hashlib
import io
import json
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

STANDIN_IMAGE = "lmstack-standin:test"
STANDIN_SOURCE = Path(__file__).with_name("standin.py")
IMAGE_STANDIN_PATH = "/opt/lmstack-standin/standin.py"
PYTHON = Path("/usr/bin/python3")
# Imports the stand-in must not pull into the image: http.client falls back without ssl, hashlib uses the
# built-in sha256 without OpenSSL's _hashlib. Blocking them when listing keeps OpenSSL out of the image.
BLOCKED_MODULES = ("ssl", "_ssl", "_hashlib")
_LDD_PATH = re.compile(r"(/\S+)")


@dataclass(frozen=True)
class ImageArchive:
    path: Path
    name: str
    image_id: str  # sha256:... of the config, what `docker image inspect` reports as Id
    size: int


def _under_usr(path: str) -> str:
    """The path inside a merged-/usr image: /lib/x -> usr/lib/x (bin, lib, lib64 and sbin are links)."""
    p = path.lstrip("/")
    for top in ("bin/", "lib/", "lib64/", "sbin/"):
        if p.startswith(top):
            return "usr/" + p
    return p


def _ldd(binary: Path) -> list[str]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    paths = []
    for line in out.splitlines():
        if "=>" in line:
            line = line.split("=>", 1)[1]
        match = _LDD_PATH.search(line)
        if match:
            paths.append(match.group(1))
    return paths


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


def _layer_members(python: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    members: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def add_dir(name: str, mode: int = 0o755) -> None:
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in members:
                info = tarfile.TarInfo(sub)
                info.type, info.mode = tarfile.DIRTYPE, (mode if sub == name else 0o755)
                members[sub] = (info, None)

    def add_link(name: str, target: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        members[name] = (info, None)

    def add_file(name: str, source: Path, mode: int | None = None) -> None:
        if name in members:
            return
        add_dir(name.rsplit("/", 1)[0])
        data = source.read_bytes()
        st = source.stat()
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode if mode is not None else st.st_mode & 0o7777, \
            int(st.st_mtime)  # the real mtime keeps Debian's __pycache__ files valid for their sources
        members[name] = (info, data)

    for top in ("usr/bin", "usr/lib", "usr/lib64", "usr/sbin", "proc", "sys", "dev", "etc", "opt"):
        add_dir(top)
    add_dir("tmp", 0o1777)
    for top in ("bin", "lib", "lib64", "sbin"):
        add_link(top, "usr/" + top)

    real_python = python.resolve()
    add_file(_under_usr(str(real_python)), real_python)
    if real_python.name != "python3":
        add_link("usr/bin/python3", real_python.name)
    shared = set(_ldd(real_python))
    files = _stdlib_files(python)
    for path in files:
        add_file(_under_usr(str(path)), path)
        if path.suffix == ".py":  # Debian ships byte-compiled files: take them (faster start-up)
            pyc = path.parent / "__pycache__" / f"{path.stem}.{_cache_tag(python)}.pyc"
            if pyc.is_file():
                add_file(_under_usr(str(pyc)), pyc)
        elif path.suffix == ".so":
            shared.update(_ldd(path))
    for lib in sorted(shared):
        add_file(_under_usr(lib), Path(lib).resolve(), 0o755)
    add_file(IMAGE_STANDIN_PATH.lstrip("/"), STANDIN_SOURCE, 0o644)
    return [members[name] for name in sorted(members)]


_CACHE_TAGS: dict[Path, str] = {}


def _cache_tag(python: Path) -> str:
    if python not in _CACHE_TAGS:
        _CACHE_TAGS[python] = subprocess.run(
            [str(python), "-c", "import sys; print(sys.implementation.cache_tag)"],
            capture_output=True, text=True, check=True).stdout.strip()
    return _CACHE_TAGS[python]


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def build_standin_archive(dest: Path, name: str = STANDIN_IMAGE, python: Path = PYTHON) -> ImageArchive:
    """Write a `docker load`-able archive of the stand-in image to `dest` (a .tar file)."""
    if not python.exists():
        raise FileNotFoundError(f"{python} is missing: the stand-in image carries the host's Python")
    layer = _tar_bytes(_layer_members(python))
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": ["/usr/bin/python3", "-u", "-s", "-B", IMAGE_STANDIN_PATH],
            "Cmd": [],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
            "ExposedPorts": {"8000/tcp": {}},
            "StopSignal": "SIGTERM",
            "Labels": {"org.opencontainers.image.title": "lmstack stand-in engine (tests only)"},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tests/testbed/image.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    layer_dir = diff_id.split(":", 1)[1]
    manifest = [{"Config": f"{config_digest}.json", "RepoTags": [name], "Layers": [f"{layer_dir}/layer.tar"]}]
    archive: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for entry_name, data in ((f"{layer_dir}/layer.tar", layer), (f"{config_digest}.json", config_bytes),
                             ("manifest.json", json.dumps(manifest).encode())):
        info = tarfile.TarInfo(entry_name)
        info.size, info.mode = len(data), 0o644
        archive.append((info, data))
    dir_info = tarfile.TarInfo(layer_dir)
    dir_info.type, dir_info.mode = tarfile.DIRTYPE, 0o755
    archive.insert(0, (dir_info, None))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(_tar_bytes(archive))
    return ImageArchive(path=dest, name=name, image_id="sha256:" + config_digest, size=dest.stat().st_size)

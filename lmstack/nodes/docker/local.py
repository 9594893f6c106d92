"""This machine's Docker, for `lmstack up`: is it there (and if not, what to do), which images it has.

Containers on the local Docker go through `DockerPool` like any worker's (a `unix://` target); this module
only answers the questions `up` asks before it writes anything.
"""

from __future__ import annotations

import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]

from lmstack.nodes.docker.errors import clip

INSTALL_HINT = ("install it (Debian/Ubuntu: `sudo apt-get install -y docker.io`; elsewhere: "
                "https://docs.docker.com/engine/install/), then run this again")


@dataclass(frozen=True)
class LocalDocker:
    url: str
    version: str  # the daemon's version
    cli: str | None  # the docker CLI on PATH (node facts and preparation call it), None: not there


class LocalDockerError(Exception):
    """The local Docker cannot be used; the message says why and what to do."""


def socket_path(url: str) -> Path | None:
    parsed = urllib.parse.urlparse(url)
    return Path(parsed.path) if parsed.scheme == "unix" else None


def probe(url: str, *, timeout_s: float = 10.0) -> LocalDocker:
    """The local Docker at `url` (unix:///PATH), checked to answer; LocalDockerError says what is missing."""
    path = socket_path(url)
    if path is None:
        raise LocalDockerError(f"DOCKER_HOST={url} is not a local Docker socket (unix:///PATH); lmstack up runs "
                               "the engines on this machine: unset DOCKER_HOST or point it at a local socket")
    cli = shutil.which("docker")
    if not path.exists():
        if cli is None:
            raise LocalDockerError(f"Docker is not installed (no `docker` command, no socket at {path}): "
                                   f"{INSTALL_HINT}")
        raise LocalDockerError(f"Docker is installed but its daemon is not running (no socket at {path}): start "
                               "it (`sudo systemctl start docker`), then run this again")
    try:
        client = docker.APIClient(base_url=url, version="auto", timeout=timeout_s)
    except docker.errors.DockerException as exc:
        text = str(exc)
        if "Permission denied" in text or "PermissionError" in text:
            raise LocalDockerError(f"no permission on the Docker socket {path}: add yourself to the docker group "
                                   "(`sudo usermod -aG docker $USER`, then log in again) or run as root") from exc
        raise LocalDockerError(f"Docker does not answer at {path} ({clip(text)}): check the daemon "
                               "(`sudo systemctl status docker`), then run this again") from exc
    try:
        version = str(client.version(api_version=False).get("Version") or "?")
    except (docker.errors.DockerException, OSError) as exc:
        raise LocalDockerError(f"Docker does not answer at {path} ({clip(str(exc))})") from exc
    finally:
        client.close()
    if cli is None:
        raise LocalDockerError(f"Docker {version} answers at {path}, but there is no `docker` command on PATH (node "
                               f"facts and image pulls use it): {INSTALL_HINT}")
    return LocalDocker(url=url, version=version, cli=cli)


def has_image(url: str, image: str, *, timeout_s: float = 10.0) -> bool:
    """Whether the local Docker has `image` (by name:tag or id)."""
    client = docker.APIClient(base_url=url, version="auto", timeout=timeout_s)
    try:
        client.inspect_image(image)
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()
    return True


def load_image(url: str, archive: Path, *, timeout_s: float = 300.0) -> None:
    """`docker load` the archive (an image written by lmstack.nodes.docker.archive) into the local Docker."""
    client = docker.APIClient(base_url=url, version="auto", timeout=timeout_s)
    try:
        with archive.open("rb") as data:
            for line in client.load_image(data):
                if isinstance(line, dict) and line.get("error"):
                    raise LocalDockerError(f"docker load {archive}: {line['error']}")
    except docker.errors.DockerException as exc:
        raise LocalDockerError(f"docker load {archive}: {clip(str(exc))}") from exc
    finally:
        client.close()

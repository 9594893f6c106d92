"""What a replica's container is, as data: backends build it, the Docker executor creates it."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

# Labels on every container lmstack creates; only containers carrying LABEL_DEPLOYMENT are ever touched.
LABEL_DEPLOYMENT = "lmstack.deployment"
LABEL_REPLICA = "lmstack.replica"
LABEL_SPEC_HASH = "lmstack.spec-hash"
LABEL_REVISION = "lmstack.revision"
LABEL_PORT = "lmstack.port"
LABEL_SERVED_NAME = "lmstack.served-name"


@dataclass(frozen=True)
class ContainerSpec:
    """Everything `docker run` needs for one replica. Host networking: the engine listens on `port`."""

    name: str  # e.g. lmstack-qwen-7b-0
    image: str
    command: tuple[str, ...]  # arguments after the image (the engine's command line)
    port: int
    gpus: tuple[int, ...]  # exact GPU indices (device requests); empty = no GPUs
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # secrets, resolved: never log these
    labels: Mapping[str, str] = field(default_factory=dict)
    volumes: Mapping[str, str] = field(default_factory=dict)  # host path -> container path
    shm_size: str = "16g"
    restart_policy: str = "unless-stopped"
    entrypoint: tuple[str, ...] | None = None  # None: the image's own
    # An init as PID 1 forwards SIGTERM: an engine as PID 1 ignores it until it installs a handler, so a
    # stop during model loading would wait out the whole stop timeout.
    init: bool = True

    def docker_run(self) -> str:
        """The equivalent `docker run` command line, for users (`lmstack plan --show-commands`).

        Environment values are shown as names only: they may be secrets.
        """
        parts = ["docker", "run", "-d", "--name", self.name, "--network", "host",
                 "--restart", self.restart_policy, "--shm-size", self.shm_size]
        if self.init:
            parts.append("--init")
        if self.gpus:
            parts += ["--gpus", f'"device={",".join(str(i) for i in self.gpus)}"']
        for host_path, container_path in sorted(self.volumes.items()):
            parts += ["-v", f"{host_path}:{container_path}"]
        for key in sorted(self.env):
            parts += ["-e", key]
        for key, value in sorted(self.labels.items()):
            parts += ["--label", f"{key}={value}"]
        if self.entrypoint is not None:
            parts += ["--entrypoint", self.entrypoint[0]]
        parts.append(self.image)
        if self.entrypoint is not None:
            parts += list(self.entrypoint[1:])
        parts += list(self.command)
        return " ".join(part if part.startswith('"device=') else shlex.quote(part) for part in parts)

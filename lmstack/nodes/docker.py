"""Container lifecycle on the workers, Docker over SSH; the only module that imports `docker` and `paramiko`.

A `DockerPool` holds one Docker API client per worker for a pass: made on first use, shared by every
thread that acts on that worker, closed when the pool is. Over `ssh://` the client is the SDK's own
transport (paramiko; each HTTP connection is an SSH channel running `docker system dial-stdio` on the
host) with the SDK's defaults replaced where they would trust too much:

- host keys come only from the given known_hosts file (the SDK reads ~/.ssh/known_hosts); an unknown
  or changed key is an error, never added;
- only the given private key is offered (the SDK lets paramiko also try ssh-agent keys and
  ~/.ssh/id_*, and reads IdentityFile / ProxyCommand from ~/.ssh/config);
- connect, banner and auth timeouts are bounded, and at most `max_sessions` channels are open per
  worker at once (sshd's MaxSessions is 10 by default; the SDK would open as many as there are calls).

Only containers that carry the `lmstack.deployment` label are listed, replaced, removed or read; a
foreign container is never touched. Failures are `NodeError`s with a kind and a message that names the
worker and what to check; environment values (secrets) never appear in messages or logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Literal, TypeVar

import docker  # type: ignore[import-untyped]  # this is the one allowed place
import docker.constants  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import docker.transport  # type: ignore[import-untyped]
import docker.types  # type: ignore[import-untyped]
import paramiko  # type: ignore[import-untyped]  # this is the one allowed place
import requests

from lmstack.backends.container import LABEL_DEPLOYMENT, LABEL_PORT, ContainerSpec

log = logging.getLogger(__name__)

# unreachable: no SSH connection (refused, timed out, no route, lost); auth_failed: the host refused the
# key; host_key: the host's key is not in known_hosts or differs from it; docker_unavailable: SSH works
# but Docker does not answer (no docker CLI for dial-stdio, daemon down, no permission on its socket);
# gpu_runtime: GPUs asked for, but Docker has no NVIDIA runtime; not_found: no such container or image;
# foreign: the container exists but lmstack did not make it (no lmstack labels), so it is left alone;
# api: any other error Docker answered.
ErrorKind = Literal["unreachable", "auth_failed", "host_key", "docker_unavailable", "gpu_runtime", "api",
                    "not_found", "foreign"]
# Kinds that a later pass may clear by itself; the others need a person (a key, a driver, a name).
RETRYABLE_KINDS: frozenset[ErrorKind] = frozenset({"unreachable", "docker_unavailable", "api"})

_GPU_RUNTIME_MISSING = "could not select device driver"
_MESSAGE_LIMIT = 600
_T = TypeVar("_T")


class NodeError(Exception):
    """An action on a worker failed. `message` names the worker and says what to check."""

    def __init__(self, *, kind: ErrorKind, worker: str, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.worker = worker
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS

    def __repr__(self) -> str:
        return f"NodeError(kind={self.kind!r}, worker={self.worker!r}, message={self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # keyword-only arguments: pickle needs help
        return (_node_error, (self.kind, self.worker, self.message))


def _node_error(kind: ErrorKind, worker: str, message: str) -> NodeError:
    return NodeError(kind=kind, worker=worker, message=message)


class DockerSetupError(Exception):
    """The pool cannot be made (a missing key or known_hosts file, a bad URL); nothing was contacted."""


@dataclass(frozen=True)
class DockerTarget:
    worker: str
    url: str  # ssh://user@host:port, or unix:///path/docker.sock (this machine; tests)

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("ssh", "unix") or (parsed.scheme == "ssh" and not parsed.hostname):
            raise DockerSetupError(f"{self.worker}: Docker URL {self.url!r} must be ssh://user@host[:port] "
                                   "(or unix:///path for this machine)")


@dataclass(frozen=True)
class ManagedContainer:
    id: str
    name: str
    image: str  # as asked for (the image reference, not its digest)
    state: str  # created, running, restarting, paused, exited, removing, dead
    status: str  # Docker's text, e.g. "Up 3 minutes", "Exited (1) 2 seconds ago"
    exit_code: int | None  # None while it has never stopped
    started_at: datetime | None  # None if never started
    finished_at: datetime | None
    restart_count: int
    oom_killed: bool
    error: str  # Docker's error for the last start, if any
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    port: int | None = None  # from the lmstack.port label

    @property
    def deployment(self) -> str:
        return self.labels.get(LABEL_DEPLOYMENT, "")

    @property
    def running(self) -> bool:
        return self.state == "running"


class DockerPool:
    """Docker clients for a pass over the workers, one per worker, reused and thread-safe.

    `with DockerPool(targets, known_hosts=..., ssh_key=...) as pool: pool.list_managed("gpu-01")`.
    `ssh_key=None` lets paramiko use ssh-agent and ~/.ssh/id_* instead of one given key.
    """

    def __init__(
        self,
        targets: Iterable[DockerTarget],
        *,
        known_hosts: Path,
        ssh_key: Path | None = None,
        connect_timeout_s: float = 10.0,
        timeout_s: float = 60.0,
        max_sessions: int = 8,
        reconnect_after_s: float = 5.0,
    ) -> None:
        self._targets = {t.worker: t for t in targets}
        if any(_scheme(t.url) == "ssh" for t in self._targets.values()):
            if not known_hosts.is_file():
                raise DockerSetupError(f"known_hosts file {known_hosts} does not exist")
            if ssh_key is not None and not ssh_key.is_file():
                raise DockerSetupError(f"SSH private key {ssh_key} does not exist")
        self._ssh = _SSHSettings(known_hosts=known_hosts, key=ssh_key, connect_timeout_s=connect_timeout_s,
                                 channel_timeout_s=timeout_s)
        self._timeout_s = timeout_s
        self._max_sessions = max(1, max_sessions)
        self._reconnect_after_s = reconnect_after_s
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._name_locks: dict[tuple[str, str], threading.Lock] = {}
        self._closed = False

    # -- the pool ---------------------------------------------------------------------------------------
    def __enter__(self) -> DockerPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close every client (and its SSH connection). Idempotent; the pool cannot be used after."""
        with self._lock:
            self._closed = True
            slots = list(self._slots.values())
        for slot in slots:
            with slot.lock:
                if slot.conn is not None:
                    slot.conn.close()
                    slot.conn = None

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(self._targets)

    def handshakes(self, worker: str) -> int:
        """How many SSH connections (completed handshakes) this pool has made to the worker so far."""
        with self._lock:
            slot = self._slots.get(worker)
        return slot.handshakes if slot is not None else 0

    # -- actions ----------------------------------------------------------------------------------------
    def list_managed(self, worker: str) -> list[ManagedContainer]:
        """Every container on the worker that carries lmstack.deployment, in any state."""
        def run(api: Any) -> list[ManagedContainer]:
            found = []
            for summary in api.containers(all=True, filters={"label": LABEL_DEPLOYMENT}):
                try:
                    attrs = api.inspect_container(summary["Id"])
                except docker.errors.NotFound:
                    continue  # removed between the list and the inspect
                if _is_managed(attrs):
                    found.append(_managed(attrs, summary.get("Status", "")))
            return sorted(found, key=lambda c: c.name)

        return self._call(worker, "listing lmstack containers", run)

    def inspect(self, worker: str, container_id: str) -> ManagedContainer | None:
        """The container (by id or name), or None if there is none or it is not lmstack's."""
        def run(api: Any) -> ManagedContainer | None:
            attrs = _inspect_or_none(api, container_id)
            if attrs is None or not _is_managed(attrs):
                return None
            return _managed(attrs, _status_text(api, attrs["Id"]))

        return self._call(worker, f"inspecting container {container_id}", run)

    def create(self, worker: str, spec: ContainerSpec) -> ManagedContainer:
        """Create and start the container; replaces an lmstack container of the same name.

        Refuses (kind foreign) when a container of that name exists without lmstack's labels. If the
        start fails, the container is removed again: nothing half-made is left behind.
        """
        labels = dict(spec.labels)
        if not labels.get(LABEL_DEPLOYMENT):
            raise ValueError(f"container {spec.name}: spec.labels needs {LABEL_DEPLOYMENT} (lmstack would not "
                             "see the container otherwise)")
        labels[LABEL_PORT] = str(spec.port)
        secrets = list(spec.env.values())

        def run(api: Any) -> ManagedContainer:
            t0 = time.monotonic()
            container_id = self._create_container(api, worker, spec, labels, secrets)
            try:
                api.start(container_id)
            except BaseException as exc:
                _discard(api, worker, container_id, spec.name)
                if isinstance(exc, docker.errors.APIError):
                    raise self._create_error(worker, spec, exc, secrets, "starting") from None
                raise
            attrs = api.inspect_container(container_id)
            created = _managed(attrs, _status_text(api, container_id))
            log.info("%s: started container %s (image %s, port %d, GPUs %s) in %.2fs", worker, spec.name,
                     spec.image, spec.port, _gpu_list(spec.gpus) or "none", time.monotonic() - t0)
            return created

        with self._name_lock(worker, spec.name):
            return self._call(worker, f"creating container {spec.name}", run, secrets=secrets)

    def remove(self, worker: str, container_id: str, *, timeout_s: int = 30) -> None:
        """Stop the container (its stop signal, SIGTERM by default; SIGKILL after timeout_s) and remove it.

        A container that is already gone is fine; one without lmstack's labels is refused (kind foreign).
        """
        def run(api: Any) -> None:
            attrs = _inspect_or_none(api, container_id)
            if attrs is None:
                return
            name = _name(attrs)
            if not _is_managed(attrs):
                raise _foreign(worker, name, "remove")
            t0 = time.monotonic()
            try:
                if attrs["State"].get("Running") or attrs["State"].get("Restarting"):
                    api.stop(attrs["Id"], timeout=timeout_s)
                api.remove_container(attrs["Id"], v=True, force=True)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code == 409 and "already in progress" in str(exc.explanation):
                    return
                raise
            log.info("%s: removed container %s in %.2fs", worker, name, time.monotonic() - t0)

        self._call(worker, f"removing container {container_id}", run)

    def logs(self, worker: str, container_id: str, *, follow: bool, tail: int) -> Iterator[bytes]:
        """The container's output (stdout and stderr, as they come), the last `tail` lines first (tail < 0:
        all). With follow, the stream stays open until the container stops or the iterator is closed
        (`close()` may be called from another thread). Errors while streaming end it with a NodeError."""
        conn = self._connection(worker)
        self._acquire(worker, conn)
        try:
            attrs = _inspect_or_none(conn.api, container_id)
            if attrs is None:
                raise NodeError(kind="not_found", worker=worker, message=f"{worker}: no container {container_id}")
            if not _is_managed(attrs):
                raise _foreign(worker, _name(attrs), "read the logs of")
            stream = conn.api.logs(attrs["Id"], stream=True, follow=follow, stdout=True, stderr=True,
                                   tail=tail if tail >= 0 else "all")
        except BaseException as exc:
            conn.sessions.release()
            if isinstance(exc, NodeError):
                raise
            error = self._error(worker, conn, exc, f"reading the logs of {container_id}")
            if error is None:
                raise
            raise error from exc
        return _LogStream(stream, conn, worker, self)

    def used_ports(self, worker: str) -> set[int]:
        """TCP ports taken on the worker: lmstack.port of every lmstack container (any state: it may be
        restarted), ports any container publishes and, over SSH, every port listening on the host (what
        host-networked containers and other programs hold)."""
        def run(api: Any) -> set[int]:
            ports: set[int] = set()
            for summary in api.containers(all=True):
                port = _port((summary.get("Labels") or {}).get(LABEL_PORT))
                if port is not None and LABEL_DEPLOYMENT in (summary.get("Labels") or {}):
                    ports.add(port)
                for binding in summary.get("Ports") or []:
                    if binding.get("PublicPort"):
                        ports.add(int(binding["PublicPort"]))
            return ports

        ports = self._call(worker, "listing used ports", run)
        conn = self._connection(worker)
        if conn.ssh is not None:
            ports |= self._call(worker, "listing listening ports", lambda _api: _listening_ports(conn))
        return ports

    # -- internals --------------------------------------------------------------------------------------
    def _create_container(self, api: Any, worker: str, spec: ContainerSpec, labels: dict[str, str],
                          secrets: list[str]) -> str:
        host_config = api.create_host_config(
            network_mode="host",
            binds=_binds(spec.volumes),
            shm_size=spec.shm_size,
            init=spec.init,
            restart_policy=_restart_policy(spec.restart_policy),
            device_requests=[docker.types.DeviceRequest(device_ids=[str(i) for i in spec.gpus],
                                                        capabilities=[["gpu"]])] if spec.gpus else None,
        )

        def attempt() -> str:
            created = api.create_container(
                spec.image, command=list(spec.command), name=spec.name, environment=dict(spec.env),
                labels=labels, host_config=host_config, detach=True,
                entrypoint=list(spec.entrypoint) if spec.entrypoint is not None else None)
            return str(created["Id"])

        try:
            try:
                return attempt()
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
            # The name is taken: by an earlier lmstack container (a crash between create and record, a
            # retry), which is replaced, or by someone else's, which is left alone.
            existing = _inspect_or_none(api, spec.name)
            if existing is not None:
                if not _is_managed(existing):
                    raise _foreign(worker, spec.name, "replace")
                log.info("%s: replacing existing lmstack container %s (%s)", worker, spec.name,
                         existing["State"].get("Status", "?"))
                with contextlib.suppress(docker.errors.NotFound):
                    api.remove_container(existing["Id"], v=True, force=True)
            return attempt()
        except docker.errors.APIError as exc:
            raise self._create_error(worker, spec, exc, secrets, "creating") from None

    def _create_error(self, worker: str, spec: ContainerSpec, exc: Any, secrets: list[str],
                      doing: str) -> NodeError:
        explanation = _redact(str(exc.explanation or exc), secrets)
        if _GPU_RUNTIME_MISSING in explanation:
            return NodeError(kind="gpu_runtime", worker=worker, message=(
                f"{worker}: Docker has no NVIDIA GPU runtime, so GPUs {_gpu_list(spec.gpus)} cannot be given to "
                f"{spec.name}; install the NVIDIA Container Toolkit (lmstack prepare --install) and restart "
                f"Docker, then check with `docker run --rm --gpus all IMAGE nvidia-smi` on the host "
                f"(Docker said: {_clip(explanation)})"))
        if isinstance(exc, docker.errors.ImageNotFound) or (exc.status_code == 404 and "image" in explanation):
            return NodeError(kind="not_found", worker=worker, message=(
                f"{worker}: image {spec.image} is not on the host, so {spec.name} cannot be created; pull it "
                f"there first (lmstack prepare pre-pulls images) (Docker said: {_clip(explanation)})"))
        return NodeError(kind="api", worker=worker, message=(
            f"{worker}: Docker refused {doing} container {spec.name} ({exc.status_code}): {_clip(explanation)}"))

    def _name_lock(self, worker: str, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault((worker, name), threading.Lock())

    def _call(self, worker: str, doing: str, fn: Callable[[Any], _T], *, secrets: list[str] | None = None) -> _T:
        conn = self._connection(worker)
        self._acquire(worker, conn)
        try:
            return fn(conn.api)
        except NodeError:
            raise
        except Exception as exc:
            error = self._error(worker, conn, exc, doing, secrets or [])
            if error is None:
                raise
            raise error from exc
        finally:
            conn.sessions.release()

    def _acquire(self, worker: str, conn: _Connection) -> None:
        if not conn.sessions.acquire(timeout=self._timeout_s):
            raise NodeError(kind="api", worker=worker, message=(
                f"{worker}: all {self._max_sessions} Docker sessions to the host stayed busy for "
                f"{self._timeout_s:.0f}s (long-running calls or open log streams)"))

    def _connection(self, worker: str) -> _Connection:
        with self._lock:
            if self._closed:
                raise RuntimeError("the DockerPool is closed")
            target = self._targets.get(worker)
            if target is None:
                raise KeyError(f"no Docker target for worker {worker!r}")
            slot = self._slots.setdefault(worker, _Slot())
        with slot.lock:  # one connect per worker at a time; the others wait for it and share it
            if slot.conn is not None and slot.conn.alive():
                return slot.conn
            if slot.conn is not None:
                log.info("%s: the Docker connection was lost; reconnecting", worker)
                slot.conn.close()
                slot.conn = None
            # A connect that just failed is not tried again at once: threads queued behind it (and calls
            # right after it) get its error instead of waiting out another connect timeout each.
            if slot.error is not None and time.monotonic() - slot.failed_at < self._reconnect_after_s:
                raise NodeError(kind=slot.error.kind, worker=worker, message=slot.error.message)
            try:
                slot.conn = self._connect(target, slot)
            except NodeError as exc:
                slot.error, slot.failed_at = exc, time.monotonic()
                raise
            slot.error = None
            return slot.conn

    def _connect(self, target: DockerTarget, slot: _Slot) -> _Connection:
        worker = target.worker
        t0 = time.monotonic()
        if _scheme(target.url) == "unix":
            try:
                api = docker.APIClient(base_url=target.url, version="auto", timeout=self._timeout_s,
                                       max_pool_size=self._max_sessions)
            except docker.errors.DockerException as exc:
                raise NodeError(kind="docker_unavailable", worker=worker, message=(
                    f"{worker}: Docker does not answer at {target.url}: {_clip(str(exc))}")) from exc
            return _Connection(api=api, ssh=None, sessions=threading.BoundedSemaphore(self._max_sessions))
        endpoint = _Endpoint.parse(target.url)
        try:
            adapter = _StrictSSHAdapter(target.url, self._ssh, timeout=self._timeout_s,
                                        max_pool_size=self._max_sessions,
                                        on_connect=lambda: slot.count_handshake())
        except Exception as exc:
            error = _connect_error(worker, endpoint, self._ssh, exc)
            if error is None:
                raise
            raise error from exc
        # The SDK builds its own adapter from the URL; this one (strict host keys, one key) replaces it.
        # use_ssh_client=True keeps the SDK's from connecting: it would only start `ssh` on first use.
        api = docker.APIClient(base_url=target.url, version=docker.constants.DEFAULT_DOCKER_API_VERSION,
                               timeout=self._timeout_s, use_ssh_client=True, max_pool_size=self._max_sessions)
        api.mount("http+docker://ssh", adapter)
        api._custom_adapter = adapter
        conn = _Connection(api=api, ssh=adapter.ssh_client, sessions=threading.BoundedSemaphore(self._max_sessions))
        try:
            # What version="auto" does: speak the daemon's API version. Also the first proof that Docker
            # answers through `docker system dial-stdio` on the host.
            api._version = api.version(api_version=False)["ApiVersion"]
        except Exception as exc:
            detail = _diagnose_docker(conn) if conn.alive() else ""
            conn.close()
            if not isinstance(exc, requests.RequestException | docker.errors.DockerException | OSError |
                              paramiko.SSHException | EOFError | KeyError):
                raise
            if not detail:
                error = _connect_error(worker, endpoint, self._ssh, exc)
                if error is not None:
                    raise error from exc
            raise NodeError(kind="docker_unavailable", worker=worker, message=(
                f"{worker}: SSH to {endpoint} works but Docker does not answer: {detail or _clip(str(exc))}"
            )) from exc
        log.debug("%s: connected to Docker over SSH (%s, API %s) in %.2fs", worker, endpoint, api._version,
                  time.monotonic() - t0)
        return conn

    def _error(self, worker: str, conn: _Connection, exc: BaseException, doing: str,
               secrets: list[str] | None = None) -> NodeError | None:
        """The NodeError for an exception from a Docker call; None for what is not a Docker failure (a bug)."""
        text = _clip(_redact(str(getattr(exc, "explanation", None) or exc), secrets or []))
        if isinstance(exc, docker.errors.NotFound):
            return NodeError(kind="not_found", worker=worker, message=f"{worker}: {doing}: {text}")
        if isinstance(exc, docker.errors.APIError):
            return NodeError(kind="api", worker=worker,
                             message=f"{worker}: Docker answered {exc.status_code} while {doing}: {text}")
        if isinstance(exc, requests.RequestException | OSError | paramiko.SSHException | EOFError):
            # Transport trouble: the SSH connection (host gone, network down) or Docker behind it (dockerd
            # down, hanging). A dropped network leaves the transport looking active, so ask SSH itself.
            if conn.ssh is not None and not conn.responds(min(self._ssh.connect_timeout_s, 5.0)):
                conn.dead = True  # the next call reconnects instead of reusing it
                reason = f"no answer within {self._timeout_s:.0f}s" if isinstance(exc, requests.Timeout) else text
                return NodeError(kind="unreachable", worker=worker, message=(
                    f"{worker}: the SSH connection stopped answering while {doing} ({reason}); check that the "
                    "host is up, its network and its sshd"))
            if isinstance(exc, requests.Timeout):
                return NodeError(kind="api", worker=worker, message=(
                    f"{worker}: Docker did not answer within {self._timeout_s:.0f}s while {doing} (SSH to the "
                    "host works: dockerd may be overloaded or hanging)"))
            detail = _diagnose_docker(conn) if conn.ssh is not None else text
            return NodeError(kind="docker_unavailable", worker=worker, message=(
                f"{worker}: Docker stopped answering while {doing}: {detail}"))
        if isinstance(exc, docker.errors.DockerException):
            return NodeError(kind="api", worker=worker, message=f"{worker}: {doing}: {text}")
        return None


# -- connections ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SSHSettings:
    known_hosts: Path
    key: Path | None
    connect_timeout_s: float
    channel_timeout_s: float


@dataclass(frozen=True)
class _Endpoint:
    host: str
    port: int
    user: str | None

    @classmethod
    def parse(cls, url: str) -> _Endpoint:
        parsed = urllib.parse.urlparse(url)
        return cls(host=parsed.hostname or "", port=parsed.port or 22, user=parsed.username)

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}:{self.port}"


class _UnknownHostKeyError(Exception):
    def __init__(self, hostname: str, key: Any) -> None:
        super().__init__(f"no host key for {hostname} in known_hosts")
        self.hostname = hostname
        self.fingerprint = _fingerprint(key)


class _RejectUnknownHost:
    """paramiko's missing-host-key policy (duck-typed): like its RejectPolicy, with an exception of our own."""

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        raise _UnknownHostKeyError(hostname, key)


class _StrictSSHAdapter(docker.transport.SSHHTTPAdapter):  # type: ignore[misc]
    """The SDK's SSH adapter with its paramiko client made strictly: host keys from our known_hosts file
    only (no ~/.ssh/known_hosts), unknown keys rejected, only our key offered (no agent, no ~/.ssh/id_*),
    no ~/.ssh/config, bounded timeouts. The SDK's reconnect (when the transport is gone) goes through
    the same `_connect`, so it is just as strict."""

    def __init__(self, base_url: str, settings: _SSHSettings, *, timeout: float, max_pool_size: int,
                 on_connect: Callable[[], None]) -> None:
        self._settings = settings
        self._on_connect = on_connect
        super().__init__(base_url, timeout=timeout, pool_connections=1, max_pool_size=max_pool_size,
                         shell_out=False)

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        # The SDK keys its channel pools by the full URL (docker/docker-py#2966), so with one pool slot
        # every request to another container's URL dropped the open channels and ran a new
        # `docker system dial-stdio` on the worker. One key: channels are reused across requests.
        return super().get_connection("ssh://docker", proxies)

    def _create_paramiko_client(self, base_url: str) -> None:
        settings = self._settings
        endpoint = _Endpoint.parse(base_url)
        client = paramiko.SSHClient()
        client.load_host_keys(str(settings.known_hosts))  # a missing file raises: never trust-on-first-use
        client.set_missing_host_key_policy(_RejectUnknownHost())
        self.ssh_client = client
        only_our_key = settings.key is not None
        self.ssh_params = {
            "hostname": endpoint.host,
            "port": endpoint.port,
            "username": endpoint.user,
            "key_filename": str(settings.key) if settings.key is not None else None,
            "look_for_keys": not only_our_key,
            "allow_agent": not only_our_key,
            "timeout": settings.connect_timeout_s,
            "banner_timeout": settings.connect_timeout_s,
            "auth_timeout": settings.connect_timeout_s,
            "channel_timeout": settings.channel_timeout_s,
        }

    def _connect(self) -> None:
        try:
            self.ssh_client.connect(**self.ssh_params)
        except BaseException:
            self.ssh_client.close()  # the transport thread and socket of a refused connection
            raise
        self._on_connect()
        transport = self.ssh_client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)  # notice a dead peer between passes, not on the next call


@dataclass
class _Connection:
    api: Any  # docker.APIClient
    ssh: Any  # paramiko.SSHClient, None for unix://
    sessions: threading.BoundedSemaphore
    dead: bool = False  # found not answering: replaced on next use

    def alive(self) -> bool:
        if self.ssh is None:
            return True
        transport = self.ssh.get_transport()
        return not self.dead and transport is not None and bool(transport.is_active())

    def responds(self, timeout_s: float) -> bool:
        """Whether the SSH connection answers now: a channel opens (and is closed again) within timeout_s."""
        if not self.alive():
            return False
        try:
            channel = self.ssh.get_transport().open_session(timeout=timeout_s)
        except Exception:
            return False
        channel.close()
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.api.close()  # closes the adapter, its channels and the SSH client
        if self.ssh is not None:
            with contextlib.suppress(Exception):
                self.ssh.close()


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    conn: _Connection | None = None
    handshakes: int = 0
    error: NodeError | None = None  # the last failed connect, and when
    failed_at: float = 0.0

    def count_handshake(self) -> None:
        self.handshakes += 1


def _connect_error(worker: str, endpoint: _Endpoint, ssh: _SSHSettings, exc: BaseException) -> NodeError | None:
    if isinstance(exc, _UnknownHostKeyError):
        return NodeError(kind="host_key", worker=worker, message=(
            f"{worker}: the SSH host key of {exc.hostname} ({exc.fingerprint}) is not in {ssh.known_hosts}, and "
            "lmstack connects only to known hosts; check the key out of band, then add it (e.g. "
            f"ssh-keyscan -p {endpoint.port} {endpoint.host} >> {ssh.known_hosts})"))
    if isinstance(exc, paramiko.BadHostKeyException):
        return NodeError(kind="host_key", worker=worker, message=(
            f"{worker}: the SSH host key of {endpoint.host}:{endpoint.port} changed: it is now "
            f"{_fingerprint(exc.key)}, {ssh.known_hosts} has {_fingerprint(exc.expected_key)}. Someone may be "
            "intercepting the connection, or the host was reinstalled: verify the new key before you replace "
            "the entry"))
    if isinstance(exc, FileNotFoundError) and exc.filename in (str(ssh.known_hosts), str(ssh.key)):
        what = "known_hosts file" if exc.filename == str(ssh.known_hosts) else "SSH private key"
        return NodeError(kind="host_key" if what == "known_hosts file" else "auth_failed", worker=worker,
                         message=f"{worker}: the {what} {exc.filename} does not exist")
    if isinstance(exc, paramiko.PasswordRequiredException):
        return NodeError(kind="auth_failed", worker=worker, message=(
            f"{worker}: the SSH private key {ssh.key} is encrypted; lmstack needs a key without a passphrase"))
    if isinstance(exc, paramiko.AuthenticationException):
        key = f"the key {ssh.key}" if ssh.key is not None else "the ssh-agent and ~/.ssh keys"
        return NodeError(kind="auth_failed", worker=worker, message=(
            f"{worker}: {endpoint} refused {key} ({_clip(str(exc))}); check that its public key is in that "
            "user's ~/.ssh/authorized_keys on the host and that the user name is right"))
    if isinstance(exc, OSError | EOFError | paramiko.SSHException):
        reason = _clip(str(exc)) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = "timed out"
        elif isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):  # refused / no route, per address
            reason = "; ".join(sorted({os.strerror(e.errno).lower() if e.errno else str(e)
                                       for e in exc.errors.values()}))
        return NodeError(kind="unreachable", worker=worker, message=(
            f"{worker}: cannot connect over SSH to {endpoint} ({reason}); check that the host is up, that sshd "
            "listens there and that the inventory's address and port are right"))
    return None


def _diagnose_docker(conn: _Connection) -> str:
    """Why Docker does not answer on a host SSH reaches: ask the docker CLI there (one extra session)."""
    try:
        _stdin, stdout, stderr = conn.ssh.exec_command("docker version --format '{{.Server.Version}}'",
                                                       timeout=15)
        out = stdout.read(2000).decode(errors="replace").strip()
        err = stderr.read(2000).decode(errors="replace").strip()
        status = stdout.channel.recv_exit_status()
    except Exception as exc:
        return f"asking the docker CLI on the host failed too ({_clip(str(exc))})"
    if status == 127:
        return ("there is no `docker` command on the PATH of the SSH user (the connection runs "
                "`docker system dial-stdio` there); install Docker (lmstack prepare --install)")
    if status != 0:
        first = err.splitlines()[0] if err else f"exit status {status}"
        hint = ("add the SSH user to the docker group" if "permission denied" in err.lower()
                else "start it (systemctl start docker)")
        return f"the Docker daemon does not answer ({_clip(first)}); {hint}"
    return f"the docker CLI reaches daemon {out}, but `docker system dial-stdio` did not answer"


def _listening_ports(conn: _Connection) -> set[int]:
    """TCP ports in LISTEN state on the host (its network namespace), from /proc/net/tcp{,6}."""
    _stdin, stdout, _stderr = conn.ssh.exec_command("cat /proc/net/tcp /proc/net/tcp6 2>/dev/null",
                                                    timeout=15)
    text = stdout.read().decode(errors="replace")
    stdout.channel.recv_exit_status()
    ports = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and ":" in fields[1]:  # 0A: TCP_LISTEN
            with contextlib.suppress(ValueError):
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# -- log streams -------------------------------------------------------------------------------------------


class _LogStream(Iterator[bytes]):
    """A container's log stream: holds one of the worker's sessions until it ends or is closed."""

    def __init__(self, stream: Any, conn: _Connection, worker: str, pool: DockerPool) -> None:
        self._stream = stream
        self._conn = conn
        self._worker = worker
        self._pool = pool
        self._lock = threading.Lock()
        self._closed = False

    def __iter__(self) -> _LogStream:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise StopIteration
        try:
            return bytes(next(self._stream))
        except StopIteration:
            self.close()
            raise
        except Exception as exc:
            closed_by_us = self._closed
            self.close()
            if closed_by_us:
                raise StopIteration from None
            error = self._pool._error(self._worker, self._conn, exc, "streaming logs")
            if error is None:
                raise
            raise error from exc

    def close(self) -> None:
        """End the stream (also from another thread: a blocked reader then gets StopIteration)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # The SDK's CancellableStream.close() refuses SSH ("not supported"): close the response instead,
        # which closes its connection, i.e. the SSH channel.
        with contextlib.suppress(Exception):
            self._stream._response.close()
        self._conn.sessions.release()

    def __enter__(self) -> _LogStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# -- helpers -----------------------------------------------------------------------------------------------


def _scheme(url: str) -> str:
    return urllib.parse.urlparse(url).scheme


def _inspect_or_none(api: Any, container_id: str) -> dict[str, Any] | None:
    try:
        attrs: dict[str, Any] = api.inspect_container(container_id)
    except docker.errors.NotFound:
        return None
    return attrs


def _is_managed(attrs: Mapping[str, Any]) -> bool:
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    return bool(labels.get(LABEL_DEPLOYMENT))


def _name(attrs: Mapping[str, Any]) -> str:
    return str(attrs.get("Name", "")).lstrip("/")


def _status_text(api: Any, container_id: str) -> str:
    summaries = api.containers(all=True, filters={"id": container_id})
    return str(summaries[0].get("Status", "")) if summaries else ""


def _managed(attrs: Mapping[str, Any], status: str) -> ManagedContainer:
    state = attrs.get("State") or {}
    labels = dict((attrs.get("Config") or {}).get("Labels") or {})
    started = _timestamp(state.get("StartedAt"))
    finished = _timestamp(state.get("FinishedAt"))
    return ManagedContainer(
        id=str(attrs["Id"]),
        name=_name(attrs),
        image=str((attrs.get("Config") or {}).get("Image", "")),
        state=str(state.get("Status", "")),
        status=status,
        exit_code=int(state.get("ExitCode", 0)) if finished is not None else None,
        started_at=started,
        finished_at=finished,
        restart_count=int(attrs.get("RestartCount", 0)),
        oom_killed=bool(state.get("OOMKilled", False)),
        error=str(state.get("Error", "")),
        labels=MappingProxyType(labels),
        port=_port(labels.get(LABEL_PORT)),
    )


def _timestamp(value: object) -> datetime | None:
    """Docker's RFC 3339 times (nanoseconds, Z); its zero time (never happened) is None."""
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    head, dot, rest = value.partition(".")
    if dot:  # fromisoformat takes at most microseconds
        digits = "".join(c for c in rest if c.isdigit())
        value = f"{head}.{digits[:6]}{rest[len(digits):]}"
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _port(value: object) -> int | None:
    try:
        port = int(str(value))
    except ValueError:
        return None
    return port if 0 < port < 65536 else None


def _binds(volumes: Mapping[str, str]) -> dict[str, dict[str, str]]:
    binds = {}
    for host_path, target in volumes.items():
        path, _, mode = target.partition(":")
        binds[host_path] = {"bind": path, "mode": mode or "rw"}
    return binds


def _restart_policy(policy: str) -> dict[str, Any]:
    name, _, retries = policy.partition(":")
    if name == "on-failure" and retries:
        return {"Name": name, "MaximumRetryCount": int(retries)}
    return {"Name": "" if name == "no" else name}


def _discard(api: Any, worker: str, container_id: str, name: str) -> None:
    """Remove a container that was created but could not start; a failure here is only logged, as the
    start failure is what the caller must hear about (and a later create replaces the container)."""
    try:
        api.remove_container(container_id, v=True, force=True)
    except Exception as exc:
        log.warning("%s: could not remove container %s after its failed start: %s", worker, name,
                    _clip(str(exc)))


def _foreign(worker: str, name: str, action: str) -> NodeError:
    return NodeError(kind="foreign", worker=worker, message=(
        f"{worker}: container {name} was not made by lmstack (it has no {LABEL_DEPLOYMENT} label), so lmstack "
        f"will not {action} it; remove or rename it yourself, or give the deployment another name"))


def _gpu_list(gpus: Iterable[int]) -> str:
    return ",".join(str(i) for i in gpus)


def _fingerprint(key: Any) -> str:
    if key is None:
        return "no key of that type"
    try:
        return f"{key.get_name()} {key.fingerprint}"
    except Exception:
        return str(key.get_name())


def _redact(text: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        if len(value) >= 4:  # shorter values are no secret, and replacing them would garble the text
            text = text.replace(value, "***")
    return text


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 1] + "…"

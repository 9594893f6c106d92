"""Container lifecycle on the workers, Docker over SSH (the SDK is imported only in this package).

A `DockerPool` holds one Docker API client per worker for a pass: made on first use, shared by every
thread that acts on that worker, closed when the pool is. At most `max_sessions` channels are open per
worker at once (sshd's MaxSessions is 10 by default; the SDK would open as many as there are calls).
How the connection is made, and what it trusts, is in `transport`.

Only containers that carry the `lmstack.deployment` label are listed, replaced, removed or read; a
foreign container is never touched. Failures are `NodeError`s with a kind and a message that names the
worker and what to check; environment values (secrets) never appear in messages or logs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import docker.errors  # type: ignore[import-untyped]
import docker.types  # type: ignore[import-untyped]
import requests

from lmstack.backends.container import LABEL_DEPLOYMENT, LABEL_PORT, ContainerSpec
from lmstack.nodes.docker.containers import (
    ManagedContainer,
    binds,
    container_name,
    discard,
    foreign,
    gpu_list,
    inspect_or_none,
    is_managed,
    label_port,
    managed_container,
    restart_policy,
    status_text,
)
from lmstack.nodes.docker.errors import DockerSetupError, NodeError, clip, redact
from lmstack.nodes.docker.transport import (
    TRANSPORT_ERRORS,
    Connection,
    SSHSettings,
    connect,
    diagnose_docker,
    listening_ports,
)

log = logging.getLogger(__name__)

_GPU_RUNTIME_MISSING = "could not select device driver"
_T = TypeVar("_T")


@dataclass(frozen=True)
class DockerTarget:
    worker: str
    url: str  # ssh://user@host:port, or unix:///path/docker.sock (this machine; tests)

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("ssh", "unix") or (parsed.scheme == "ssh" and not parsed.hostname):
            raise DockerSetupError(f"{self.worker}: Docker URL {self.url!r} must be ssh://user@host[:port] "
                                   "(or unix:///path for this machine)")


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
        ssh_config: Path | None = None,
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
            if ssh_config is not None and not ssh_config.is_file():
                raise DockerSetupError(f"ssh_config file {ssh_config} does not exist")
        self._ssh = SSHSettings(known_hosts=known_hosts, key=ssh_key, config=ssh_config,
                                connect_timeout_s=connect_timeout_s, channel_timeout_s=timeout_s)
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
                if is_managed(attrs):
                    found.append(managed_container(attrs, summary.get("Status", "")))
            return sorted(found, key=lambda c: c.name)

        return self._call(worker, "listing lmstack containers", run)

    def inspect(self, worker: str, container_id: str) -> ManagedContainer | None:
        """The container (by id or name), or None if there is none or it is not lmstack's."""
        def run(api: Any) -> ManagedContainer | None:
            attrs = inspect_or_none(api, container_id)
            if attrs is None or not is_managed(attrs):
                return None
            return managed_container(attrs, status_text(api, attrs["Id"]))

        return self._call(worker, f"inspecting container {container_id}", run)

    def last_exit_code(self, worker: str, container_id: str) -> int | None:
        """The exit code of the container's last exit in the past day (Docker's `die` events), or None when it
        did not exit. A container Docker's restart policy started again shows exit code 0 in its state."""
        def run(api: Any) -> int | None:
            now = time.time()
            code = None
            # As strings: the SDK would round datetimes down to the second, missing an exit in the last one.
            for event in api.events(since=f"{now - 86400:.3f}", until=f"{now:.3f}", decode=True,
                                    filters={"container": container_id, "event": "die"}):
                value = str(((event.get("Actor") or {}).get("Attributes") or {}).get("exitCode", ""))
                if value.lstrip("-").isdigit():
                    code = int(value)
            return code

        return self._call(worker, f"reading the exits of container {container_id}", run)

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
                discard(api, worker, container_id, spec.name)
                if isinstance(exc, docker.errors.APIError):
                    raise self._create_error(worker, spec, exc, secrets, "starting") from None
                raise
            attrs = api.inspect_container(container_id)
            created = managed_container(attrs, status_text(api, container_id))
            log.info("%s: started container %s (image %s, port %d, GPUs %s) in %.2fs", worker, spec.name,
                     spec.image, spec.port, gpu_list(spec.gpus) or "none", time.monotonic() - t0)
            return created

        with self._name_lock(worker, spec.name):
            return self._call(worker, f"creating container {spec.name}", run, secrets=secrets)

    def remove(self, worker: str, container_id: str, *, timeout_s: int = 30) -> None:
        """Stop the container (its stop signal, SIGTERM by default; SIGKILL after timeout_s) and remove it.

        A container that is already gone is fine; one without lmstack's labels is refused (kind foreign).
        """
        def run(api: Any) -> None:
            attrs = inspect_or_none(api, container_id)
            if attrs is None:
                return
            name = container_name(attrs)
            if not is_managed(attrs):
                raise foreign(worker, name, "remove")
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
            attrs = inspect_or_none(conn.api, container_id)
            if attrs is None:
                raise NodeError(kind="not_found", worker=worker, message=f"{worker}: no container {container_id}")
            if not is_managed(attrs):
                raise foreign(worker, container_name(attrs), "read the logs of")
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
        restarted), ports any container publishes and every port listening on the host (what host-networked
        containers and other programs hold), over SSH or, for a local Docker, on this machine."""
        def run(api: Any) -> set[int]:
            ports: set[int] = set()
            for summary in api.containers(all=True):
                port = label_port((summary.get("Labels") or {}).get(LABEL_PORT))
                if port is not None and LABEL_DEPLOYMENT in (summary.get("Labels") or {}):
                    ports.add(port)
                for binding in summary.get("Ports") or []:
                    if binding.get("PublicPort"):
                        ports.add(int(binding["PublicPort"]))
            return ports

        ports = self._call(worker, "listing used ports", run)
        conn = self._connection(worker)
        # Over SSH, or here for a local Docker (unix://): the API server and the embedded database of
        # `lmstack up` listen on the same machine as its engines.
        ports |= self._call(worker, "listing listening ports", lambda _api: listening_ports(conn))
        return ports

    # -- internals --------------------------------------------------------------------------------------
    def _create_container(self, api: Any, worker: str, spec: ContainerSpec, labels: dict[str, str],
                          secrets: list[str]) -> str:
        host_config = api.create_host_config(
            network_mode="host",
            binds=binds(spec.volumes),
            shm_size=spec.shm_size,
            init=spec.init,
            restart_policy=restart_policy(spec.restart_policy),
            device_requests=[docker.types.DeviceRequest(device_ids=[str(i) for i in spec.gpus],
                                                        capabilities=[["gpu"]])] if spec.gpus else None,
            # No engine makes device nodes; one planted in the mounted model cache would be a way to the host.
            cap_drop=["MKNOD"],
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
            existing = inspect_or_none(api, spec.name)
            if existing is not None:
                if not is_managed(existing):
                    raise foreign(worker, spec.name, "replace")
                log.info("%s: replacing existing lmstack container %s (%s)", worker, spec.name,
                         existing["State"].get("Status", "?"))
                with contextlib.suppress(docker.errors.NotFound):
                    api.remove_container(existing["Id"], v=True, force=True)
            return attempt()
        except docker.errors.APIError as exc:
            raise self._create_error(worker, spec, exc, secrets, "creating") from None

    def _create_error(self, worker: str, spec: ContainerSpec, exc: Any, secrets: list[str],
                      doing: str) -> NodeError:
        explanation = redact(str(exc.explanation or exc), secrets)
        if _GPU_RUNTIME_MISSING in explanation:
            return NodeError(kind="gpu_runtime", worker=worker, message=(
                f"{worker}: Docker has no NVIDIA GPU runtime, so GPUs {gpu_list(spec.gpus)} cannot be given to "
                f"{spec.name}; install the NVIDIA Container Toolkit (lmstack prepare --install) and restart "
                f"Docker, then check with `docker run --rm --gpus all IMAGE nvidia-smi` on the host "
                f"(Docker said: {clip(explanation)})"))
        if isinstance(exc, docker.errors.ImageNotFound) or (exc.status_code == 404 and "image" in explanation):
            return NodeError(kind="not_found", worker=worker, message=(
                f"{worker}: image {spec.image} is not on the host, so {spec.name} cannot be created; pull it "
                f"there first (lmstack prepare pre-pulls images) (Docker said: {clip(explanation)})"))
        return NodeError(kind="api", worker=worker, message=(
            f"{worker}: Docker refused {doing} container {spec.name} ({exc.status_code}): {clip(explanation)}"))

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

    def _acquire(self, worker: str, conn: Connection) -> None:
        if not conn.sessions.acquire(timeout=self._timeout_s):
            raise NodeError(kind="api", worker=worker, message=(
                f"{worker}: all {self._max_sessions} Docker sessions to the host stayed busy for "
                f"{self._timeout_s:.0f}s (long-running calls or open log streams)"))

    def _connection(self, worker: str) -> Connection:
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

    def _connect(self, target: DockerTarget, slot: _Slot) -> Connection:
        return connect(target.worker, target.url, self._ssh, timeout_s=self._timeout_s,
                       max_sessions=self._max_sessions, on_handshake=slot.count_handshake)

    def _error(self, worker: str, conn: Connection, exc: BaseException, doing: str,
               secrets: list[str] | None = None) -> NodeError | None:
        """The NodeError for an exception from a Docker call; None for what is not a Docker failure (a bug)."""
        text = clip(redact(str(getattr(exc, "explanation", None) or exc), secrets or []))
        if isinstance(exc, docker.errors.NotFound):
            return NodeError(kind="not_found", worker=worker, message=f"{worker}: {doing}: {text}")
        if isinstance(exc, docker.errors.APIError):
            return NodeError(kind="api", worker=worker,
                             message=f"{worker}: Docker answered {exc.status_code} while {doing}: {text}")
        if isinstance(exc, requests.RequestException | TRANSPORT_ERRORS):
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
            detail = diagnose_docker(conn) if conn.ssh is not None else text
            return NodeError(kind="docker_unavailable", worker=worker, message=(
                f"{worker}: Docker stopped answering while {doing}: {detail}"))
        if isinstance(exc, docker.errors.DockerException):
            return NodeError(kind="api", worker=worker, message=f"{worker}: {doing}: {text}")
        return None


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    conn: Connection | None = None
    handshakes: int = 0
    error: NodeError | None = None  # the last failed connect, and when
    failed_at: float = 0.0

    def count_handshake(self) -> None:
        self.handshakes += 1


class _LogStream(Iterator[bytes]):
    """A container's log stream: holds one of the worker's sessions until it ends or is closed."""

    def __init__(self, stream: Any, conn: Connection, worker: str, pool: DockerPool) -> None:
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


def _scheme(url: str) -> str:
    return urllib.parse.urlparse(url).scheme

"""Live logs of one replica's container: find it, open its Docker log stream over SSH, and hand its lines to
the event loop from a thread of its own.

A follow stream lasts as long as someone watches, so it never runs in the shared thread pool (a few viewers
would starve every other request): each gets one daemon thread that reads and splits lines. Closing the
session closes the Docker stream (its SSH channel) and the SSH connection, also while the thread is blocked
reading; the thread then ends by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, cast

from lmstack.api.services.repo import NoRepository, RepoView
from lmstack.api.services.status import ReplicaLocation, deployment_exists, find_replica
from lmstack.config import Settings, SshFilesError, ssh_files
from lmstack.gitsource import SourceError
from lmstack.manifests import ManifestValidationError
from lmstack.nodes.docker import DockerPool, DockerSetupError, DockerTarget, NodeError
from lmstack.reconcile.access import worker_access
from lmstack.state import Database

log = logging.getLogger(__name__)

MAX_LINE = 16_384  # longer lines are sent in pieces: a frame per line, never an unbounded buffer
MAX_PENDING = 1_000  # lines read but not yet sent; then the reader waits (the client is slow)


class LogsError(Exception):
    """Why logs cannot be streamed; `status` is the HTTP status it corresponds to (404, 502, 503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Stream(Protocol):
    def __iter__(self) -> Iterator[bytes]: ...
    def __next__(self) -> bytes: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class LogTarget:
    replica: ReplicaLocation
    container_id: str
    docker_url: str


def resolve(*, database: Database, repo: RepoView, deployment: str, ordinal: int | None) -> LogTarget:
    """Where the replica's container runs. The worker's address comes from the configured repository's
    inventory (the database keeps only the inventory host's name). Blocking. Raises LogsError."""
    with database.session() as session:
        replica = find_replica(session=session, deployment=deployment, ordinal=ordinal)
        exists = replica is not None or deployment_exists(session=session, name=deployment)
    if replica is None:
        which = "any replica" if ordinal is None else f"replica {ordinal}"
        raise LogsError(404, f"deployment {deployment!r} has no {which}" if exists
                        else f"no deployment {deployment!r}")
    if not replica.container_id:
        raise LogsError(404, f"replica {deployment}/{replica.ordinal} has no container (yet)")
    try:
        source = repo.source()
    except NoRepository:
        raise LogsError(503, "the server has no repository configured (LMSTACK_REPO): it needs the inventory "
                             "to reach the workers") from None
    except (SourceError, ManifestValidationError) as exc:
        raise LogsError(503, f"cannot read the repository for the workers' addresses: {exc}") from exc
    with database.session() as session:
        workers = worker_access(source, session)
    if replica.worker not in workers:
        raise LogsError(503, f"worker {replica.worker} is not in the inventory of {source.origin}")
    return LogTarget(replica=replica, container_id=replica.container_id, docker_url=workers[replica.worker].docker_url)


class LogSession:
    """One open log stream and the SSH connection it runs on. `close()` ends both (idempotent)."""

    def __init__(self, pool: DockerPool, stream: _Stream, target: LogTarget) -> None:
        self.pool = pool
        self.stream = stream
        self.target = target
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.stream.close()  # wakes a reader blocked on the stream (StopIteration)
        self.pool.close()


def open_stream(*, target: LogTarget, settings: Settings, tail: int) -> LogSession:
    """Connect to the worker's Docker and open a follow stream of the container's output. Blocking.
    Raises LogsError: 404 when the container is gone, 502 when the worker or its Docker fails."""
    worker = target.replica.worker
    try:
        ssh = ssh_files(settings)
        pool = DockerPool([DockerTarget(worker=worker, url=target.docker_url)], known_hosts=ssh.known_hosts,
                          ssh_key=ssh.key, ssh_config=ssh.config, max_sessions=2)
    except (SshFilesError, DockerSetupError) as exc:
        raise LogsError(503, str(exc)) from exc
    try:
        stream = pool.logs(worker, target.container_id, follow=True, tail=tail)
    except NodeError as exc:
        pool.close()
        raise LogsError(404 if exc.kind == "not_found" else 502, exc.message) from exc
    except BaseException:
        pool.close()
        raise
    # DockerPool.logs is typed as an iterator; what it returns also has close() (callable from any thread).
    return LogSession(pool, cast(_Stream, stream), target)


@dataclass(frozen=True)
class End:
    """The stream ended: the container stopped (error None) or reading failed (error says why)."""

    error: str | None = None


class LineReader:
    """Reads a LogSession in a daemon thread and queues whole lines (text) for the event loop.

    `await next()` gives the next line, or End. After each line is sent, call `sent()`: at most
    MAX_PENDING lines wait, so a slow client slows the reading instead of growing memory.
    """

    def __init__(self, session: LogSession, *, loop: asyncio.AbstractEventLoop) -> None:
        self.session = session
        self._loop = loop
        self._queue: asyncio.Queue[str | End] = asyncio.Queue()
        self._slots = threading.Semaphore(MAX_PENDING)
        target = session.target
        self._thread = threading.Thread(
            target=self._run, daemon=True,
            name=f"logs {target.replica.deployment}/{target.replica.ordinal}@{target.replica.worker}")

    def start(self) -> None:
        self._thread.start()

    async def next(self) -> str | End:
        return await self._queue.get()

    def sent(self) -> None:
        self._slots.release()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end (after the session is closed); True if it did."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- the thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        end = End()
        try:
            for line in _lines(self.session.stream):
                if not self._put(line):
                    return
        except NodeError as exc:
            end = End(exc.message)
        except Exception as exc:  # a bug or an unexpected transport error: end the stream, say so, log it
            log.exception("reading logs of %s failed", self._thread.name)
            end = End(f"reading the logs failed: {type(exc).__name__}")
        finally:
            if not self.session.closed:
                self._deliver(end)

    def _put(self, line: str) -> bool:
        while not self._slots.acquire(timeout=0.5):
            if self.session.closed:
                return False
        if self.session.closed:
            return False
        return self._deliver(line)

    def _deliver(self, item: str | End) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            with contextlib.suppress(Exception):
                self.session.close()
            return False
        return True


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Docker's frames (writes of the container, not lines) as lines without their newline; a line longer
    than MAX_LINE comes in pieces of at most that many bytes."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield from _pieces(line)
        while len(pending) > MAX_LINE:
            yield _text(pending[:MAX_LINE])
            pending = pending[MAX_LINE:]
    if pending:
        yield from _pieces(pending)


def _pieces(line: bytes) -> Iterator[str]:
    for start in range(0, max(len(line), 1), MAX_LINE):
        yield _text(line[start:start + MAX_LINE])


def _text(line: bytes) -> str:
    return line.removesuffix(b"\r").decode("utf-8", errors="replace")

"""The configured repository (LMSTACK_REPO at LMSTACK_REF) as the API server reads it.

/api/sync, /api/plan and the logs WebSocket each need the commit the ref names now. Reading it fetches a
remote repository, and parsing it runs Ansible's inventory parser: per request, a dashboard polling a few
routes would keep the server fetching. `RepoView` reads the ref at most once per `max_age_s` (requests that
ask meanwhile, or while a read is under way, share it; a failed read is remembered as long, so an
unreachable remote is not hammered either) and parses each commit once.

Blocking (git and Ansible): call it from a thread, as the sync routes do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from lmstack.config import Settings
from lmstack.gitsource import Snapshot, Source, SourceError, parse_snapshot, read_commit
from lmstack.gitsource.source import push_limits
from lmstack.manifests import ManifestValidationError


class NoRepository(Exception):
    """The server has no repository configured (LMSTACK_REPO)."""


class RepoView:
    def __init__(self, settings: Settings, *, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.max_age_s = max_age_s
        self.reads = 0  # reads of the repository made (a fetch each, for a URL): a figure for tests
        self._clock = clock
        self._read_lock = threading.Lock()
        self._read: Snapshot | SourceError | None = None
        self._read_at = 0.0
        self._parse_lock = threading.Lock()
        self._parsed_sha: str | None = None
        self._parsed: Source | ManifestValidationError | None = None

    def head(self) -> Snapshot:
        """The files of the commit the ref names, read at most `max_age_s` ago. Raises NoRepository,
        SourceError."""
        if self.settings.repo is None:
            raise NoRepository("the server has no repository configured (LMSTACK_REPO)")
        with self._read_lock:
            if self._read is None or self._clock() - self._read_at >= self.max_age_s:
                self.reads += 1
                try:
                    self._read = read_commit(self.settings.repo, self.settings.ref,
                                             cache_dir=self.settings.repo_cache_dir)
                except SourceError as exc:
                    self._read = exc
                self._read_at = self._clock()
            read = self._read
        if isinstance(read, SourceError):
            raise SourceError(str(read))
        return read

    def source(self) -> Source:
        """That commit parsed and validated (once per commit). Raises NoRepository, SourceError,
        ManifestValidationError."""
        snapshot = self.head()
        sha = snapshot.revision.sha if snapshot.revision is not None else None
        with self._parse_lock:
            if sha is None or sha != self._parsed_sha or self._parsed is None:
                try:
                    self._parsed = parse_snapshot(snapshot, limits=push_limits(self.settings))
                except ManifestValidationError as exc:
                    self._parsed = exc
                self._parsed_sha = sha
            parsed = self._parsed
        if isinstance(parsed, ManifestValidationError):
            raise ManifestValidationError(parsed.errors)
        return parsed

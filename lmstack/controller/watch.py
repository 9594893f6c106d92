"""Watching a local repository's refs (a path or a file:// URL): a commit or push to it pokes the controller
at once, without waiting for the next poll. Needs the `watchfiles` package (it comes with uvicorn[standard]);
without it, or for a remote repository, there is no watcher and polls and webhooks do the work."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from lmstack.gitsource.repo import is_url

log = logging.getLogger("lmstack.controller")

Watch = Callable[[threading.Event, Callable[[str], None]], None]


def local_git_dir(repo: str) -> Path | None:
    """The git directory of a local repository, bare or not; None for a remote or something else."""
    if repo.startswith("file://"):
        path = Path(unquote(urlparse(repo).path))
    elif is_url(repo):
        return None
    else:
        path = Path(repo).expanduser()
    path = path.resolve()
    if (path / ".git").is_dir():
        return path / ".git"
    if (path / "HEAD").is_file() and (path / "refs").is_dir():
        return path
    return None


def ref_watcher(repo: str) -> Watch | None:
    """A watch for Controller(watch=...), or None (no local repository, or no watchfiles)."""
    git_dir = local_git_dir(repo)
    if git_dir is None:
        return None
    try:
        import watchfiles
    except ImportError:
        log.info("controller: watchfiles is not installed; %s is polled, not watched", repo)
        return None

    def is_ref(change: object, path: str) -> bool:
        # Git writes NAME.lock and renames it to NAME: the rename is the change that matters.
        relative = Path(path).relative_to(git_dir).as_posix() if Path(path).is_relative_to(git_dir) else ""
        return not relative.endswith(".lock") and (relative in ("HEAD", "packed-refs") or
                                                   relative.startswith("refs/"))

    def watch(stop: threading.Event, poke: Callable[[str], None]) -> None:
        try:
            # A short debounce: a push touches a few refs within milliseconds; 1.6 s (the default) is latency.
            for _changes in watchfiles.watch(git_dir, watch_filter=is_ref, debounce=50, step=20,
                                             stop_event=stop, raise_interrupt=False):
                poke("watch")
        except Exception as exc:  # inotify limits, the folder removed: polls still run
            log.warning("controller: watching %s stopped: %s", git_dir, exc)

    return watch

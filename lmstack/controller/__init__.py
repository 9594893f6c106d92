"""The GitOps controller inside `lmstack serve`: keeps the workers matching LMSTACK_REPO at LMSTACK_REF.

    controller = build_controller(settings, database)   # None: no repository, or LMSTACK_CONTROLLER=false
    controller.start(); ...; controller.poke("webhook"); ...; controller.stop()

loop.py decides when a pass runs (triggers, coalescing, retries), passes.py what a pass does, watch.py
watches a local repository's refs, webhook.py checks Git hosts' signatures.
"""

from __future__ import annotations

from collections.abc import Mapping

from lmstack.config import Settings, ssh_files
from lmstack.controller.loop import RETRY_FIRST_S, Controller
from lmstack.controller.passes import PassResult, PassRunner
from lmstack.controller.watch import ref_watcher
from lmstack.state import Database

__all__ = ["Controller", "PassResult", "PassRunner", "build_controller"]


def build_controller(settings: Settings, database: Database, *, watch: bool = True, parallel: int = 8,
                     environ: Mapping[str, str] | None = None,
                     retry_first_s: float = RETRY_FIRST_S) -> Controller | None:
    """The controller `settings` ask for (not started), or None when there is none to run. Raises SshFilesError
    when the SSH key or known_hosts file is missing. `watch`: watch a local repository's refs."""
    if settings.repo is None or not settings.controller:
        return None
    runner = PassRunner(settings, database, ssh_files(settings), parallel=parallel, environ=environ)
    return Controller(runner.run, poll_interval_s=settings.poll_interval_s,
                      drift_interval_s=settings.drift_interval_s, retry_first_s=retry_first_s,
                      watch=ref_watcher(settings.repo) if watch else None)

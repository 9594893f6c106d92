"""The controller: a thread of `lmstack serve` that runs passes (passes.py) when something says to.

Triggers: a poll of the ref every `poll_interval_s`; `poke("webhook")` from POST /api/hooks/git; `poke("watch")`
when a local repository's refs change (watch.py); a drift pass every `drift_interval_s` without a new commit
(any pass that applies or re-observes restarts that timer). Pokes coalesce: however many arrive while a pass
runs, one more pass follows, of the commit the ref names then.

A pass that raises (repository unreachable, database down) or leaves a replica failed is logged and retried
after 2 s, 6 s, 18 s, ... (at most RETRY_CAP_S); a push (webhook, watch) retries at once. A pass that held a
replica back (crash-loop backoff, reconcile/backoff.py) says when it may be tried again (`retry_at`): the retry
comes then if that is sooner. Nothing a pass does stops the thread.

Stopping: `stop()` wakes the thread and waits up to `grace_s` for the pass in flight. A pass is not
interrupted (an action half-done is worse than one finished); one still running after the grace period is
abandoned with the process: the thread is a daemon, the leader lock goes with the database connection, the
next holder finishes that sync run as interrupted, and what the pass recorded as it went tells the next
pass where things stand.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from lmstack.controller.passes import PassResult

log = logging.getLogger("lmstack.controller")

RETRY_FIRST_S = 2.0
RETRY_FACTOR = 3.0
RETRY_CAP_S = 300.0
# When several triggers are pending, the pass is named after the most direct one.
_PRIORITY = ("webhook", "watch", "start", "poll", "drift")


class Controller:
    """`Controller(run_pass, poll_interval_s=, drift_interval_s=)`; `start()`, `poke(trigger)`, `stop()`.

    `run_pass(trigger) -> PassResult` is one pass (passes.PassRunner.run); `watch`, if given, is started in a
    thread of its own with the controller's stop event and a poke to call on a change."""

    def __init__(self, run_pass: Callable[[str], PassResult], *, poll_interval_s: float, drift_interval_s: float,
                 watch: Callable[[threading.Event, Callable[[str], None]], None] | None = None,
                 retry_first_s: float = RETRY_FIRST_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._run_pass = run_pass
        self.poll_interval_s = poll_interval_s
        self.drift_interval_s = drift_interval_s
        self._watch = watch
        self._retry_first_s = retry_first_s
        self._clock = clock
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._pending: set[str] = set()
        self._threads: list[threading.Thread] = []
        # What tests and /metrics-like callers may read (under the condition's lock):
        self.pokes = 0
        self.passes = 0
        self.failures = 0  # passes failed in a row (the retry delay grows with it)
        self.last: PassResult | None = None
        self.last_error: str | None = None

    # -- control -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._loop, name="lmstack-controller", daemon=True)]
        if self._watch is not None:
            watch = self._watch
            self._threads.append(threading.Thread(target=lambda: watch(self._stop, self.poke),
                                                  name="lmstack-controller-watch", daemon=True))
        for thread in self._threads:
            thread.start()

    def poke(self, trigger: str) -> None:
        """Run a pass as soon as the one in flight (if any) ends; pokes meanwhile make one pass."""
        with self._cond:
            self.pokes += 1
            self._pending.add(trigger)
            self._cond.notify_all()

    def stop(self, grace_s: float = 30.0) -> bool:
        """Stop and join the threads; False when a pass was still running after `grace_s` (abandoned)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + grace_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in self._threads if thread.is_alive()]
        if stuck:
            log.warning("controller: a pass was still running after %.0f s; abandoned (the next leader marks its "
                        "sync run interrupted)", grace_s)
        return not stuck

    def wait_idle(self, passes: int, timeout_s: float) -> bool:
        """Wait until at least `passes` passes have finished and none is pending (for tests, bench)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.passes < passes or self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # -- the loop ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        now = self._clock()
        # A first pass at start ("start": never skipped as a poll of the commit last applied would be): adopt
        # what runs, repair what changed while no server ran, apply a commit pushed meanwhile.
        with self._cond:
            self._pending.add("start")
        next_poll = now + self.poll_interval_s
        next_drift = now + self.drift_interval_s
        retry_at: float | None = None
        retry_trigger = "poll"
        while True:
            with self._cond:
                while True:
                    if self._stop.is_set():
                        return
                    now = self._clock()
                    trigger = None
                    if self._pending:
                        trigger = min(self._pending, key=lambda t: _PRIORITY.index(t) if t in _PRIORITY else 99)
                        self._pending.clear()
                    elif retry_at is not None:
                        # Backing off: no drift passes, but the poll still comes at its interval (a pass reads
                        # the ref anyway), so a worker that stays down does not delay new commits by minutes.
                        if now >= retry_at:
                            trigger = retry_trigger
                        elif now >= next_poll:
                            trigger = "poll"
                    elif now >= next_poll:
                        trigger = "poll"
                    elif now >= next_drift:
                        trigger = "drift"
                    if trigger is not None:
                        break
                    wake = min(retry_at, next_poll) if retry_at is not None else min(next_poll, next_drift)
                    self._cond.wait(max(0.0, wake - now))
            result = self._one(trigger)
            now = self._clock()
            next_poll = now + self.poll_interval_s  # every pass reads the ref
            if result is not None and result.observed:
                next_drift = now + self.drift_interval_s  # and this one looked at every container
            if result is None or not result.ok:
                delay = min(RETRY_CAP_S, self._retry_first_s * RETRY_FACTOR ** (self.failures - 1))
                if result is not None and result.retry_at is not None:
                    # A replica backing off may be tried again sooner than the pass's own backoff says.
                    delay = min(delay, max(0.0, (result.retry_at - datetime.now(UTC)).total_seconds()))
                retry_at, retry_trigger = now + delay, trigger
                log.warning("controller: retrying in %.0f s (%d failed in a row)", delay, self.failures)
            else:
                retry_at = None

    def _one(self, trigger: str) -> PassResult | None:
        try:
            result = self._run_pass(trigger)
        except Exception as exc:  # a pass never stops the controller: logged, counted, retried
            message = " ".join(str(exc).split())[:500] or type(exc).__name__
            log.error("controller: %s pass failed: %s", trigger, message)
            with self._cond:
                self.passes += 1
                self.failures += 1
                self.last_error = message
                self._cond.notify_all()
            return None
        level = logging.WARNING if not result.ok else logging.INFO
        if result.outcome != "unchanged" or result.trigger != "poll":  # a quiet poll every minute is not news
            log.log(level, "controller: %s", result.summary)
        with self._cond:
            self.passes += 1
            self.failures = 0 if result.ok else self.failures + 1
            self.last = result
            self.last_error = None if result.ok else result.summary
            self._cond.notify_all()
        return result

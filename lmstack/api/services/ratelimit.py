"""Rate limits, in memory and per server process: failed logins, and requests per API key.

Both limiters keep a sliding window as the times of the last N events per subject, so a subject costs
at most N timestamps and a check is O(1): the (N+1)-th event is refused while the oldest of the last N
is younger than the window, and the wait returned is exactly when that one leaves the window.

Counts are per process: with several `lmstack serve` processes behind a load balancer a client can
get up to (processes x limit). Nothing here touches the database, so a limit costs no round-trip.

- `LoginLimiter(*, attempts, window_s=60)`: failed logins per subject ("user:NAME", "ip:ADDR").
  `retry_after(*subjects)` before checking a password (seconds to wait, or None), `failed(*subjects)`
  after a wrong one, `succeeded(subject)` to clear one (a user's count after a good login; an IP's
  count is never cleared early, so logging in to one's own account cannot reset guessing elsewhere).
- `KeyRateLimiter(*, window_s=60)`: requests per minute per API key, `check(key_id, limit)`.
  The gateway calls it through the key cache: `state.keys.check_rate(info) -> float | None` —
  None: allowed, and the request is counted; a number: refused (not counted), retry after that many
  seconds (send `Retry-After: ceil(seconds)` with a 429). A key whose `rpm_limit` is None is never
  limited. "At most `rpm_limit` requests in any 60 seconds", per process.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

Clock = Callable[[], float]


class _SlidingLog:
    """The last `limit` event times per subject; thread-safe (sync routes run in a thread pool)."""

    def __init__(self, *, window_s: float, clock: Clock) -> None:
        self.window_s = window_s
        self._events: dict[object, deque[float]] = {}
        self.lock = threading.Lock()
        self._next_sweep = clock() + window_s

    def wait(self, subject: object, limit: int, now: float) -> float | None:
        """Seconds until one more event fits (None: it fits now). Call with the lock held."""
        events = self._events.get(subject)
        if events is None or len(events) < limit:
            return None
        oldest = events[-limit]
        wait = oldest + self.window_s - now
        return wait if wait > 0 else None

    def add(self, subject: object, limit: int, now: float) -> None:
        """Record an event. Call with the lock held."""
        events = self._events.get(subject)
        if events is None or events.maxlen != limit:
            events = deque(events or (), maxlen=limit)
            self._events[subject] = events
        events.append(now)

    def forget(self, subject: object) -> None:
        """Drop a subject's events. Call with the lock held."""
        self._events.pop(subject, None)

    def sweep(self, now: float) -> None:
        """Forget subjects with no event in the window (at most once a window), so memory stays bounded
        by the subjects active in the last minute. Call with the lock held."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.window_s
        horizon = now - self.window_s
        for subject in [s for s, events in self._events.items() if not events or events[-1] <= horizon]:
            del self._events[subject]


class LoginLimiter:
    """At most `attempts` failed logins per subject in any `window_s` seconds (per process)."""

    def __init__(self, *, attempts: int, window_s: float = 60.0, clock: Clock = time.monotonic) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.attempts = attempts
        self.window_s = window_s
        self._clock = clock
        self._log = _SlidingLog(window_s=window_s, clock=clock)

    def retry_after(self, *subjects: str) -> float | None:
        """Seconds until every subject may try again; None when none of them is blocked."""
        now = self._clock()
        with self._log.lock:
            waits = [w for s in subjects if (w := self._log.wait(s, self.attempts, now)) is not None]
        return max(waits) if waits else None

    def failed(self, *subjects: str) -> None:
        now = self._clock()
        with self._log.lock:
            self._log.sweep(now)
            for subject in subjects:
                self._log.add(subject, self.attempts, now)

    def succeeded(self, subject: str) -> None:
        with self._log.lock:
            self._log.forget(subject)


class KeyRateLimiter:
    """At most `limit` requests per API key in any `window_s` seconds (per process). See the module doc."""

    def __init__(self, *, window_s: float = 60.0, clock: Clock = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._log = _SlidingLog(window_s=window_s, clock=clock)

    def check(self, key_id: int, limit: int | None) -> float | None:
        """None: allowed (and counted). A number: refused (not counted); seconds until one would pass."""
        if limit is None:
            return None
        if limit < 1:
            return self.window_s
        now = self._clock()
        with self._log.lock:
            wait = self._log.wait(key_id, limit, now)
            if wait is not None:
                return wait
            self._log.sweep(now)
            self._log.add(key_id, limit, now)
        return None

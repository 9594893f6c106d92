"""Rate limits, in memory: failed logins, password checks at once, and requests per API key.

The limiters keep a sliding window as the times of the last N events per subject, so a subject costs at
most N timestamps and a check is O(1): the (N+1)-th event is refused while the oldest of the last N is
younger than the window, and the wait returned is exactly when that one leaves the window.

Counts are per instance: one process uses them in place (services/limits.LocalLimits); a server of several
processes keeps one of each in its supervisor (api/hub), so a limit holds across them. Separate servers
behind a load balancer each count their own. Nothing here touches the database.

- `LoginLimiter(*, attempts, concurrency, window_s=60)`: logins. `admit(user, address)` counts the
  attempt as a failure BEFORE its password is checked (so concurrent guesses cannot all slip past the
  count) and returns a `LoginAttempt`, or raises `Throttled(retry_after)`. The attempt's `succeeded()`
  takes the count back (and resets that user and address's failures), `cancel()` takes it back when no
  password was checked. Three windows (see the class): per (user, address), per address, and per user
  across addresses, which slows guessing from many addresses without locking the user out of their own.
  `checks` (a `PasswordChecks`) bounds the argon2 checks running at once (64 MiB each).
- `KeyRateLimiter(*, window_s=60)`: requests per minute per API key, `check(key_id, limit)` -> float | None:
  None: allowed, and the request is counted; a number: refused (not counted), retry after that many
  seconds (send `Retry-After: ceil(seconds)` with a 429). A key whose `rpm_limit` is None is never
  limited. "At most `rpm_limit` requests in any 60 seconds". The gateway asks through services/limits.
- `TokenLimiter`: tokens (prompt + completion) per API key, a minute and a day; see the class. The usage
  recorder feeds it every answer's tokens (`used`) and every batch it writes (`written`); the gateway asks
  `tokens_over(key)` before a request, which is refused (429) once the key has used its tokens.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

Clock = Callable[[], float]

# Per address: one address trying many user names gets this many times a pair's failures.
ADDRESS_FACTOR = 4
# Per user, across every address: past this many times a pair's failures the user is under attack (see
# LoginLimiter).
USER_FACTOR = 10
KNOWN_FOR_S = 30 * 24 * 3600.0  # an address a user logged in from stays known this long ...
MAX_KNOWN = 10_000  # ... and at most this many (user, address) pairs are remembered (the oldest go first)
QUEUE_FACTOR = 4  # password checks waiting for a slot, per slot; beyond that a login is refused at once


class Throttled(Exception):
    """Refused by a limit; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after:.1f} s")
        self.retry_after = retry_after


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

    def take_back(self, subject: object, at: float) -> None:
        """Remove one event recorded at `at` (an attempt that turned out not to count). Call with the lock held."""
        events = self._events.get(subject)
        if events is not None and at in events:
            events.remove(at)

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
    """Failed logins, counted before the password is checked, in three sliding windows of `window_s`:

    - per (user, address): `attempts`. Guessing from address A never locks the real user out at B.
    - per address: `attempts * ADDRESS_FACTOR` (one address trying many user names).
    - per user, across every address: `attempts * USER_FACTOR`. Past it the user is under attack and a
      password is checked only from an address the user logged in from before (kept KNOWN_FOR_S, per
      process) or for a (user, address) pair's first try in the window. So K attacker addresses get K
      guesses a window instead of K * attempts, while the real user still gets in from their own address
      (known, or a first try from a new one); a wrong try there waits like any other pair.

    `checks` bounds the password checks running at once (see PasswordChecks).
    """

    def __init__(self, *, attempts: int, concurrency: int = 2, window_s: float = 60.0,
                 clock: Clock = time.monotonic) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.attempts = attempts
        self.window_s = window_s
        self.checks = PasswordChecks(concurrency=concurrency, queue=QUEUE_FACTOR * concurrency)
        self._clock = clock
        self._log = _SlidingLog(window_s=window_s, clock=clock)
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()

    def admit(self, user: str, address: str) -> LoginAttempt:
        """Count one attempt (as failed, until told otherwise); Throttled when a limit is reached."""
        pair, per_address, per_user = ("pair", user, address), ("ip", address), ("user", user)
        now = self._clock()
        with self._log.lock:
            self._log.sweep(now)
            waits = [w for w in (self._log.wait(pair, self.attempts, now),
                                 self._log.wait(per_address, self.attempts * ADDRESS_FACTOR, now)) if w is not None]
            if waits:
                raise Throttled(max(waits))
            under_attack = self._log.wait(per_user, self.attempts * USER_FACTOR, now)
            if under_attack is not None and not self._is_known(user, address, now):
                first_try = self._log.wait(pair, 1, now) is None
                if not first_try:
                    raise Throttled(under_attack)
            for subject, limit in ((pair, self.attempts), (per_address, self.attempts * ADDRESS_FACTOR),
                                   (per_user, self.attempts * USER_FACTOR)):
                self._log.add(subject, limit, now)
        return LoginAttempt(self, pair, per_address, per_user, now)

    def _is_known(self, user: str, address: str, now: float) -> bool:
        since = self._known.get((user, address))
        return since is not None and now - since < KNOWN_FOR_S

    def _settle(self, attempt: LoginAttempt, *, succeeded: bool) -> None:
        with self._log.lock:
            for subject in (attempt.per_address, attempt.per_user):
                self._log.take_back(subject, attempt.at)
            if succeeded:
                self._log.forget(attempt.pair)
                known = (attempt.pair[1], attempt.pair[2])
                self._known.pop(known, None)
                self._known[known] = self._clock()
                while len(self._known) > MAX_KNOWN:
                    self._known.popitem(last=False)
            else:
                self._log.take_back(attempt.pair, attempt.at)


class LoginAttempt:
    """One admitted login attempt, counted as failed until `succeeded()` or `cancel()`."""

    def __init__(self, limiter: LoginLimiter, pair: tuple[str, str, str], per_address: tuple[str, str],
                 per_user: tuple[str, str], at: float) -> None:
        self.limiter = limiter
        self.pair = pair
        self.per_address = per_address
        self.per_user = per_user
        self.at = at

    def succeeded(self) -> None:
        """The password was right: this attempt does not count, and the pair's earlier failures are cleared
        (the address's and the user's are not: logging in cannot reset guessing elsewhere)."""
        self.limiter._settle(self, succeeded=True)

    def cancel(self) -> None:
        """No password was checked (the server was busy): the attempt does not count."""
        self.limiter._settle(self, succeeded=False)


class PasswordChecks:
    """At most `concurrency` password checks at once and `queue` more waiting; beyond that `slot()` raises
    Throttled at once rather than letting requests (and argon2's memory) pile up."""

    def __init__(self, *, concurrency: int, queue: int) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self._semaphore = asyncio.Semaphore(concurrency)
        self._admitted = 0  # running or waiting
        self.running = 0
        self.most_running = 0  # the most checks seen running at once (a figure for tests)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._admitted >= self.concurrency + self.queue:
            raise Throttled(1.0)
        self._admitted += 1
        try:
            async with self._semaphore:
                self.running += 1
                self.most_running = max(self.most_running, self.running)
                try:
                    yield
                finally:
                    self.running -= 1
        finally:
            self._admitted -= 1


class KeyRateLimiter:
    """At most `limit` requests per API key in any `window_s` seconds. See the module doc."""

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


DAY_S = 86_400  # unix time counts no leap seconds: a UTC day is exactly this many seconds


class LimitedKey(Protocol):
    """What TokenLimiter reads of a key (services.keys.KeyInfo)."""

    @property
    def id(self) -> int: ...
    @property
    def tpm_limit(self) -> int | None: ...
    @property
    def tpd_limit(self) -> int | None: ...
    @property
    def tokens_today(self) -> int | None: ...  # in the usage table on the UTC day of tokens_read_at
    @property
    def tokens_read_at(self) -> datetime | None: ...  # the database's clock when the statement that read it began


class Answer(Protocol):
    """What TokenLimiter reads of an answer's usage (services.usage.UsageRecord)."""

    @property
    def key_id(self) -> int | None: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def at(self) -> float: ...  # unix time the request arrived: the UTC day (and hour row) it counts in


@dataclass(frozen=True)
class TokensOver:
    """A key has used its tokens: refuse its requests for `retry_after` seconds."""

    per: Literal["minute", "day"]
    limit: int
    used: int
    retry_after: float


class _Bucket:
    """The tokens of the answers that finished within `TokenLimiter.bucket_s` of `start`."""

    __slots__ = ("last", "start", "tokens")

    def __init__(self, now: float, tokens: int) -> None:
        self.start = self.last = now
        self.tokens = tokens


class TokenLimiter:
    """Tokens (prompt + completion) per API key: `tpm_limit` a minute, `tpd_limit` a day. A key that has used
    as many is refused until enough of them leave the minute, or until the next UTC day. Tokens are known
    only when an answer finishes, so requests in flight are not counted: a key may go over by what the
    requests admitted before it reached its limit use.

    - A minute: the tokens of the answers that finished in the last `window_s` (told to this limiter: by one
      process, or by every process of a server through its hub), kept in buckets of `bucket_s` that leave
      the window as their last answer does (so a bucket's tokens count up to `bucket_s` longer, never shorter).
    - A day: the UTC day, because the usage table is rolled up per hour: a day is whole hour rows, exact on
      every server, and frees at the same announced moment everywhere (a rolling 24 h would be rows that
      leave an hour at a time). It is what the usage table says (`key.tokens_today`, read by the key cache
      with each look-up and background re-check of the key, twice a second for keys in use: no query per
      request) plus the tokens told to this limiter that the table did not have when that was read: those
      not written yet (`used`, waiting in the usage buffer, or dropped from it) and those written after the read began
      (`written` keeps the database's clock after each write; compared with `key.tokens_read_at`, same
      clock). So the count holds across servers and restarts, and this server's own answers count at once.

    Keys are tracked from their first check with a limit; the usage recorder calls `used` and `written` for
    every answer. Everything runs on the event loop: no lock.
    """

    def __init__(self, *, window_s: float = 60.0, bucket_s: float = 1.0, clock: Clock = time.monotonic,
                 wall: Clock = time.time) -> None:
        self.window_s = window_s
        self.bucket_s = bucket_s
        self._clock = clock  # for the minute
        self._wall = wall  # unix time, for the day
        self._minute: dict[int, deque[_Bucket]] = {}  # per key with a tpm limit, oldest first
        self._unwritten: dict[int, dict[int, int]] = {}  # per key with a tpd limit: {UTC day: tokens}
        # Per key with a tpd limit: (the database's clock once written, UTC day, tokens) of the writes the
        # key's last read may not have seen.
        self._written: dict[int, list[tuple[datetime, int, int]]] = {}

    def tokens_over(self, key: LimitedKey) -> TokensOver | None:
        """None: the key is within its token limits (or has none). Else the limit it reached (the longer
        wait when both)."""
        minute = self._minute_over(key.id, key.tpm_limit) if key.tpm_limit is not None else None
        day = self._day_over(key, key.tpd_limit) if key.tpd_limit is not None else None
        if minute is None or day is None:
            return minute or day
        return day if day.retry_after >= minute.retry_after else minute

    def used(self, answer: Answer) -> None:
        """An answer finished: count its tokens (for a key being tracked)."""
        tokens = answer.prompt_tokens + answer.completion_tokens
        if answer.key_id is None or tokens <= 0:
            return
        buckets = self._minute.get(answer.key_id)
        if buckets is not None:
            now = self._clock()
            if buckets and now - buckets[-1].start < self.bucket_s:
                buckets[-1].last = now
                buckets[-1].tokens += tokens
            else:
                buckets.append(_Bucket(now, tokens))
        days = self._unwritten.get(answer.key_id)
        if days is not None:
            day = int(answer.at // DAY_S)
            days[day] = days.get(day, 0) + tokens

    def written(self, answers: Iterable[Answer], *, at: datetime | None) -> None:
        """These answers are in the usage table, committed before the database's clock read `at`. None: that
        time is not known (the database went away right after the commit); they then count as unseen by any
        read for the rest of their day, twice at worst, which errs on the side of the limit."""
        stamp = at if at is not None else datetime.max.replace(tzinfo=UTC)
        moved: dict[tuple[int, int], int] = {}
        for answer in answers:
            tokens = answer.prompt_tokens + answer.completion_tokens
            if answer.key_id is None or tokens <= 0 or answer.key_id not in self._unwritten:
                continue
            where = (answer.key_id, int(answer.at // DAY_S))
            moved[where] = moved.get(where, 0) + tokens
        for (key_id, day), tokens in moved.items():
            days = self._unwritten[key_id]
            # Never below 0: an answer recorded before its key was tracked was not counted here.
            tokens = min(tokens, days.get(day, 0))
            if tokens:
                days[day] -= tokens
                self._written.setdefault(key_id, []).append((stamp, day, tokens))

    def _minute_over(self, key_id: int, limit: int) -> TokensOver | None:
        buckets = self._minute.setdefault(key_id, deque())
        now = self._clock()
        while buckets and buckets[0].last <= now - self.window_s:
            buckets.popleft()
        used = sum(bucket.tokens for bucket in buckets)
        if used < limit:
            return None
        left = used  # the key may ask again once the oldest buckets leave and less than `limit` remain
        for bucket in buckets:
            left -= bucket.tokens
            if left < limit:
                return TokensOver("minute", limit, used, max(bucket.last + self.window_s - now, 0.0))
        raise AssertionError("unreachable: every bucket gone leaves 0 < limit")

    def _day_over(self, key: LimitedKey, limit: int) -> TokensOver | None:
        now = self._wall()
        today = int(now // DAY_S)
        days = self._unwritten.setdefault(key.id, {})
        for past in [day for day in days if day < today]:
            del days[past]
        used = days.get(today, 0)
        read_at = key.tokens_read_at
        written = self._written.get(key.id)
        if written:
            # Writes the read saw are in key.tokens_today; yesterday's count no more.
            written[:] = [w for w in written if w[1] >= today and (read_at is None or w[0] >= read_at)]
            used += sum(tokens for _, day, tokens in written if day == today)
        if read_at is not None and int(read_at.timestamp() // DAY_S) == today:
            used += key.tokens_today or 0
        if used < limit:
            return None
        return TokensOver("day", limit, used, (today + 1) * DAY_S - now)

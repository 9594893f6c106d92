"""The limits a server enforces, behind one interface whether the server is one process or several.

`Limits` is what the gateway and the login route ask: a key's requests a minute (`rate`), its tokens
(`tokens_over`, fed by `used` and `written` from the usage recorder), and login attempts (`admit_login`).

- `LocalLimits`: one process (`lmstack serve --workers 1`, tests). The classes of services/ratelimit.py, called
  in place: no await does any waiting.
- `api.hub.client.SharedLimits`: several processes. The same classes run once, in the supervisor (api/hub),
  and each call is one round trip over a Unix socket; so a limit holds exactly across processes.

Password checks at once (`password_checks`) stay per process in both: they bound argon2's memory, which is
per process too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from lmstack.api.services.ratelimit import (
    Answer,
    KeyRateLimiter,
    LimitedKey,
    LoginLimiter,
    PasswordChecks,
    TokenLimiter,
    TokensOver,
)


class RateLimitedKey(LimitedKey, Protocol):
    @property
    def rpm_limit(self) -> int | None: ...


class LoginTicket(Protocol):
    """An admitted login attempt, counted as failed until `succeeded()` (or `cancel()`: no password checked)."""

    def succeeded(self) -> None: ...
    def cancel(self) -> None: ...


class Limits(Protocol):
    @property
    def password_checks(self) -> PasswordChecks: ...

    async def rate(self, key: RateLimitedKey) -> float | None:
        """None: allowed, and counted. A number: refused (not counted); seconds until one would pass."""

    async def tokens_over(self, key: LimitedKey) -> TokensOver | None:
        """None: within the key's token limits. Else the limit it reached."""

    def used(self, answer: Answer) -> None:
        """An answer finished: its tokens count."""

    def written(self, answers: Iterable[Answer], *, at: datetime | None) -> None:
        """These answers are in the usage table (see TokenLimiter.written)."""

    async def admit_login(self, user: str, address: str) -> LoginTicket:
        """Count one login attempt; raises ratelimit.Throttled when a window is full."""


@dataclass
class LocalLimits:
    """Limits kept in this process (see the module doc)."""

    logins: LoginLimiter
    rates: KeyRateLimiter = field(default_factory=KeyRateLimiter)
    tokens: TokenLimiter = field(default_factory=TokenLimiter)

    @property
    def password_checks(self) -> PasswordChecks:
        return self.logins.checks

    async def rate(self, key: RateLimitedKey) -> float | None:
        return self.rates.check(key.id, key.rpm_limit)

    async def tokens_over(self, key: LimitedKey) -> TokensOver | None:
        return self.tokens.tokens_over(key)

    def used(self, answer: Answer) -> None:
        self.tokens.used(answer)

    def written(self, answers: Iterable[Answer], *, at: datetime | None) -> None:
        self.tokens.written(answers, at=at)

    async def admit_login(self, user: str, address: str) -> LoginTicket:
        return self.logins.admit(user, address)

"""API keys: creating, listing and revoking them, and verifying them on the request path (`KeyCache`).

A key is `lmsk_` + 32 random bytes. It is shown once, when created; the database keeps its first
characters in clear (to find the row) and a SHA-256 digest (to check it), never the key.

`KeyCache.verify(token)` trusts what it read from the database for `ttl_s` (default 1 s), for valid
and invalid keys alike: a hot key costs no database round-trip per request, and a revoked or expired
key, or one whose user was disabled, is refused within `ttl_s` on every server without any message
between servers (the entry simply expires). Lookups run in the thread pool, off the event loop, and
concurrent lookups of one key share a single query.

`KeyCache.run()` keeps the keys and users asked for in the last `WARM_FOR_S` warm: every `ttl_s / 2` it
re-reads all of them in one query and renews their entries from the time that read started. So a key in
use never waits on the database, not even for its first request after a pause, and a revocation still
lands within `ttl_s` (an entry is never trusted longer than `ttl_s` after the read it came from).

While the database does not answer, the last answer read for a key or user is used for up to `outage_grace_s`
(default 10 minutes) after that read: keys and logins verified before the outage keep working, a key never
seen gets 503. The database is tried again at most once a second meanwhile (not once per request), and the
first read that succeeds ends it: a key revoked during the outage is refused as soon as the database answers.

A key is for the gateway (/v1) and its own usage. Anything more is a scope, set when it is created:
"status" (the read-only /api), "metrics" (/metrics) and "logs" (live logs; its user must be an admin). A key
with a model allowlist sees only those models wherever it reaches (deps.Principal.sees).

`last_used_at` is written at most once a minute per key, by the lookup or re-check that finds it older
than that (so not per request, and not per server).
A key's requests-per-minute and token limits are applied by services/limits.py (token limits from the tokens
of today the key's reads bring along).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import BigInteger, ColumnElement, Row, Update, case, func, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from lmstack.api.security import KEY_PREFIX, digests_match, key_digest, key_lookup, new_api_key
from lmstack.api.services.ratelimit import Clock
from lmstack.state import ROLES, ApiKey, Database, Role, Usage, User

log = logging.getLogger(__name__)

LAST_USED_EVERY = timedelta(seconds=60)
# Keys and users asked for within this long are re-checked in the background (one query per ttl_s / 2).
WARM_FOR_S = 300.0
MAX_NAME_LENGTH = 100
MAX_TPM = 2**31 - 1  # the columns: tpm_limit an integer, tpd_limit a bigint
MAX_TPD = 2**63 - 1
Scope = Literal["status", "metrics", "logs"]
SCOPES: tuple[Scope, ...] = ("status", "metrics", "logs")
_MAX_TOKEN_LENGTH = 128  # keys are 48 characters; anything much longer is not worth hashing
# Compared against when no row has the key's prefix, so a miss costs what a wrong key costs.
_NO_DIGEST = "0" * 64


# A re-check's answer: the keys still usable and the users still enabled among those asked for, and the
# monotonic time the read began (entries are trusted until then + ttl_s).
Rechecked = tuple[dict[int, "KeyInfo"], dict[str, Role], float]
Rechecks = Callable[[list[int], list[str], set[int]], Awaitable[Rechecked]]


@dataclass(frozen=True)
class KeyInfo:
    """A verified key, as the gateway sees it."""

    id: int
    name: str
    user: str
    role: str
    models: tuple[str, ...] | None  # None: every model
    rpm_limit: int | None
    expires_at: datetime | None
    prefix: str = ""  # `lmsk_` and the stored lookup characters, for logs
    scopes: frozenset[str] = frozenset()  # what it reaches beyond /v1 and its own usage (SCOPES)
    tpm_limit: int | None = None  # tokens a minute (prompt + completion); None: no limit
    tpd_limit: int | None = None  # tokens a UTC day; None: no limit
    # With a tpd limit: the key's tokens in the usage table on the UTC day of tokens_read_at, read with the key
    # (so as fresh as the key: twice a second while in use). ratelimit.TokenLimiter adds what is not there yet.
    # A reading, not part of what the key is: left out of comparisons.
    tokens_today: int | None = field(default=None, compare=False)
    tokens_read_at: datetime | None = field(default=None, compare=False)  # the database's clock as that read began

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


KeyStatus = Literal["active", "revoked", "expired"]


@dataclass(frozen=True)
class KeyRecord:
    """A stored key for listing: everything but the secret (which is not stored)."""

    id: int
    name: str
    user: str
    prefix: str  # as shown: `lmsk_` + the lookup characters
    models: tuple[str, ...] | None
    rpm_limit: int | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    last_used_at: datetime | None
    scopes: tuple[str, ...] = ()
    tpm_limit: int | None = None
    tpd_limit: int | None = None

    @property
    def status(self) -> KeyStatus:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= datetime.now(UTC):
            return "expired"
        return "active"


@dataclass(frozen=True)
class CreatedKey:
    record: KeyRecord
    token: str  # the key itself: show it once, store it nowhere


class ApiKeyError(Exception):
    """A key operation that cannot be done; the message says why (shown as is)."""


class ApiKeyNotFound(ApiKeyError):
    pass


class InvalidKeyRequest(ApiKeyError):
    pass


class CredentialsUnavailable(Exception):
    """Credentials cannot be checked now (the database does not answer)."""


def _record(key: ApiKey, user: str) -> KeyRecord:
    return KeyRecord(
        id=key.id, name=key.name, user=user, prefix=KEY_PREFIX + key.prefix,
        models=tuple(key.models) if key.models is not None else None, rpm_limit=key.rpm_limit,
        expires_at=key.expires_at, revoked_at=key.revoked_at, created_at=key.created_at,
        last_used_at=key.last_used_at, scopes=tuple(key.scopes or ()), tpm_limit=key.tpm_limit,
        tpd_limit=key.tpd_limit)


def _clean_models(models: Sequence[str] | None) -> list[str] | None:
    if models is None:
        return None
    cleaned = list(dict.fromkeys(m.strip() for m in models))
    if not cleaned or any(not m for m in cleaned):
        raise InvalidKeyRequest("models: list at least one model name (or leave it out to allow every model)")
    return cleaned


def _clean_scopes(scopes: Sequence[str]) -> list[str]:
    cleaned = list(dict.fromkeys(s.strip() for s in scopes))
    unknown = [s for s in cleaned if s not in SCOPES]
    if unknown:
        raise InvalidKeyRequest(f"scopes: unknown scope {unknown[0]!r}; the scopes are {', '.join(SCOPES)}")
    return cleaned


def _check_limit(name: str, value: object, most: int) -> None:
    # bool is an int to Python, and 1.0 is not one: neither is a limit.
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
        raise InvalidKeyRequest(f"{name}: a whole number from 1 to {most} (or leave it out for no limit), "
                                f"not {value!r}")


def create_key(session: Session, *, user: str, name: str, models: Sequence[str] | None = None,
               rpm_limit: int | None = None, expires_at: datetime | None = None,
               scopes: Sequence[str] = (), tpm_limit: int | None = None, tpd_limit: int | None = None) -> CreatedKey:
    """A new key for `user`. The returned token is the only copy of the key. `scopes`: what it reaches
    beyond /v1 and its own usage (SCOPES). Limits (None: none): `rpm_limit` requests a minute, `tpm_limit`
    tokens a minute, `tpd_limit` tokens a UTC day (see services/ratelimit.py)."""
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidKeyRequest(f"name: 1 to {MAX_NAME_LENGTH} characters")
    allowed = _clean_models(models)
    granted = _clean_scopes(scopes)
    if rpm_limit is not None and rpm_limit < 1:
        raise InvalidKeyRequest("rpm_limit: at least 1 (or leave it out for no limit)")
    _check_limit("tpm_limit", tpm_limit, MAX_TPM)
    _check_limit("tpd_limit", tpd_limit, MAX_TPD)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise InvalidKeyRequest("expires_at: give a time zone (for example 2030-01-01T00:00:00Z)")
        if expires_at <= datetime.now(UTC):
            raise InvalidKeyRequest("expires_at: must be in the future")
    owner = session.scalar(select(User).where(User.name == user))
    if owner is None:
        raise ApiKeyNotFound(f"no user {user!r}")
    if owner.disabled:
        raise InvalidKeyRequest(f"user {user!r} is disabled")
    new = new_api_key()
    key = ApiKey(name=name, user_id=owner.id, prefix=new.lookup, key_hash=new.digest, models=allowed,
                 rpm_limit=rpm_limit, expires_at=expires_at, scopes=granted, tpm_limit=tpm_limit,
                 tpd_limit=tpd_limit)
    session.add(key)
    session.flush()
    session.refresh(key)
    return CreatedKey(record=_record(key, owner.name), token=new.token)


def list_keys(session: Session, *, user: str | None = None) -> list[KeyRecord]:
    """Every key (revoked and expired ones too), or only `user`'s."""
    query = select(ApiKey, User.name).join(User, User.id == ApiKey.user_id).order_by(ApiKey.id)
    if user is not None:
        query = query.where(User.name == user)
    return [_record(key, owner) for key, owner in session.execute(query)]


def find_key(session: Session, *, ref: str) -> KeyRecord:
    """A key by id (digits) or by prefix as `keys list` shows it (with or without `lmsk_`; the whole key
    works too)."""
    ref = ref.strip()
    query = select(ApiKey, User.name).join(User, User.id == ApiKey.user_id)
    if ref.isdigit():
        query = query.where(ApiKey.id == int(ref))
    else:
        query = query.where(ApiKey.prefix == key_lookup(ref if ref.startswith(KEY_PREFIX) else KEY_PREFIX + ref))
    row = session.execute(query).one_or_none()
    if row is None:
        raise ApiKeyNotFound(f"no API key {ref!r}")
    return _record(*row)


def revoke_key(session: Session, *, key_id: int, owner: str | None = None) -> KeyRecord:
    """Revoke a key (idempotent: a revoked key keeps its first revocation time). With `owner`, only a
    key of that user is found. Servers refuse it within their key cache's time (about a second)."""
    query = select(ApiKey, User.name).join(User, User.id == ApiKey.user_id).where(ApiKey.id == key_id)
    if owner is not None:
        query = query.where(User.name == owner)
    row = session.execute(query.with_for_update(of=ApiKey)).one_or_none()
    if row is None:
        raise ApiKeyNotFound(f"no API key {key_id}")
    key, user = row
    if key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
    return _record(key, user)


# -- verification on the request path ---------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    value: object
    until: float  # monotonic: trusted until then
    used: float  # monotonic: when a request last asked for it


class KeyCache:
    """Verified keys (and users' current roles), each trusted for `ttl_s`. See the module docstring."""

    def __init__(self, database: Database, *, ttl_s: float, clock: Clock = time.monotonic,
                 outage_grace_s: float = 600.0, rechecks: Rechecks | None = None) -> None:
        self.database = database
        # Where the background re-checks come from: this process's own query, or (several server processes)
        # the one query the supervisor makes for all of them (api/hub).
        self._source: Rechecks = rechecks or self._recheck_here
        self.ttl_s = ttl_s
        self.outage_grace_s = outage_grace_s
        self.outage_since: float | None = None  # monotonic: when the database stopped answering (None: it does)
        self._retry_at = 0.0  # during an outage: the database is not tried again before then
        self.lookups = 0  # database lookups made: a figure for metrics and tests
        self.rechecks = 0  # background re-checks made (each one query for every key in use)
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._loading: dict[tuple[str, str], asyncio.Task[object]] = {}
        self._next_purge = clock() + ttl_s
        self._last_refresh = clock()

    async def verify(self, token: str) -> KeyInfo | None:
        """The key's info when `token` is a valid, unexpired, unrevoked key of an enabled user; else None."""
        if not token.startswith(KEY_PREFIX) or len(token) > _MAX_TOKEN_LENGTH:
            return None
        # Cached by digest: the key itself is not kept in memory either.
        value = await self._get(("key", key_digest(token)), lambda: run_in_threadpool(self._lookup_key, token))
        info = value if isinstance(value, KeyInfo) else None
        if info is not None and info.expires_at is not None and info.expires_at <= datetime.now(UTC):
            return None  # expired while cached
        return info

    async def user_role(self, name: str) -> Role | None:
        """The current role of an enabled user; None when unknown or disabled (login tokens are checked
        against this, so disabling a user ends their sessions within `ttl_s` too)."""
        value = await self._get(("user", name), lambda: run_in_threadpool(self._lookup_user, name))
        return value if isinstance(value, str) and value in ROLES else None

    def clear(self) -> None:
        """Forget every cached answer (the next verification of each key reads the database)."""
        self._entries.clear()

    async def _get(self, key: tuple[str, str], load: Callable[[], Awaitable[object]]) -> object:
        entry = self._entries.get(key)
        now = self._clock()
        if entry is not None:
            if entry.until > now:
                entry.used = now
                return entry.value
            if self.outage_since is not None and now < self._retry_at and self._within_grace(entry, now):
                entry.used = now  # the database is down and was tried less than a second ago
                return entry.value
        if self.outage_since is not None and now < self._retry_at:
            raise CredentialsUnavailable("cannot check credentials now: the database does not answer")
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(key, load))
            self._loading[key] = task
            task.add_done_callback(lambda done: self._loaded(key, done))
        try:
            # Shielded: a caller that goes away (client disconnect) does not cancel the others' lookup.
            return await asyncio.shield(task)
        except CredentialsUnavailable:
            now = self._clock()
            self._database_down(now)
            if entry is not None and self._within_grace(entry, now):
                entry.used = now
                return entry.value
            raise

    def _within_grace(self, entry: _Entry, now: float) -> bool:
        """Whether an expired entry may stand in while the database does not answer: read (ttl_s before it
        expired) less than outage_grace_s ago."""
        return entry.until - self.ttl_s + self.outage_grace_s > now

    def _database_down(self, now: float) -> None:
        if self.outage_since is None:
            self.outage_since = now
            log.warning("the database does not answer: API keys and logins checked in the last %.0f s are "
                        "trusted meanwhile; new ones get 503", self.outage_grace_s)
        self._retry_at = now + 1.0

    def _database_up(self) -> None:
        if self.outage_since is not None:
            log.warning("the database answers again after %.0f s: credentials are checked again",
                        self._clock() - self.outage_since)
            self.outage_since = None

    async def _load(self, key: tuple[str, str], load: Callable[[], Awaitable[object]]) -> object:
        started = self._clock()  # trusted from before the read: never longer than ttl_s after it
        value = await load()
        self._database_up()
        self._store(key, value, until=started + self.ttl_s)
        return value

    def _loaded(self, key: tuple[str, str], task: asyncio.Task[object]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    def _store(self, key: tuple[str, str], value: object, *, until: float) -> None:
        now = self._clock()
        if now >= self._next_purge:  # drop stale entries (unknown keys included) about once per ttl
            self._next_purge = now + self.ttl_s
            # Valid keys and users in use are kept for the outage grace: they stand in if the database stops
            # answering. Refusals are not (a flood of made-up keys must not fill memory).
            for stale in [k for k, e in self._entries.items() if e.until <= now and (
                    e.value is None or e.used < now - WARM_FOR_S or not self._within_grace(e, now))]:
                del self._entries[stale]
        self._entries[key] = _Entry(value, until, used=now)

    # -- keeping keys in use warm ------------------------------------------------------------------

    async def run(self) -> None:
        """Re-check the keys and users in use every `ttl_s / 2` until cancelled (see the module docstring)."""
        failing = False
        while True:
            await asyncio.sleep(self.ttl_s / 2)
            try:
                await self.refresh()
            except CredentialsUnavailable as exc:
                if not failing:  # once per outage: entries then expire and requests see the 503 themselves
                    log.warning("cannot re-check API keys in use: %s", exc.__cause__ or exc)
                failing = True
            except Exception:  # a bug must not end the re-checks: keys would then only expire
                log.exception("re-checking API keys in use failed")
            else:
                failing = False

    async def refresh(self) -> None:
        """Re-read every valid key and enabled user asked for within WARM_FOR_S, in one query, and renew
        their entries (a key revoked, expired or gone, or a user disabled, is cached as refused)."""
        now = self._clock()
        keys: dict[int, tuple[str, str]] = {}
        users: dict[str, tuple[str, str]] = {}
        used_lately: set[int] = set()  # keys asked for since the last re-check: their last_used_at may be due
        for cache_key, entry in self._entries.items():
            if entry.used < now - WARM_FOR_S or (entry.until <= now and self.outage_since is None):
                continue  # not in use, or expired (the next request reads it again itself)
            if isinstance(entry.value, KeyInfo):
                keys[entry.value.id] = cache_key
                if entry.used >= self._last_refresh:
                    used_lately.add(entry.value.id)
            elif cache_key[0] == "user" and entry.value is not None:
                users[cache_key[1]] = cache_key
        if not keys and not users:
            return
        self._last_refresh = self._clock()
        try:
            infos, roles, started = await self._source(list(keys), list(users), used_lately)
        except CredentialsUnavailable:
            self._database_down(self._clock())
            raise
        self._database_up()
        until = started + self.ttl_s
        for key_id, cache_key in keys.items():
            self._renew(cache_key, infos.get(key_id), until)
        for name, cache_key in users.items():
            self._renew(cache_key, roles.get(name), until)

    async def _recheck_here(self, key_ids: list[int], user_names: list[str],
                            used_lately: set[int]) -> Rechecked:
        started = self._clock()
        infos, roles = await run_in_threadpool(self.recheck, key_ids, user_names, used_lately)
        return infos, roles, started

    def _renew(self, cache_key: tuple[str, str], value: object, until: float) -> None:
        entry = self._entries.get(cache_key)
        if entry is None:
            return  # purged meanwhile: the next request reads it itself
        if entry.until < until:  # unless a lookup started after this re-check stored something newer
            entry.value, entry.until = value, until

    def recheck(self, key_ids: list[int], user_names: list[str],
                 used_lately: set[int]) -> tuple[dict[int, KeyInfo], dict[str, Role]]:
        self.rechecks += 1
        infos: dict[int, KeyInfo] = {}
        roles: dict[str, Role] = {}
        now = datetime.now(UTC)
        try:
            with self.database.engine.begin() as conn:
                if key_ids:
                    due: list[int] = []
                    for row in conn.execute(_KEY_COLUMNS.where(ApiKey.id.in_(key_ids))):
                        if _usable(row, now):
                            infos[row.id] = _key_info(row)
                            if row.id in used_lately and (row.last_used_at is None
                                                          or row.last_used_at < now - LAST_USED_EVERY):
                                due.append(row.id)
                    if due:
                        conn.execute(_touch(ApiKey.id.in_(due)))
                if user_names:
                    query = select(User.name, User.role, User.disabled).where(User.name.in_(user_names))
                    for name, role, disabled in conn.execute(query):
                        if not disabled:
                            roles[name] = role
        except (DBAPIError, PoolTimeoutError) as exc:
            raise CredentialsUnavailable("the database does not answer") from exc
        return infos, roles

    def _lookup_key(self, token: str) -> KeyInfo | None:
        self.lookups += 1
        try:
            with self.database.engine.begin() as conn:
                row = conn.execute(_KEY_COLUMNS.where(ApiKey.prefix == key_lookup(token))).one_or_none()
                match = digests_match(row.key_hash if row is not None else _NO_DIGEST, token)
                now = datetime.now(UTC)
                if row is None or not match or not _usable(row, now):
                    return None
                if row.last_used_at is None or row.last_used_at < now - LAST_USED_EVERY:
                    conn.execute(_touch(ApiKey.id == row.id))
        except (DBAPIError, PoolTimeoutError) as exc:
            raise CredentialsUnavailable("cannot check the API key now: the database does not answer") from exc
        return _key_info(row)

    def _lookup_user(self, name: str) -> Role | None:
        self.lookups += 1
        try:
            with self.database.engine.connect() as conn:
                row = conn.execute(select(User.role, User.disabled).where(User.name == name)).one_or_none()
        except (DBAPIError, PoolTimeoutError) as exc:
            raise CredentialsUnavailable("cannot check the login now: the database does not answer") from exc
        if row is None or row.disabled:
            return None
        role: Role = row.role
        return role


# A key with a daily token limit: its tokens in the usage table since the start of the UTC day, as of the
# statement's start (statement_timestamp: TokenLimiter compares it with the times its own writes committed,
# on the same clock). Read with the key, so the key cache's re-checks keep it fresh without a query per request.
_READ_AT = case((ApiKey.tpd_limit.is_(None), None), else_=func.statement_timestamp())
_TOKENS_TODAY = case((ApiKey.tpd_limit.is_(None), None), else_=(
    select(func.coalesce(func.sum(Usage.prompt_tokens + Usage.completion_tokens), 0).cast(BigInteger))
    .where(Usage.api_key_id == ApiKey.id,
           Usage.hour >= func.date_trunc("day", func.statement_timestamp(), "UTC"))
    .correlate(ApiKey).scalar_subquery()))

_KEY_COLUMNS = (select(ApiKey.id, ApiKey.name, ApiKey.prefix, ApiKey.key_hash, ApiKey.models, ApiKey.rpm_limit,
                       ApiKey.scopes, ApiKey.expires_at, ApiKey.revoked_at, ApiKey.last_used_at,
                       User.name.label("user"), User.role, User.disabled, ApiKey.tpm_limit, ApiKey.tpd_limit,
                       _TOKENS_TODAY.label("tokens_today"), _READ_AT.label("tokens_read_at"))
                .join(User, User.id == ApiKey.user_id))


def _usable(row: Row[*tuple[Any, ...]], now: datetime) -> bool:
    """Not revoked, not expired, and its user enabled."""
    return row.revoked_at is None and not row.disabled and (row.expires_at is None or row.expires_at > now)


def _key_info(row: Row[*tuple[Any, ...]]) -> KeyInfo:
    return KeyInfo(id=row.id, name=row.name, user=row.user, role=row.role,
                   models=tuple(row.models) if row.models is not None else None, rpm_limit=row.rpm_limit,
                   expires_at=row.expires_at, prefix=KEY_PREFIX + row.prefix, scopes=frozenset(row.scopes or ()),
                   tpm_limit=row.tpm_limit, tpd_limit=row.tpd_limit, tokens_today=row.tokens_today,
                   tokens_read_at=row.tokens_read_at)


def _touch(which: ColumnElement[bool]) -> Update:
    """Set last_used_at to now where it is due. Conditional: of several servers finding it due at once,
    usually only one writes."""
    return (update(ApiKey)
            .where(which, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < func.now() - LAST_USED_EVERY))
            .values(last_used_at=func.now()))

"""Users: who may log in (argon2 password hashes, role admin or viewer) and the login itself.

No account exists until `lmstack users create` makes one: there is no default user or password anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from lmstack.api.security import hash_password, issue_token, verify_password
from lmstack.api.services.limits import Limits
from lmstack.api.services.ratelimit import Throttled
from lmstack.state import ROLES, Database, Role, User

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024  # argon2 reads all of it: a cap keeps a login request cheap
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}"
_NAME = re.compile(NAME_PATTERN)


class UserError(Exception):
    """A user operation that cannot be done; the message says why (shown as is)."""


class UserExists(UserError):
    pass


class UserNotFound(UserError):
    pass


class InvalidUser(UserError):
    """A name or password that does not meet the rules."""


@dataclass(frozen=True)
class UserRecord:
    id: int
    name: str
    role: Role
    disabled: bool
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserRecord:
        return cls(id=user.id, name=user.name, role=user.role, disabled=user.disabled, created_at=user.created_at)


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidUser(f"invalid user name {name!r}: 1-64 letters, digits and . _ @ -, starting with a letter "
                          "or digit")


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidUser(f"the password is too short: at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidUser(f"the password is too long: at most {MAX_PASSWORD_LENGTH} characters")


def create_user(session: Session, *, name: str, password: str, role: Role) -> UserRecord:
    check_name(name)
    check_password(password)
    if role not in ROLES:
        raise InvalidUser(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise UserExists(f"user {name!r} already exists")
    user = User(name=name, password_hash=hash_password(password), role=role, disabled=False)
    session.add(user)
    try:
        session.flush()
    except IntegrityError:  # created by someone else since the check
        raise UserExists(f"user {name!r} already exists") from None
    session.refresh(user)
    return UserRecord.of(user)


def list_users(session: Session) -> list[UserRecord]:
    return [UserRecord.of(user) for user in session.scalars(select(User).order_by(User.name))]


def get_user(session: Session, *, name: str) -> UserRecord | None:
    user = session.scalar(select(User).where(User.name == name))
    return UserRecord.of(user) if user is not None else None


def set_disabled(session: Session, *, name: str, disabled: bool) -> UserRecord:
    """Disable (or enable again) a user: a disabled user cannot log in, and neither their login tokens
    nor their API keys are accepted (within the key cache's time, about a second)."""
    user = session.scalar(select(User).where(User.name == name).with_for_update())
    if user is None:
        raise UserNotFound(f"no user {name!r}")
    user.disabled = disabled
    return UserRecord.of(user)


# -- logging in ------------------------------------------------------------------------------------


class LoginRefused(Exception):
    """Why a login failed. The message is safe to show: it never says whether the user exists."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidCredentials(LoginRefused):
    pass


class UserDisabled(LoginRefused):
    pass


class TooManyAttempts(LoginRefused):
    pass


class LoginBusy(LoginRefused):
    """Too many password checks running and waiting: try again in a moment (nothing was counted)."""


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_at: datetime
    user: str
    role: Role


async def log_in(database: Database, *, limits: Limits, name: str, password: str, client: str, secret: str,
                 ttl_s: int) -> IssuedToken:
    """A login token for a right name and password.

    The attempt is counted against the limits (services/ratelimit.py: per user and address, per address,
    per user across addresses) before the password is checked, so concurrent guesses cannot outrun the
    count; a refused attempt checks nothing. The check itself waits for one of `limits.password_checks`' slots
    (argon2 takes 64 MiB each) and runs in a thread; when too many are waiting it is refused at once.
    A wrong password and an unknown user fail alike, at the same cost (one argon2 verification either way:
    an unknown user is checked against a dummy hash).
    """
    try:
        attempt = await limits.admit_login(name, client)
    except Throttled as exc:
        raise TooManyAttempts("too many failed logins; try again later", retry_after=exc.retry_after) from None
    try:
        async with limits.password_checks.slot():
            # Not abandoned on cancellation: the slot is held until the check really ends.
            user = await run_in_threadpool(_check_password, database, name, password)
    except Throttled as exc:
        attempt.cancel()
        raise LoginBusy("too many logins at once; try again in a moment", retry_after=exc.retry_after) from None
    if user is None:
        raise InvalidCredentials("wrong user name or password")
    attempt.succeeded()
    if user.disabled:
        # Only someone who knows the password learns this.
        raise UserDisabled(f"user {name!r} is disabled")
    token, expires = issue_token(secret, user=user.name, role=user.role, ttl_s=ttl_s)
    return IssuedToken(token=token, expires_at=expires, user=user.name, role=user.role)


def _check_password(database: Database, name: str, password: str) -> UserRecord | None:
    """The user when the password is theirs; None otherwise. Blocking (a query and argon2)."""
    with database.session() as session:
        user = session.scalar(select(User).where(User.name == name))
        if not verify_password(user.password_hash if user is not None else None, password) or user is None:
            return None
        return UserRecord.of(user)

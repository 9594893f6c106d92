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

from lmstack.api.security import hash_password, issue_token, verify_password
from lmstack.api.services.ratelimit import LoginLimiter
from lmstack.state import ROLES, Role, User

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


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_at: datetime
    user: str
    role: Role


def log_in(session: Session, *, limiter: LoginLimiter, name: str, password: str, client: str, secret: str,
           ttl_s: int) -> IssuedToken:
    """A login token for a right name and password.

    A wrong password and an unknown user fail alike, at the same cost (one argon2 verification either
    way: an unknown user is checked against a dummy hash). Failures count against the user and the
    client address; once either has had `limiter.attempts` in the window, further attempts are refused
    before any password is checked. A good login clears the user's count, not the address's.
    """
    subjects = (f"user:{name}", f"ip:{client}")
    wait = limiter.retry_after(*subjects)
    if wait is not None:
        raise TooManyAttempts("too many failed logins; try again later", retry_after=wait)
    user = session.scalar(select(User).where(User.name == name))
    if not verify_password(user.password_hash if user is not None else None, password) or user is None:
        limiter.failed(*subjects)
        raise InvalidCredentials("wrong user name or password")
    if user.disabled:
        # Only someone who knows the password learns this.
        raise UserDisabled(f"user {name!r} is disabled")
    limiter.succeeded(subjects[0])
    token, expires = issue_token(secret, user=user.name, role=user.role, ttl_s=ttl_s)
    return IssuedToken(token=token, expires_at=expires, user=user.name, role=user.role)

"""Passwords (argon2), login tokens (JWT, HS256 only) and API keys (random, stored as a hash)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

KEY_PREFIX = "lmsk_"
_LOOKUP_CHARS = 12  # characters after the prefix stored in clear, to find the row without a scan
_hasher = PasswordHasher()
# Verifying against this when the user does not exist takes as long as a real check: no user enumeration.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class TokenClaims:
    user: str
    role: str
    expires_at: datetime


def issue_token(secret: str, *, user: str, role: str, ttl_s: int) -> tuple[str, datetime]:
    expires = datetime.now(UTC) + timedelta(seconds=ttl_s)
    token = jwt.encode({"sub": user, "role": role, "exp": expires, "iat": datetime.now(UTC)}, secret,
                       algorithm="HS256")
    return token, expires


def decode_token(secret: str, token: str) -> TokenClaims | None:
    """The claims of a valid, unexpired HS256 token; None otherwise (`alg: none` and others are refused)."""
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
    except jwt.PyJWTError:
        return None
    return TokenClaims(user=str(claims["sub"]), role=str(claims.get("role", "viewer")),
                       expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC))


def load_or_create_secret(path: Path) -> str:
    """The JWT secret kept in the state directory, created (0600) on first start."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    with path.open("x") as handle:  # "x": two servers starting at once do not overwrite each other
        path.chmod(0o600)
        handle.write(secret)
    return secret


@dataclass(frozen=True)
class NewKey:
    token: str  # shown once, never stored
    lookup: str  # stored in clear to find the row
    digest: str  # stored


def new_api_key() -> NewKey:
    token = KEY_PREFIX + secrets.token_urlsafe(32)  # 32 random bytes
    return NewKey(token=token, lookup=key_lookup(token), digest=key_digest(token))


def key_lookup(token: str) -> str:
    return token[len(KEY_PREFIX): len(KEY_PREFIX) + _LOOKUP_CHARS]


def key_digest(token: str) -> str:
    # The key has 256 bits of entropy: a fast hash is enough (no dictionary to attack) and keeps
    # verification cheap on the request path.
    return hashlib.sha256(token.encode()).hexdigest()


def digests_match(stored: str, token: str) -> bool:
    return hmac.compare_digest(stored, key_digest(token))

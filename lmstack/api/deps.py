"""Dependencies as `Annotated` aliases, all in one place: routes declare what they need by type."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from lmstack.api.errors import ApiError
from lmstack.api.security import KEY_PREFIX, decode_token
from lmstack.api.services.keys import CredentialsUnavailable, KeyInfo, Scope
from lmstack.api.services.status import View
from lmstack.api.state import AppState


async def get_state(request: Request) -> AppState:
    # async: a plain `def` dependency would be run in the thread pool on every request.
    state: AppState = request.app.state.lmstack
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.database.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class Principal:
    """Who is asking: a user by login token, or a user's API key (with its limits).

    A key acts as at most its own user, narrowed: beyond /v1 and its own usage it reaches only its scopes,
    and with a model allowlist it sees only those models anywhere (`view`)."""

    user: str
    role: str
    key: KeyInfo | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def has_scope(self, scope: Scope) -> bool:
        """A login reaches everything its role does; a key only its scopes."""
        return self.key is None or scope in self.key.scopes

    def sees(self, served_name: str) -> bool:
        return self.key is None or self.key.allows(served_name)

    @property
    def models(self) -> frozenset[str] | None:
        """The served names a key is limited to; None: every model."""
        return frozenset(self.key.models) if self.key is not None and self.key.models is not None else None

    @property
    def view(self) -> View:
        """What the status API shows: the key's models only, and addresses (engine endpoints) to admins only."""
        return View(models=self.models, addresses=self.is_admin)


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def authenticate(request: Request, state: StateDep) -> Principal:
    return await principal_for(request.headers.get("authorization", ""), state)


async def principal_for(header: str, state: AppState) -> Principal:
    """Who an `Authorization` header value names; ApiError 401 (or 503 when credentials cannot be checked)."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing credentials: send 'Authorization: Bearer <API key or login token>'",
                       code="missing_api_key", headers=_CHALLENGE)
    try:
        if token.startswith(KEY_PREFIX):
            info = await state.keys.verify(token)
            if info is None:
                raise ApiError(401, "invalid API key (unknown, revoked or expired)", code="invalid_api_key",
                               headers=_CHALLENGE)
            return Principal(user=info.user, role=info.role, key=info)
        claims = decode_token(state.jwt_secret, token)
        # The user's current role, not the one in the token; a disabled user's tokens stop working
        # (within the key cache's time) instead of lasting until they expire.
        role = await state.keys.user_role(claims.user) if claims is not None else None
    except CredentialsUnavailable as exc:
        raise ApiError(503, str(exc), code="credentials_unavailable", headers={"Retry-After": "1"}) from exc
    if claims is None or role is None:
        raise ApiError(401, "invalid or expired login token; log in again", code="invalid_token",
                       headers=_CHALLENGE)
    return Principal(user=claims.user, role=role)


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]


def require_admin(principal: CurrentPrincipal) -> Principal:
    if not principal.is_admin:
        raise ApiError(403, "this needs an admin", code="forbidden")
    return principal


AdminPrincipal = Annotated[Principal, Depends(require_admin)]


def require_login(principal: CurrentPrincipal) -> Principal:
    # API keys are for calling models: a key (perhaps limited to some models, or expiring) must not be
    # able to mint or revoke keys.
    if principal.key is not None:
        raise ApiError(403, "this needs a login token (POST /api/auth/login), not an API key", code="forbidden")
    return principal


LoginPrincipal = Annotated[Principal, Depends(require_login)]


def _scoped(scope: Scope) -> Callable[[Principal], Awaitable[Principal]]:
    async def require(principal: CurrentPrincipal) -> Principal:
        if not principal.has_scope(scope):
            raise ApiError(403, f"this API key has no {scope!r} scope: log in, or use a key created with "
                                f"scope {scope!r} (lmstack keys create --scope {scope})", code="missing_scope")
        return principal

    return require


# The read-only status API and /metrics: a login, or a key with the scope.
StatusPrincipal = Annotated[Principal, Depends(_scoped("status"))]
MetricsPrincipal = Annotated[Principal, Depends(_scoped("metrics"))]

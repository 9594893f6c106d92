"""Routes: logging in (a JWT for a user name and password) and who the caller is."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from lmstack.api import schemas
from lmstack.api.deps import CurrentPrincipal, StateDep
from lmstack.api.errors import ApiError
from lmstack.api.services.users import (
    MAX_PASSWORD_LENGTH,
    InvalidCredentials,
    LoginBusy,
    LoginRefused,
    TooManyAttempts,
    UserDisabled,
    log_in,
)

router = APIRouter(prefix="/api/auth", tags=["auth"])


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (the scheme's name, not a secret)
    expires_at: datetime


class WhoAmI(BaseModel):
    user: str
    role: str
    via: Literal["login", "api_key"]
    key_id: int | None = None


@router.post("/login", responses=schemas.errors(
    400, 413, (401, "wrong user name or password"), (403, "the user is disabled"),
    (429, "too many failed logins (see Retry-After)"), (503, "too many logins at once (see Retry-After)")))
async def login(body: LoginRequest, request: Request, state: StateDep) -> TokenOut:
    """A login token (HS256 JWT) for the dashboard and the /api routes; send it as `Authorization: Bearer`."""
    client = request.client.host if request.client is not None else "unknown"
    try:
        issued = await log_in(state.database, limits=state.limits, name=body.username, password=body.password,
                              client=client, secret=state.jwt_secret, ttl_s=state.settings.jwt_ttl_s)
    except LoginRefused as exc:
        raise _refusal(exc) from None
    return TokenOut(access_token=issued.token, expires_at=issued.expires_at)


def _refusal(exc: LoginRefused) -> ApiError:
    if isinstance(exc, TooManyAttempts):
        return ApiError(429, str(exc), code="too_many_logins",
                        headers={"Retry-After": str(max(1, math.ceil(exc.retry_after or 1)))})
    if isinstance(exc, LoginBusy):
        return ApiError(503, str(exc), code="login_busy",
                        headers={"Retry-After": str(max(1, math.ceil(exc.retry_after or 1)))})
    if isinstance(exc, UserDisabled):
        return ApiError(403, str(exc), code="user_disabled")
    assert isinstance(exc, InvalidCredentials)
    return ApiError(401, str(exc), code="invalid_credentials", headers={"WWW-Authenticate": "Bearer"})


@router.get("/me", responses=schemas.errors(401, 503))
async def me(principal: CurrentPrincipal) -> WhoAmI:
    """Who the credentials belong to (a login token or an API key)."""
    return WhoAmI(user=principal.user, role=principal.role, via="api_key" if principal.key else "login",
                  key_id=principal.key.id if principal.key else None)

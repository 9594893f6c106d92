"""Routes: API keys. An admin manages everyone's keys; a viewer only their own. These need a login token:
an API key cannot create or revoke keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from lmstack.api import schemas
from lmstack.api.deps import LoginPrincipal, SessionDep
from lmstack.api.errors import ApiError
from lmstack.api.services.keys import (
    MAX_NAME_LENGTH,
    MAX_TPD,
    MAX_TPM,
    ApiKeyNotFound,
    InvalidKeyRequest,
    KeyRecord,
    KeyStatus,
    Scope,
    create_key,
    list_keys,
    revoke_key,
)

router = APIRouter(prefix="/api/keys", tags=["keys"], responses=schemas.errors(
    401, (403, "An API key cannot manage keys (log in), or a viewer asked for another user's key"), 503))
_INT_MAX = 2**31 - 1  # the database's integer columns


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, description="what the key is for")
    user: str | None = Field(default=None, description="whose key (admins only); default: the caller")
    models: list[str] | None = Field(default=None, min_length=1, description="allowed models; default: all")
    rpm_limit: int | None = Field(default=None, ge=1, le=_INT_MAX, description="requests per minute; default: no limit")
    # strict: "5", 5.0 and true are not a number of tokens either.
    tpm_limit: int | None = Field(default=None, ge=1, le=MAX_TPM, strict=True, description=(
        "tokens a minute (prompt + completion), per server process; default: no limit"))
    tpd_limit: int | None = Field(default=None, ge=1, le=MAX_TPD, strict=True, description=(
        "tokens a day (the UTC day), across servers; default: no limit"))
    expires_at: AwareDatetime | None = Field(default=None, description="default: never")
    scopes: list[Scope] = Field(default_factory=list, max_length=3, description=(
        "what the key reaches beyond /v1 and its own usage: status (the read-only /api), metrics (/metrics), "
        "logs (live logs, for an admin's key); default: nothing more"))


class KeyOut(BaseModel):
    id: int
    name: str
    user: str
    prefix: str = Field(description="the key's first characters, to recognise it")
    models: list[str] | None
    scopes: list[str]
    rpm_limit: int | None
    tpm_limit: int | None
    tpd_limit: int | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    last_used_at: datetime | None = Field(description="to within a minute")
    status: KeyStatus

    @classmethod
    def of(cls, record: KeyRecord) -> KeyOut:
        return cls(id=record.id, name=record.name, user=record.user, prefix=record.prefix,
                   models=list(record.models) if record.models is not None else None, scopes=list(record.scopes),
                   rpm_limit=record.rpm_limit, tpm_limit=record.tpm_limit, tpd_limit=record.tpd_limit,
                   expires_at=record.expires_at, revoked_at=record.revoked_at, created_at=record.created_at,
                   last_used_at=record.last_used_at, status=record.status)


class CreatedKeyOut(KeyOut):
    key: str = Field(description="the API key: shown in this response only, and stored nowhere")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyOut]


@router.post("", status_code=201, responses=schemas.errors(400, 404, 413))
def create(body: KeyCreate, principal: LoginPrincipal, session: SessionDep) -> CreatedKeyOut:
    """A new API key. The response is the only time the key is shown."""
    owner = body.user or principal.user
    if owner != principal.user and not principal.is_admin:
        raise ApiError(403, "only an admin can create keys for another user", code="forbidden", param="user")
    try:
        created = create_key(session, user=owner, name=body.name, models=body.models, rpm_limit=body.rpm_limit,
                             expires_at=body.expires_at, scopes=body.scopes, tpm_limit=body.tpm_limit,
                             tpd_limit=body.tpd_limit)
    except ApiKeyNotFound as exc:
        raise ApiError(404, str(exc), code="user_not_found", param="user") from None
    except InvalidKeyRequest as exc:
        raise ApiError(400, str(exc), code="invalid_request") from None
    return CreatedKeyOut(**KeyOut.of(created.record).model_dump(), key=created.token)


@router.get("")
def list_(principal: LoginPrincipal, session: SessionDep) -> KeyList:
    """Keys (never the keys themselves): an admin sees all, a viewer their own."""
    records = list_keys(session, user=None if principal.is_admin else principal.user)
    return KeyList(data=[KeyOut.of(record) for record in records])


@router.delete("/{key_id}", responses=schemas.errors(400, 404))
def revoke(key_id: Annotated[int, Path(ge=1, le=_INT_MAX)], principal: LoginPrincipal, session: SessionDep) -> KeyOut:
    """Revoke a key (the caller's own, or any for an admin). Every server refuses it within about a second."""
    try:
        record = revoke_key(session, key_id=key_id, owner=None if principal.is_admin else principal.user)
    except ApiKeyNotFound as exc:
        raise ApiError(404, str(exc), code="key_not_found") from None
    return KeyOut.of(record)

"""Route: POST /api/hooks/git, the Git host's push webhook. It starts a controller pass at once (coalesced
with any already pending); the pass reads the configured ref itself, so nothing in the payload is trusted or
even parsed: the signature (controller/webhook.py) is the only authentication, checked in constant time over
the raw body (at most inputs.MAX_BODY_BYTES).

On a server without LMSTACK_WEBHOOK_SECRET or without a running controller, a request signed the way a Git
host signs gets 404 (the host's delivery log then says why the hook does nothing); any other gets 401, as on
every other route without credentials.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import Field

from lmstack.api import schemas
from lmstack.api.deps import StateDep
from lmstack.api.errors import ApiError
from lmstack.api.inputs import MAX_BODY_BYTES, read_body
from lmstack.controller import Controller
from lmstack.controller.webhook import from_git_host, verify

router = APIRouter(prefix="/api/hooks", tags=["hooks"])

# RFC 9110 wants a challenge with every 401; `Authorization: Bearer SECRET` is one of the accepted forms.
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class HookAccepted(schemas.ApiModel):
    accepted: bool = True
    signed_by: str = Field(description="which signature matched: github, gitea, gitlab or bearer")
    message: str


@router.post(
    "/git", status_code=202, response_model=HookAccepted,
    responses={
        **schemas.errors(
            400, (401, "No signature, or one that does not match LMSTACK_WEBHOOK_SECRET; nothing was done"),
            (404, "The webhook is off (no LMSTACK_WEBHOOK_SECRET, or no controller runs on this server) and the "
                  "request is signed as a Git host signs"),
            (413, f"The body is larger than {MAX_BODY_BYTES // 1024} KiB")),
    },
)
async def git_hook(request: Request, state: StateDep) -> HookAccepted:
    """A push (any event) signed with the webhook secret: the controller syncs the configured ref at once.
    Signed as GitHub does (`X-Hub-Signature-256: sha256=HMAC-SHA256(secret, body)`), Gitea
    (`X-Gitea-Signature: HMAC hex`), GitLab (`X-Gitlab-Token: secret`) or `Authorization: Bearer secret`."""
    headers = request.headers
    controller: Controller | None = getattr(request.app.state, "controller", None)
    secret = state.settings.webhook_secret
    if secret is None or controller is None:
        if not from_git_host(headers):
            raise ApiError(401, "the webhook request carries no valid signature", code="invalid_signature",
                           headers=_CHALLENGE)
        why = "LMSTACK_WEBHOOK_SECRET is not set" if secret is None else "no controller runs on this server"
        raise ApiError(404, f"the webhook is off: {why}", code="webhook_disabled")
    body = await read_body(request.receive, limit=MAX_BODY_BYTES,
                           too_large=f"the webhook body is larger than {MAX_BODY_BYTES // 1024} KiB")
    if body is None:
        raise ApiError(400, "the request body did not arrive", code="invalid_request")
    signed_by = verify(headers, body, secret.get_secret_value())
    if signed_by is None:
        raise ApiError(401, "the webhook signature does not match", code="invalid_signature", headers=_CHALLENGE)
    controller.poke("webhook")
    return HookAccepted(signed_by=signed_by, message="sync started")

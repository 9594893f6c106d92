"""Checking a Git host's webhook signature against the shared secret, in constant time.

- GitHub (and Gitea, which sends it too): `X-Hub-Signature-256: sha256=HEX`, HEX = HMAC-SHA256(secret, body).
- Gitea: `X-Gitea-Signature: HEX`, the same HMAC.
- GitLab: `X-Gitlab-Token: SECRET` (the secret itself; GitLab signs nothing).
- Anything else (a CI job, curl): `Authorization: Bearer SECRET`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

GIT_HOST_HEADERS = ("x-hub-signature-256", "x-gitea-signature", "x-gitlab-token")


def from_git_host(headers: Mapping[str, str]) -> bool:
    """Whether the request is signed the way a Git host signs (rightly or not)."""
    return any(headers.get(name) for name in GIT_HOST_HEADERS)


def verify(headers: Mapping[str, str], body: bytes, secret: str) -> str | None:
    """Which header proved the request came from the secret's holder ("github", "gitea", "gitlab", "bearer");
    None when none did. `headers` is looked up by lower-case name."""
    key = secret.encode()
    digest = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
    # Header values as sent (latin-1 is how the server decoded them); compare_digest wants bytes for those.
    github = headers.get("x-hub-signature-256", "").encode("latin-1", "replace")
    if github.startswith(b"sha256=") and hmac.compare_digest(github[len(b"sha256="):].lower(), digest):
        return "github"
    gitea = headers.get("x-gitea-signature", "").encode("latin-1", "replace")
    if gitea and hmac.compare_digest(gitea.lower(), digest):
        return "gitea"
    gitlab = headers.get("x-gitlab-token", "").encode("latin-1", "replace")
    if gitlab and hmac.compare_digest(gitlab, key):
        return "gitlab"
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token and hmac.compare_digest(token.strip().encode("latin-1", "replace"), key):
        return "bearer"
    return None

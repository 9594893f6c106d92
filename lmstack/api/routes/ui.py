"""The dashboard: the static files of ui/ (HTML, CSS, JavaScript; no build step), index.html at / and every
file at /ui/<path>. They hold no data, so they need no login; the page logs in and then reads /api with its
token.

One route that matches exactly those paths (GET and HEAD), not a catch-all mount: every other path keeps
its own 404 and 405. The files are listed when the app is made; their content is read at each request.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from starlette.responses import FileResponse
from starlette.routing import BaseRoute, Match
from starlette.types import Receive, Scope, Send

from lmstack.api.errors import ApiError

# ui/ ships inside the package (lmstack/ui, mapped in pyproject.toml); an editable install runs from the
# source checkout, where it is the top-level ui/.
_PACKAGE = Path(__file__).resolve().parents[2]
UI_DIR = _PACKAGE / "ui" if (_PACKAGE / "ui").is_dir() else _PACKAGE.parent / "ui"
ASSETS = "/ui/"

# The page loads nothing from elsewhere and runs no inline script: a value from the repository that slipped
# into the markup could not run. Its token lives in sessionStorage, so this matters.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: an upgraded lmstack serves its new files at once
}


def _files(directory: Path) -> dict[str, Path]:
    """URL path -> file: "/" is index.html, every regular file is /ui/<its path> (dot files left out)."""
    if not directory.is_dir():
        return {}
    found = {ASSETS + path.relative_to(directory).as_posix(): path for path in sorted(directory.rglob("*"))
             if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)}
    if ASSETS + "index.html" in found:
        found["/"] = found[ASSETS + "index.html"]
    return found


class DashboardRoute(BaseRoute):
    """GET and HEAD of the dashboard's files; any other method on them is a 405."""

    path = "/"

    def __init__(self, directory: Path = UI_DIR) -> None:
        self.files: Mapping[str, Path] = _files(directory)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["path"] not in self.files:
            return Match.NONE, {}
        return (Match.FULL if scope["method"] in ("GET", "HEAD") else Match.PARTIAL), {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            raise ApiError(405, "the dashboard's files are read-only", code="method_not_allowed",
                           headers={"Allow": "GET, HEAD"})
        response = FileResponse(self.files[scope["path"]], headers=HEADERS)
        await response(scope, receive, send)


def dashboard_route(directory: Path = UI_DIR) -> DashboardRoute:
    return DashboardRoute(directory)

"""Finding 13: /docs loaded Swagger UI from a third-party CDN, and the docs were public. Now no HTML page
loads anything from anywhere: the API's description is /openapi.json, behind a login like every other
route, and LMSTACK_API_DOCS=false turns it off."""

from __future__ import annotations

from pathlib import Path

from apiserver import SECRET, add_user, bearer
from fastapi.testclient import TestClient

from lmstack.api.app import create_app
from lmstack.config import Settings
from lmstack.state import Database


def test_the_docs_load_nothing_from_elsewhere_and_need_a_login(db: Database, tmp_path: Path) -> None:
    token = add_user(db, "watcher", "viewer")
    with TestClient(create_app(Settings(jwt_secret=SECRET, home=tmp_path, repo=None), database=db)) as client:
        for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            answer = client.get(page, headers=bearer(token))
            assert answer.status_code == 404 and "cdn" not in answer.text.lower(), page
        assert client.get("/openapi.json").status_code == 401
        document = client.get("/openapi.json", headers=bearer(token))
        assert document.status_code == 200 and "/v1/chat/completions" in document.json()["paths"]


def test_the_docs_can_be_turned_off(db: Database, tmp_path: Path) -> None:
    token = add_user(db, "watcher", "viewer")
    settings = Settings(jwt_secret=SECRET, home=tmp_path, repo=None, api_docs=False)
    with TestClient(create_app(settings, database=db)) as client:
        assert client.get("/openapi.json", headers=bearer(token)).status_code == 404

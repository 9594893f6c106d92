"""One settings object (`LMSTACK_*` environment variables), passed in, never read from globals."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path.home() / ".local" / "share" / "lmstack"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LMSTACK_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL (postgresql://user@host:port/db); unset: an embedded PostgreSQL under home",
    )
    home: Path = Field(default_factory=_default_home, description="state directory (embedded database, caches)")

    @property
    def embedded_database_dir(self) -> Path:
        return self.home / "postgres"

    @property
    def repo_cache_dir(self) -> Path:
        return self.home / "repos"

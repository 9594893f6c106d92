"""What one server process holds: built in the app's lifespan, never at import time."""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.api.gateway.registry import Registry
from lmstack.api.gateway.upstream import UpstreamClient
from lmstack.api.services.keys import KeyCache
from lmstack.api.services.limits import Limits
from lmstack.api.services.metrics import MetricsRecorder
from lmstack.api.services.repo import RepoView
from lmstack.api.services.usage import UsageRecorder
from lmstack.config import Settings
from lmstack.state import Database


@dataclass
class AppState:
    settings: Settings
    database: Database
    jwt_secret: str
    keys: KeyCache
    limits: Limits  # requests and tokens per key, login attempts: in this process, or shared (api/hub)
    registry: Registry
    repo: RepoView  # the configured repository, read at most every LMSTACK_REPO_REFRESH_S
    upstream: UpstreamClient  # one pooled client per process for every engine
    usage: UsageRecorder
    metrics: MetricsRecorder

"""Helpers for controller tests: a fleet repository a user edits and pushes to a bare remote (served as a
file:// URL, like any Git host), the server settings that track it, and waiting on conditions.

    remote = Remote(tmp_path, bed, standin_image)    # committed and pushed: the bed's workers, no deployments
    sha = remote.push("chat", replicas=1)              # a deployment added, committed, pushed
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from testbed.fleet import workers_yaml, write_fleet

from lmstack.config import Settings
from lmstack.state import Database, Replica, SyncRun

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
HOOK_SECRET = "hook-secret-0123456789"
MODELS = "/tmp/lmstack-test-models"  # the bed's model caches (the operator allows them: settings below)
T = TypeVar("T")


def deployment_yaml(name: str, *, replicas: int, image: str, args: list[str] | None = None) -> str:
    return (f"apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n"
            f"  backend: vllm\n  model: test/{name}\n  image: {image}\n  replicas: {replicas}\n"
            f"  resources: {{gpus: 0}}\n  placement: {{strategy: spread}}\n  args: {json.dumps(args or [])}\n"
            f"  health: {{startupTimeout: 60s}}\n")


def git(*argv: str, cwd: Path) -> str:
    done = subprocess.run(["git", *argv], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True)
    return done.stdout.strip()


class Remote:
    def __init__(self, root: Path, bed: Any, image: str) -> None:
        self.bed = bed
        self.image = image
        self.home = root / "home"
        self.bare = root / "remote.git"
        self.work = root / "fleet"
        git("init", "-q", "--bare", "-b", "main", str(self.bare), cwd=root)
        write_fleet(self.work, bed, {}, workers=workers_yaml(bed.hosts, model_cache=lambda h: f"{MODELS}/{h.name}"),
                    message="the bed's workers")
        git("remote", "add", "origin", str(self.bare), cwd=self.work)
        git("push", "-q", "origin", "main", cwd=self.work)

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    @property
    def head(self) -> str:
        return git("rev-parse", "main", cwd=self.bare)

    def push(self, name: str, *, replicas: int = 1, message: str | None = None, **options: Any) -> str:
        """Write deployment `name`, commit and push; the new commit's SHA."""
        (self.work / "manifests" / f"{name}.yaml").write_text(
            deployment_yaml(name, replicas=replicas, image=self.image, **options))
        git("add", "-A", cwd=self.work)
        git("commit", "-qm", message or f"{name}: {replicas} replicas", cwd=self.work)
        git("push", "-q", "origin", "main", cwd=self.work)
        return self.head

    def settings(self, database_url: str, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url, "home": self.home, "repo": self.url, "ref": "main",
            "ssh_key": self.bed.ssh_key, "known_hosts": self.bed.known_hosts, "mount_roots": [Path(MODELS)],
            "jwt_secret": "controller-test-secret-0123456789abcdef", "poll_interval_s": 3600,
            "drift_interval_s": 3600, **overrides}
        return Settings(**values)

    def containers(self) -> dict[str, str]:
        """Every lmstack container on the bed that runs: "deployment/replica" -> host."""
        found = {}
        for host in self.bed.hosts:
            lines = self.bed.docker(host, "ps", "--filter", "label=lmstack.deployment", "--format",
                                    '{{.Label "lmstack.deployment"}}/{{.Label "lmstack.replica"}}').stdout.split()
            for line in lines:
                assert line not in found, f"{line} runs twice"
                found[line] = host.name
        return found


def github_signature(body: bytes, secret: str = HOOK_SECRET) -> dict[str, str]:
    return {"X-Hub-Signature-256": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
            "X-GitHub-Event": "push", "Content-Type": "application/json"}


def sync_runs(database: Database) -> list[tuple[str, str, str | None]]:
    """(trigger, status, revision) of every sync run, oldest first."""
    with database.session() as session:
        return [(r.trigger, r.status, r.revision) for r in session.scalars(select(SyncRun).order_by(SyncRun.id))]


def replica_status(database: Database) -> dict[str, str]:
    with database.session() as session:
        return {f"{r.deployment_name}/{r.ordinal}": r.status for r in session.scalars(select(Replica))}


def wait_for(what: str, check: Callable[[], T], timeout_s: float = 120, interval_s: float = 0.1) -> T:
    """`check()`'s first truthy value, polled until `timeout_s`; fails naming `what` and the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {value!r})")
        time.sleep(interval_s)

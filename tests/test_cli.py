"""The `lmstack` command as a user runs it: a real process, a real git repository, a real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from lmstack.state import Database, Replica, SyncRun, Worker

LMSTACK = [sys.executable, "-m", "lmstack"]
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {**os.environ, **GIT_ENV, "LMSTACK_DATABASE_URL": database_url, "LMSTACK_HOME": str(tmp_path / "home"),
            "NO_COLOR": "1", "COLUMNS": "200"}


def lmstack(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LMSTACK, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def fleet(tmp_path: Path, env: dict[str, str]) -> Path:
    repo = tmp_path / "fleet"
    result = lmstack(env, "init", str(repo))
    assert result.returncode == 0, result.stderr
    return repo


def test_init_scaffolds_a_committed_repository(fleet: Path, env: dict[str, str]) -> None:
    assert git(fleet, "status", "--porcelain") == ""
    assert git(fleet, "log", "--format=%s") == "lmstack init: example inventory, workers and deployment"
    files = set(git(fleet, "ls-files").splitlines())
    assert {"inventory/hosts.ini", "manifests/workers.yaml", "manifests/deployments/qwen-7b.yaml"} <= files
    # The scaffold is the project's own example: they must not drift apart.
    root = Path(__file__).resolve().parent.parent
    for name in ("inventory/hosts.ini", "manifests/workers.yaml", "manifests/deployments/qwen-7b.yaml"):
        assert (fleet / name).read_text() == (root / name).read_text(), name
    again = lmstack(env, "init", str(fleet))
    assert again.returncode == 1 and "not empty" in again.stderr


def test_validate_reports_every_error_with_file_and_line(fleet: Path, env: dict[str, str]) -> None:
    assert lmstack(env, "validate", "--repo", str(fleet)).returncode == 0
    workers = fleet / "manifests/workers.yaml"
    workers.write_text(workers.read_text().replace("host: gpu-b", "host: gpu-z"))
    deployment = fleet / "manifests/deployments/qwen-7b.yaml"
    deployment.write_text(deployment.read_text().replace("replicas: 2", "replica: 2"))
    # The commit is still valid: validate reads the commit, not the working tree.
    assert lmstack(env, "validate", "--repo", str(fleet)).returncode == 0
    result = lmstack(env, "validate", "--dir", str(fleet))
    assert result.returncode == 1
    assert "manifests/workers.yaml:17: spec.host: host 'gpu-z' is not in the inventory" in result.stderr
    assert "manifests/deployments/qwen-7b.yaml:10: spec.replica: unknown key; did you mean 'replicas'?" \
        in result.stderr
    assert "2 errors" in result.stderr


def test_plan_without_facts_places_nothing_and_says_why(fleet: Path, env: dict[str, str], db: Database) -> None:
    result = lmstack(env, "plan", "--repo", str(fleet))
    assert result.returncode == 2, result.stderr
    sha = git(fleet, "rev-parse", "HEAD")
    assert f"@ {sha[:12]} \"lmstack init" in result.stdout
    assert "facts unknown for gpu-a, gpu-b" in result.stdout
    assert "qwen-7b/0" in result.stdout and "needs 1 GPU with 24Gi free" in result.stdout


def _facts(gpus: int) -> dict[str, object]:
    return {"gpus": [{"index": i, "name": "NVIDIA H100", "memory_total": 80 * 2**30, "memory_unmanaged": 0}
                     for i in range(gpus)]}


def test_plan_json_and_exit_codes_follow_the_database(fleet: Path, env: dict[str, str], db: Database) -> None:
    with db.session() as session:
        session.execute(insert(Worker), [
            {"name": "gpu-a", "host": "gpu-a", "facts": _facts(2)},
            {"name": "gpu-b", "host": "gpu-b", "facts": _facts(1)},
        ])
    result = lmstack(env, "plan", "--repo", str(fleet), "--json")
    assert result.returncode == 2, result.stderr
    document = json.loads(result.stdout)
    assert document["source"]["revision"] == git(fleet, "rev-parse", "HEAD")
    creates = sorted((a["replica"], a["placement"]["worker"]) for a in document["actions"] if a["kind"] == "create")
    assert creates == [(0, "gpu-a"), (1, "gpu-b")]  # spread: one per worker

    # Record the replicas as running: the same commit then plans no change (exit 0).
    with db.session() as session:
        for action in document["actions"]:
            spec = _effective(fleet, env)
            session.execute(insert(Replica).values(
                deployment_name="qwen-7b", ordinal=action["replica"], worker_name=action["placement"]["worker"],
                gpu_indices=action["placement"]["gpus"], spec=spec, spec_hash=action["specHash"], status="ready"))
    result = lmstack(env, "plan", "--repo", str(fleet))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No changes." in result.stdout

    # A new commit changing args: both replicas are recreated, with the field diff shown.
    deployment = fleet / "manifests/deployments/qwen-7b.yaml"
    deployment.write_text(deployment.read_text().replace('"8192"', '"4096"'))
    git(fleet, "commit", "-qam", "shorter context")
    result = lmstack(env, "plan", "--repo", str(fleet))
    assert result.returncode == 2
    assert result.stdout.count("recreate") >= 2 and "spec changed: args" in result.stdout
    assert "'8192'" in result.stdout and "'4096'" in result.stdout
    # The previous commit, by SHA, still plans no change.
    result = lmstack(env, "plan", "--repo", str(fleet), "--ref", git(fleet, "rev-parse", "HEAD~1"))
    assert result.returncode == 0, result.stdout


def _effective(fleet: Path, env: dict[str, str]) -> dict[str, object]:
    from lmstack.backends import effective_spec
    from lmstack.config import Settings
    from lmstack.gitsource import load_source

    source = load_source(repo=str(fleet), ref="HEAD", directory=None, settings=Settings(home=Path(env["LMSTACK_HOME"])))
    return effective_spec("qwen-7b", source.desired.deployments["qwen-7b"].spec).to_json()


def test_plan_of_a_bad_commit_exits_1_and_plans_nothing(fleet: Path, env: dict[str, str], db: Database) -> None:
    workers = fleet / "manifests/workers.yaml"
    workers.write_text(workers.read_text() + "---\n- not a mapping\n")
    git(fleet, "commit", "-qam", "broken")
    result = lmstack(env, "plan", "--repo", str(fleet))
    assert result.returncode == 1
    assert "manifests/workers.yaml:20: a manifest document must be a mapping" in result.stderr
    assert "nothing was planned or applied" in result.stderr
    assert "Plan" not in result.stdout


def test_database_unreachable_is_a_clear_error(fleet: Path, env: dict[str, str]) -> None:
    result = lmstack({**env, "LMSTACK_DATABASE_URL": "postgresql://lmstack:secret@127.0.0.1:1/x"},
                     "plan", "--repo", str(fleet))
    assert result.returncode == 1
    assert "127.0.0.1:1" in result.stderr and "secret" not in result.stderr


def test_schema_and_help(env: dict[str, str]) -> None:
    schema = json.loads(lmstack(env, "schema").stdout)
    assert {"Worker", "Deployment"} <= set(schema["$defs"])
    help_text = lmstack(env, "--help").stdout
    for command in ("init", "validate", "plan", "schema", "db"):
        assert command in help_text
    assert "--detailed" not in help_text
    plan_help = lmstack(env, "plan", "--help").stdout
    assert "--repo" in plan_help and "--ref" in plan_help and "--dir" in plan_help and "--json" in plan_help


def test_apply_waits_while_another_process_applies(fleet: Path, env: dict[str, str], db: Database,
                                                   tmp_path: Path) -> None:
    """`lmstack apply` takes the leader lock the controller of `lmstack serve` takes: while another process
    holds it, apply says who and waits (before gathering facts or planning), and changes nothing."""
    from lmstack.reconcile.leader import try_lead

    key, known_hosts = tmp_path / "key", tmp_path / "known_hosts"
    key.write_text("not used before the lock is free\n")
    known_hosts.write_text("")
    with try_lead(db, role="serve") as leadership:
        assert leadership is not None
        apply = subprocess.Popen([*LMSTACK, "apply", "--repo", str(fleet), "--yes", "--ssh-key", str(key),
                                  "--known-hosts", str(known_hosts)], env=env, stderr=subprocess.PIPE, text=True)
        try:
            assert apply.stderr is not None
            line = apply.stderr.readline()
            assert line.startswith(f"Waiting: lmstack serve (pid {os.getpid()} on "), line
            with pytest.raises(subprocess.TimeoutExpired):
                apply.wait(1.5)  # still waiting: the holder has not let go
        finally:
            apply.kill()
            apply.wait(10)
    with db.session() as session:
        assert session.scalars(select(SyncRun)).all() == []  # it started nothing

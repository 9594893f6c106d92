"""`lmstack apply` on the real multi-host test bed: sshd + dockerd per host in network namespaces, host keys
checked, a real PostgreSQL, real ansible-runner for facts and the docker SDK over SSH.

The engine is the stand-in OpenAI-compatible server (tests/testbed/standin.py) in a local image, run as a
`backend: vllm` deployment with `gpus: 0` and `image: lmstack-standin:test`: vLLM itself needs GPUs and a
registry, neither of which is here. GPUs are faked only where the issue allows: a fake `nvidia-smi`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from testbed.fleet import workers_yaml, write_fleet

from lmstack.config import Settings
from lmstack.gitsource import Source, init_repository, load_source
from lmstack.reconcile.apply import ApplyReport, Survey, apply_source
from lmstack.state import Database, Replica, SyncRun

pytestmark = pytest.mark.testbed

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def _deployment(name: str, *, replicas: int, image: str, args: list[str] | None = None,
                placement: str = "{strategy: spread}", gpus: int = 0) -> str:
    return (f"apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n"
            f"  backend: vllm\n  model: test/{name}\n  image: {image}\n  replicas: {replicas}\n"
            f"  resources: {{gpus: {gpus}}}\n  placement: {placement}\n  args: {json.dumps(args or [])}\n"
            f"  health: {{startupTimeout: 60s}}\n")


class Fleet:
    """A manifests repository on disk, committed with git like a user would."""

    def __init__(self, root: Path, bed: Any, image: str, database: Database) -> None:
        self.repo = root / "fleet"
        self.bed = bed
        self.image = image
        self.database = database
        self.home = root / "home"
        write_fleet(self.repo, bed, {}, workers=workers_yaml(
            bed.hosts, model_cache=lambda host: f"/tmp/lmstack-test-models/{host.name}"))
        self.write("chat", replicas=2)
        self.write("embed", replicas=1, placement="{workers: [node3]}")
        init_repository(self.repo, "two deployments")

    def write(self, name: str, **options: Any) -> None:
        (self.repo / "manifests" / f"{name}.yaml").write_text(_deployment(name, image=self.image, **options))

    def remove(self, name: str) -> None:
        (self.repo / "manifests" / f"{name}.yaml").unlink()

    def commit(self, message: str) -> None:
        env = {**os.environ, **GIT_ENV}
        subprocess.run(["git", "-C", str(self.repo), "add", "-A"], check=True, env=env)
        subprocess.run(["git", "-C", str(self.repo), "commit", "-qm", message], check=True, env=env)

    def source(self) -> Source:
        # The workers' model caches (above) lie outside the default mount root: the operator allows them.
        settings = Settings(home=self.home, mount_roots=[Path("/tmp/lmstack-test-models")])
        return load_source(repo=str(self.repo), ref="HEAD", directory=None, settings=settings)

    def apply(self, confirm: Any = None) -> tuple[Survey, ApplyReport | None]:
        return apply_source(self.source(), self.database, ssh_key=self.bed.ssh_key,
                            known_hosts=self.bed.known_hosts, confirm=confirm or (lambda survey: True))

    def containers(self) -> dict[str, list[dict[str, str]]]:
        """Every container on every host: host -> [{id, name, deployment, replica}]."""
        found: dict[str, list[dict[str, str]]] = {}
        for host in self.bed.hosts:
            lines = self.bed.docker(host, "ps", "-a", "--no-trunc", "--format",
                                    '{{.ID}}|{{.Names}}|{{.Label "lmstack.deployment"}}|'
                                    '{{.Label "lmstack.replica"}}|{{.State}}').stdout.split()
            found[host.name] = [dict(zip(("id", "name", "deployment", "replica", "state"), line.split("|"),
                                         strict=True)) for line in lines]
        return found

    def replicas(self) -> dict[str, Replica]:
        with self.database.session() as session:
            return {f"{r.deployment_name}/{r.ordinal}": r for r in session.scalars(select(Replica))}


@pytest.fixture
def fleet(tmp_path: Path, clean_testbed: Any, standin_image: str, db: Database) -> Fleet:
    return Fleet(tmp_path, clean_testbed, standin_image, db)


def _models(endpoint: str, key: str | None) -> list[str]:
    call = urllib.request.Request(endpoint + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(call, timeout=5) as answer:
        return [model["id"] for model in json.load(answer)["data"]]


def _ids(containers: dict[str, list[dict[str, str]]]) -> dict[str, str]:
    return {f"{c['deployment']}/{c['replica']}": c["id"] for cs in containers.values() for c in cs if c["deployment"]}


def test_apply_runs_replicas_where_planned_and_is_idempotent(fleet: Fleet) -> None:
    survey, report = fleet.apply()
    assert report is not None and report.ok, [r.message for r in report.failed] if report else None
    planned = {a.replica_name: a.placement.worker for a in survey.plan.actions if a.placement}
    assert planned == {"chat/0": "node1", "chat/1": "node2", "embed/0": "node3"}
    containers = fleet.containers()
    running = {f"{c['deployment']}/{c['replica']}": host for host, cs in containers.items() for c in cs}
    assert running == planned
    rows = fleet.replicas()
    for name, row in rows.items():
        assert row.status == "ready" and row.worker_name == planned[name]
        assert row.endpoint is not None and row.endpoint.startswith(f"http://{fleet.bed.config.subnet}.")
        assert row.engine_key and _models(row.endpoint, row.engine_key) == [name.split("/")[0]]
    with fleet.database.session() as session:
        run = session.scalars(select(SyncRun)).one()
        assert run.status == "succeeded" and run.revision is not None

    # Again with no change: nothing to do, and no container restarted.
    before = _ids(containers)
    survey, report = fleet.apply()
    assert report is not None and report.ok and not report.results and not survey.plan.has_changes
    assert _ids(fleet.containers()) == before
    with fleet.database.session() as session:  # the no-op pass is recorded: that revision is in sync
        runs = session.scalars(select(SyncRun).order_by(SyncRun.id)).all()
        assert [run.status for run in runs] == ["succeeded", "succeeded"]


def test_changed_args_recreate_only_that_deployment_and_removed_ones_are_pruned(fleet: Fleet) -> None:
    survey, report = fleet.apply()
    assert report is not None and report.ok
    foreign = fleet.bed.docker("node1", "run", "-d", "--name", "someone-else", "--network", "host",
                               fleet.image, "--port", "19999").stdout.strip()
    before = _ids(fleet.containers())

    fleet.write("chat", replicas=2, args=["--max-model-len", "4096"])
    fleet.commit("chat: shorter context")
    survey, report = fleet.apply()
    assert report is not None and report.ok
    kinds = {a.replica_name: a.kind.value for a in survey.plan.changes}
    assert kinds == {"chat/0": "recreate", "chat/1": "recreate"}
    after = _ids(fleet.containers())
    assert after["embed/0"] == before["embed/0"]
    # Replaced by surge: each new replica takes the next free ordinal, and the old containers are gone.
    assert set(after) == {"chat/2", "chat/3", "embed/0"}

    fleet.remove("embed")
    fleet.commit("drop embed")
    # With pruning off (LMSTACK_PRUNE=false, apply --no-prune) the removed deployment keeps running.
    survey, report = apply_source(fleet.source(), fleet.database, ssh_key=fleet.bed.ssh_key,
                                  known_hosts=fleet.bed.known_hosts, prune=False)
    assert report is not None and report.ok and not survey.plan.changes
    assert any("pruning is off: embed" in note for note in survey.plan.notes)
    assert _ids(fleet.containers())["embed/0"] == after["embed/0"]
    survey, report = fleet.apply()
    assert report is not None and report.ok
    assert {a.replica_name: a.kind.value for a in survey.plan.changes} == {"embed/0": "delete"}
    containers = fleet.containers()
    assert "embed/0" not in _ids(containers) and "embed/0" not in fleet.replicas()
    # The container without lmstack's labels is untouched.
    assert any(c["id"] == foreign and c["state"] == "running" for c in containers["node1"])


def test_a_host_lost_during_apply_fails_alone_and_the_next_apply_converges(fleet: Fleet) -> None:
    def lose_node2(survey: Survey) -> bool:
        assert {a.placement.worker for a in survey.plan.changes if a.placement} == {"node1", "node2", "node3"}
        fleet.bed.stop_sshd("node2")  # after facts and the plan: its actions are under way when it goes
        return True

    _, report = fleet.apply(confirm=lose_node2)
    assert report is not None and not report.ok
    failed = {r.action.replica_name: r.message for r in report.failed}
    assert list(failed) == ["chat/1"]
    assert "node2" in failed["chat/1"] and "cannot connect over SSH" in failed["chat/1"]
    rows = fleet.replicas()
    assert rows["chat/0"].status == "ready" and rows["embed/0"].status == "ready"
    assert rows["chat/1"].status == "failed"
    with fleet.database.session() as session:
        assert session.scalars(select(SyncRun)).one().status == "failed"

    fleet.bed.start_sshd("node2")
    _, report = fleet.apply()
    assert report is not None and report.ok, [r.message for r in report.failed]
    containers = fleet.containers()
    owners = [f"{c['deployment']}/{c['replica']}" for cs in containers.values() for c in cs]
    assert sorted(owners) == ["chat/0", "chat/1", "embed/0"]  # one container each, no duplicates
    assert all(row.status == "ready" for row in fleet.replicas().values())


def test_an_orphaned_labelled_container_is_removed(fleet: Fleet) -> None:
    survey, report = fleet.apply()
    assert report is not None and report.ok
    # As if a crash happened between creating a container and recording it: labels, but no replica row.
    fleet.bed.docker("node2", "run", "-d", "--name", "lmstack-chat-7", "--network", "host",
                     "--label", "lmstack.deployment=chat", "--label", "lmstack.replica=7",
                     fleet.image, "--port", "18999")
    survey, report = fleet.apply()
    assert [o.name for o in survey.live.orphans] == ["lmstack-chat-7"]
    assert report is not None and report.orphans_removed == 1
    assert "chat/7" not in _ids(fleet.containers())


def test_gpus_on_a_host_without_a_gpu_runtime_fail_clearly(fleet: Fleet) -> None:
    fleet.bed.install_fake_nvidia_smi("node3", [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total": 81559},
        {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_total": 81559},
    ])
    fleet.write("big", replicas=1, gpus=1, placement="{workers: [node3]}")
    fleet.commit("a GPU deployment")
    survey, report = fleet.apply()
    gpu_facts = {w.worker: len((w.facts or {}).get("gpus", [])) for w in survey.facts.workers}
    assert gpu_facts == {"node1": 0, "node2": 0, "node3": 2}
    big = next(a for a in survey.plan.actions if a.deployment == "big")
    assert big.kind.value == "create" and big.placement is not None
    assert (big.placement.worker, big.placement.gpus) == ("node3", (0,))
    assert report is not None
    failed = {r.action.replica_name: r.message for r in report.failed}
    assert list(failed) == ["big/0"]
    assert "node3" in failed["big/0"] and "GPU runtime" in failed["big/0"]
    assert "big/0" not in _ids(fleet.containers())  # nothing half-created left behind
    assert all(r.ok for r in report.results if r.action.deployment != "big")


def test_cli_apply_asks_shows_the_plan_and_exits_nonzero_on_failure(fleet: Fleet, database_url: str) -> None:
    env = {**os.environ, "LMSTACK_DATABASE_URL": database_url, "LMSTACK_HOME": str(fleet.home),
           "LMSTACK_SSH_KEY": str(fleet.bed.ssh_key), "LMSTACK_KNOWN_HOSTS": str(fleet.bed.known_hosts),
           "NO_COLOR": "1", "COLUMNS": "200", "LMSTACK_MOUNT_ROOTS": "/tmp/lmstack-test-models"}
    command = [sys.executable, "-m", "lmstack", "apply", "--repo", str(fleet.repo)]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, input="n\n")
    assert refused.returncode == 1 and "chat/0" in refused.stdout and not fleet.replicas()
    # The plan shown names where each container goes and what it mounts.
    assert "Docker endpoints:" in refused.stdout and "mount /tmp/lmstack-test-models/node1 -> " in refused.stdout
    assert "Apply cancelled; nothing was changed." in refused.stderr
    done = subprocess.run([*command, "--yes"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 created" in done.stdout
    again = subprocess.run([*command, "--yes"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "No changes." in again.stdout


def test_a_replica_recorded_as_failed_is_recreated_even_if_its_container_runs(fleet: Fleet) -> None:
    _, report = fleet.apply()
    assert report is not None and report.ok
    before = _ids(fleet.containers())
    # As after a readiness timeout: the container runs (restart policy) but the replica never became ready.
    with fleet.database.session() as session:
        session.execute(update(Replica).where(Replica.deployment_name == "embed").values(status="failed"))
    survey, report = fleet.apply()
    assert {a.replica_name: a.kind.value for a in survey.plan.changes} == {"embed/0": "recreate"}
    assert report is not None and report.ok
    after = _ids(fleet.containers())
    assert after["embed/0"] != before["embed/0"] and after["chat/0"] == before["chat/0"]
    assert fleet.replicas()["embed/0"].status == "ready"

"""Carrying out a plan's actions on the workers: containers over Docker/SSH, readiness over HTTP.

Each action records what happened as it happens (replica rows, events), so a crash or a killed process
leaves the database describing what exists; the next pass converges from there.

A failed action is transient (a later pass may succeed with nothing changed: the worker or Docker did not
answer) or permanent (it fails the same way until a person changes the manifest, the worker or the
operator's settings: a missing secret, no GPU runtime, an engine that exits or never becomes ready). The
worker's errors say which by `NodeError.retryable`, the replica's own by `ReplicaFailed.retryable`; the
result and the replica's message carry it.

Replacing a serving replica never makes a request wait on a stopping container: the replica is first marked
`draining` (the gateway routes only to `ready` replicas and re-reads them every `route_refresh_s`), then the
executor waits that long and for the engine's requests in flight to finish (up to `rollout.drainTimeout`),
and only then stops it. A surge starts the new replica first and retires the old one once the new one is
Ready; if the new one never is, it is removed and the old one keeps serving. A replica stopped first whose
replacement fails readiness gets the spec it served put back. Either way the action fails (the deployment is
Degraded with the reason) and the rest of the deployment's rollout is not started.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from secrets import token_urlsafe
from typing import NoReturn

from sqlalchemy import select, update

from lmstack.backends import EffectiveSpec, backend_for, normalize_applied
from lmstack.backends.base import ReplicaContext
from lmstack.backends.container import LABEL_DEPLOYMENT, LABEL_REPLICA
from lmstack.manifests.policy import PushLimits
from lmstack.nodes.docker import DockerPool, ManagedContainer, NodeError
from lmstack.nodes.http import request
from lmstack.nodes.inflight import requests_in_flight
from lmstack.reconcile.access import WorkerAccess
from lmstack.reconcile.backoff import read_log_tail, secret_values
from lmstack.reconcile.model import Action, ActionKind
from lmstack.reconcile.records import add_event, delete_replica, engine_key_of, set_replica_status, upsert_replica
from lmstack.reconcile.secrets import SecretError, resolve_env
from lmstack.state import Database, Replica

Progress = Callable[[Action, str], None]

# Beyond the gateway's refresh interval: its read of the replicas, and a request picked just before it, land.
_ROUTE_MARGIN_S = 0.5
_DRAIN_POLL_S = 0.2


@dataclass(frozen=True)
class ActionResult:
    action: Action
    ok: bool
    message: str
    endpoint: str | None = None
    elapsed_s: float = 0.0
    retryable: bool | None = None  # a failure only: whether a later pass may clear it by itself


class ReplicaFailed(Exception):
    """An action failed for a reason of the replica's own (its engine, its secrets, its worker's entry)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class RolloutFailed(ReplicaFailed):
    """A new spec failed and was rolled back: the replica serves the spec it served before (still, by surge, or
    again), so its row is left as it is."""


@dataclass(frozen=True)
class _Serving:
    """What a replica's row says it serves: read before it is replaced, to drain it and to put it back."""

    status: str
    endpoint: str | None
    engine_key: str | None
    stored: dict[str, object]
    spec_hash: str
    revision: str | None


def failure_text(message: str, retryable: bool) -> str:
    """The message with which kind of failure it is, as the replica's message and the report show it."""
    if retryable:
        return f"{message} (transient: a later pass retries)"
    return f"{message} (permanent: fix the manifest, the worker or the settings; a later pass fails the same way)"


@dataclass
class Executor:
    pool: DockerPool
    database: Database
    workers: Mapping[str, WorkerAccess]
    specs: Mapping[str, EffectiveSpec]  # deployment -> its desired spec
    revision: str | None
    sync_run: int | None
    environ: Mapping[str, str]
    limits: PushLimits  # where secrets may come from (the operator's, as the source was validated against)
    containers: Mapping[tuple[str, int], ManagedContainer] = field(default_factory=dict)
    progress: Progress = lambda action, status: None
    poll_s: float = 1.0
    # How often the gateway re-reads the replicas (settings.registry_refresh_s): a replica marked draining gets
    # no new request once this has passed.
    route_refresh_s: float = 1.0
    _ports: dict[str, set[int]] = field(default_factory=dict)
    _port_lock: threading.Lock = field(default_factory=threading.Lock)
    # deployment -> why its rollout stopped: its remaining restarts are not started in this pass
    _halted: dict[str, str] = field(default_factory=dict)

    # -- actions ---------------------------------------------------------------------------------

    def run(self, action: Action) -> ActionResult:
        started = time.monotonic()
        try:
            if action.kind is ActionKind.DELETE:
                message, endpoint = self._delete(action), None
            elif action.kind is ActionKind.UPDATE:
                message, endpoint = self._update(action)
            elif action.surge is not None:
                message, endpoint = self._surge(action)
            else:
                message, endpoint = self._create(action)
        except RolloutFailed as exc:
            text = failure_text(str(exc), exc.retryable)
            self._halted.setdefault(action.deployment, f"{action.replica_name} failed")
            self._event("Warning", "Deployment", action.deployment, "RolloutFailed",
                        f"replica {action.replica}: {text}")
            self.progress(action, f"failed: {text}")
            return ActionResult(action, False, text, None, time.monotonic() - started, exc.retryable)
        except (NodeError, SecretError, ReplicaFailed) as exc:
            retryable = isinstance(exc, NodeError | ReplicaFailed) and exc.retryable
            text = failure_text(str(exc), retryable)
            if action.kind is ActionKind.RECREATE:
                self._halted.setdefault(action.deployment, f"{action.replica_name} failed")
            self._failed(action, text)
            self.progress(action, f"failed: {text}")
            return ActionResult(action, False, text, None, time.monotonic() - started, retryable)
        self.progress(action, message)
        return ActionResult(action, True, message, endpoint, time.monotonic() - started)

    def run_chain(self, chain: list[Action]) -> list[ActionResult]:
        """The actions in order; a restart of a deployment whose rollout stopped (an earlier restart of it failed,
        here or in another chain) is not started: the replica keeps serving what it serves."""
        results = []
        for action in chain:
            halted = self._halted.get(action.deployment)
            if halted is not None and action.kind is ActionKind.RECREATE:
                text = f"not started: the rollout of {action.deployment} stopped ({halted})"
                self.progress(action, text)
                results.append(ActionResult(action, False, text, None, 0.0, False))
                continue
            results.append(self.run(action))
        return results

    def remove_orphan(self, worker: str, container_id: str, name: str) -> str | None:
        """Remove a labelled container no replica owns; returns the error, if any."""
        try:
            self.pool.remove(worker, container_id)
        except NodeError as exc:
            return str(exc)
        self._event("Normal", "Worker", worker, "OrphanRemoved", f"removed container {name} that no replica owns")
        return None

    def _delete(self, action: Action) -> str:
        previous = action.previous
        assert previous is not None
        self._retire(action, action.replica, previous.worker, action.reason)
        self._event("Normal", "Deployment", action.deployment, "ReplicaDeleted",
                    f"replica {action.replica} removed from {previous.worker}: {action.reason}")
        return "deleted"

    def _retire(self, action: Action, ordinal: int, worker: str, reason: str) -> None:
        """Drain replica `ordinal` of the action's deployment, then remove its container and its row."""
        serving = self._serving(action.deployment, ordinal)
        if serving is not None:
            self._drain(action, ordinal, serving)
        self.progress(action, f"removing the container of replica {ordinal}")
        with self.database.session() as session:
            set_replica_status(session, action.deployment, ordinal, "deleting", reason)
        current = self.containers.get((action.deployment, ordinal))
        if current is not None:
            self.pool.remove(worker, current.id)
        self._remove_by_name(worker, action.deployment, ordinal)
        with self.database.session() as session:
            delete_replica(session, action.deployment, ordinal, worker)

    def _surge(self, action: Action) -> tuple[str, str | None]:
        """Start the replacement (its own ordinal) beside the replica, wait for it to be Ready, then retire the
        old one. A replacement that fails is removed: the old replica serves on, untouched."""
        previous = action.previous
        assert previous is not None and action.surge is not None
        new = replace(action, kind=ActionKind.CREATE, replica=action.surge, previous=None, surge=None,
                      reason=f"replaces replica {action.replica}: {action.reason}")
        try:
            _, endpoint = self._create(new)
        except (NodeError, SecretError, ReplicaFailed) as exc:
            retryable = isinstance(exc, NodeError | ReplicaFailed) and exc.retryable
            self.progress(action, f"{new.replica_name} failed ({exc}): removing it")
            try:
                self._discard(new)
            except NodeError as again:
                exc = ReplicaFailed(f"{exc}; removing it failed too: {again}", retryable=True)
            raise RolloutFailed(f"rollout stopped: the new replica {new.replica_name}: {exc}; replica "
                                f"{action.replica} keeps serving the previous spec", retryable=retryable) from exc
        self._retire(action, action.replica, previous.worker, f"replaced by replica {action.surge}")
        self._event("Normal", "Deployment", action.deployment, "ReplicaReplaced",
                    f"replica {action.replica} on {previous.worker} replaced by replica {action.surge} "
                    f"(ready at {endpoint}): {action.reason}")
        return f"replaced by {new.replica_name}, ready at {endpoint}", endpoint

    def _discard(self, action: Action) -> None:
        """Remove a replica that never became Ready (its container and its row)."""
        placement = action.placement
        assert placement is not None
        self._remove_by_name(placement.worker, action.deployment, action.replica)
        with self.database.session() as session:
            delete_replica(session, action.deployment, action.replica, placement.worker)

    def _update(self, action: Action) -> tuple[str, str | None]:
        placement = action.placement
        assert placement is not None
        spec = self.specs[action.deployment]
        backend = backend_for(spec.backend)
        container = self.containers.get((action.deployment, action.replica))
        port = _port_of(container) or backend.default_port
        endpoint = f"http://{self.workers[placement.worker].address}:{port}"
        with self.database.session() as session:
            key = engine_key_of(session, action.deployment, action.replica)  # the running container's
        try:
            self._after_start(action, spec, endpoint, key)
            # An adopted container has been starting since it started: its startup timeout counts from then.
            self._wait_ready(action, spec, placement.worker, container.id if container else None, endpoint, key,
                             since=container.started_at if action.adopt and container else None)
        except ReplicaFailed as exc:
            if not action.adopt:
                raise
            self.progress(action, f"not ready ({exc}): recreating it")
            return self._create(replace(action, kind=ActionKind.RECREATE, adopt=False,
                                        reason=f"{action.reason}; not ready: {exc}"))
        with self.database.session() as session:
            upsert_replica(session, deployment=action.deployment, ordinal=action.replica, worker=placement.worker,
                           gpus=placement.gpus, container_id=container.id if container else None,
                           endpoint=endpoint, spec=spec, spec_hash=action.spec_hash or "", revision=self.revision,
                           status="ready", message=action.reason, engine_key=key)
        if action.adopt:
            self._event("Normal", "Deployment", action.deployment, "ReplicaAdopted",
                        f"replica {action.replica} on {placement.worker} ready at {endpoint}: {action.reason}")
            return f"adopted: ready at {endpoint}", endpoint
        self._event("Normal", "Deployment", action.deployment, "ReplicaUpdated",
                    f"replica {action.replica} on {placement.worker} updated in place: {action.reason}")
        return "updated in place", endpoint

    def _create(self, action: Action) -> tuple[str, str | None]:
        placement, previous = action.placement, action.previous
        assert placement is not None
        moving = previous is not None and previous.worker != placement.worker
        old = self.containers.get((action.deployment, action.replica))
        keep_port = _port_of(old) if old is not None and not moving else None
        serving: _Serving | None = None
        if previous is not None and not moving:
            # Recreate in place: the GPUs are the old container's, so it has to go first (drained, if it serves).
            serving = self._serving(action.deployment, action.replica)
            if serving is not None:
                self._drain(action, action.replica, serving)
            self.progress(action, "stopping the old container")
            if old is not None:
                self.pool.remove(previous.worker, old.id)
            self._remove_by_name(previous.worker, action.deployment, action.replica)
        try:
            endpoint = self._start(action, self.specs[action.deployment], action.spec_hash or "", self.revision,
                                   keep_port, action.reason)
        except (NodeError, SecretError, ReplicaFailed) as exc:
            if serving is None:
                raise
            self._put_back(action, serving, keep_port, exc)
        if moving and previous is not None:
            self.progress(action, f"removing the old container on {previous.worker}")
            try:
                if old is not None:
                    self.pool.remove(previous.worker, old.id)
                self._remove_by_name(previous.worker, action.deployment, action.replica)
            except NodeError as exc:
                # The new replica serves; the old container is an orphan the next pass removes.
                self._event("Warning", "Deployment", action.deployment, "OldReplicaNotRemoved",
                            f"replica {action.replica}: could not remove the old container on "
                            f"{previous.worker}: {exc}")
        verb = "created" if action.kind is ActionKind.CREATE else "recreated"
        self._event("Normal", "Deployment", action.deployment, "ReplicaReady",
                    f"replica {action.replica} {verb} on {placement} and ready at {endpoint}: {action.reason}")
        return f"ready at {endpoint}", endpoint

    def _start(self, action: Action, spec: EffectiveSpec, hash_: str, revision: str | None, keep_port: int | None,
               message: str) -> str:
        """Create the replica's container with `spec` on the action's placement, record it, wait until it is
        Ready and record that; returns its endpoint."""
        placement = action.placement
        assert placement is not None
        backend = backend_for(spec.backend)
        worker = self.workers.get(placement.worker)
        if worker is None:
            raise ReplicaFailed(f"{placement.worker}: no connection details (not in the inventory)", retryable=False)
        env = resolve_env(action.deployment, spec.env, environ=self.environ, limits=self.limits)
        port = self._claim_port(placement.worker, backend.default_port, keep_port)
        # A new key for every new container: one leaked with an old container opens nothing now.
        key = token_urlsafe(32) if backend.takes_engine_key else None
        context = ReplicaContext(
            deployment=action.deployment, ordinal=action.replica, served_name=spec.served_name,
            gpus=placement.gpus, port=port, model_cache=worker.model_cache, revision=revision,
            spec_hash=hash_, engine_key=key,
        )
        container_spec = backend.container(spec, context, env)
        endpoint = f"http://{worker.address}:{port}"
        self.progress(action, f"creating container on {placement.worker}")
        try:
            created = self.pool.create(placement.worker, container_spec)
        except NodeError:
            self._release_port(placement.worker, port)
            raise
        # Recorded at once: from here on the container exists, and a crash must not lose it.
        with self.database.session() as session:
            upsert_replica(session, deployment=action.deployment, ordinal=action.replica, worker=placement.worker,
                           gpus=placement.gpus, container_id=created.id, endpoint=endpoint, spec=spec,
                           spec_hash=hash_, revision=revision, status="starting", message=message,
                           engine_key=key)
        self._after_start(action, spec, endpoint, key)
        self._wait_ready(action, spec, placement.worker, created.id, endpoint, key)
        # Said as done: a ready replica's message is why it was made, not a problem it still has.
        done = f"{'created' if action.kind is ActionKind.CREATE else 'recreated'}: {message}"
        with self.database.session() as session:
            set_replica_status(session, action.deployment, action.replica, "ready", done)
        return endpoint

    def _put_back(self, action: Action, serving: _Serving, keep_port: int | None,
                  failure: NodeError | SecretError | ReplicaFailed) -> NoReturn:
        """The replica was stopped for a new spec that failed: start it again with the spec it served."""
        previous = normalize_applied(action.deployment, serving.stored)
        if previous is None:
            raise failure
        self.progress(action, f"not ready ({failure}): putting the previous spec back")
        placement = action.placement
        assert placement is not None
        self._remove_by_name(placement.worker, action.deployment, action.replica)
        try:
            endpoint = self._start(action, previous, serving.spec_hash, serving.revision, keep_port,
                                   f"serving the previous spec: the new one failed: {failure}")
        except (NodeError, SecretError, ReplicaFailed) as exc:
            raise ReplicaFailed(f"{failure}; putting the previous spec back failed too: {exc}",
                                retryable=False) from exc
        retryable = not isinstance(failure, SecretError) and failure.retryable
        raise RolloutFailed(f"rollout stopped: {failure}; rolled back: replica {action.replica} serves the previous "
                            f"spec again at {endpoint}", retryable=retryable)

    # -- draining ----------------------------------------------------------------------------------

    def _serving(self, deployment: str, ordinal: int) -> _Serving | None:
        """What the replica's row says it serves, when the gateway may route to it (it is Ready); else None."""
        with self.database.session() as session:
            row = session.execute(
                select(Replica.status, Replica.endpoint, Replica.engine_key, Replica.spec, Replica.spec_hash,
                       Replica.revision)
                .where(Replica.deployment_name == deployment, Replica.ordinal == ordinal)).first()
        if row is None or row.status != "ready":
            return None
        return _Serving(row.status, row.endpoint, row.engine_key, dict(row.spec or {}), row.spec_hash, row.revision)

    def _drain(self, action: Action, ordinal: int, serving: _Serving) -> None:
        """Take the replica out of the gateway's routing, wait until every gateway has seen that, then until its
        engine has no request left (up to rollout.drainTimeout)."""
        spec = self.specs.get(action.deployment) or normalize_applied(action.deployment, serving.stored)
        timeout = spec.rollout.drain_timeout if spec is not None else 30
        backend = spec.backend if spec is not None else ""
        with self.database.session() as session:
            # `draining` is not one of the statuses the records module writes (it is no Literal there): the
            # column is plain text, and every reader but the gateway takes it for "not ready".
            session.execute(update(Replica).where(Replica.deployment_name == action.deployment,
                                                  Replica.ordinal == ordinal)
                            .values(status="draining", message=f"draining before it stops: {action.reason}"))
        self.progress(action, f"draining replica {ordinal}: no new requests")
        time.sleep(self.route_refresh_s + _ROUTE_MARGIN_S)
        if serving.endpoint is None or timeout <= 0:
            return
        deadline = time.monotonic() + timeout
        while True:
            count = requests_in_flight(backend, serving.endpoint, bearer=serving.engine_key)
            if count == 0:
                return
            if time.monotonic() >= deadline:
                self._event("Warning", "Deployment", action.deployment, "DrainTimedOut",
                            f"replica {ordinal}: {'requests still' if count else 'maybe requests'} in flight after "
                            f"{timeout} s (rollout.drainTimeout): stopping it")
                return
            # None: the engine does not say; the whole drain timeout is the only safe wait.
            time.sleep(_DRAIN_POLL_S)

    # -- readiness ---------------------------------------------------------------------------------

    def _after_start(self, action: Action, spec: EffectiveSpec, endpoint: str, key: str | None) -> None:
        calls = backend_for(spec.backend).after_start(spec)
        if not calls:
            return
        deadline = time.monotonic() + spec.health.startup_timeout
        while request(endpoint + "/", timeout_s=2).status is None:
            if time.monotonic() > deadline:
                raise ReplicaFailed(f"{endpoint} never answered within {spec.health.startup_timeout} s",
                                    retryable=False)
            time.sleep(self.poll_s)
        for call in calls:
            self.progress(action, f"{call.method} {call.path}")
            answer = request(endpoint + call.path, method=call.method, body=call.json, timeout_s=call.timeout_s,
                             bearer=key)
            if answer.status is None or answer.status >= 400:
                # No answer may clear by itself; an engine that refuses the call refuses it again.
                raise ReplicaFailed(f"{call.method} {call.path} on {endpoint} failed: "
                                    f"{answer.error or answer.status}", retryable=answer.status is None)

    def _wait_ready(self, action: Action, spec: EffectiveSpec, worker: str, container_id: str | None,
                    endpoint: str, key: str | None, *, since: datetime | None = None) -> None:
        backend = backend_for(spec.backend)
        timeout = spec.health.startup_timeout
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        waited = 0.0 if since is None else max((datetime.now(UTC) - since).total_seconds(), 0.0)
        deadline = time.monotonic() + timeout - waited
        served = backend.upstream_model(spec)
        checks = 0
        while True:
            # A health path (llama.cpp's /health) must answer 200 before the model list is asked.
            path = backend.health_path or backend.ready_path
            answer = request(endpoint + path, timeout_s=3, bearer=key)
            if path != backend.ready_path and answer.status == 200:
                path = backend.ready_path
                answer = request(endpoint + path, timeout_s=3, bearer=key)
            if path == backend.ready_path and backend.is_ready(answer.status, answer.payload, served):
                return
            checks += 1
            if container_id is not None and checks % 3 == 0:
                state = self.pool.inspect(worker, container_id)
                # Restarted by Docker (restart policy) means it exited: a crash before it was ever ready.
                if state is None or state.state not in ("running", "created") or state.restart_count > 0:
                    logs = self._tail(worker, container_id, secret_values(
                        action.deployment, spec, environ=self.environ, limits=self.limits, engine_key=key))
                    what = "is gone" if state is None else f"exited ({state.status})"
                    if state is not None and state.state == "running":  # started again by Docker: how it exited
                        code = self.pool.last_exit_code(worker, container_id)
                        what = f"exited{f' with code {code}' if code is not None else ''} (Docker restarted it)"
                    raise ReplicaFailed(f"container on {worker} {what} before it was ready{logs}", retryable=False)
            if time.monotonic() > deadline:
                raise ReplicaFailed(f"not ready after {timeout} s (health.startupTimeout): {endpoint}"
                                    f"{path} answered {answer.status or answer.error}", retryable=False)
            if checks == 1 or checks % 10 == 0:
                self.progress(action, f"waiting for {served} at {endpoint}")
            # Quick checks first (small engines are up in well under a second), then back off to poll_s.
            time.sleep(min(self.poll_s, 0.1 * 1.5 ** checks))

    def _tail(self, worker: str, container_id: str, secrets: list[str]) -> str:
        lines = read_log_tail(self.pool, worker, container_id, secrets=secrets)  # secrets blanked
        return "; last log lines: " + lines if lines else ""

    # -- helpers -----------------------------------------------------------------------------------

    def _remove_by_name(self, worker: str, deployment: str, ordinal: int) -> None:
        """Remove any container of this replica on the worker (by labels), e.g. one left by a crash."""
        for container in self.pool.list_managed(worker):
            if (container.labels.get(LABEL_DEPLOYMENT) == deployment
                    and container.labels.get(LABEL_REPLICA) == str(ordinal)):
                self.pool.remove(worker, container.id)

    def _claim_port(self, worker: str, base: int, keep: int | None) -> int:
        with self._port_lock:
            used = self._ports.get(worker)
            if used is None:
                used = self.pool.used_ports(worker)
                self._ports[worker] = used
            if keep is not None:
                used.add(keep)
                return keep
            port = base
            while port in used:
                port += 1
            used.add(port)
            return port

    def _release_port(self, worker: str, port: int) -> None:
        with self._port_lock:
            self._ports.get(worker, set()).discard(port)

    def _failed(self, action: Action, message: str) -> None:
        with self.database.session() as session:
            spec = self.specs.get(action.deployment)
            if (action.kind is not ActionKind.DELETE and action.previous is None and action.placement is not None
                    and spec is not None):
                upsert_replica(session, deployment=action.deployment, ordinal=action.replica,
                               worker=action.placement.worker, gpus=action.placement.gpus, container_id=None,
                               endpoint=None, spec=spec, spec_hash=action.spec_hash or "",
                               revision=self.revision, status="failed", message=message)
            else:
                set_replica_status(session, action.deployment, action.replica, "failed", message)
            add_event(session, type="Warning", kind="Deployment", name=action.deployment,
                      reason=f"{action.kind.value.capitalize()}Failed",
                      message=f"replica {action.replica}: {message}", sync_run=self.sync_run)

    def _event(self, type_: str, kind: str, name: str, reason: str, message: str) -> None:
        with self.database.session() as session:
            add_event(session, type="Warning" if type_ == "Warning" else "Normal", kind=kind, name=name,
                      reason=reason, message=message, sync_run=self.sync_run)


def _port_of(container: ManagedContainer | None) -> int | None:
    return None if container is None else container.port


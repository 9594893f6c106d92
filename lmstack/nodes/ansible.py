"""Running lmstack's playbooks with ansible-runner; the only module that imports `ansible_runner`.

As AWX and ansible-navigator drive it: each run gets a fresh `private_data_dir` (the playbooks, the
inventory, environment variables that make ssh use the operator's key file and ssh_config and check host
keys against the given known_hosts file), runs in JSON mode and quietly, and a cheap event handler keeps
only the per-host outcomes. The result is data; nothing here stores anything or decides what a failure
means for a worker.

Nothing a run is given is ever a template to ansible: per-host data (from manifests in Git) is written into
the inventory with every string tagged `!unsafe`, and extra variables (which ansible renders) may only be
numbers and booleans. The SSH private key is never copied: ssh reads the operator's file, so a killed run
leaves no key behind, and private data dirs of runs whose process is gone are removed at the next start.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Literal

import ansible_runner  # type: ignore[import-untyped]  # noqa: TID251 (this is the one allowed place)
import yaml

# playbooks/ ships inside the package (lmstack/playbooks, mapped in pyproject.toml); an editable install runs
# from the source checkout, where it is the top-level playbooks/.
_PACKAGE = Path(__file__).resolve().parents[1]
PLAYBOOKS_DIR = _PACKAGE / "playbooks" if (_PACKAGE / "playbooks").is_dir() else _PACKAGE.parent / "playbooks"
FACTS_PLAYBOOK = "facts.yml"
FACTS_MODULE = "lmstack_facts"
MAX_FORKS = 50
PRIVATE_DIR_PREFIX = "lmstack-ansible-"
HOST_VARS_FILE = "zz-lmstack-data.yml"  # beside the given inventory: lmstack's per-host data
_DATA_KEY = re.compile(r"lmstack_[a-z0-9_]+")

RunStatus = Literal["successful", "failed", "timeout", "canceled"]
# unreachable: no SSH connection (refused, timed out, no route, DNS); auth_failed: the server refused
# the key; host_key: the host key is unknown or differs from known_hosts; module_failed: connected, but
# the task failed (no Python, module error); no_result: the run ended without an outcome for the host
# (timeout, cancel, an error before the play started).
ErrorKind = Literal["unreachable", "auth_failed", "host_key", "module_failed", "no_result"]

_HOST_KEY = re.compile(
    r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|host key is known for|"
    r"Host key for .* has changed|No \w+ host key is known",
    re.IGNORECASE,
)
_AUTH = re.compile(r"Permission denied|publickey|Too many authentication failures", re.IGNORECASE)
_MESSAGE_LIMIT = 600


class AnsibleSetupError(Exception):
    """The run could not be set up (a missing key, known_hosts or playbook file); nothing was run."""


@dataclass(frozen=True)
class TaskResult:
    task: str
    action: str  # the module, e.g. "lmstack_facts"
    changed: bool
    result: Mapping[str, Any]  # the module's return values


@dataclass(frozen=True)
class HostError:
    host: str
    kind: ErrorKind
    message: str
    task: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(frozen=True)
class HostRun:
    """What one host did in a run: its task results, and the error that stopped it, if one did."""

    host: str
    results: tuple[TaskResult, ...] = ()
    error: HostError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def changed(self) -> bool:
        return any(result.changed for result in self.results)


@dataclass(frozen=True)
class PlaybookRun:
    status: RunStatus
    rc: int
    hosts: Mapping[str, HostRun]  # every host asked for, including those without an outcome
    messages: tuple[str, ...] = ()  # Ansible's own errors and warnings (not per host)
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class HostFacts:
    host: str
    facts: Mapping[str, Any]  # what the lmstack_facts module returned under `facts`


RunnerInventory = str | Mapping[str, bytes]
"""What ansible-runner is given as its inventory: INI or YAML text (written as `inventory/hosts`), or files by
path relative to `inventory/` (lmstack writes them from the parsed gitsource.Inventory: reconcile.facts)."""


def run_playbook(
    playbook: str,
    *,
    inventory: RunnerInventory,
    hosts: Sequence[str],
    ssh_key: Path,
    known_hosts: Path,
    ssh_config: Path | None = None,
    host_vars: Mapping[str, Mapping[str, object]] | None = None,
    extravars: Mapping[str, bool | int] | None = None,
    forks: int = 20,
    timeout_s: int = 600,
    connect_timeout_s: int = 10,
    cancel: Callable[[], bool] | None = None,
    playbooks_dir: Path = PLAYBOOKS_DIR,
) -> PlaybookRun:
    """Run `playbook` (a file in `playbooks_dir`) on `hosts` (the `--limit`), return per-host outcomes.

    ssh authenticates with the key file `ssh_key` (read in place, never copied), reads the operator's
    `ssh_config` when given (jump hosts, extra options), and trusts only the host keys in `known_hosts`.
    `host_vars` ({host: {lmstack_*: value}}) reach the playbook as host variables that ansible never renders;
    `extravars` are rendered by ansible, so only numbers and booleans are taken. `cancel` is polled about once
    a second; returning True stops the run (status "canceled"). Raises AnsibleSetupError only when nothing
    could be run.
    """
    if not hosts:
        return PlaybookRun(status="successful", rc=0, hosts=MappingProxyType({}))
    _check_key(ssh_key)
    _check_file(known_hosts, "known_hosts file")
    if ssh_config is not None:
        _check_file(ssh_config, "ssh_config file")
    if not (playbooks_dir / playbook).is_file():
        raise AnsibleSetupError(f"playbook {playbooks_dir / playbook} does not exist")
    extra = _extravars(extravars or {})
    data = _host_vars_file(host_vars or {})
    remove_leftovers()
    collector = _Collector()
    # The process id in the name tells a later run whether this one is still going (see remove_leftovers).
    with tempfile.TemporaryDirectory(prefix=f"{PRIVATE_DIR_PREFIX}{os.getpid()}-") as temp:
        private = Path(temp)
        _write_private_data_dir(private, inventory=inventory, host_vars=data, ssh_key=ssh_key,
                                known_hosts=known_hosts, ssh_config=ssh_config, connect_timeout_s=connect_timeout_s,
                                playbooks_dir=playbooks_dir)
        started = time.monotonic()
        try:
            runner = ansible_runner.run(
                private_data_dir=str(private),
                playbook=playbook,
                limit=",".join(hosts),
                forks=max(1, min(forks, len(hosts), MAX_FORKS)),
                extravars=extra,
                json_mode=True,
                quiet=True,
                timeout=timeout_s,
                event_handler=collector.handle,
                cancel_callback=cancel or (lambda: False),
                # How often the cancel callback and the timeout are checked (default 5 s).
                settings={"pexpect_timeout": 1, "suppress_output_file": True},
            )
        except ansible_runner.AnsibleRunnerException as exc:
            raise AnsibleSetupError(f"ansible-runner: {exc}") from exc
        elapsed = time.monotonic() - started
        known = ("successful", "timeout", "canceled")
        status: RunStatus = runner.status if runner.status in known else "failed"
        rc = int(runner.rc if runner.rc is not None else -1)
    return PlaybookRun(
        status=status,
        rc=rc,
        hosts=collector.outcomes(hosts, _no_result_reason(status, timeout_s, collector.messages)),
        messages=tuple(collector.messages),
        elapsed_s=elapsed,
    )


def run_facts(
    inventory: RunnerInventory,
    hosts: Sequence[str],
    *,
    ssh_key: Path,
    known_hosts: Path,
    ssh_config: Path | None = None,
    model_cache: Mapping[str, str] | None = None,
    forks: int = 20,
    timeout_s: int = 300,
    cancel: Callable[[], bool] | None = None,
    playbooks_dir: Path = PLAYBOOKS_DIR,
) -> dict[str, HostFacts | HostError]:
    """Gather lmstack's node facts from `hosts` in one run: each host's facts, or why there are none.

    `model_cache` maps a host to its model cache directory (default /var/lib/lmstack/models).
    """
    run = run_playbook(
        FACTS_PLAYBOOK,
        inventory=inventory,
        hosts=hosts,
        ssh_key=ssh_key,
        known_hosts=known_hosts,
        ssh_config=ssh_config,
        host_vars={host: {"lmstack_model_cache": directory} for host, directory in (model_cache or {}).items()},
        forks=forks,
        timeout_s=timeout_s,
        cancel=cancel,
        playbooks_dir=playbooks_dir,
    )
    gathered: dict[str, HostFacts | HostError] = {}
    for host in hosts:
        outcome = run.hosts[host]
        facts = next((r.result.get("facts") for r in outcome.results if r.action == FACTS_MODULE), None)
        if outcome.error is not None:
            gathered[host] = outcome.error
        elif isinstance(facts, Mapping):
            gathered[host] = HostFacts(host=host, facts=facts)
        else:
            gathered[host] = HostError(host, "module_failed", f"{FACTS_MODULE} returned no facts")
    return gathered


# --- data for the playbooks ------------------------------------------------------------------------


def inventory_yaml(hosts: Mapping[str, Mapping[str, object]]) -> str:
    """A YAML inventory of `hosts` ({name: {variable: value}}) in which every string is tagged `!unsafe`:
    ansible takes it as written and never renders a template in it, however deep in lists and mappings."""
    document = {"all": {"hosts": {
        str(name): {str(key): _unsafe(value) for key, value in variables.items()}
        for name, variables in sorted(hosts.items())
    }}}
    return yaml.dump(document, Dumper=_InventoryDumper, sort_keys=True, default_flow_style=False, allow_unicode=True)


class _Unsafe(str):
    """A string ansible must not render: written with the `!unsafe` tag."""


class _InventoryDumper(yaml.SafeDumper):
    pass


_InventoryDumper.add_representer(_Unsafe, lambda dumper, value: dumper.represent_scalar("!unsafe", str(value)))


def _unsafe(value: object) -> object:
    """`value` with every string in it (not the keys) marked unsafe."""
    if isinstance(value, str):
        return _Unsafe(value)
    if isinstance(value, Mapping):
        return {str(key): _unsafe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_unsafe(item) for item in value]
    return value


def _host_vars_file(host_vars: Mapping[str, Mapping[str, object]]) -> str | None:
    for variables in host_vars.values():
        for key in variables:
            if not _DATA_KEY.fullmatch(key):  # never a connection variable, never ansible's own
                raise ValueError(f"host variable {key!r} is not lmstack_*")
    return inventory_yaml(host_vars) if host_vars else None


def _extravars(extravars: Mapping[str, bool | int]) -> dict[str, bool | int]:
    # ansible renders extra variables as templates (a string from Git could run a lookup on this machine)
    for key, value in extravars.items():
        if not isinstance(value, bool | int):
            raise ValueError(f"extra variable {key!r} must be a number or a boolean; pass data as host_vars")
    return dict(extravars)


# --- the private data dir --------------------------------------------------------------------------


def remove_leftovers(temp_root: Path | None = None) -> list[Path]:
    """Remove the private data dirs of runs whose process is gone (killed: nothing removed them), and those of
    lmstack versions that named no process (they held a copy of the SSH key). Returns what was removed."""
    root = Path(temp_root or tempfile.gettempdir())
    removed = []
    for path in root.glob(f"{PRIVATE_DIR_PREFIX}*"):
        try:
            info = path.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            continue  # someone else's: not ours to judge
        owner = re.match(rf"{re.escape(PRIVATE_DIR_PREFIX)}(\d+)-", path.name)
        if owner is not None and _alive(int(owner.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _write_private_data_dir(
    private: Path, *, inventory: RunnerInventory, host_vars: str | None, ssh_key: Path, known_hosts: Path,
    ssh_config: Path | None, connect_timeout_s: int, playbooks_dir: Path,
) -> None:
    """project/ (the playbooks and their library/), inventory/ and env/envvars; no env/ssh_key (see above)."""
    shutil.copytree(playbooks_dir, private / "project", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    inventory_dir = private / "inventory"
    inventory_dir.mkdir()
    if isinstance(inventory, str):
        (inventory_dir / "hosts").write_text(inventory)
    else:
        for relative, data in inventory.items():
            parts = PurePosixPath(relative).parts
            if not parts or ".." in parts or PurePosixPath(relative).is_absolute() or relative == HOST_VARS_FILE:
                raise AnsibleSetupError(f"inventory file path {relative!r} is not inside inventory/")
            target = inventory_dir.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)  # not executable: a script inventory from Git is never run
    if host_vars is not None:
        (inventory_dir / HOST_VARS_FILE).write_text(host_vars)
    env = private / "env"
    env.mkdir(mode=0o700)
    options = ["-F", str(ssh_config.resolve())] if ssh_config is not None else []
    options += [
        # Given on the command line, these win over anything in an ssh_config: host keys are always checked.
        "-o", f"UserKnownHostsFile={known_hosts.resolve()}",
        "-o", "StrictHostKeyChecking=yes",
        # No prompt may ever wait for a person (a passphrase, an unknown host): fail instead.
        "-o", "BatchMode=yes",
        # Only the key file given (ANSIBLE_PRIVATE_KEY_FILE below), not whatever an ssh-agent holds.
        "-o", "IdentitiesOnly=yes",
    ]
    envvars = {
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_SSH_ARGS": " ".join(shlex.quote(option) for option in options),
        "ANSIBLE_PRIVATE_KEY_FILE": str(ssh_key.resolve()),
        "ANSIBLE_TRANSPORT": "ssh",
        "ANSIBLE_TIMEOUT": str(connect_timeout_s),
        # One SSH connection per task (the module goes over stdin) instead of mkdir, sftp, run, rm.
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
        "ANSIBLE_LOCAL_TEMP": str(private / "tmp"),
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "True",
        # A broken inventory is an error, not a warning and a run over no hosts.
        "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
        "ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": "True",
        "PATH": _search_path(),
    }
    (env / "envvars").write_text(json.dumps(envvars))


def _check_key(path: Path) -> None:
    _check_file(path, "SSH private key")
    try:
        with path.open("rb"):
            pass
        mode = path.stat()
    except OSError as exc:
        raise AnsibleSetupError(f"cannot read the SSH private key {path}: {exc.strerror or exc}") from exc
    # ssh ignores a key of its own user that others may read; say so here rather than "Permission denied".
    if mode.st_uid == os.geteuid() and mode.st_mode & 0o077:
        raise AnsibleSetupError(f"the SSH private key {path} may be read by others (mode "
                                f"{stat.S_IMODE(mode.st_mode):04o}), so ssh will not use it: chmod 600 {path}")


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise AnsibleSetupError(f"{what} {path} does not exist")


def _search_path() -> str:
    """PATH with the directory of this Python first when ansible-playbook is there: a venv's bin/ need
    not be on PATH (`.venv/bin/lmstack facts`). ansible-runner's own `binary` option would do, but it
    switches to a raw mode that leaves the playbook off the command line."""
    path = os.environ.get("PATH", os.defpath)
    here = Path(sys.executable).parent
    if (here / "ansible-playbook").is_file() and str(here) not in path.split(os.pathsep):
        return f"{here}{os.pathsep}{path}"
    return path


# --- events ----------------------------------------------------------------------------------------


@dataclass
class _Collector:
    """Keeps the per-host outcomes from the event stream; everything else is dropped unwritten."""

    results: dict[str, list[TaskResult]] = field(default_factory=dict)
    errors: dict[str, HostError] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, event: Mapping[str, Any]) -> bool:
        kind = event.get("event")
        data = event.get("event_data") or {}
        host = data.get("host")
        res: Mapping[str, Any] = data["res"] if isinstance(data.get("res"), Mapping) else {}
        task = str(data.get("task") or "") or None
        with self.lock:
            if kind == "runner_on_ok" and host:
                self.results.setdefault(host, []).append(TaskResult(
                    task=task or "", action=str(data.get("task_action") or ""),
                    changed=bool(res.get("changed")), result=res))
            elif kind == "runner_on_unreachable" and host:
                raw = str(res.get("msg") or "unreachable")
                error_kind = _unreachable_kind(raw)
                message = _host_key_message(raw) if error_kind == "host_key" else _ssh_message(raw)
                self.errors.setdefault(host, HostError(host, error_kind, message, task))
            elif kind == "runner_on_failed" and host and not data.get("ignore_errors"):
                self.errors.setdefault(host, HostError(host, "module_failed", _failure_message(res), task))
            elif kind in ("verbose", "error", "warning", "playbook_on_no_hosts_matched"):
                text = _condense(str(event.get("stdout") or ""))
                if text and not text.startswith("Identity added:"):  # ssh-add's, on every run
                    self.messages.append(text)
        return False  # the private data dir is thrown away: do not write events to it

    def outcomes(self, hosts: Sequence[str], no_result: str) -> Mapping[str, HostRun]:
        runs = {}
        for host in hosts:
            error = self.errors.get(host)
            results = tuple(self.results.get(host, ()))
            if error is None and not results:
                error = HostError(host, "no_result", no_result)
            runs[host] = HostRun(host=host, results=results, error=error)
        return MappingProxyType(runs)


def _unreachable_kind(message: str) -> ErrorKind:
    if _HOST_KEY.search(message):
        return "host_key"
    if _AUTH.search(message):
        return "auth_failed"
    return "unreachable"


# What ansible puts before ssh's own words.
_SSH_PREFIX = re.compile(
    r"^(Task failed: )?(Data could not be sent to remote host \"[^\"]*\"\. Make sure this host can be "
    r"reached over ssh: |Failed to connect to the host via ssh: )?",
)
_CHANGED = re.compile(r"Host key for (\S+) has changed")
_SENT = re.compile(
    r"The fingerprint for the (\S+) key sent by the remote host is\s+(\S+?)\.?\s*$", re.MULTILINE
)
_OFFENDING = re.compile(r"Offending \S+ key in (\S+)")


def _ssh_message(raw: str) -> str:
    return _condense(_SSH_PREFIX.sub("", raw.strip(), count=1))


def _host_key_message(raw: str) -> str:
    """ssh's fifteen-line warning about a changed key, as one sentence that says what to check."""
    changed = _CHANGED.search(raw)
    if changed is None:
        return _ssh_message(raw)  # unknown host: ssh's own two lines say it well
    sent = _SENT.search(raw)
    offending = _OFFENDING.search(raw)
    key = f" (it sent {sent.group(1)} {sent.group(2)})" if sent else ""
    where = f" at {offending.group(1)}" if offending else ""
    return (f"the host key of {changed.group(1)} differs from the one in known_hosts{where}{key}: "
            "the host was reinstalled, or someone is intercepting the connection; check, then update "
            "known_hosts")


def _failure_message(res: Mapping[str, Any]) -> str:
    parts = [str(res.get("msg") or "failed")]
    for key in ("module_stderr", "stderr"):
        extra = str(res.get(key) or "").strip()
        if extra and extra not in parts[0]:
            parts.append(extra)
            break
    return _condense(" ".join(parts) if parts[0].endswith((".", ":")) else ": ".join(parts))


def _condense(text: str) -> str:
    """One line without ssh's @@@ banners and blank lines, cut to a readable length."""
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and not set(line) <= {"@"}]
    joined = " ".join(kept)
    return joined if len(joined) <= _MESSAGE_LIMIT else joined[: _MESSAGE_LIMIT - 1] + "…"


def _no_result_reason(status: RunStatus, timeout_s: int, messages: Sequence[str]) -> str:
    if status == "timeout":
        return f"the run timed out after {timeout_s} s"
    if status == "canceled":
        return "the run was canceled"
    detail = "; ".join(messages[-3:]) if messages else "no output"
    return f"ansible-playbook ended without a result for this host ({status}): {detail}"

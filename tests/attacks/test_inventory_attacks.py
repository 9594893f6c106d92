"""What the repository's inventory may make lmstack do on its own host, and what a killed run leaves behind.

Issue 10, finding 1: inventory variables reached Ansible unfiltered. `ansible_ssh_common_args` with a
ProxyCommand ran a command as root on the lmstack host during `lmstack facts`, `ansible_connection: local` ran
the play there, `ansible_ssh_args` switched off host-key checking, and a host (or address) spelled like an ssh
option is one; `validate` said "Valid" each time. Finding 5: a ~1 KB alias bomb in the inventory made validate
use 2.5 GB and run past 90 s. Finding 11: a SIGKILL of a run while facts were gathered left a copy of the SSH
private key in a temporary directory that nothing removed.

The validation cases are data files (tests/attacks/inventory/*, read as `inventory/hosts.EXT`), each with
`# expect: LINE: VARIABLE: substring` lines (VARIABLE empty where the error is about a value).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from testbed.fleet import write_fleet

from lmstack.gitsource import parse_inventory
from lmstack.manifests import ManifestError, ManifestValidationError

LMSTACK = [sys.executable, "-m", "lmstack"]
DATA = Path(__file__).parent / "inventory"
BOMB = DATA / "alias_bomb.yml"  # read only in a child process with bounded memory (see below)
CASES = sorted(path for path in DATA.iterdir() if path.is_file() and path != BOMB)
_EXPECT = re.compile(r"^# expect: (\d+): ([\w]*): (.+)$")
WORKER = "apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {name: a}\nspec: {host: gpu-a}\n"


def _expectations(text: str) -> list[tuple[int, str, str]]:
    return [(int(m[1]), m[2], m[3]) for line in text.splitlines() if (m := _EXPECT.match(line))]


def _target(path: Path) -> str:
    return f"inventory/hosts{path.suffix}"


def _errors(files: dict[str, bytes]) -> tuple[ManifestError, ...]:
    with pytest.raises(ManifestValidationError) as info:
        parse_inventory(files)
    return info.value.errors


def _repository(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in {**files, "manifests/workers.yaml": WORKER.encode()}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


# --- validation: every case refused with FILE:LINE and the variable ------------------------------------------


def test_every_case_states_its_expectations() -> None:
    assert len(CASES) >= 12
    for path in [*CASES, BOMB]:
        assert _expectations(path.read_text()), path.name


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_inventory_attack_refused_at_validate(path: Path, tmp_path: Path) -> None:
    expected = _expectations(path.read_text())
    errors = _errors({_target(path): path.read_bytes()})
    report = "\n".join(str(e) for e in errors)
    assert {(e.file, e.line, e.path) for e in errors} == {(_target(path), line, key) for line, key, _ in expected}, \
        report
    for line, key, substring in expected:
        assert any(substring in e.message for e in errors if (e.line, e.path) == (line, key)), \
            f"{path.name}:{line}: {key}: no message contains {substring!r}:\n{report}"

    # And as the operator sees it: `lmstack validate` fails naming FILE:LINE, and nothing ran.
    repo = _repository(tmp_path / "fleet", {_target(path): path.read_bytes()})
    result = subprocess.run([*LMSTACK, "validate", "--dir", str(repo)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "300"})
    assert result.returncode == 1, result.stdout + result.stderr
    for line, key, _ in expected:
        assert f"{_target(path)}:{line}: {key + ': ' if key else ''}" in result.stderr, result.stderr
    assert not list(Path("/tmp").glob("lmstack-attack-*"))


def test_an_oversized_inventory_file_is_refused_unread() -> None:
    big = b"[gpu]\ngpu-a ansible_host=10.0.0.5\n" + b"# padding\n" * 40_000
    started = time.perf_counter()
    [error] = _errors({"inventory/hosts": big})
    assert time.perf_counter() - started < 1
    assert (error.file, error.line) == ("inventory/hosts", 0) and "bytes; an inventory file may have at most" in \
        error.message


def _limit_memory() -> None:
    # The old reader took gigabytes for this file: a child that tries fails instead of taking the machine.
    resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))


def test_an_alias_bomb_is_refused_in_under_a_second_with_bounded_memory(tmp_path: Path) -> None:
    """In a child process (the old reader took minutes and gigabytes): its parse time and peak memory."""
    expected = _expectations(BOMB.read_text())
    script = (
        "import json, resource, sys, time\n"
        "from lmstack.gitsource import parse_inventory\n"
        "from lmstack.manifests import ManifestValidationError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "started = time.perf_counter()\n"
        "try:\n"
        "    parse_inventory({'inventory/hosts.yml': open(sys.argv[1], 'rb').read()})\n"
        "    errors = []\n"
        "except ManifestValidationError as exc:\n"
        "    errors = [[e.file, e.line, e.path, e.message] for e in exc.errors]\n"
        "print(json.dumps({'seconds': time.perf_counter() - started, 'errors': errors,\n"
        "                  'grown_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(BOMB)], capture_output=True, text=True, timeout=60,
                            preexec_fn=_limit_memory)
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout)
    assert [(file, line, key) for file, line, key, _ in outcome["errors"]] == \
        [("inventory/hosts.yml", line, key) for line, key, _ in expected], outcome
    assert all(substring in outcome["errors"][0][3] for _, _, substring in expected)
    assert outcome["seconds"] < 1, outcome
    assert outcome["grown_kib"] < 100 * 1024, outcome

    repo = _repository(tmp_path / "fleet", {"inventory/hosts.yml": BOMB.read_bytes()})
    validate = subprocess.run([*LMSTACK, "validate", "--dir", str(repo)], capture_output=True, text=True,
                              timeout=60, preexec_fn=_limit_memory, env={**os.environ, "NO_COLOR": "1"})
    assert validate.returncode == 1 and "inventory/hosts.yml:3: " in validate.stderr, validate.stderr[-2000:]


# --- the SSH key: never copied where a killed run leaves it ---------------------------------------------------


def _env(bed: Any, database_url: str, root: Path) -> dict[str, str]:
    return {**os.environ, "LMSTACK_DATABASE_URL": database_url, "LMSTACK_HOME": str(root / "home"),
            "LMSTACK_SSH_KEY": str(bed.ssh_key), "LMSTACK_KNOWN_HOSTS": str(bed.known_hosts),
            "TMPDIR": str(root / "tmp"), "NO_COLOR": "1", "COLUMNS": "200"}


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id), from /proc."""
    found = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
        except OSError:
            continue
        found[int(stat_file.parent.name)] = (int(fields[1]), int(fields[3]))
    return found


def _sessions_under(pid: int) -> set[int]:
    """The sessions of `pid` and of every process below it (ansible starts each ssh in a session of its own)."""
    processes = _processes()
    below, sessions = {pid}, set()
    while True:
        more = {child for child, (parent, _) in processes.items() if parent in below} - below
        if not more:
            break
        below |= more
    for member in below:
        if member in processes:
            sessions.add(processes[member][1])
    return sessions


def _end_sessions(sessions: set[int]) -> None:
    """SIGKILL each process of `sessions` (what a killed run left running), by its id, until none is left."""
    for _ in range(50):
        left = [pid for pid, (_, session) in _processes().items() if session in sessions]
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"processes of sessions {sessions} would not end")


def _holding(directory: Path, secret: bytes) -> list[Path]:
    """Files under `directory` whose content holds `secret`."""
    found = []
    for path in directory.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and secret in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found


@pytest.mark.testbed
def test_a_killed_facts_run_leaves_no_key_and_the_next_run_removes_its_leftovers(
    clean_testbed: Any, db: Any, database_url: str, tmp_path: Path
) -> None:
    bed = clean_testbed
    repo = write_fleet(tmp_path / "fleet", bed, {})
    env = _env(bed, database_url, tmp_path)
    temp = tmp_path / "tmp"
    temp.mkdir()
    key = Path(bed.ssh_key).read_bytes().strip()
    # The operator's ssh_config makes the connection hang (a jump host that never answers), so the run is
    # caught while ssh is connecting: the moment a per-run key copy would be in use.
    connecting = tmp_path / "connecting"
    config = tmp_path / "home" / "ssh_config"  # where lmstack looks for one by default (LMSTACK_SSH_CONFIG)
    config.parent.mkdir()
    config.write_text(f"Host *\n  ProxyCommand sh -c 'touch {connecting}; exec sleep 120'\n")

    run = subprocess.Popen([*LMSTACK, "facts", "--dir", str(repo)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sessions = {run.pid}
    try:
        deadline = time.monotonic() + 60
        copies: set[Path] = set()  # any copy of the key, at any moment of the run
        while not connecting.exists() and run.poll() is None and time.monotonic() < deadline:
            copies.update(_holding(temp, key))
            time.sleep(0.05)
        assert not copies, f"the run copied the SSH key to {sorted(copies)}"
        assert run.poll() is None, "the run ended before it was caught mid-way"
        run_dirs = list(temp.glob("lmstack-ansible-*"))
        sessions |= _sessions_under(run.pid)
        os.kill(run.pid, signal.SIGKILL)  # lmstack itself, as the OOM killer or `kill -9` would
        run.wait(timeout=10)
    finally:
        if run.poll() is None:
            os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=10)
        _end_sessions(sessions)  # what the killed run left running: ansible-playbook, ssh, the ProxyCommand
    assert connecting.exists() and run_dirs, "the run never got as far as connecting"
    assert all(path.exists() for path in run_dirs)  # the killed run removed nothing ...
    assert _holding(temp, key) == []  # ... and nothing it left holds the key

    # Leftovers: the killed run's directory, one of an older lmstack (no process id in its name, a key copy
    # inside), and one of a run still going (this process) that must stay.
    older = temp / "lmstack-ansible-k3y_c0py"
    (older / "env").mkdir(parents=True)
    (older / "env" / "ssh_key").write_bytes(key)
    live = temp / f"lmstack-ansible-{os.getpid()}-busy"
    live.mkdir()
    config.unlink()
    again = subprocess.run([*LMSTACK, "facts", "--dir", str(repo)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(path.name for path in temp.glob("lmstack-ansible-*")) == [live.name]
    assert _holding(temp, key) == []

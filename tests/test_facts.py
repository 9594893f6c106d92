"""Node facts end to end: real ansible-runner and ansible-playbook against real sshd hosts (host keys
checked), the facts stored in a real PostgreSQL, and `lmstack facts` / `lmstack plan` as processes.

The hosts are the shared multi-host test bed (`testbed` fixture) when tests/conftest.py has it, else
sshd servers on 127.0.0.1 started here. The only fake is GPU hardware: a `nvidia-smi` on a host's PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from testbed.fleet import workers_yaml, write_fleet

from lmstack.cli.render_facts import disk_summary
from lmstack.gitsource import parse_inventory
from lmstack.nodes.ansible import PLAYBOOKS_DIR, HostError, HostFacts, run_facts, run_playbook
from lmstack.reconcile.facts import runner_inventory, worker_facts
from lmstack.state import Database, Worker

LMSTACK = [sys.executable, "-m", "lmstack"]
GIB = 1024**3
MIB = 1024**2
# Two H100s; GPU 0 also runs someone else's 1 GiB process (busy, but with room left).
GPUS = [
    {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total": 81559, "utilization": 3,
     "processes": [{"pid": 999_001, "used_memory": 1024, "process_name": "jupyter"}]},
    {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_total": 81559, "utilization": 0},
]


# --- pure parts (no hosts) ---------------------------------------------------------------------------


def test_worker_facts_shape_for_the_planner() -> None:
    module = {
        "gpu_source": "nvidia-smi", "gpu_error": None, "docker_version": "26.1.5", "docker_error": None,
        "nvidia_runtime": True, "cpus": 64, "memory_total": 512 * GIB,
        "disk": {"path": "/var/lib", "requested": "/var/lib/lmstack/models", "free": 900 * GIB,
                 "total": 2000 * GIB},
        "gpus": [{"index": 0, "uuid": "GPU-a", "name": "NVIDIA H100 80GB HBM3", "memory_total": 80 * GIB,
                  "memory_used": 2 * GIB, "memory_unmanaged": GIB, "utilization": None,
                  "processes": [{"pid": 7, "used_memory": GIB, "managed": False}]},
                 {"index": 1, "uuid": "GPU-b", "name": "X", "memory_total": None, "memory_used": None,
                  "memory_unmanaged": 0, "utilization": 5}],
    }
    stored = worker_facts(module)
    assert stored["gpus"][0] == {"index": 0, "uuid": "GPU-a", "name": "NVIDIA H100 80GB HBM3",
                                 "memory_total": 80 * GIB, "memory_used": 2 * GIB, "memory_unmanaged": GIB,
                                 "utilization": None}
    assert stored["gpus"][1]["memory_total"] == 0  # unknown: nothing to offer to the scheduler
    assert stored["docker_version"] == "26.1.5" and stored["nvidia_runtime"] is True
    assert (stored["cpus"], stored["memory_total"], stored["disk_free"]) == (64, 512 * GIB, 900 * GIB)
    assert stored["disk_error"] is None
    assert json.loads(json.dumps(stored)) == stored  # plain JSON for the JSONB column


def test_a_refused_model_cache_is_kept_in_the_facts_and_shown() -> None:
    """The facts module refuses a cache that is a symlink (disk.error); the stored facts and the table keep
    the reason instead of dropping it."""
    refused = "refused: /var/lib/lmstack/models is a symlink (to /etc)"
    stored = worker_facts({"disk": {"path": "/var/lib/lmstack/models", "error": refused}})
    assert stored["disk_error"] == refused
    assert refused in disk_summary(stored)


def test_the_runner_inventory_has_only_the_connection_lmstack_decided(tmp_path: Path) -> None:
    inventory = parse_inventory({
        "inventory/hosts.ini": b"[gpu]\ngpu-a ansible_host='{{ inventory_hostname }}.lan' ansible_port=2222\n"
                               b"[gpu:vars]\nrack=r1\nansible_python_interpreter=/usr/bin/python3\n"
                               b"note=\"{{ lookup('pipe', 'touch " + str(tmp_path / "ran").encode() + b"') }}\"\n",
    })
    text = runner_inventory(inventory)
    # Read back the way ansible-playbook reads it, and every variable rendered as a play would render it.
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar
    from ansible.vars.manager import VariableManager

    (tmp_path / "lmstack.yml").write_text(text)
    loader = DataLoader()
    manager = InventoryManager(loader=loader, sources=[str(tmp_path / "lmstack.yml")])
    host = manager.get_host("gpu-a")
    variables = VariableManager(loader=loader, inventory=manager).get_vars(host=host, include_hostvars=False)
    ours = {key for key in host.vars if key not in ("inventory_file", "inventory_dir")}
    assert ours == {"ansible_connection", "ansible_host", "ansible_port", "ansible_python_interpreter"}
    rendered = {key: Templar(loader=loader, variables=variables).template(variables[key]) for key in ours}
    assert rendered == {"ansible_connection": "ssh", "ansible_host": "gpu-a.lan", "ansible_port": 2222,
                        "ansible_python_interpreter": "/usr/bin/python3"}
    assert "rack" not in variables and "note" not in variables  # the repository's own variables stay out
    assert not (tmp_path / "ran").exists()


# --- the hosts -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalHost:
    name: str
    address: str
    ssh_port: int
    dir: Path

    @property
    def bin_dir(self) -> Path:
        return self.dir / "bin"


class LocalBed:
    """sshd servers on 127.0.0.1 (one port per "host"), key-only, host keys pinned in known_hosts: the
    stand-in for the shared test bed, with the same names for what these tests use."""

    def __init__(self, root: Path, count: int) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not Path(sshd).exists():
            subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server"], check=True,
                           capture_output=True, timeout=300)
        self.sshd = sshd
        self.root = root
        self.user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True,
                                                            check=True).stdout.strip()
        client = root / "client"
        client.mkdir(parents=True)
        self.ssh_key = client / "id_ed25519"
        self.known_hosts = client / "known_hosts"
        _keygen(self.ssh_key)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.hosts: list[LocalHost] = []
        known = []
        for i in range(count):
            host = LocalHost(f"node{i + 1}", "127.0.0.1", _free_port(), root / f"node{i + 1}")
            host.bin_dir.mkdir(parents=True)
            _keygen(host.dir / "host_key")
            (host.dir / "sshd_config").write_text(textwrap.dedent(f"""\
                Port {host.ssh_port}
                ListenAddress 127.0.0.1
                HostKey {host.dir / "host_key"}
                PidFile {host.dir / "sshd.pid"}
                AuthorizedKeysFile {client / "authorized_keys"}
                AuthenticationMethods publickey
                PasswordAuthentication no
                KbdInteractiveAuthentication no
                PermitRootLogin prohibit-password
                StrictModes no
                UsePAM no
                MaxSessions 100
                SetEnv PATH={host.bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
                """))
            public = (host.dir / "host_key.pub").read_text().split()
            known.append(f"[{host.address}]:{host.ssh_port} {public[0]} {public[1]}\n")
            self.hosts.append(host)
        shutil.copy(self.ssh_key.with_suffix(".pub"), client / "authorized_keys")
        self.known_hosts.write_text("".join(known))
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory, when root
        for host in self.hosts:
            self.start_sshd(host)

    def host(self, host: LocalHost | str) -> LocalHost:
        return host if isinstance(host, LocalHost) else next(h for h in self.hosts if h.name == host)

    def inventory_ini(self, group: str = "gpu") -> str:
        lines = [f"[{group}]"] + [
            f"{h.name} ansible_host={h.address} ansible_port={h.ssh_port} ansible_user={self.user} "
            "ansible_python_interpreter=/usr/bin/python3" for h in self.hosts]
        return "\n".join(lines) + "\n"

    def start_sshd(self, host: LocalHost | str) -> None:
        h = self.host(host)
        if h.name in self.procs and self.procs[h.name].poll() is None:
            return
        log = (h.dir / "sshd.log").open("ab")
        self.procs[h.name] = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(h.dir / "sshd_config")],
                                              stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((h.address, h.ssh_port), timeout=1) as conn:
                    if conn.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd for {h.name} did not start: {(h.dir / 'sshd.log').read_text()}")

    def stop_sshd(self, host: LocalHost | str) -> None:
        proc = self.procs.pop(self.host(host).name, None)
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)

    def install_fake_nvidia_smi(self, host: LocalHost | str, gpus: list[dict[str, object]]) -> Path:
        h = self.host(host)
        (h.bin_dir / "nvidia-smi.json").write_text(json.dumps(gpus))
        target = h.bin_dir / "nvidia-smi"
        target.write_text(FAKE_NVIDIA_SMI)
        target.chmod(0o755)
        return target

    def remove_fake_nvidia_smi(self, host: LocalHost | str) -> None:
        for name in ("nvidia-smi", "nvidia-smi.json"):
            (self.host(host).bin_dir / name).unlink(missing_ok=True)

    def close(self) -> None:
        for name in list(self.procs):
            self.stop_sshd(name)


# A fake nvidia-smi for LocalBed, fed the same GPU records as the shared bed's (memory in MiB).
FAKE_NVIDIA_SMI = """\
#!/usr/bin/python3
import json, os, sys
gpus = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "nvidia-smi.json")))
args = " ".join(sys.argv[1:])
for i, gpu in enumerate(gpus):
    gpu.setdefault("index", i)
    gpu.setdefault("uuid", "GPU-00000000-0000-4000-8000-%012d" % gpu["index"])
    gpu.setdefault("memory_used", sum(p["used_memory"] for p in gpu.get("processes", [])))
if "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu" in args:
    for g in gpus:
        print("%s, %s, %s, %s, %s, %s" % (g["index"], g["uuid"], g["name"], g["memory_total"],
                                          g["memory_used"], g.get("utilization", 0)))
elif "--query-compute-apps=pid,used_memory,gpu_uuid" in args:
    for g in gpus:
        for p in g.get("processes", []):
            print("%s, %s, %s" % (p["pid"], p["used_memory"], g["uuid"]))
else:
    sys.exit("unexpected arguments: " + args)
"""


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lmstack-test", "-f", str(path)],
                   check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def bed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Three hosts: the shared `testbed` when it exists, else LocalBed. The first host has two GPUs."""
    try:
        shared = request.getfixturevalue("testbed")
    except (pytest.FixtureLookupError, pytest.skip.Exception):
        shared = None  # no shared bed here (no root, no network namespaces): sshd on 127.0.0.1 will do
    if shared is not None:
        if len(shared.hosts) < 3:
            pytest.skip("these tests need a test bed with at least three hosts")
        shared.install_fake_nvidia_smi(shared.hosts[0], GPUS)
        yield shared
        for host in shared.hosts:
            shared.start_sshd(host)
        shared.remove_fake_nvidia_smi(shared.hosts[0])
        return
    local = LocalBed(tmp_path_factory.mktemp("hosts"), 3)
    local.install_fake_nvidia_smi(local.hosts[0], GPUS)
    try:
        yield local
    finally:
        local.close()


@dataclass(frozen=True)
class Ssh:
    key: Path
    known_hosts: Path

    def kwargs(self) -> dict[str, Path]:
        return {"ssh_key": self.key, "known_hosts": self.known_hosts}


@pytest.fixture
def ssh(bed: Any) -> Ssh:
    return Ssh(key=Path(bed.ssh_key), known_hosts=Path(bed.known_hosts))


@pytest.fixture
def restart_sshd(bed: Any) -> Iterator[None]:
    """Every host's sshd runs again after the test, whatever it stopped."""
    yield
    for host in bed.hosts:
        bed.start_sshd(host)


def _names(bed: Any) -> list[str]:
    return [host.name for host in bed.hosts]


# --- the adapter -------------------------------------------------------------------------------------------


@pytest.mark.testbed
def test_facts_from_every_host_in_one_run(bed: Any, ssh: Ssh) -> None:
    names = _names(bed)
    started = time.monotonic()
    gathered = run_facts(bed.inventory_ini(), names, **ssh.kwargs(),
                         model_cache={names[0]: "/nonexistent/models"})
    elapsed = time.monotonic() - started
    print(f"facts from {len(names)} hosts in {elapsed:.2f} s")
    assert set(gathered) == set(names)
    assert all(isinstance(result, HostFacts) for result in gathered.values()), gathered
    gpu_host = gathered[names[0]]
    assert isinstance(gpu_host, HostFacts)
    facts = gpu_host.facts
    assert facts["gpu_source"] == "nvidia-smi" and facts["gpu_error"] is None
    assert [gpu["index"] for gpu in facts["gpus"]] == [0, 1]
    first, second = facts["gpus"]
    assert first["name"] == "NVIDIA H100 80GB HBM3" and first["memory_total"] == 81559 * MIB
    # Process 999001 runs in no lmstack container: its memory is unmanaged.
    assert first["memory_unmanaged"] == 1024 * MIB and second["memory_unmanaged"] == 0
    assert facts["disk"]["requested"] == "/nonexistent/models" and facts["disk"]["path"] == "/"
    for name in names[1:]:
        other = gathered[name]
        assert isinstance(other, HostFacts)
        assert other.facts["gpus"] == [] and other.facts["gpu_source"] == "none"
        assert "nvidia-smi not found" in other.facts["gpu_error"]
        assert other.facts["disk"]["requested"] == "/var/lib/lmstack/models"
        assert other.facts["cpus"] >= 1 and other.facts["memory_total"] > 0
    if not isinstance(bed, LocalBed):  # the shared bed runs a dockerd on every host
        for result in gathered.values():
            assert isinstance(result, HostFacts) and result.facts["docker_version"], result
            assert result.facts["nvidia_runtime"] is False and "runc" in result.facts["docker_runtimes"]


@pytest.mark.testbed
def test_a_stopped_sshd_is_unreachable_for_that_host_only(
    bed: Any, ssh: Ssh, restart_sshd: None
) -> None:
    names = _names(bed)
    bed.stop_sshd(bed.hosts[1])
    gathered = run_facts(bed.inventory_ini(), names, **ssh.kwargs())
    down = gathered[names[1]]
    assert isinstance(down, HostError) and down.kind == "unreachable", down
    assert "Connection refused" in down.message or "timed out" in down.message
    assert isinstance(gathered[names[0]], HostFacts) and isinstance(gathered[names[2]], HostFacts)


@pytest.mark.testbed
def test_host_keys_are_checked(bed: Any, ssh: Ssh, tmp_path: Path) -> None:
    names = _names(bed)
    victim = bed.hosts[2]
    # known_hosts with the third host's key replaced by another one (what a man in the middle presents).
    _keygen(tmp_path / "impostor")
    impostor = (tmp_path / "impostor.pub").read_text().split()
    lines = []
    for line in Path(ssh.known_hosts).read_text().splitlines():
        patterns = line.split()[0].split(",") if line.strip() else []
        if victim.address in patterns or f"[{victim.address}]:{victim.ssh_port}" in patterns:
            line = f"{line.split()[0]} {impostor[0]} {impostor[1]}"
        lines.append(line)
    wrong = tmp_path / "known_hosts"
    wrong.write_text("\n".join(lines) + "\n")
    gathered = run_facts(bed.inventory_ini(), names, ssh_key=ssh.key, known_hosts=wrong)
    refused = gathered[names[2]]
    assert isinstance(refused, HostError) and refused.kind == "host_key", refused
    assert "differs from the one in known_hosts" in refused.message
    assert isinstance(gathered[names[0]], HostFacts) and isinstance(gathered[names[1]], HostFacts)

    # A host missing from known_hosts is refused too (never trusted on first use).
    (tmp_path / "empty").write_text("")
    unknown = run_facts(bed.inventory_ini(), names[:1], ssh_key=ssh.key, known_hosts=tmp_path / "empty")
    assert isinstance(unknown[names[0]], HostError) and unknown[names[0]].kind == "host_key"


@pytest.mark.testbed
def test_the_operators_ssh_config_is_read_and_cannot_switch_off_host_keys(bed: Any, ssh: Ssh, tmp_path: Path) -> None:
    host = bed.hosts[0]
    # An address only the operator's ssh_config knows (as with a jump host): found through it, and only so.
    config = tmp_path / "ssh_config"
    config.write_text(f"Host via-config\n  HostName {host.address}\n")
    inventory = (f"{host.name} ansible_host=via-config ansible_user={host.user} ansible_port={host.ssh_port} "
                 "ansible_python_interpreter=/usr/bin/python3\n")
    found = run_facts(inventory, [host.name], **ssh.kwargs(), ssh_config=config)
    assert isinstance(found[host.name], HostFacts), found
    lost = run_facts(inventory, [host.name], **ssh.kwargs())
    assert isinstance(lost[host.name], HostError) and lost[host.name].kind == "unreachable", lost

    # Host keys are checked against the known_hosts lmstack was given, whatever the ssh_config says.
    config.write_text("Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
                      "  GlobalKnownHostsFile /dev/null\n")
    (tmp_path / "empty").write_text("")
    unknown = run_facts(bed.inventory_ini(), [host.name], ssh_key=ssh.key, known_hosts=tmp_path / "empty",
                        ssh_config=config)
    assert isinstance(unknown[host.name], HostError) and unknown[host.name].kind == "host_key", unknown


@pytest.mark.testbed
def test_a_key_the_hosts_do_not_accept_is_auth_failed(bed: Any, ssh: Ssh, tmp_path: Path) -> None:
    _keygen(tmp_path / "stranger")
    name = bed.hosts[0].name
    gathered = run_facts(bed.inventory_ini(), [name], ssh_key=tmp_path / "stranger",
                         known_hosts=ssh.known_hosts)
    assert isinstance(gathered[name], HostError) and gathered[name].kind == "auth_failed", gathered


@pytest.mark.testbed
def test_cancel_and_timeout_stop_the_run(bed: Any, ssh: Ssh, tmp_path: Path) -> None:
    names = _names(bed)
    canceled = run_playbook("facts.yml", inventory=bed.inventory_ini(), hosts=names, **ssh.kwargs(),
                            cancel=lambda: True)
    assert canceled.status == "canceled"
    assert {run.error.kind for run in canceled.hosts.values() if run.error} == {"no_result"}

    # A playbook that outlives its timeout (a copy of the playbooks with one slow task).
    slow = tmp_path / "playbooks"
    shutil.copytree(PLAYBOOKS_DIR, slow)
    (slow / "slow.yml").write_text("- hosts: all\n  gather_facts: false\n  tasks:\n"
                                   "    - ansible.builtin.command: sleep 60\n")
    started = time.monotonic()
    timed_out = run_playbook("slow.yml", inventory=bed.inventory_ini(), hosts=names[:1], **ssh.kwargs(),
                             timeout_s=3, playbooks_dir=slow)
    assert timed_out.status == "timeout" and time.monotonic() - started < 20
    error = timed_out.hosts[names[0]].error
    assert error is not None and error.kind == "no_result" and "timed out after 3 s" in error.message


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.testbed
def test_gpu_memory_of_lmstack_containers_is_not_unmanaged(bed: Any, ssh: Ssh) -> None:
    """Real containers on a real dockerd; only the GPU is fake (its process list names their PIDs)."""
    if isinstance(bed, LocalBed):
        pytest.skip("needs the shared test bed (a dockerd per host)")
    host = bed.hosts[1]
    sleeper = ["--network", "none", "--entrypoint", "/usr/bin/python3", bed.standin_image,
               "-c", "import os, time; os.fork(); time.sleep(600)"]
    ours = bed.docker(host, "run", "-d", "--label", "lmstack.deployment=qwen-7b", *sleeper).stdout.strip()
    theirs = bed.docker(host, "run", "-d", "--label", "team=research", *sleeper).stdout.strip()
    try:
        pid = {cid: int(bed.docker(host, "inspect", "--format", "{{.State.Pid}}", cid).stdout)
               for cid in (ours, theirs)}
        deadline = time.monotonic() + 10
        while not _children(pid[ours]) and time.monotonic() < deadline:
            time.sleep(0.05)
        ours_child = _children(pid[ours])[0]  # the engine's worker process: a child of the container's PID 1
        bed.install_fake_nvidia_smi(host, [
            {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total": 81559,
             "processes": [{"pid": ours_child, "used_memory": 30000}, {"pid": pid[theirs], "used_memory": 5000},
                           {"pid": 4_000_000, "used_memory": 700}]},  # a process outside any container
        ])
        gathered = run_facts(bed.inventory_ini(), [host.name], **ssh.kwargs())
        result = gathered[host.name]
        assert isinstance(result, HostFacts), result
        gpu = result.facts["gpus"][0]
        assert gpu["memory_used"] == 35700 * MIB
        assert gpu["memory_unmanaged"] == 5700 * MIB  # the unlabelled container's and the stray process's
        assert {p["pid"]: p["managed"] for p in gpu["processes"]} == {
            ours_child: True, pid[theirs]: False, 4_000_000: False}
    finally:
        bed.docker(host, "rm", "-f", ours, theirs, check=False)
        bed.remove_fake_nvidia_smi(host)


# --- `lmstack facts`, the database, and `lmstack plan` ------------------------------------------------------


def _repository(root: Path, bed: Any) -> Path:
    workers = workers_yaml(bed.hosts, name=lambda host: f"w-{host.name}",
                           labels=lambda host: {"n": str(bed.hosts.index(host))})
    return write_fleet(root / "fleet", bed, {"qwen.yaml": textwrap.dedent("""\
        apiVersion: lmstack.dev/v1
        kind: Deployment
        metadata: {name: qwen-7b}
        spec:
          backend: vllm
          model: Qwen/Qwen2.5-7B-Instruct
          replicas: 2
          resources: {gpus: 1, gpuMemory: 24Gi}
        """)}, workers=workers)


def _lmstack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LMSTACK, *args], env=env, capture_output=True, text=True, timeout=300)


def _rows(db: Database) -> dict[str, Worker]:
    with db.session() as session:
        return {row.name: row for row in session.scalars(select(Worker))}


@pytest.mark.testbed
def test_cli_stores_facts_marks_failures_and_plan_uses_them(
    bed: Any, ssh: Ssh, db: Database, database_url: str, tmp_path: Path, restart_sshd: None
) -> None:
    repo = _repository(tmp_path, bed)
    env = {**os.environ, "LMSTACK_DATABASE_URL": database_url, "LMSTACK_HOME": str(tmp_path / "home"),
           "LMSTACK_SSH_KEY": str(ssh.key), "LMSTACK_KNOWN_HOSTS": str(ssh.known_hosts),
           "NO_COLOR": "1", "COLUMNS": "200"}
    gpu_worker, down_worker = f"w-{bed.hosts[0].name}", f"w-{bed.hosts[1].name}"

    first = _lmstack(env, "facts", "--dir", str(repo))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2× H100 80GB HBM3 79.6Gi (1 busy)" in first.stdout
    assert "none (nvidia-smi not found)" in first.stdout  # the GPU-less hosts: none, and why
    assert "3 of 3 workers Ready" in first.stdout
    rows = _rows(db)
    assert set(rows) == {f"w-{h.name}" for h in bed.hosts}
    assert all(row.facts_at is not None and row.facts_error is None for row in rows.values())
    assert rows[gpu_worker].host == bed.hosts[0].name and rows[gpu_worker].labels == {"n": "0"}
    assert rows[gpu_worker].spec["host"] == bed.hosts[0].name
    assert [gpu["memory_unmanaged"] for gpu in rows[gpu_worker].facts["gpus"]] == [GIB, 0]
    assert (datetime.now(UTC) - rows[gpu_worker].facts_at).total_seconds() < 120

    plan = _lmstack(env, "plan", "--dir", str(repo), "--json")
    assert plan.returncode == 2, plan.stderr
    creates = [a for a in json.loads(plan.stdout)["actions"] if a["kind"] == "create"]
    assert sorted((a["placement"]["worker"], tuple(a["placement"]["gpus"])) for a in creates) == [
        (gpu_worker, (0,)), (gpu_worker, (1,))]

    bed.stop_sshd(bed.hosts[1])
    second = _lmstack(env, "facts", "--dir", str(repo), "--json")
    assert second.returncode == 1, second.stdout + second.stderr
    report = {w["name"]: w for w in json.loads(second.stdout)["workers"]}
    assert report[down_worker]["ready"] is False and report[down_worker]["errorKind"] == "unreachable"
    assert report[gpu_worker]["ready"] is True
    rows_after = _rows(db)
    down = rows_after[down_worker]
    assert down.facts_error is not None and down.facts_error.startswith("unreachable: ")
    assert down.facts == rows[down_worker].facts and down.facts_at == rows[down_worker].facts_at  # kept
    assert rows_after[gpu_worker].facts_at > rows[gpu_worker].facts_at

    table = _lmstack(env, "facts", "--dir", str(repo))
    assert table.returncode == 1 and "NotReady: unreachable:" in table.stdout
    assert "2 of 3 workers Ready" in table.stdout
    plan = _lmstack(env, "plan", "--dir", str(repo))
    assert plan.returncode == 2 and f"{gpu_worker} gpu 0" in plan.stdout

    bed.start_sshd(bed.hosts[1])
    third = _lmstack(env, "facts", "--dir", str(repo))
    assert third.returncode == 0, third.stdout + third.stderr
    assert _rows(db)[down_worker].facts_error is None


def test_cli_refuses_missing_key_or_known_hosts(tmp_path: Path, database_url: str) -> None:
    repo = tmp_path / "fleet"
    (repo / "inventory").mkdir(parents=True)
    (repo / "manifests").mkdir()
    (repo / "inventory" / "hosts.ini").write_text("[gpu]\ngpu-a ansible_host=127.0.0.1\n")
    (repo / "manifests" / "w.yaml").write_text(
        "apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {name: a}\nspec: {host: gpu-a}\n")
    _keygen(tmp_path / "key")
    env = {**os.environ, "LMSTACK_DATABASE_URL": database_url, "NO_COLOR": "1"}
    missing_key = _lmstack(env, "facts", "--dir", str(repo), "--ssh-key", str(tmp_path / "nope"),
                           "--known-hosts", str(tmp_path / "key.pub"))
    assert missing_key.returncode == 1 and "SSH private key" in missing_key.stderr
    missing_known = _lmstack(env, "facts", "--dir", str(repo), "--ssh-key", str(tmp_path / "key"),
                             "--known-hosts", str(tmp_path / "nope"))
    assert missing_known.returncode == 1 and "known_hosts file" in missing_known.stderr

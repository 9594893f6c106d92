"""The multi-host test bed: N "machines" on this one, each with its own sshd and dockerd.

Layout (names configurable through BedConfig / LMSTACK_TESTBED_* variables):

    test process ── lmsbr0 10.213.0.1/24 ─┬─ veth ─ netns lmsbed-node1: eth0 10.213.0.11, sshd :22, dockerd
                                          ├─ veth ─ netns lmsbed-node2: eth0 10.213.0.12, ...
                                          └─ ...

Each host has its own network namespace (entered with nsenter, never `ip netns exec`, which remounts
/sys and breaks dockerd), its own persistent UTS namespace (its hostname, e.g. node1), its own mount
namespace (only to give it its own /root: a real host's home, and no test machine's ~/.bashrc), its own
sshd (key-only root login, its own generated host key, pinned in the bed's known_hosts) and its own
dockerd (own data root, exec root, socket; vfs storage, no bridge, no iptables), which its sshd sessions
reach through `SetEnv DOCKER_HOST=...`. Sessions also get that host's own bin directory first on PATH
(where a fake nvidia-smi goes). Otherwise the hosts share this machine's file system.

Everything the bed makes lives under one state directory and is found again by name and by pid
file, so a bed left behind by a crashed run is removed at the next start. A lock file serialises beds:
two runs on one machine would want the same addresses, so the second waits for the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .image import STANDIN_IMAGE, ImageArchive, build_standin_archive

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PRIVSEP_DIR = Path("/run/sshd")
REQUIRED_TOOLS = {  # tool -> Debian package
    "ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux", "ssh-keygen": "openssh-client",
    "ssh": "openssh-client", "sshd": "openssh-server", "dockerd": "docker.io", "docker": "docker.io",
    "containerd": "docker.io (containerd)", "runc": "docker.io (runc)", "docker-init": "docker.io (tini)",
    "ldd": "libc-bin",
}
FAKE_NVIDIA_SMI = Path(__file__).with_name("fake_nvidia_smi.py")


class TestbedUnavailable(RuntimeError):
    """This machine cannot run the bed (not root, no network namespaces, a tool missing)."""


@dataclass(frozen=True)
class BedConfig:
    __test__ = False

    hosts: int = 3
    prefix: str = "lmsbed"  # namespaces <prefix>-node1..., host-side veths <prefix>-v1...
    bridge: str = "lmsbr0"
    subnet: str = "10.213.0"  # a /24: .1 is this machine on the bridge, hosts are .11, .12, ...
    first_host: int = 11
    state_dir: Path = Path("/var/tmp/lmstack-testbed")
    ssh_port: int = 22
    lock_timeout: float = 900.0

    @classmethod
    def from_env(cls, **overrides: object) -> BedConfig:
        env = os.environ.get
        values: dict[str, object] = {}
        if env("LMSTACK_TESTBED_HOSTS"):
            values["hosts"] = int(env("LMSTACK_TESTBED_HOSTS", "3"))
        for key in ("prefix", "bridge", "subnet"):
            if env(f"LMSTACK_TESTBED_{key.upper()}"):
                values[key] = env(f"LMSTACK_TESTBED_{key.upper()}")
        if env("LMSTACK_TESTBED_DIR"):
            values["state_dir"] = Path(env("LMSTACK_TESTBED_DIR", ""))
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def comment(self) -> str:
        """Tags the iptables rules the bed adds, so exactly those are removed (also after a crash)."""
        return f"lmstack-testbed:{self.bridge}"

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def host_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.hosts + 1)]

    def validate(self) -> None:
        if not 1 <= self.hosts <= 200 - self.first_host:
            raise ValueError(f"hosts must be between 1 and {200 - self.first_host}")
        if len(self.bridge) > 15 or len(f"{self.prefix}-v{self.hosts}") > 15:
            raise ValueError("interface names are limited to 15 characters: shorten bridge or prefix")


@dataclass(frozen=True)
class TestHost:
    __test__ = False

    name: str
    address: str
    ssh_port: int
    user: str
    netns: str
    dir: Path
    veth: str  # the host-side end on the bridge

    @property
    def bin_dir(self) -> Path:
        return self.dir / "bin"

    @property
    def docker_socket(self) -> Path:
        return self.dir / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.docker_socket}"

    @property
    def home(self) -> Path:
        """Bind-mounted on /root inside the host's mount namespace: each host has its own home."""
        return self.dir / "root"

    @property
    def uts_file(self) -> Path:
        return self.dir.parent / "ns" / f"{self.name}.uts"

    @property
    def mnt_file(self) -> Path:
        return self.dir.parent / "ns" / f"{self.name}.mnt"

    def nsenter(self) -> list[str]:
        """The command prefix that runs a program inside this host (network, hostname, mounts)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", f"--uts={self.uts_file}",
                f"--mount={self.mnt_file}", "--"]

    @property
    def sshd_config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def sshd_pidfile(self) -> Path:
        return self.dir / "sshd.pid"

    @property
    def dockerd_pidfile(self) -> Path:
        return self.dir / "dockerd.pid"

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def env(self) -> dict[str, str]:
        """The environment a session on this host has (what its sshd sets)."""
        return {"PATH": f"{self.bin_dir}:{SYSTEM_PATH}", "DOCKER_HOST": self.docker_host, "HOME": "/root",
                "LANG": "C.UTF-8", "USER": self.user}


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 60, **kwargs: object
         ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                          **kwargs)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {output}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _read_pid(path: Path, must_mention: str) -> int | None:
    """The pid in a pid file, if that process is alive and is ours (its command line names our file)."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _pid_alive(pid) and must_mention in _cmdline(pid) else None


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pids: Sequence[int]) -> set[int]:
    children = _children_map()
    found: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill(pids: Sequence[int] | set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: Sequence[int] | set[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if _pid_alive(p)]
    return alive


def _wait_for(what: str, ready: Callable[[], bool], timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        if time.monotonic() > deadline:
            tail = ""
            if log is not None and log.exists():
                tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"{what} not ready after {timeout:.0f}s{tail}")
        time.sleep(0.02)


def _unix_http_ok(sock_path: Path) -> bool:
    """Whether a Docker API answers /_ping on this unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(sock_path))
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return s.recv(64).split(b"\r\n", 1)[0].split()[1:2] == [b"200"]
    except (OSError, IndexError):
        return False


def _ssh_banner(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1) as s:
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix) or point == str(path):
                found.append(point)
    return sorted(set(found), key=len, reverse=True)


# ------------------------------------------------------------------------------------------------
# Removal of a bed (this run's at teardown, or one a crashed run left behind at start).
# ------------------------------------------------------------------------------------------------


def _our_netns(config: BedConfig) -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{config.prefix}-node")]


def _our_cgroups(config: BedConfig) -> list[Path]:
    """The cgroups the hosts' dockerds made (--cgroup-parent=/<netns>), deepest first, v1 and v2."""
    root = Path("/sys/fs/cgroup")
    patterns = (f"{config.prefix}-node*", f"*/{config.prefix}-node*")
    tops = [p for pattern in patterns for p in root.glob(pattern) if p.is_dir()]
    found = []
    for top in tops:
        for dirpath, _dirs, _files in os.walk(top):
            found.append(Path(dirpath))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _cgroup_pids(cgroups: list[Path]) -> set[int]:
    pids: set[int] = set()
    for cg in cgroups:
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (cg / "cgroup.procs").read_text().split())
    return pids


def _iptables_rules(config: BedConfig) -> list[list[str]]:
    """Our rules, each as the `-A CHAIN ...` arguments `iptables -S` prints."""
    if shutil.which("iptables") is None:
        return []
    rules = []
    for chain in ("FORWARD", "DOCKER-USER"):
        proc = _run(["iptables", "-w", "-S", chain], check=False)
        for line in proc.stdout.splitlines():
            if config.comment in line and line.startswith("-A "):
                rules.append(shlex.split(line))
    return rules


def remove_bed(config: BedConfig, procs: Sequence[subprocess.Popen[bytes]] = ()) -> list[str]:
    """Remove everything a bed with this config made; return what could not be removed (empty: all).

    Processes go by pid: first sshd and dockerd from their pid files (SIGTERM, dockerd stops its
    containers and containerd), then whatever still runs in the hosts' network namespaces and their
    descendants (SIGKILL). Then mounts under the state directory, namespaces, veths, the bridge, the
    iptables rules tagged with the bed's comment, and the state directory.
    """
    problems: list[str] = []
    state = config.state_dir
    host_dirs = sorted(p for p in state.glob("node*") if p.is_dir()) if state.is_dir() else []
    sshds, dockerds = [], []
    for d in host_dirs:
        pid = _read_pid(d / "sshd.pid", str(d))
        if pid:
            sshds.append(pid)
        pid = _read_pid(d / "dockerd.pid", str(d))
        if pid:
            dockerds.append(pid)
    # Open ssh sessions first, while their sshd still reaps them.
    sessions = sorted(_descendants(sshds))
    _kill(sessions, signal.SIGKILL)
    _wait_gone(sessions, 5)
    _kill(sshds + dockerds, signal.SIGTERM)
    stuck = _wait_gone(sshds + dockerds, 15)
    _kill(stuck, signal.SIGKILL)
    _wait_gone(stuck, 5)

    namespaces = _our_netns(config)
    cgroups = _our_cgroups(config)
    for _ in range(3):
        # Whatever is left: processes in the hosts' namespaces, in their containers' cgroups (a
        # container with its own network namespace), and their descendants.
        inside = _cgroup_pids(cgroups)
        for ns in namespaces:
            out = _run(["ip", "netns", "pids", ns], check=False).stdout
            inside.update(int(p) for p in out.split() if p.isdigit())
        inside |= _descendants(sorted(inside))
        inside.discard(os.getpid())
        if not inside:
            break
        _kill(inside, signal.SIGKILL)
        left = _wait_gone(inside, 5)
        if left:
            problems.append(f"processes still alive after SIGKILL: {left}")
    for proc in procs:  # reap our own children (they are gone by now)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)

    if state.exists():
        for point in _mounts_under(state):
            proc = _run(["umount", "-l", point], check=False)
            if proc.returncode != 0:
                problems.append(f"umount {point}: {proc.stderr.strip()}")
    for cg in cgroups:
        try:
            cg.rmdir()
        except OSError as exc:
            problems.append(f"rmdir {cg}: {exc}")
    for ns in namespaces:
        proc = _run(["ip", "netns", "delete", ns], check=False)
        if proc.returncode != 0:
            problems.append(f"ip netns delete {ns}: {proc.stderr.strip()}")
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for line in links.splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name == config.bridge or name.startswith(f"{config.prefix}-v"):
            proc = _run(["ip", "link", "delete", name], check=False)
            if proc.returncode != 0 and "Cannot find device" not in proc.stderr:
                problems.append(f"ip link delete {name}: {proc.stderr.strip()}")
    for rule in _iptables_rules(config):
        proc = _run(["iptables", "-w", "-D", *rule[1:]], check=False)
        if proc.returncode != 0:
            problems.append(f"iptables -D {' '.join(rule[1:])}: {proc.stderr.strip()}")
    if state.exists():
        if _mounts_under(state):
            problems.append(f"mounts remain under {state}; not deleting it")
        else:
            shutil.rmtree(state, ignore_errors=True)
            if state.exists():
                problems.append(f"could not delete {state}")
    return problems


def leftovers(config: BedConfig) -> list[str]:
    """What of a bed with this config still exists (empty after a complete teardown)."""
    found = [f"network namespace {ns}" for ns in _our_netns(config)]
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for line in links.splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name == config.bridge or name.startswith(f"{config.prefix}-v"):
            found.append(f"link {name}")
    found += [f"iptables rule {' '.join(rule)}" for rule in _iptables_rules(config)]
    found += [f"cgroup {cg}" for cg in _our_cgroups(config)]
    if config.state_dir.exists():
        found.append(f"directory {config.state_dir}")
        found += [f"mount {m}" for m in _mounts_under(config.state_dir)]
    marker = f"{config.state_dir}/"  # not a prefix of another bed's folder (/var/tmp/lmstack-testbed-b)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _pid_alive(int(entry)) and marker in _cmdline(int(entry)):
            found.append(f"process {entry}: {_cmdline(int(entry))[:120]}")
    return found


# ------------------------------------------------------------------------------------------------
# The bed.
# ------------------------------------------------------------------------------------------------


def preflight() -> None:
    """Raise TestbedUnavailable (with what to do) when this machine cannot run the bed."""
    if os.geteuid() != 0:
        raise TestbedUnavailable("the test bed needs root (network namespaces, sshd, dockerd)")
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items()
                      if shutil.which(tool, path=SYSTEM_PATH) is None})
    if missing:
        raise TestbedUnavailable(
            "the test bed needs these Debian packages: " + ", ".join(missing)
            + " (apt-get install -y docker.io openssh-server iproute2 iptables busybox-static;"
            " .ci/run does it)")
    if not Path("/usr/bin/python3").exists():
        raise TestbedUnavailable("the test bed needs /usr/bin/python3 (the stand-in image carries it)")
    probe = _run(["unshare", "--net", "--uts", "true"], check=False)
    if probe.returncode != 0:
        raise TestbedUnavailable(f"network namespaces are not possible here: {probe.stderr.strip()}")


@dataclass
class TestBed:
    """A running bed. Made by TestBed.start(); removed by close() (also on errors during start)."""

    __test__ = False

    config: BedConfig
    hosts: list[TestHost]
    ssh_key: Path
    known_hosts: Path
    ssh_config: Path
    home: Path  # a HOME whose ~/.ssh points at the bed's key and known_hosts (for paramiko)
    standin_image: str = STANDIN_IMAGE
    image: ImageArchive | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _procs: dict[tuple[str, str], subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    _lock_fd: int | None = field(default=None, repr=False)
    _home_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _closed: bool = field(default=False, repr=False)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def start(cls, config: BedConfig | None = None) -> TestBed:
        config = config or BedConfig.from_env()
        config.validate()
        preflight()
        t0 = time.monotonic()
        lock_fd = _lock(Path(f"{config.state_dir}.lock"), config.lock_timeout)
        t_lock = time.monotonic()
        try:
            problems = remove_bed(config)
            if problems:
                raise RuntimeError("could not remove the previous bed: " + "; ".join(problems))
        except BaseException:
            os.close(lock_fd)
            raise
        t_clean = time.monotonic()
        state = config.state_dir
        hosts = [
            TestHost(name=name, address=f"{config.subnet}.{config.first_host + i}", ssh_port=config.ssh_port,
                     user="root", netns=f"{config.prefix}-{name}", dir=state / name,
                     veth=f"{config.prefix}-v{i + 1}")
            for i, name in enumerate(config.host_names())
        ]
        client = state / "client"
        bed = cls(config=config, hosts=hosts, ssh_key=client / "id_ed25519",
                  known_hosts=client / "known_hosts", ssh_config=client / "ssh_config", home=client / "home",
                  _lock_fd=lock_fd)
        bed.timings["lock_wait_s"] = t_lock - t0
        bed.timings["clean_leftovers_s"] = t_clean - t_lock
        try:
            bed._bring_up()
        except BaseException:
            bed.close()
            raise
        bed.timings["bring_up_s"] = time.monotonic() - t_lock  # not counting the wait for another bed
        return bed

    def _bring_up(self) -> None:
        marks = [("start", time.monotonic())]

        def mark(name: str) -> None:
            marks.append((name, time.monotonic()))

        for host in self.hosts:
            host.bin_dir.mkdir(parents=True)
        self.ssh_key.parent.mkdir(parents=True)
        # The image archive is written while the keys are made and the daemons start.
        image_result: dict[str, object] = {}

        def build() -> None:
            try:
                image_result["archive"] = build_standin_archive(self.config.state_dir / "standin-image.tar",
                                                                self.standin_image)
            except Exception as exc:  # reported below
                image_result["error"] = exc

        image_thread = threading.Thread(target=build, name="testbed-image", daemon=True)
        image_thread.start()
        keygens = [subprocess.Popen(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                                     "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for path, comment in [(self.ssh_key, "lmstack-testbed-client")]
                   + [(h.host_key, f"lmstack-testbed-{h.name}") for h in self.hosts]]
        self._network()
        mark("network")
        for proc in keygens:
            if proc.wait(timeout=30) != 0:
                raise RuntimeError(f"ssh-keygen failed: {proc.stderr.read() if proc.stderr else ''}")
        self._write_ssh_files()
        mark("keys_and_config")
        for host in self.hosts:
            self._start_dockerd(host)
            self.start_sshd(host, wait=False)
        for host in self.hosts:
            _wait_for(f"dockerd on {host.name}", lambda h=host: _unix_http_ok(h.docker_socket), 30,
                      host.dir / "dockerd.log")
            _wait_for(f"sshd on {host.name}", lambda h=host: _ssh_banner(h.address, h.ssh_port), 10,
                      host.dir / "sshd.log")
        mark("daemons")
        image_thread.join(timeout=120)
        if "error" in image_result or "archive" not in image_result:
            raise RuntimeError(f"building the stand-in image failed: {image_result.get('error')}")
        self.image = image_result["archive"]  # type: ignore[assignment]
        mark("image_build")
        self.load_image(self.image.path)  # type: ignore[union-attr]
        mark("image_load")
        for (name, t), (_, before) in zip(marks[1:], marks[:-1], strict=True):
            self.timings[f"{name}_s"] = t - before

    def _network(self) -> None:
        cfg = self.config
        ip = ["ip"]
        _run([*ip, "link", "add", cfg.bridge, "type", "bridge"])
        _run([*ip, "addr", "add", f"{cfg.gateway}/24", "dev", cfg.bridge])
        _run([*ip, "link", "set", cfg.bridge, "up"])
        # Persistent UTS and mount namespaces per host (its hostname; its own /root). Namespace files
        # can only be bind-mounted on a mount with private propagation: give them their own.
        ns_dir = self.config.state_dir / "ns"
        ns_dir.mkdir()
        _run(["mount", "--bind", str(ns_dir), str(ns_dir)])
        _run(["mount", "--make-private", str(ns_dir)])
        for host in self.hosts:
            host.uts_file.touch()
            host.mnt_file.touch()
            host.home.mkdir(mode=0o700)
            _run(["unshare", f"--uts={host.uts_file}", f"--mount={host.mnt_file}", "--propagation", "slave",
                  "sh", "-c", 'hostname "$1" && mount --bind "$2" /root', "sh", host.name, str(host.home)])
        for host in self.hosts:
            _run([*ip, "netns", "add", host.netns])
            _run([*ip, "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns])
            _run([*ip, "link", "set", host.veth, "master", cfg.bridge, "up"])
            _run([*ip, "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0"])
            _run([*ip, "-n", host.netns, "link", "set", "eth0", "up"])
            _run([*ip, "-n", host.netns, "link", "set", "lo", "up"])
        if shutil.which("iptables"):
            # A dockerd on this machine sets FORWARD to DROP (with br_netfilter, bridged frames pass
            # FORWARD): accept the bed's bridge-internal traffic, in DOCKER-USER when that chain exists.
            rule = ["-i", cfg.bridge, "-o", cfg.bridge, "-m", "comment", "--comment", cfg.comment,
                    "-j", "ACCEPT"]
            _run(["iptables", "-w", "-I", "FORWARD", *rule])
            if _run(["iptables", "-w", "-S", "DOCKER-USER"], check=False).returncode == 0:
                _run(["iptables", "-w", "-I", "DOCKER-USER", *rule])

    def _write_ssh_files(self) -> None:
        public = self.ssh_key.with_suffix(".pub").read_text().strip()
        authorized = self.config.state_dir / "authorized_keys"
        authorized.write_text(public + "\n")
        lines = []
        for host in self.hosts:
            key = " ".join(host.host_key.with_suffix(".pub").read_text().split()[:2])
            pattern = host.address if host.ssh_port == 22 else f"[{host.address}]:{host.ssh_port}"
            lines.append(f"{pattern} {key}")
            host.sshd_config.write_text("\n".join([
                f"Port {host.ssh_port}",
                "ListenAddress 0.0.0.0",
                f"HostKey {host.host_key}",
                f"PidFile {host.sshd_pidfile}",
                f"AuthorizedKeysFile {authorized}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",  # the state directory may sit under a world-writable /var/tmp
                "UseDNS no",
                "MaxSessions 100",  # the docker SDK opens many sessions on one connection
                "MaxStartups 100:30:200",
                "PrintMotd no",
                "PrintLastLog no",
                "X11Forwarding no",
                "AcceptEnv LANG LC_*",
                "Subsystem sftp internal-sftp",  # Ansible copies files over sftp
                f"SetEnv DOCKER_HOST={host.docker_host} PATH={host.bin_dir}:{SYSTEM_PATH}",
                "",
            ]))
        self.known_hosts.write_text("\n".join(lines) + "\n")
        # For the ssh CLI (and Ansible): -F this file. The options pin this bed's known_hosts.
        self.ssh_config.write_text("\n".join([
            f"Host {' '.join(h.address for h in self.hosts)}",
            "  User root",
            f"  IdentityFile {self.ssh_key}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {self.known_hosts}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 5",
            "  LogLevel ERROR",
            "",
        ]))
        # For paramiko (the docker SDK's ssh:// transport): it reads ~/.ssh/known_hosts (host keys, with
        # a RejectPolicy for unknown hosts) and ~/.ssh/config (IdentityFile) under $HOME.
        # So a HOME made for the bed, set while a client connects, points it at the bed's files
        # without touching the real ~/.ssh. See TestBed.docker_client().
        dot_ssh = self.home / ".ssh"
        dot_ssh.mkdir(parents=True, mode=0o700)
        shutil.copyfile(self.known_hosts, dot_ssh / "known_hosts")
        shutil.copyfile(self.ssh_config, dot_ssh / "config")

    def _start_dockerd(self, host: TestHost) -> None:
        (host.dir / "daemon.json").write_text("{}\n")
        argv = ["/usr/sbin/dockerd", f"--data-root={host.dir / 'docker'}", f"--exec-root={host.dir / 'run'}",
                f"--pidfile={host.dockerd_pidfile}", f"--host={host.docker_host}",
                f"--config-file={host.dir / 'daemon.json'}", "--storage-driver=vfs", "--bridge=none",
                "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--userland-proxy=false",
                "--shutdown-timeout=2", "--log-level=warn", f"--cgroup-parent=/{host.netns}"]
        self._spawn(host, "dockerd", argv)

    def _spawn(self, host: TestHost, what: str, argv: list[str]) -> None:
        log = open(host.dir / f"{what}.log", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            # tini (docker.io's docker-init) as a subreaper parent reaps what the daemon orphans
            # (containerd shims, killed ssh sessions): this machine's PID 1 may not.
            self._procs[(host.name, what)] = subprocess.Popen(
                [*host.nsenter(), "/usr/bin/docker-init", "-s", "--", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/root"})
        finally:
            log.close()

    # -- lookups -------------------------------------------------------------------------------------
    def host(self, host: TestHost | str) -> TestHost:
        if isinstance(host, TestHost):
            return host
        for candidate in self.hosts:
            if host in (candidate.name, candidate.address):
                return candidate
        raise KeyError(f"no test host {host!r}")

    def docker_url(self, host: TestHost | str) -> str:
        h = self.host(host)
        return f"ssh://{h.user}@{h.address}:{h.ssh_port}"

    def inventory_ini(self, group: str = "gpu", *, ssh_options: bool = False) -> str:
        """Ansible INI inventory of the hosts. With ssh_options, it also names the bed's key and pins its
        known_hosts (ansible_ssh_private_key_file, ansible_ssh_common_args): plain ansible-playbook works."""
        lines = [f"[{group}]"]
        for h in self.hosts:
            line = (f"{h.name} ansible_host={h.address} ansible_user={h.user} ansible_port={h.ssh_port} "
                    "ansible_python_interpreter=/usr/bin/python3")
            if ssh_options:
                line += (f" ansible_ssh_private_key_file={self.ssh_key} ansible_ssh_common_args='"
                         f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes "
                         "-o GlobalKnownHostsFile=/dev/null'")
            lines.append(line)
        return "\n".join(lines) + "\n"

    # -- running things ------------------------------------------------------------------------------
    def exec(self, host: TestHost | str, *argv: str, check: bool = False, timeout: float = 60,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv on this machine inside the host's network and UTS namespaces, with its session env."""
        h = self.host(host)
        return subprocess.run([*h.nsenter(), *argv],
                              capture_output=True, text=True, timeout=timeout, check=check, input=input,
                              env=h.env)

    def docker(self, host: TestHost | str, *argv: str, check: bool = True, timeout: float = 120
               ) -> subprocess.CompletedProcess[str]:
        """The docker CLI against the host's dockerd through its local socket (not over SSH): for setup."""
        h = self.host(host)
        return _run(["docker", "-H", h.docker_host, *argv], check=check, timeout=timeout,
                    env={"PATH": SYSTEM_PATH, "HOME": str(h.dir)})

    def ssh_argv(self, host: TestHost | str, *argv: str) -> list[str]:
        h = self.host(host)
        return ["ssh", "-F", str(self.ssh_config), "-p", str(h.ssh_port), f"{h.user}@{h.address}", "--",
                *argv]

    def ssh(self, host: TestHost | str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command on the host through the ssh CLI (strict host key checking)."""
        return subprocess.run(self.ssh_argv(host, *argv), capture_output=True, text=True, timeout=timeout,
                              check=False)

    @contextlib.contextmanager
    def ssh_home(self) -> Iterator[Path]:
        """Point $HOME at the bed's home (see _write_ssh_files) for the duration; for paramiko users."""
        with self._home_lock:
            old = os.environ.get("HOME")
            os.environ["HOME"] = str(self.home)
            try:
                yield self.home
            finally:
                if old is None:
                    os.environ.pop("HOME", None)
                else:
                    os.environ["HOME"] = old

    def docker_client(self, host: TestHost | str, **kwargs: object) -> object:
        """docker.DockerClient(base_url="ssh://...") for the host; its key checked against known_hosts.

        The SDK's paramiko transport reads ~/.ssh/known_hosts and ~/.ssh/config when the client is made
        (and only then: a later reconnect reuses what it read), so HOME is the bed's only meanwhile."""
        import docker  # only the tests that need it pay for the import

        with self.ssh_home():
            return docker.DockerClient(base_url=self.docker_url(host), **kwargs)

    def load_image(self, archive: Path | str) -> None:
        """`docker load` an image archive into every host's dockerd (in parallel)."""
        procs = [(h, subprocess.Popen(["docker", "-H", h.docker_host, "load", "-q", "-i", str(archive)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={"PATH": SYSTEM_PATH, "HOME": str(h.dir)}))
                 for h in self.hosts]
        for h, proc in procs:
            out, err = proc.communicate(timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"docker load on {h.name} failed: {err.strip() or out.strip()}")

    # -- failures to simulate --------------------------------------------------------------------------
    def stop_sshd(self, host: TestHost | str, *, kill_sessions: bool = True) -> None:
        """Stop the host's sshd (by pid); with kill_sessions also its open connections, as if the host went
        away (existing docker-over-SSH clients then fail too). Docker and containers keep running."""
        h = self.host(host)
        pid = _read_pid(h.sshd_pidfile, str(h.dir))
        proc = self._procs.pop((h.name, "sshd"), None)
        if pid is None and proc is not None and proc.poll() is None:
            pid = proc.pid
        if pid is not None:
            if kill_sessions:  # first, while the sshd still reaps them
                sessions = sorted(_descendants([pid]))
                _kill(sessions, signal.SIGKILL)
                _wait_gone(sessions, 5)
            _kill([pid], signal.SIGTERM)
            left = _wait_gone([pid], 5)
            _kill(left, signal.SIGKILL)
            _wait_gone(left, 5)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        h.sshd_pidfile.unlink(missing_ok=True)

    def start_sshd(self, host: TestHost | str, *, wait: bool = True) -> None:
        h = self.host(host)
        if self.sshd_running(h):
            return
        # sshd's privilege separation directory: Debian's service units create it, so where sshd was installed
        # but never started as a service it is missing and sshd refuses to start.
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self._spawn(h, "sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(h.sshd_config)])
        if wait:
            _wait_for(f"sshd on {h.name}", lambda: _ssh_banner(h.address, h.ssh_port), 10, h.dir / "sshd.log")

    def sshd_running(self, host: TestHost | str) -> bool:
        h = self.host(host)
        proc = self._procs.get((h.name, "sshd"))
        return proc is not None and proc.poll() is None

    def disconnect(self, host: TestHost | str) -> None:
        """Cut the host off the network (its end on the bridge goes down); processes keep running."""
        _run(["ip", "link", "set", self.host(host).veth, "down"])

    def reconnect(self, host: TestHost | str) -> None:
        _run(["ip", "link", "set", self.host(host).veth, "up"])

    # -- fake GPUs ---------------------------------------------------------------------------------------
    def install_fake_nvidia_smi(self, host: TestHost | str, gpus: list[dict[str, object]]) -> Path:
        """Give the host a fake `nvidia-smi` reporting these GPUs (see fake_nvidia_smi.py for the keys; all
        optional: index, uuid, name, memory_total / memory_used (MiB), utilization (%), processes: [{pid,
        used_memory, process_name}]). memory_used defaults to the sum of the processes' memory."""
        h = self.host(host)
        records = []
        for i, given in enumerate(gpus):
            gpu = dict(given)
            index = int(gpu.get("index", i))  # type: ignore[call-overload]
            processes = [dict(p) for p in gpu.get("processes", [])]  # type: ignore[attr-defined]
            for p in processes:
                p.setdefault("process_name", "python3")
            records.append({
                "index": index,
                "uuid": gpu.get("uuid") or f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{h.name}.gpu{index}')}",
                "name": gpu.get("name", "NVIDIA A100-SXM4-80GB"),
                "memory_total": int(gpu.get("memory_total", 81920)),  # type: ignore[call-overload]
                "memory_used": int(gpu.get("memory_used",  # type: ignore[call-overload]
                                           sum(int(p.get("used_memory", 0)) for p in processes))),
                "utilization": int(gpu.get("utilization", 0)),  # type: ignore[call-overload]
                "pci_bus_id": gpu.get("pci_bus_id", f"00000000:{0x10 + index:02X}:00.0"),
                "temperature": gpu.get("temperature", 34),
                "power_draw": float(gpu.get("power_draw", 61.5)),  # type: ignore[arg-type]
                "compute_cap": gpu.get("compute_cap", "8.0"),
                "serial": gpu.get("serial", f"13230{index:08d}"),
                "persistence_mode": "Enabled",
                "processes": processes,
            })
        (h.bin_dir / "nvidia-smi.json").write_text(json.dumps(records, indent=1))
        target = h.bin_dir / "nvidia-smi"
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(FAKE_NVIDIA_SMI, tmp)
        tmp.chmod(0o755)
        tmp.replace(target)
        return target

    def remove_fake_nvidia_smi(self, host: TestHost | str) -> None:
        h = self.host(host)
        (h.bin_dir / "nvidia-smi").unlink(missing_ok=True)
        (h.bin_dir / "nvidia-smi.json").unlink(missing_ok=True)

    # -- between tests and at the end -------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the state after start: containers removed, sshds running, links up, no fake GPUs."""
        for h in self.hosts:
            self.reconnect(h)
            self.start_sshd(h)
            self.remove_fake_nvidia_smi(h)
            ids = self.docker(h, "ps", "-aq").stdout.split()
            if ids:
                self.docker(h, "rm", "-f", "-v", *ids)
            for extra in h.bin_dir.iterdir():
                extra.unlink()

    def close(self) -> list[str]:
        """Tear the bed down completely (idempotent). Returns what is left (empty: all removed)."""
        if self._closed:
            return []
        t0 = time.monotonic()
        try:
            problems = remove_bed(self.config, list(self._procs.values()))
            self._procs.clear()
            # Checked while the lock is still held: after it, the next bed (another session) may start.
            problems += [f"left over: {item}" for item in leftovers(self.config)]
        finally:
            self._closed = True
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
        self.timings["teardown_s"] = time.monotonic() - t0
        return problems

    def __enter__(self) -> TestBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(path: Path, timeout: float) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                holder = path.read_text().strip()
                os.close(fd)
                raise TestbedUnavailable(
                    f"another test bed (pid {holder}) has held {path} for over {timeout:.0f}s") from None
            time.sleep(0.5)

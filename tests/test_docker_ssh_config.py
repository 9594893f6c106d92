"""Docker over SSH takes its route from the operator's ssh_config (LMSTACK_SSH_CONFIG), as Ansible does:
HostName, Port, User, ProxyCommand and ProxyJump, on the real test bed. Nothing else in that file can
weaken the connection: host keys are still checked against the known_hosts file given to the pool.

The jump tests reach a worker as 127.0.0.1 *through* the first test host: on this machine nothing
answers SSH on 127.0.0.1, so a listing that works went through the jump host.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lmstack.nodes.docker import DockerPool, DockerTarget, NodeError


@pytest.fixture(autouse=True)
def _empty_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def host_key_line(host, pattern: str) -> str:
    return f"{pattern} " + " ".join(host.host_key.with_suffix(".pub").read_text().split()[:2])


def listing(bed, url: str, *, ssh_config: Path | None, known_hosts: Path | None = None) -> list[str]:
    with DockerPool([DockerTarget(worker="w", url=url)], known_hosts=known_hosts or bed.known_hosts,
                    ssh_key=bed.ssh_key, ssh_config=ssh_config, connect_timeout_s=5, reconnect_after_s=0) as pool:
        return [c.name for c in pool.list_managed("w")]


def loopback_through(bed, jump, tmp_path: Path) -> Path:
    """The bed's known_hosts plus the jump host's key for 127.0.0.1: the address it has for itself."""
    pattern = "127.0.0.1" if jump.ssh_port == 22 else f"[127.0.0.1]:{jump.ssh_port}"
    return write(tmp_path / "known_hosts", bed.known_hosts.read_text().strip(), host_key_line(jump, pattern))


def known_lines_of(bed, host) -> list[str]:
    patterns = (host.address, f"[{host.address}]:{host.ssh_port}")
    return [line for line in bed.known_hosts.read_text().splitlines() if line.split()[0] in patterns]


def proxies_running() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "ssh .*-W "], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_host_alias_from_the_ssh_config(clean_testbed, tmp_path):
    bed = clean_testbed
    host = bed.hosts[0]
    config = write(tmp_path / "ssh_config", "Host gpu-alias", f"  HostName {host.address}", f"  Port {host.ssh_port}")
    with pytest.raises(NodeError) as without:
        listing(bed, "ssh://root@gpu-alias", ssh_config=None)
    assert without.value.kind == "unreachable"
    assert listing(bed, "ssh://root@gpu-alias", ssh_config=config) == []


def test_proxy_jump_through_a_bastion(clean_testbed, tmp_path):
    bed = clean_testbed
    jump = bed.hosts[0]
    known_hosts = loopback_through(bed, jump, tmp_path)
    config = write(tmp_path / "ssh_config", "Host inner", "  HostName 127.0.0.1", f"  Port {jump.ssh_port}",
                   f"  ProxyJump root@{jump.address}:{jump.ssh_port}")
    with pytest.raises(NodeError) as direct:  # the same address without the jump: nothing answers here
        listing(bed, f"ssh://root@127.0.0.1:{jump.ssh_port}", ssh_config=None, known_hosts=known_hosts)
    assert direct.value.kind == "unreachable"

    bed.docker(jump, "run", "-d", "--name", "lmstack-jumped", "--label", "lmstack.deployment=jumped",
               "lmstack-standin:test", "sleep", "300", check=True)
    assert listing(bed, "ssh://root@inner", ssh_config=config, known_hosts=known_hosts) == ["lmstack-jumped"]
    assert proxies_running() == []  # the pool's close stopped the `ssh -W` it ran


def test_proxy_command_with_tokens(clean_testbed, tmp_path):
    """A ProxyCommand (the classic `ssh -W %h:%p` through another host) carries the connection."""
    bed = clean_testbed
    jump = bed.hosts[0]
    known_hosts = loopback_through(bed, jump, tmp_path)
    config = write(tmp_path / "ssh_config", "Host via-proxy", "  HostName 127.0.0.1", f"  Port {jump.ssh_port}",
                   f"  ProxyCommand ssh -F /dev/null -o BatchMode=yes -i {bed.ssh_key} "
                   f"-o UserKnownHostsFile={bed.known_hosts} -p {jump.ssh_port} -W %h:%p root@{jump.address}")
    assert listing(bed, "ssh://root@via-proxy", ssh_config=config, known_hosts=known_hosts) == []
    assert proxies_running() == []


def test_the_ssh_config_cannot_switch_off_host_key_checks(clean_testbed, tmp_path):
    """An ssh_config that says StrictHostKeyChecking no / UserKnownHostsFile /dev/null changes nothing:
    neither the worker's key (checked by lmstack) nor the last jump host's (pinned on ssh's command line)
    is taken on trust."""
    bed = clean_testbed
    jump, target = bed.hosts[0], bed.hosts[1]
    lax = ["  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null", "  GlobalKnownHostsFile /dev/null"]
    config = write(tmp_path / "ssh_config", "Host lax-direct", f"  HostName {target.address}",
                   f"  Port {target.ssh_port}", *lax,
                   "Host lax-jump", f"  HostName {target.address}", f"  Port {target.ssh_port}",
                   f"  ProxyJump root@{jump.address}:{jump.ssh_port}",
                   f"Host {jump.address}", *lax)
    only_target = write(tmp_path / "only_target", *known_lines_of(bed, target))
    only_jump = write(tmp_path / "only_jump", *known_lines_of(bed, jump))
    empty = write(tmp_path / "empty", "")

    with pytest.raises(NodeError) as unknown_worker:
        listing(bed, "ssh://root@lax-direct", ssh_config=config, known_hosts=empty)
    assert unknown_worker.value.kind == "host_key"
    assert str(empty) in unknown_worker.value.message

    with pytest.raises(NodeError) as unknown_jump:
        listing(bed, "ssh://root@lax-jump", ssh_config=config, known_hosts=only_target)
    assert unknown_jump.value.kind == "host_key"
    assert "Host key verification failed" in unknown_jump.value.message

    with pytest.raises(NodeError) as unknown_target:
        listing(bed, "ssh://root@lax-jump", ssh_config=config, known_hosts=only_jump)
    assert unknown_target.value.kind == "host_key"
    assert proxies_running() == []


def test_a_hostname_from_the_repository_is_never_run_by_a_proxy_command(clean_testbed, tmp_path):
    """The worker's address comes from the repository's inventory; %h in an operator's ProxyCommand must
    not let it run a command on the lmstack host."""
    bed = clean_testbed
    marker = tmp_path / "pwned"
    config = write(tmp_path / "ssh_config", "Host *", "  ProxyCommand busybox nc %h %p")
    for host in (f"x;touch${{IFS}}{marker}", f"$(touch${{IFS}}{marker})", f"`touch {marker}`"):
        with pytest.raises(NodeError) as refused:
            listing(bed, f"ssh://root@{host.replace(' ', '%20')}:22", ssh_config=config)
        assert refused.value.kind == "unreachable"
    assert not marker.exists()


def test_a_broken_ssh_config_names_the_file(clean_testbed, tmp_path):
    bed = clean_testbed
    config = write(tmp_path / "ssh_config", "Host broken", "  NoSuchOption yes")
    with pytest.raises(NodeError) as broken:
        listing(bed, "ssh://root@broken", ssh_config=config)
    assert broken.value.kind == "unreachable"
    assert str(config) in broken.value.message

"""The Docker-over-SSH executor (lmstack.nodes.docker) against the real multi-host test bed.

Every pool here checks host keys strictly against the bed's known_hosts and offers only the bed's key;
HOME points at an empty directory, so nothing comes from ~/.ssh by accident.
"""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmstack.backends.container import LABEL_DEPLOYMENT, LABEL_PORT, LABEL_REPLICA, ContainerSpec
from lmstack.nodes.docker import DockerPool, DockerTarget, NodeError

SECRET = f"hf_{secrets.token_hex(12)}"  # an env value: must never show up in messages or logs


@pytest.fixture(autouse=True)
def _empty_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def targets(bed) -> list[DockerTarget]:
    return [DockerTarget(worker=h.name, url=bed.docker_url(h)) for h in bed.hosts]


@pytest.fixture
def pool(clean_testbed) -> Iterator[DockerPool]:
    with DockerPool(targets(clean_testbed), known_hosts=clean_testbed.known_hosts,
                    ssh_key=clean_testbed.ssh_key, reconnect_after_s=0) as p:
        yield p


def spec(image: str, name: str, port: int, **overrides) -> ContainerSpec:
    values = dict(
        name=name, image=image, port=port, gpus=(),
        command=("--served-model-name", name, "--port", str(port)),
        env={"HF_TOKEN": SECRET, "STANDIN_TOKEN_DELAY": "0.001"},
        labels={LABEL_DEPLOYMENT: name.removeprefix("lmstack-"), LABEL_REPLICA: "0"},
        shm_size="64m", restart_policy="no",
    )
    values.update(overrides)
    return ContainerSpec(**values)


def get_models(address: str, port: int, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}:{port}/v1/models", timeout=1) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.03)


def names_on(bed, host) -> list[str]:
    return bed.docker(host, "ps", "-a", "--format", "{{.Names}}").stdout.split()


def established_ssh(bed, host) -> int:
    """SSH connections the host's sshd has open with this machine."""
    out = bed.exec(host, "ss", "-Htn", "state", "established", "( sport = :22 )", check=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def wait_no_ssh(bed, host, timeout: float = 5) -> None:
    """Until the host's sshd has no connection from here (a closed client's lingers for a moment)."""
    deadline = time.monotonic() + timeout
    while established_ssh(bed, host):
        assert time.monotonic() < deadline, "an SSH connection stayed open"
        time.sleep(0.05)


def run_foreign(bed, host, name: str, port: int) -> None:
    bed.docker(host, "run", "-d", "--name", name, "--network", "host", bed.standin_image,
               "--port", str(port), "--served-model-name", name)


# -- lifecycle ------------------------------------------------------------------------------------------------


def test_create_serves_lists_and_removes_only_its_own(pool, clean_testbed, standin_image):
    bed, node1 = clean_testbed, clean_testbed.hosts[0]
    run_foreign(bed, node1, "someone-elses", 18101)
    t0 = time.monotonic()
    assert pool.list_managed("node1") == []  # the first call connects: SSH handshake, API version
    bed.timings["executor_connect_and_list_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    created = pool.create("node1", spec(standin_image, "lmstack-qwen-0", 18100))
    create_s = time.monotonic() - t0
    models = get_models(node1.address, 18100)
    bed.timings["executor_create_start_s"] = create_s
    bed.timings["executor_create_to_serving_s"] = time.monotonic() - t0
    assert [m["id"] for m in models["data"]] == ["lmstack-qwen-0"]
    assert models["data"][0]["standin"]["hostname"] == "node1"
    assert created.name == "lmstack-qwen-0" and created.state == "running" and created.port == 18100
    assert created.labels[LABEL_DEPLOYMENT] == "qwen-0" and created.labels[LABEL_PORT] == "18100"
    assert created.started_at is not None and created.exit_code is None
    assert created.image == standin_image
    env = json.loads(bed.docker(node1, "inspect", "--format", "{{json .Config.Env}}", created.id).stdout)
    assert f"HF_TOKEN={SECRET}" in env  # the env reached the container
    hostcfg = json.loads(bed.docker(node1, "inspect", "--format", "{{json .HostConfig}}", created.id).stdout)
    assert hostcfg["NetworkMode"] == "host" and hostcfg["ShmSize"] == 64 * 1024 * 1024
    assert hostcfg["DeviceRequests"] in (None, [])
    assert hostcfg["CapDrop"] == ["MKNOD"] and not hostcfg["Privileged"]
    mknod = "import os, stat; os.mknod('/tmp/null', stat.S_IFCHR | 0o666, os.makedev(1, 3))"
    made = bed.docker(node1, "exec", created.id, "python3", "-c", mknod, check=False)
    assert made.returncode != 0 and "Operation not permitted" in made.stderr  # no device nodes from a container

    t0 = time.monotonic()
    listed = pool.list_managed("node1")
    bed.timings["executor_list_managed_s"] = time.monotonic() - t0
    assert [c.name for c in listed] == ["lmstack-qwen-0"]  # not the foreign one
    assert listed[0].id == created.id and listed[0].status.startswith("Up")
    ours = {k: v for k, v in listed[0].labels.items() if k.startswith("lmstack.")}  # (and the image's labels)
    assert ours == {LABEL_DEPLOYMENT: "qwen-0", LABEL_REPLICA: "0", LABEL_PORT: "18100"}
    assert pool.list_managed("node2") == []
    assert pool.inspect("node1", created.id) == listed[0]
    assert pool.inspect("node1", "someone-elses") is None
    assert pool.inspect("node1", "no-such-container") is None

    # The foreign container: never removed, replaced or read.
    for action in (lambda: pool.remove("node1", "someone-elses"),
                   lambda: pool.create("node1", spec(standin_image, "someone-elses", 18102)),
                   lambda: list(pool.logs("node1", "someone-elses", follow=False, tail=-1))):
        with pytest.raises(NodeError) as err:
            action()
        assert err.value.kind == "foreign" and err.value.worker == "node1"
        assert "someone-elses" in err.value.message and "not made by lmstack" in err.value.message
    state = bed.docker(node1, "inspect", "--format", "{{.State.Status}}", "someone-elses").stdout.strip()
    assert state == "running"
    get_models(node1.address, 18101)

    t0 = time.monotonic()
    pool.remove("node1", created.id)
    bed.timings["executor_remove_s"] = time.monotonic() - t0
    assert names_on(bed, node1) == ["someone-elses"]
    assert pool.list_managed("node1") == []
    pool.remove("node1", created.id)  # already gone: fine
    pool.remove("node1", "never-existed")


def test_exited_containers_are_listed_with_exit_code(pool, clean_testbed, standin_image):
    # An engine that exits at once (bad arguments): the listing shows it exited, with its code.
    bad = spec(standin_image, "lmstack-broken-0", 18110, command=("--port", "not-a-number"))
    created = pool.create("node2", bad)
    deadline = time.monotonic() + 10
    while (c := pool.inspect("node2", created.id)) is not None and c.state != "exited":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [listed] = pool.list_managed("node2")
    assert listed.state == "exited" and listed.exit_code == 2 and listed.status.startswith("Exited (2)")
    assert listed.finished_at is not None and listed.started_at is not None
    assert b"invalid int value" in b"".join(pool.logs("node2", created.id, follow=False, tail=-1))


def test_a_container_docker_restarted_still_tells_how_it_exited(pool, clean_testbed, standin_image):
    # Docker's restart policy starts a crashed engine again, and its state then says exit code 0: the last
    # exit's code comes from Docker's events.
    bad = spec(standin_image, "lmstack-restarted-0", 18111, command=("--port", "not-a-number"),
               restart_policy="unless-stopped")
    created = pool.create("node2", bad)
    deadline = time.monotonic() + 20
    while (c := pool.inspect("node2", created.id)) is None or c.restart_count < 1 or c.state != "running":
        assert time.monotonic() < deadline, c
        time.sleep(0.01)
    assert c.exit_code in (0, None)  # what the state says once Docker started it again
    assert pool.last_exit_code("node2", created.id) == 2
    pool.remove("node2", created.id)


def test_create_twice_replaces_the_old_container(pool, clean_testbed, standin_image):
    bed, node2 = clean_testbed, clean_testbed.hosts[1]
    first = pool.create("node2", spec(standin_image, "lmstack-same-0", 18120))
    get_models(node2.address, 18120)
    second = pool.create("node2", spec(standin_image, "lmstack-same-0", 18120))
    assert second.id != first.id
    assert names_on(bed, node2) == ["lmstack-same-0"]
    assert [c.id for c in pool.list_managed("node2")] == [second.id]
    assert pool.inspect("node2", first.id) is None
    get_models(node2.address, 18120)


def test_gpu_request_without_gpu_runtime_is_a_clear_error_and_leaves_nothing(pool, clean_testbed, standin_image,
                                                                            caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(NodeError) as err:
        pool.create("node3", spec(standin_image, "lmstack-gpu-0", 18130, gpus=(0, 1)))
    error = err.value
    assert error.kind == "gpu_runtime" and error.worker == "node3" and not error.retryable
    assert error.message.startswith("node3: Docker has no NVIDIA GPU runtime, so GPUs 0,1 cannot be given to "
                                    "lmstack-gpu-0; install the NVIDIA Container Toolkit")
    assert names_on(clean_testbed, "node3") == []
    assert pool.list_managed("node3") == []
    assert SECRET not in str(error) and SECRET not in caplog.text


def test_missing_image_is_not_found(pool, standin_image):
    with pytest.raises(NodeError) as err:
        pool.create("node1", spec("lmstack-no-such-image:1", "lmstack-noimage-0", 18140))
    assert err.value.kind == "not_found"
    assert "lmstack-no-such-image:1 is not on the host" in err.value.message


def test_env_values_never_reach_messages_or_logs(pool, clean_testbed, standin_image, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, paramiko's and urllib3's included
    s = spec(standin_image, "lmstack-secret-0", 18150)
    created = pool.create("node1", s)
    pool.create("node1", s)  # the replace path logs too
    errors = []
    for bad in (spec(standin_image, "lmstack-secret-1", 18151, gpus=(3,)),
                spec("lmstack-no-such-image:1", "lmstack-secret-2", 18152),
                spec(standin_image, "lmstack-secret-3", 18153, shm_size="-5g")):
        with pytest.raises(NodeError) as err:
            pool.create("node1", bad)
        errors.append(err.value)
    assert [e.kind for e in errors] == ["gpu_runtime", "not_found", "api"]
    get_models(clean_testbed.hosts[0].address, 18150)
    pool.remove("node1", created.name)
    assert any("started container lmstack-secret-0" in r.getMessage() for r in caplog.records)
    for error in errors:
        assert SECRET not in str(error) and SECRET not in repr(error)
    assert SECRET not in caplog.text


# -- logs -----------------------------------------------------------------------------------------------------


def test_logs(clean_testbed, standin_image):
    node1 = clean_testbed.hosts[0]
    # One session only: a stream that did not give its session back would make the next call time out.
    with DockerPool(targets(clean_testbed), known_hosts=clean_testbed.known_hosts, ssh_key=clean_testbed.ssh_key,
                    max_sessions=1, timeout_s=5) as pool:
        check_logs(clean_testbed, pool, node1, standin_image)


def check_logs(bed, pool, node1, standin_image):
    created = pool.create("node1", spec(standin_image, "lmstack-logs-0", 18160))
    get_models(node1.address, 18160)
    output = b"".join(pool.logs("node1", created.id, follow=False, tail=-1))
    assert b"GET /v1/models" in output
    assert len(b"".join(pool.logs("node1", created.id, follow=False, tail=1)).splitlines()) == 1
    with pytest.raises(NodeError) as err:
        pool.logs("node1", "no-such-container", follow=False, tail=10)
    assert err.value.kind == "not_found"

    # follow: new lines arrive while it is open; close() from another thread ends the reader.
    stream = pool.logs("node1", created.id, follow=True, tail=0)
    seen: list[bytes] = []
    reader = threading.Thread(target=lambda: seen.extend(stream), daemon=True)
    reader.start()
    urllib.request.urlopen(f"http://{node1.address}:18160/health?follow-marker", timeout=5).read()
    deadline = time.monotonic() + 10
    while b"follow-marker" not in b"".join(seen):
        assert time.monotonic() < deadline, seen
        time.sleep(0.02)
    stream.close()  # type: ignore[attr-defined]
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert pool.inspect("node1", created.id) is not None  # the stream's session was given back

    # A followed stream ends when the container stops, and gives its session back then.
    stream = pool.logs("node1", created.id, follow=True, tail=0)
    reader = threading.Thread(target=lambda: seen.extend(stream), daemon=True)
    reader.start()
    bed.docker(node1, "stop", created.id)
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert pool.inspect("node1", created.id).state == "exited"


# -- connections ----------------------------------------------------------------------------------------------


def test_one_ssh_connection_is_reused_across_calls(pool, clean_testbed, standin_image):
    bed = clean_testbed
    created = pool.create("node1", spec(standin_image, "lmstack-reuse-0", 18170))
    times = []
    for i in range(20):
        t0 = time.monotonic()
        if i % 2:
            assert [c.id for c in pool.list_managed("node1")] == [created.id]
        else:
            assert {18170, 22} <= pool.used_ports("node1")  # sshd's own port is taken too
        times.append(time.monotonic() - t0)
    assert pool.handshakes("node1") == 1
    assert established_ssh(bed, "node1") == 1
    bed.timings["executor_call_median_s"] = sorted(times)[len(times) // 2]
    pool.close()
    wait_no_ssh(bed, "node1")


def test_parallel_calls_from_8_threads_on_3_workers(pool, clean_testbed, standin_image):
    bed = clean_testbed
    failures: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        worker = bed.hosts[i % 3].name
        name = f"lmstack-par-{i}"
        try:
            barrier.wait()
            created = pool.create(worker, spec(bed.standin_image, name, 18200 + i))
            assert created.name in {c.name for c in pool.list_managed(worker)}
            assert 18200 + i in pool.used_ports(worker)
            assert pool.inspect(worker, name) is not None
            get_models(bed.hosts[i % 3].address, 18200 + i)  # serving (stops at once on SIGTERM)
            pool.remove(worker, created.id)
            assert pool.inspect(worker, created.id) is None
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    bed.timings["executor_8_threads_s"] = time.monotonic() - t0
    assert not failures, failures
    assert [pool.handshakes(h.name) for h in bed.hosts] == [1, 1, 1]
    for h in bed.hosts:
        assert names_on(bed, h) == []


def test_unknown_or_changed_host_key_is_refused(clean_testbed, tmp_path):
    bed, node1 = clean_testbed, clean_testbed.hosts[0]
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    wait_no_ssh(bed, node1)  # (a previous test's pool, just closed)
    # The bed's ~/.ssh (with the right known_hosts) must not be used as a fallback either.
    with bed.ssh_home(), DockerPool(targets(bed), known_hosts=empty, ssh_key=bed.ssh_key) as pool:
        with pytest.raises(NodeError) as err:
            pool.list_managed("node1")
        assert err.value.kind == "host_key" and err.value.worker == "node1"
        assert str(empty) in err.value.message and "not in" in err.value.message
        assert "ssh-ed25519" in err.value.message  # the key it was shown, to check out of band
        assert pool.handshakes("node1") == 0
        wait_no_ssh(bed, node1, timeout=2)

    keys = dict(line.split(" ", 1) for line in bed.known_hosts.read_text().splitlines())
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"{node1.address} {keys[bed.hosts[1].address]}\n")  # node2's key for node1
    with DockerPool(targets(bed), known_hosts=wrong, ssh_key=bed.ssh_key) as pool:
        with pytest.raises(NodeError) as err:
            pool.list_managed("node1")
        assert err.value.kind == "host_key" and "changed" in err.value.message
        assert pool.handshakes("node1") == 0
        wait_no_ssh(bed, node1, timeout=2)


def test_sshd_down_is_unreachable_and_the_pool_reconnects(pool, clean_testbed):
    bed = clean_testbed
    pool.list_managed("node2")
    bed.stop_sshd("node2")  # also kills the open connection
    with pytest.raises(NodeError) as err:
        pool.list_managed("node2")
    assert err.value.kind == "unreachable" and err.value.retryable
    assert err.value.message.startswith("node2: ")
    t0 = time.monotonic()
    with pytest.raises(NodeError) as err:
        pool.list_managed("node2")
    assert err.value.kind == "unreachable" and "connection refused" in err.value.message.lower()
    assert time.monotonic() - t0 < 2
    assert pool.list_managed("node1") == []  # the other workers are not affected
    bed.start_sshd("node2")
    assert pool.list_managed("node2") == []
    assert pool.handshakes("node2") == 2


def test_a_host_that_drops_off_the_network_is_unreachable(clean_testbed):
    bed = clean_testbed
    with DockerPool(targets(bed), known_hosts=bed.known_hosts, ssh_key=bed.ssh_key, timeout_s=3,
                    connect_timeout_s=2, reconnect_after_s=0) as pool:
        pool.list_managed("node3")
        bed.disconnect("node3")  # no RST, no FIN: the SSH transport still looks active
        t0 = time.monotonic()
        with pytest.raises(NodeError) as err:
            pool.list_managed("node3")
        assert err.value.kind == "unreachable" and "stopped answering" in err.value.message
        assert time.monotonic() - t0 < 8  # the call's timeout, then a short SSH probe
        with pytest.raises(NodeError) as err:
            pool.list_managed("node3")  # a new connection is tried, and times out
        assert err.value.kind == "unreachable" and "timed out" in err.value.message
        bed.reconnect("node3")
        assert pool.list_managed("node3") == []


def test_wrong_key_is_auth_failed(clean_testbed, tmp_path):
    other = tmp_path / "id_other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with (DockerPool(targets(clean_testbed), known_hosts=clean_testbed.known_hosts, ssh_key=other) as pool,
          pytest.raises(NodeError) as err):
        pool.list_managed("node3")
    assert err.value.kind == "auth_failed" and str(other) in err.value.message


def test_no_docker_daemon_is_docker_unavailable(pool, clean_testbed):
    # The host's `docker` (first on the SSH session's PATH) pointed at a socket where no daemon listens.
    host = clean_testbed.host("node3")
    wrapper = host.bin_dir / "docker"
    wrapper.write_text("#!/bin/sh\nexec /usr/bin/docker -H unix:///nonexistent/docker.sock \"$@\"\n")
    wrapper.chmod(0o755)
    with pytest.raises(NodeError) as err:
        pool.list_managed("node3")
    assert err.value.kind == "docker_unavailable"
    assert "SSH to root@10.213.0.13:22 works but Docker does not answer" in err.value.message
    assert "Cannot connect to the Docker daemon" in err.value.message


def test_unix_socket_target(clean_testbed, standin_image):
    host = clean_testbed.hosts[2]
    target = DockerTarget(worker="local", url=host.docker_host)
    with DockerPool([target], known_hosts=Path("/nonexistent")) as pool:
        created = pool.create("local", spec(standin_image, "lmstack-unix-0", 18180))
        assert [c.id for c in pool.list_managed("local")] == [created.id]
        # Serving: its SIGTERM handler is in place (a Python PID 1 ignores SIGTERM until then, and the
        # stop would wait out its timeout).
        get_models(host.address, 18180)
        pool.remove("local", created.id)
        assert pool.list_managed("local") == []

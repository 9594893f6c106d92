"""The multi-host test bed itself: real sshd + dockerd hosts in network namespaces (tests/testbed/)."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
import urllib.request

import paramiko
import pytest

pytestmark = pytest.mark.testbed

STANDIN_PORT = 18000


def get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def post_json(address: str, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(address, STANDIN_PORT, timeout=10)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def wait_until_serving(address: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get_json(f"http://{address}:{STANDIN_PORT}/v1/models", timeout=1)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_standin(client, image: str, name: str, *args: str, **kwargs):
    return client.containers.run(
        image, ["--port", str(STANDIN_PORT), "--served-model-name", name, *args], name=name,
        network_mode="host", detach=True, labels={"lmstack.test": "testbed"}, **kwargs)


def test_each_host_answers_ssh_with_strict_host_key_checking(testbed):
    for host in testbed.hosts:
        # The ssh CLI with the options spelled out (the bed's ssh_config says the same).
        proc = subprocess.run(
            ["ssh", "-F", "/dev/null", "-i", str(testbed.ssh_key), "-o", "IdentitiesOnly=yes",
             "-o", f"UserKnownHostsFile={testbed.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
             "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(host.ssh_port),
             f"{host.user}@{host.address}", "hostname; echo $DOCKER_HOST; echo $PATH"],
            capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr
        hostname, docker_host, path = proc.stdout.split()
        assert hostname == host.name
        assert docker_host == host.docker_host
        assert path.split(":")[0] == str(host.bin_dir)

        # paramiko, as the docker SDK uses it: known host keys only, unknown ones rejected.
        client = paramiko.SSHClient()
        client.load_host_keys(str(testbed.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(host.address, port=host.ssh_port, username=host.user,
                       key_filename=str(testbed.ssh_key), look_for_keys=False, allow_agent=False, timeout=10)
        try:
            _, stdout, _ = client.exec_command("hostname")
            assert stdout.read().decode().strip() == host.name
        finally:
            client.close()


def test_host_keys_are_really_checked(testbed, tmp_path):
    host = testbed.hosts[0]
    other = testbed.hosts[1]
    # node2's key recorded for node1's address: a strict client must refuse to talk to node1.
    keys = dict(line.split(" ", 1) for line in testbed.known_hosts.read_text().splitlines())
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{host.address} {keys[other.address]}\n")
    proc = subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", str(testbed.ssh_key), "-o", f"UserKnownHostsFile={wrong}",
         "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
         f"root@{host.address}", "true"], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 255
    assert "HOST IDENTIFICATION HAS CHANGED" in proc.stderr or "verification failed" in proc.stderr
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    client = paramiko.SSHClient()
    client.load_host_keys(str(empty))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        client.connect(host.address, username="root", key_filename=str(testbed.ssh_key), look_for_keys=False,
                       allow_agent=False, timeout=10)
    client.close()


def test_docker_over_ssh_runs_the_standin_engine(clean_testbed, standin_image):
    bed = clean_testbed
    node1 = bed.hosts[0]
    t0 = time.monotonic()
    client = bed.docker_client(node1)  # SSH handshake, host key checked against the bed's known_hosts
    bed.timings["docker_ssh_connect_s"] = time.monotonic() - t0
    try:
        calls = []
        for _ in range(5):
            t0 = time.monotonic()
            version = client.version()
            calls.append(time.monotonic() - t0)
        bed.timings["docker_ssh_call_first_s"] = calls[0]
        bed.timings["docker_ssh_call_median_s"] = sorted(calls)[len(calls) // 2]
        assert client.info()["Name"] == node1.name
        assert version["ApiVersion"]

        image = client.images.get(standin_image)
        assert image.id == bed.image.image_id  # the same archive everywhere

        t0 = time.monotonic()
        container = run_standin(client, standin_image, "m-node1",
                                environment={"NVIDIA_VISIBLE_DEVICES": "1,3"})
        models = wait_until_serving(node1.address)
        bed.timings["standin_run_to_serving_s"] = time.monotonic() - t0
        assert [m["id"] for m in models["data"]] == ["m-node1"]
        assert models["data"][0]["standin"]["hostname"] == node1.name
        health = get_json(f"http://{node1.address}:{STANDIN_PORT}/health")
        assert health["status"] == "ok"
        assert health["gpus"]["devices"] == ["1", "3"]

        # A streamed chat completion arrives in several chunks, over time, with usage and [DONE].
        conn = http.client.HTTPConnection(node1.address, STANDIN_PORT, timeout=10)
        conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"model": "m-node1", "stream": True,
                                      "stream_options": {"include_usage": True},
                                      "messages": [{"role": "user", "content": "say something nice"}]}))
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/event-stream"
        events, arrivals = [], []
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                arrivals.append(time.monotonic())
        conn.close()
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        content = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
        assert len([c for c in content if c]) >= 5
        assert "".join(c for c in content if c).startswith("Hello from m-node1 on node1")
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 3
        assert arrivals[-1] - arrivals[0] > 0.1  # streamed, not sent at once

        status, body = post_json(node1.address, "/v1/chat/completions",
                                 {"model": "m-node1", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
        status, body = post_json(node1.address, "/v1/completions", {"model": "m-node1", "prompt": "a b"})
        assert status == 200 and body["choices"][0]["text"]
        status, body = post_json(node1.address, "/v1/embeddings", {"model": "m-node1", "input": ["a", "b"]})
        assert status == 200 and len(body["data"]) == 2 and len(body["data"][0]["embedding"]) == 16
        status, body = post_json(node1.address, "/v1/chat/completions",
                                 {"model": "other", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 404 and body["error"]["code"] == 404

        # SIGTERM stops it at once (docker stop would otherwise wait for its timeout, then SIGKILL).
        t0 = time.monotonic()
        container.stop(timeout=10)
        assert time.monotonic() - t0 < 5
        container.reload()
        assert container.attrs["State"]["ExitCode"] == 0
        assert b"GET /v1/models" in container.logs()
    finally:
        client.close()


def test_a_container_is_seen_only_on_its_host(clean_testbed, standin_image):
    bed = clean_testbed
    node1, node2 = bed.hosts[0], bed.hosts[1]
    c1, c2 = bed.docker_client(node1), bed.docker_client(node2)
    try:
        run_standin(c1, standin_image, "only-on-node1")
        wait_until_serving(node1.address)
        label = {"label": "lmstack.test=testbed"}
        assert [c.name for c in c1.containers.list(all=True, filters=label)] == ["only-on-node1"]
        assert c2.containers.list(all=True, filters=label) == []
        with pytest.raises(OSError):
            get_json(f"http://{node2.address}:{STANDIN_PORT}/v1/models", timeout=2)
        # The same port on node2 is free: its own network. This one uses the host's /usr instead of the
        # image's own (the other way to run the image).
        run_standin(c2, standin_image, "m-node2", volumes={"/usr": {"bind": "/usr", "mode": "ro"}})
        assert wait_until_serving(node2.address)["data"][0]["id"] == "m-node2"
        assert wait_until_serving(node1.address)["data"][0]["id"] == "only-on-node1"
    finally:
        c1.close()
        c2.close()


def test_fake_nvidia_smi_answers_only_on_its_host(clean_testbed):
    bed = clean_testbed
    node1, node2 = bed.hosts[0], bed.hosts[1]
    bed.install_fake_nvidia_smi(node1, [
        {"name": "NVIDIA H100 80GB HBM3", "memory_total": 81559, "utilization": 12,
         "processes": [{"pid": 4242, "used_memory": 20000}]},
        {"uuid": "GPU-11111111-2222-3333-4444-555555555555", "memory_total": 81559, "memory_used": 0},
    ])
    query = "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu"
    proc = bed.ssh(node1, "nvidia-smi", query, "--format=csv,noheader,nounits")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(", ") for line in proc.stdout.splitlines()]
    assert len(rows) == 2
    assert rows[0][0] == "0" and rows[0][1].startswith("GPU-") and rows[0][2] == "NVIDIA H100 80GB HBM3"
    assert rows[0][3:] == ["81559", "20000", "12"]
    assert rows[1] == ["1", "GPU-11111111-2222-3333-4444-555555555555", "NVIDIA A100-SXM4-80GB", "81559", "0",
                       "0"]
    apps = bed.ssh(node1, "nvidia-smi", "--query-compute-apps=pid,used_memory,gpu_uuid",
                   "--format=csv,noheader,nounits")
    assert apps.stdout.splitlines() == [f"4242, 20000, {rows[0][1]}"]
    with_units = bed.exec(node1, "nvidia-smi", "--query-gpu=memory.total,utilization.gpu", "--format=csv")
    assert with_units.stdout.splitlines() == ["memory.total [MiB], utilization.gpu [%]", "81559 MiB, 12 %",
                                              "81559 MiB, 0 %"]
    assert bed.exec(node1, "nvidia-smi", "--query-gpu=bogus", "--format=csv").returncode == 2

    missing = bed.ssh(node2, "nvidia-smi", query, "--format=csv,noheader,nounits")
    assert missing.returncode == 127  # command not found: node2 has no GPUs
    bed.remove_fake_nvidia_smi(node1)
    assert bed.ssh(node1, "nvidia-smi", "-L").returncode == 127


def test_stopping_sshd_makes_the_host_unreachable_until_started(clean_testbed):
    bed = clean_testbed
    node2 = bed.hosts[1]
    assert bed.ssh(node2, "true").returncode == 0
    client = bed.docker_client(node2)
    assert client.ping()
    bed.stop_sshd(node2)
    assert bed.ssh(node2, "true").returncode == 255
    with pytest.raises(Exception):  # noqa: B017 (the SDK raises what paramiko/requests raise)
        client.ping()
    client.close()
    with pytest.raises((paramiko.SSHException, OSError)):
        bed.docker_client(node2)
    assert bed.exec(node2, "docker", "info", "--format", "{{.Name}}").stdout.strip() == node2.name  # still up
    bed.start_sshd(node2)
    assert bed.ssh(node2, "hostname").stdout.strip() == node2.name
    client = bed.docker_client(node2)
    assert client.ping()
    client.close()


def test_inventory_works_with_ansible(testbed, tmp_path):
    import shutil
    import sys
    from pathlib import Path

    text = testbed.inventory_ini()
    assert text.splitlines()[1] == ("node1 ansible_host=10.213.0.11 ansible_user=root ansible_port=22 "
                                    "ansible_python_interpreter=/usr/bin/python3")
    ansible = Path(sys.executable).with_name("ansible")
    if not ansible.exists() and shutil.which("ansible") is None:
        pytest.skip("ansible is not installed")
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(testbed.inventory_ini(ssh_options=True))
    env = {"PATH": f"{ansible.parent}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path),
           "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
           "ANSIBLE_NOCOLOR": "1", "LANG": "C.UTF-8"}
    proc = subprocess.run([str(ansible) if ansible.exists() else "ansible", "-i", str(inventory), "all",
                           "-m", "command", "-a", "hostname", "-o"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for host in testbed.hosts:
        assert f"{host.name} | CHANGED | rc=0 | (stdout) {host.name}" in proc.stdout

"""Only the operator makes a host "this machine" (`lmstack up`, LMSTACK_LOCAL_HOST / LMSTACK_HOME/local-host).

A local host gets Ansible's local connection (modules run on the lmstack host, as its user) and the local
Docker socket. A repository that could claim either would run code on the lmstack host. So, with the operator's
local host set (as after `lmstack up`), a push still cannot: name `ansible_connection: local` (or any other
connection variable) for any host, point a Worker's dockerHost at a Docker socket or another endpoint on the
lmstack host, or make a host local by giving it the address 127.0.0.1 / localhost. And for the operator's own
local host, what the repository says about its connection (address, port, user, Python) is not used.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmstack.config import Settings
from lmstack.gitsource import load_source
from lmstack.manifests import ManifestValidationError
from lmstack.reconcile.access import worker_access
from lmstack.reconcile.facts import runner_inventory
from lmstack.state import Database


def _fleet(root: Path, inventory: str, workers: str) -> Path:
    (root / "inventory").mkdir(parents=True)
    (root / "manifests").mkdir()
    (root / "inventory" / "hosts.ini").write_text(inventory)
    (root / "manifests" / "workers.yaml").write_text(workers)
    return root


def _worker(name: str, host: str, extra: str = "") -> str:
    return f"apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {{name: {name}}}\nspec: {{host: {host}{extra}}}\n"


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(home=tmp_path / "home", local_host="local", **values)  # type: ignore[arg-type]


@pytest.mark.parametrize("line", [
    "gpu-a ansible_connection=local",
    "local ansible_connection=local",
    "gpu-a ansible_host=127.0.0.1 ansible_connection=local",
    "gpu-a ansible_docker_extra_args='-H unix:///var/run/docker.sock'",
])
def test_a_repository_cannot_name_a_local_connection(tmp_path: Path, line: str) -> None:
    fleet = _fleet(tmp_path / "fleet", f"local\n{line}\n", _worker("a", "gpu-a"))
    with pytest.raises(ManifestValidationError) as info:
        load_source(repo=None, ref="HEAD", directory=fleet, settings=_settings(tmp_path))
    assert any("ansible_" in str(error) for error in info.value.errors), info.value.errors


@pytest.mark.parametrize("docker_host", [
    "unix:///var/run/docker.sock",
    "unix:///run/docker.sock",
    "tcp://127.0.0.1:2375",
    "ssh://root@127.0.0.1:22",  # not the worker's own inventory address (10.0.0.11)
])
def test_a_repository_cannot_point_a_worker_at_this_machines_docker(tmp_path: Path, docker_host: str) -> None:
    fleet = _fleet(tmp_path / "fleet", "local\ngpu-a ansible_host=10.0.0.11\n",
                   _worker("a", "gpu-a", f", dockerHost: '{docker_host}'"))
    with pytest.raises(ManifestValidationError) as info:
        load_source(repo=None, ref="HEAD", directory=fleet, settings=_settings(tmp_path))
    assert any("dockerHost" in str(error) for error in info.value.errors), info.value.errors


def test_only_the_operators_host_is_local_whatever_the_addresses_say(tmp_path: Path, db: Database) -> None:
    # gpu-a says it is 127.0.0.1, gpu-b localhost: still reached over SSH with host keys checked. `local`, the
    # operator's choice, is local whatever the repository gives as its address, user, port and Python.
    fleet = _fleet(tmp_path / "fleet",
                   "local ansible_host=10.9.9.9 ansible_user=mallory ansible_port=2222 "
                   "ansible_python_interpreter=/tmp/evil/python\n"
                   "gpu-a ansible_host=127.0.0.1\ngpu-b ansible_host=localhost\n",
                   _worker("me", "local") + "---\n" + _worker("a", "gpu-a") + "---\n" + _worker("b", "gpu-b"))
    settings = _settings(tmp_path, DOCKER_HOST="unix:///srv/docker.sock")
    source = load_source(repo=None, ref="HEAD", directory=fleet, settings=settings)

    hosts = yaml.safe_load(runner_inventory(source.inventory).replace("!unsafe ", ""))["all"]["hosts"]
    assert hosts["local"]["ansible_connection"] == "local"
    assert set(hosts["local"]) == {"ansible_connection", "ansible_python_interpreter"}
    assert hosts["local"]["ansible_python_interpreter"] != "/tmp/evil/python"
    assert hosts["gpu-a"]["ansible_connection"] == hosts["gpu-b"]["ansible_connection"] == "ssh"

    with db.session() as session:
        access = worker_access(source, session)
    assert (access["me"].docker_url, access["me"].address) == ("unix:///srv/docker.sock", "127.0.0.1")
    assert access["a"].docker_url == "ssh://root@127.0.0.1:22"
    assert access["b"].docker_url == "ssh://root@localhost:22"


def test_without_the_operators_setting_no_host_is_local(tmp_path: Path, db: Database) -> None:
    fleet = _fleet(tmp_path / "fleet", "local ansible_host=127.0.0.1\n", _worker("me", "local"))
    # A repository file named like the operator's setting changes nothing: only LMSTACK_HOME is read.
    (fleet / "local-host").write_text("local\n")
    source = load_source(repo=None, ref="HEAD", directory=fleet, settings=Settings(home=tmp_path / "home"))
    assert not source.inventory.hosts["local"].local
    hosts = yaml.safe_load(runner_inventory(source.inventory).replace("!unsafe ", ""))["all"]["hosts"]
    assert hosts["local"]["ansible_connection"] == "ssh"
    with db.session() as session:
        assert worker_access(source, session)["me"].docker_url == "ssh://root@127.0.0.1:22"


def test_the_setting_in_lmstack_home_is_read(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "local-host").write_text("this-box\n")
    assert Settings(home=home).local_host == "this-box"
    assert Settings(home=home, local_host="other").local_host == "other"  # the variable wins

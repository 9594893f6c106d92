"""Inventory parsing with ansible-core's own parser, from snapshot files (paths under inventory/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.gitsource import Inventory, parse_inventory
from lmstack.manifests.errors import ManifestValidationError

INI = b"""\
# the GPU fleet
[gpu]
gpu-a ansible_host=10.0.0.1 ansible_port=2222 ansible_user=ops
gpu-b:2200
gpu-c

[gpu:vars]
rack=r1

[infra]
gateway ansible_host=gw.example.com

[cluster:children]
gpu
"""

# `ansible-vault encrypt_string topsecret --name token` (password "pw"): lmstack cannot decrypt it.
VAULTED = b"""\
token: !vault |
          $ANSIBLE_VAULT;1.1;AES256
          34343533333839386337376138623766306638363632306439373930393231626431326436326134
          3262643363373530326238376562313362326363353037610a336465333332386335666561656665
          36353065316439333737666636656233333532356461656366316665336436666365616365386230
          6165343333323466640a613931303530666636323262303931616463396165653836383264343838
          6266
"""


def parse(files: dict[str, bytes]) -> Inventory:
    return parse_inventory({f"inventory/{name}": data for name, data in files.items()})


def errors_of(files: dict[str, bytes]) -> list[tuple[str, int, str]]:
    with pytest.raises(ManifestValidationError) as error:
        parse(files)
    return [(e.file, e.line, e.message) for e in error.value.errors]


def test_ini_hosts_groups_and_connection_vars() -> None:
    inventory = parse({"hosts.ini": INI})
    assert list(inventory.hosts) == ["gateway", "gpu-a", "gpu-b", "gpu-c"]  # sorted by name
    a = inventory.hosts["gpu-a"]
    assert (a.name, a.address, a.port, a.user) == ("gpu-a", "10.0.0.1", 2222, "ops")
    assert a.groups == ("cluster", "gpu")
    assert a.vars["rack"] == "r1"
    b = inventory.hosts["gpu-b"]
    assert (b.address, b.port, b.user) == ("gpu-b", 2200, None)  # host:port syntax
    c = inventory.hosts["gpu-c"]
    assert (c.address, c.port, c.user) == ("gpu-c", 22, None)
    gateway = inventory.hosts["gateway"]
    assert (gateway.address, gateway.groups) == ("gw.example.com", ("infra",))
    assert "rack" not in gateway.vars
    # no ansible bookkeeping among the host's variables
    assert not {"inventory_hostname", "groups", "group_names", "playbook_dir", "omit"} & set(a.vars)
    assert inventory.warnings == ()


def test_yaml_inventory() -> None:
    yaml = b"""\
all:
  vars:
    ansible_user: deploy
  children:
    gpu:
      hosts:
        gpu-a:
          ansible_host: 10.0.0.1
          ansible_port: "2222"
        gpu-b:
      vars:
        labels: {rack: r1, tier: [a, b]}
"""
    inventory = parse({"hosts.yaml": yaml})
    a = inventory.hosts["gpu-a"]
    assert (a.address, a.port, a.user, a.groups) == ("10.0.0.1", 2222, "deploy", ("gpu",))
    assert a.vars["labels"] == {"rack": "r1", "tier": ["a", "b"]}
    # plain builtins, not ansible's tagged subclasses
    assert type(a.vars["labels"]) is dict and type(a.user) is str
    assert not any(key.startswith("ansible_") for key in a.vars)  # the connection is in the typed fields
    assert json.loads(json.dumps(dict(a.vars))) == dict(a.vars)
    assert inventory.hosts["gpu-b"].user == "deploy"


def test_group_vars_and_host_vars_folders() -> None:
    inventory = parse(
        {
            "hosts": b"[gpu]\ngpu-a\ngpu-b\n",
            "group_vars/all.yml": b"site: ams\nrack: r0\n",
            "group_vars/gpu/main.yml": b"rack: r1\nansible_user: ops\n",
            "host_vars/gpu-b.yaml": (
                b"rack: r2\nansible_host: '{{ inventory_hostname }}.lan'\nansible_port: 2200\n"
            ),
        }
    )
    a, b = inventory.hosts["gpu-a"], inventory.hosts["gpu-b"]
    assert (a.vars["site"], a.vars["rack"], a.user, a.address) == ("ams", "r1", "ops", "gpu-a")
    assert (b.vars["site"], b.vars["rack"], b.address, b.port) == ("ams", "r2", "gpu-b.lan", 2200)


def test_connection_secrets_are_errors_and_vaulted_values_are_omitted() -> None:
    errors = errors_of({
        "hosts.ini": b"gpu-a ansible_password=hunter2 ansible_become_password=x ansible_ssh_pass=y\n",
        "group_vars/all.yml": VAULTED + b"ansible_become_pass: z\nkeep: me\n",
    })
    assert [(file, line, message.split(":")[0]) for file, line, message in errors] == [
        ("inventory/group_vars/all.yml", 8, "not allowed in the inventory"),
        ("inventory/hosts.ini", 1, "not allowed in the inventory"),
        ("inventory/hosts.ini", 1, "not allowed in the inventory"),
        ("inventory/hosts.ini", 1, "not allowed in the inventory")]
    assert all("hunter2" not in message for _, _, message in errors)  # named, never shown
    inventory = parse({"hosts.ini": b"gpu-a\n", "group_vars/all.yml": VAULTED + b"keep: me\n"})
    assert inventory.hosts["gpu-a"].vars == {"keep": "me"}
    assert any("token" in warning for warning in inventory.warnings)  # the vaulted value is named, not shown


def test_malformed_ini_is_an_error_naming_the_file() -> None:
    errors = errors_of({"hosts.ini": b"[gpu:wrong]\ngpu-a\n", "more.ini": b"[ok]\nhost-b\n"})
    assert len(errors) == 1
    file, _, message = errors[0]
    assert file == "inventory/hosts.ini"
    assert "Section [gpu:wrong] has unknown type: wrong" in message
    assert "/tmp" not in message


def test_every_bad_file_is_reported() -> None:
    errors = errors_of(
        {
            "a.ini": b"[gpu]\ngpu-a ansible_port\n",
            "b.yml": b"all:\n  hosts:\n    gpu-b: {\n",
            "c.ini": b"[fine]\ngpu-c\n",
        }
    )
    assert [(file, line) for file, line, _ in errors] == [("inventory/a.ini", 0), ("inventory/b.yml", 4)]
    assert "Expected key=value host variable assignment" in errors[0][2]
    assert "YAML" in errors[1][2]


def test_bad_group_vars_file_is_named() -> None:
    errors = errors_of({"hosts": b"gpu-a\n", "group_vars/all.yml": b"site: [ams\n"})
    assert [(file, line) for file, line, _ in errors] == [("inventory/group_vars/all.yml", 2)]


def test_bad_port_is_an_error() -> None:
    errors = errors_of({"hosts": b"gpu-a ansible_port=ssh\n"})
    assert errors == [("inventory/hosts", 1, "host gpu-a: ansible_port 'ssh' is not a port number")]


def test_every_connection_alias_set_is_checked_and_the_plain_one_wins() -> None:
    # ansible_host is what lmstack uses; an ansible_ssh_host beside it is checked all the same.
    errors = errors_of({"hosts": b"gpu-a ansible_host=10.0.0.5 ansible_ssh_host=-oProxyCommand=x\n"
                                 b"gpu-b ansible_user=deploy ansible_ssh_user='a b' ansible_ssh_port=0\n"})
    assert sorted((file, line, message.split(" '")[0]) for file, line, message in errors) == [
        ("inventory/hosts", 1, "host gpu-a: ansible_ssh_host"),
        ("inventory/hosts", 2, "host gpu-b: ansible_ssh_port 0 is not a port number"),
        ("inventory/hosts", 2, "host gpu-b: ansible_ssh_user")]
    host = parse({"hosts": b"gpu-a ansible_host=10.0.0.5 ansible_ssh_host=10.0.0.6 ansible_ssh_port=2200\n"})
    assert (host.hosts["gpu-a"].address, host.hosts["gpu-a"].port) == ("10.0.0.5", 2200)


def test_host_errors_are_reported_beside_bad_files() -> None:
    errors = errors_of({"a.ini": b"[gpu:wrong]\n", "b.ini": b"gpu-b ansible_host='{{ nope }}'\n"})
    assert [(file, line) for file, line, _ in errors] == [("inventory/a.ini", 0), ("inventory/b.ini", 1)]
    assert "host gpu-b: ansible_host" in errors[1][2] and "nope" in errors[1][2]


def test_connection_templates_render_in_a_sandbox_and_never_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    inventory = parse({"hosts.yml": b"all:\n  vars:\n    net: '10.1'\n    base: '{{ net }}.0'\n  hosts:\n"
                                    b"    gpu-a:\n      ansible_host: '{{ base }}.11'\n"
                                    b"      ansible_port: '{{ 2200 + 2 }}'\n"
                                    b"    gpu-b:\n"
                                    b"      ansible_host: '{{ inventory_hostname }}.{{ group_names | length }}'\n"})
    assert (inventory.hosts["gpu-a"].address, inventory.hosts["gpu-a"].port) == ("10.1.0.11", 2202)
    assert inventory.hosts["gpu-b"].address == "gpu-b.0"

    lookup = f"{{{{ lookup('pipe', 'touch {marker}') }}}}".encode()
    errors = errors_of({"hosts.yml": b"all:\n  hosts:\n    gpu-a:\n      ansible_host: \"" + lookup + b"\"\n"})
    assert errors == [("inventory/hosts.yml", 4, "host gpu-a: ansible_host: 'lookup' is undefined; lmstack "
                                                 "renders connection variables without Ansible's lookups and filters")]
    escape = b"{{ ''.__class__.__mro__[1].__subclasses__() }}"
    [(_, _, message)] = errors_of({"hosts.yml": b"all:\n  hosts:\n    gpu-a:\n      ansible_port: \"" + escape
                                   + b"\"\n"})
    assert "host gpu-a: ansible_port:" in message and "unsafe" in message
    assert not marker.exists()


def test_inventory_plugins_are_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    constructed = (b"plugin: ansible.builtin.constructed\ncompose:\n  x: lookup('pipe', 'touch "
                   + str(marker).encode() + b"')\n")
    errors = errors_of({"hosts.ini": b"gpu-a\n", "dynamic.yml": constructed})
    assert [(file, line) for file, line, _ in errors] == [("inventory/dynamic.yml", 0)]
    assert "does not run inventory plugins" in errors[0][2]
    script = b"#!/bin/sh\ntouch " + str(marker).encode() + b"\necho '{}'\n"
    assert errors_of({"hosts.ini": b"gpu-a\n", "dynamic.sh": script})  # not a static inventory either
    assert not marker.exists()


def test_missing_inventory_folder() -> None:
    with pytest.raises(ManifestValidationError) as error:
        parse_inventory({"manifests/workers.yaml": b""})
    assert [e.file for e in error.value.errors] == ["inventory/"]
    assert "inventory/" in str(error.value)


def test_inventory_with_only_vars_is_an_error() -> None:
    errors = errors_of({"group_vars/all.yml": b"site: ams\n"})
    assert [file for file, _, _ in errors] == ["inventory/"]


def test_warnings_are_kept_not_printed(capfd: pytest.CaptureFixture[str]) -> None:
    inventory = parse({"hosts.yml": b"all:\n  hots:\n    gpu-a:\n"})
    assert inventory.hosts == {}
    assert any("hots" in warning for warning in inventory.warnings)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_current_directory_group_vars_do_not_leak_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars/all.yml").write_text("leaked: true\n")
    monkeypatch.chdir(tmp_path)
    assert "leaked" not in parse({"hosts": b"gpu-a\n"}).hosts["gpu-a"].vars


def test_parsing_writes_nothing_under_home_and_leaves_the_environment(tmp_path: Path) -> None:
    # A fresh interpreter, so ansible is imported here for the first time.
    script = (
        "import os; from lmstack.gitsource import parse_inventory; "
        "parse_inventory({'inventory/hosts': b'gpu-a\\n'}); "
        "print('ANSIBLE_LOCAL_TEMP' in os.environ)"
    )
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("ANSIBLE_LOCAL_TEMP", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
    assert result.stderr == ""
    assert not (tmp_path / ".ansible").exists()

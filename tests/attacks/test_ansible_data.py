"""Nothing from the repository is ever rendered as a template on the lmstack host.

Issue 10, finding 2: manifest strings reached Ansible as templates. `{{ lookup('pipe', ...) }}` in a Worker's
`modelCache` ran a command as root on the lmstack host during `lmstack facts`, and in a Deployment's `image`
and an `hf://` model path during `lmstack prepare` (ansible-core renders extra variables, and lookups run on
the controller). Here a lookup payload that touches `MARKER-<field>` goes into every string field of both
kinds and into the inventory's variables; validate, plan, facts, prepare and apply run on the test bed as an
operator runs them, and no marker may appear. Where validation refuses a field's payload, that is checked too.

The test bed's hosts are network namespaces on this machine: a marker written "on a worker" would appear
here as well, so an empty marker folder means no command ran anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from testbed.fleet import write_fleet

from lmstack.config import Settings
from lmstack.gitsource import load_source
from lmstack.manifests import ManifestValidationError
from lmstack.nodes.ansible import run_facts, run_playbook

pytestmark = pytest.mark.testbed

LMSTACK = [sys.executable, "-m", "lmstack"]
MARKER = "MARKER-"


class Markers:
    """Payloads that touch `folder/MARKER-<field>` if ansible ever renders them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()

    def __call__(self, field: str) -> str:
        return f"{{{{ lookup('pipe', 'touch {self.folder}/{MARKER}{field}') }}}}"

    def found(self) -> list[str]:
        return sorted(path.name for path in self.folder.iterdir())


@pytest.fixture
def markers(tmp_path: Path) -> Markers:
    return Markers(tmp_path / "markers")


def _documents(*documents: dict[str, Any]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False, width=1000)


def _workers(bed: Any, root: Path, payload: Callable[[str], str], **override: Any) -> list[dict[str, Any]]:
    return [{
        "apiVersion": "lmstack.dev/v1", "kind": "Worker",
        "metadata": {"name": host.name, "labels": {"n": str(index), "note": payload("worker-label"),
                                                   "zone": payload("worker-label-and-selector")}},
        "spec": {"host": host.name, "modelCache": str(root / "caches" / host.name), **override},
    } for index, host in enumerate(bed.hosts)]


def _deployments(image: str, payload: Callable[[str], str]) -> list[dict[str, Any]]:
    plain = {  # runs: the standin engine ignores arguments it does not know
        "apiVersion": "lmstack.dev/v1", "kind": "Deployment",
        "metadata": {"name": "plain", "labels": {"note": payload("deployment-label")}},
        "spec": {"backend": "vllm", "model": "test/" + payload("vllm-model"), "image": image, "replicas": 1,
                 "resources": {"gpus": 0}, "placement": {"workers": ["node1"]},
                 "args": ["--note", payload("args")], "env": {"NOTE": payload("env")},
                 "health": {"startupTimeout": "60s"}},
    }
    odd = {  # what prepare hands to the worker: an image and a model file to download
        "apiVersion": "lmstack.dev/v1", "kind": "Deployment",
        "metadata": {"name": "odd"},
        "spec": {"backend": "llamacpp", "model": "hf://lmstack-test/payload/" + payload("hf-model") + ".gguf",
                 "image": "lmstack-standin:" + payload("image"), "replicas": 1, "resources": {"gpus": 0},
                 "placement": {"workers": ["node2"], "selector": {"zone": payload("worker-label-and-selector")}},
                 # a secret read by lmstack itself at apply time, never by ansible (there is no such file)
                 "env": {"TOKEN": {"fromFile": payload("from-file")},
                         "OTHER": {"fromEnv": "LMSTACK_SECRET_" + payload("from-env")}},
                 "health": {"startupTimeout": "10s"}},
    }
    return [plain, odd]


def _inventory(bed: Any, payload: Callable[[str], str]) -> tuple[str, str]:
    """hosts.ini (the bed's, plus a plain variable) and group_vars/gpu.yml (plain variables, nested too)."""
    ini = bed.inventory_ini() + f'[gpu:vars]\nnote="{payload("inventory-ini-var")}"\n'
    group_vars = yaml.safe_dump({"comment": payload("inventory-group-var"),
                                 "nested": {"list": [payload("inventory-nested-var")]}})
    return ini, group_vars


def _repository(root: Path, bed: Any, image: str, payload: Callable[[str], str], *,
                workers: list[dict[str, Any]] | None = None, deployments: list[dict[str, Any]] | None = None,
                ini: str | None = None) -> Path:
    default_ini, group_vars = _inventory(bed, payload)
    repo = write_fleet(root / "fleet", bed, {"deployments.yaml": _documents(*(deployments or
                                                                                _deployments(image, payload)))},
                       workers=_documents(*(workers or _workers(bed, root, payload))))
    (repo / "inventory" / "hosts.ini").write_text(ini or default_ini)
    (repo / "inventory" / "group_vars").mkdir()
    (repo / "inventory" / "group_vars" / "gpu.yml").write_text(group_vars)
    return repo


def _env(bed: Any, database_url: str, root: Path) -> dict[str, str]:
    return {**os.environ, "LMSTACK_DATABASE_URL": database_url, "LMSTACK_HOME": str(root / "home"),
            "LMSTACK_SSH_KEY": str(bed.ssh_key), "LMSTACK_KNOWN_HOSTS": str(bed.known_hosts),
            "LMSTACK_MOUNT_ROOTS": str(root / "caches"), "NO_COLOR": "1", "COLUMNS": "250"}


def _lmstack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LMSTACK, *args], env=env, capture_output=True, text=True, timeout=600)


# --- every field that validates: validate, plan, facts, prepare, apply -------------------------------------


def test_lookups_in_every_field_stay_text_through_every_command(
    clean_testbed: Any, standin_image: str, db: Any, database_url: str, tmp_path: Path, markers: Markers
) -> None:
    bed = clean_testbed
    repo = _repository(tmp_path, bed, standin_image, markers)
    env = _env(bed, database_url, tmp_path)

    validate = _lmstack(env, "validate", "--dir", str(repo))
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "3 workers, 2 deployments" in validate.stdout
    plan = _lmstack(env, "plan", "--dir", str(repo))
    assert plan.returncode == 2 and "2 unplaceable" in plan.stdout, plan.stdout + plan.stderr  # no facts yet

    facts = _lmstack(env, "facts", "--dir", str(repo))
    assert facts.returncode == 0 and "3 of 3 workers Ready" in facts.stdout, facts.stdout + facts.stderr
    assert markers.found() == []
    for args in (["plan", "--json"], ["plan", "--show-commands"]):
        plan = _lmstack(env, *args, "--dir", str(repo))
        assert plan.returncode == 2, plan.stdout + plan.stderr
    assert markers.found() == []
    # The commands shown hold the text as written (shell-quoted; env values are not shown).
    assert "2 to create" in plan.stdout and all(f"{MARKER}{field}" in plan.stdout
                                                for field in ("args", "image", "vllm-model", "hf-model")), plan.stdout

    prepare = _lmstack(env, "prepare", "--dir", str(repo), "--json")
    assert markers.found() == []
    # node2 cannot have the image nor the model file (no such image; no network), but the worker's module got
    # them as the text written in Git: its results name them so.
    workers = {worker["name"]: worker for worker in json.loads(prepare.stdout)["workers"]}
    assert prepare.returncode == 1 and workers["node1"]["status"] == "ok" and workers["node2"]["status"] == "failed", \
        prepare.stdout
    assert [image["image"] for image in workers["node2"]["images"]] == ["lmstack-standin:" + markers("image")]
    assert [model["source"] for model in workers["node2"]["models"]] == [
        "hf://lmstack-test/payload/" + markers("hf-model") + ".gguf"]

    apply = _lmstack(env, "apply", "--dir", str(repo), "--yes")
    assert markers.found() == []
    assert apply.returncode == 1, apply.stdout + apply.stderr  # odd/0 fails: its image does not exist
    # plain/0 runs on node1 with the values as written.
    ids = bed.docker("node1", "ps", "-q", "--filter", "label=lmstack.deployment=plain").stdout.split()
    assert len(ids) == 1, apply.stdout + apply.stderr
    [inspected] = json.loads(bed.docker("node1", "inspect", ids[0]).stdout)
    assert f"NOTE={markers('env')}" in inspected["Config"]["Env"]
    assert markers("args") in inspected["Args"] or markers("args") in inspected["Config"]["Cmd"]


# --- fields whose payload validation refuses ------------------------------------------------------------------


def _refusals(bed: Any, root: Path, image: str, payload: Callable[[str], str]) -> dict[str, dict[str, Any]]:
    """field -> _repository() arguments that put the payload there (and nowhere else that would fail)."""
    deployments = _deployments(image, payload)
    cases: dict[str, dict[str, Any]] = {
        "modelCache": {"workers": _workers(bed, root, payload, modelCache="/var/lib/lmstack/" + payload("cache"))},
        "dockerHost": {"workers": _workers(bed, root, payload, dockerHost="ssh://" + payload("docker-host"))},
    }
    cases["servedName"] = {"deployments": [
        dict(deployments[0], spec={**deployments[0]["spec"], "servedName": payload("served-name")}), deployments[1]]}
    host = bed.hosts[0]
    for variable in ("ansible_host", "ansible_ssh_host", "ansible_port", "ansible_user",
                     "ansible_python_interpreter"):
        line = f"{host.name} {variable}=\"{payload(variable)}\""
        cases[variable] = {"ini": bed.inventory_ini() + f"[gpu]\n{line}\n"}
    return cases


def test_payloads_that_validation_refuses_are_named_and_run_nothing(
    clean_testbed: Any, standin_image: str, db: Any, database_url: str, tmp_path: Path, markers: Markers
) -> None:
    bed = clean_testbed
    settings = Settings(home=tmp_path / "home", mount_roots=[tmp_path / "caches"])
    for name, arguments in _refusals(bed, tmp_path, standin_image, markers).items():
        arguments.setdefault("workers", _workers(bed, tmp_path, markers))
        repo = _repository(tmp_path / name, bed, standin_image, markers, **arguments)
        with pytest.raises(ManifestValidationError) as info:
            load_source(repo=None, ref="HEAD", directory=repo, settings=settings)
        assert any(name in f"{e.path} {e.message}" for e in info.value.errors), (name, info.value.errors)

    # All of them in one repository, through every command: each refuses before anything runs.
    workers = _workers(bed, tmp_path, markers, modelCache="/var/lib/lmstack/" + markers("cache"),
                       dockerHost="ssh://" + markers("docker-host"))
    deployments = _deployments(standin_image, markers)
    deployments[0]["spec"]["servedName"] = markers("served-name")
    line = " ".join(f'{variable}="{markers(variable)}"' for variable in ("ansible_host", "ansible_port",
                                                                         "ansible_user", "ansible_python_interpreter"))
    repo = _repository(tmp_path / "all", bed, standin_image, markers, workers=workers, deployments=deployments,
                       ini=bed.inventory_ini() + f"[gpu]\n{bed.hosts[0].name} {line}\n")
    env = _env(bed, database_url, tmp_path)
    for command in (["validate"], ["plan"], ["facts"], ["prepare"], ["apply", "--yes"]):
        result = _lmstack(env, *command, "--dir", str(repo))
        assert result.returncode == 1 and "modelCache" in result.stderr, (command, result.stdout, result.stderr)
        assert "ansible_python_interpreter" in result.stderr
    assert markers.found() == []
    assert all(not bed.docker(host, "ps", "-aq").stdout.strip() for host in bed.hosts)


# --- the adapter, for values that never pass validation: still data ------------------------------------------


def test_the_playbooks_take_their_data_as_text(clean_testbed: Any, tmp_path: Path, markers: Markers) -> None:
    """run_facts and the prepare playbook with payloads in every value they take, validation bypassed."""
    bed = clean_testbed
    host = bed.hosts[0].name
    key, known_hosts = Path(bed.ssh_key), Path(bed.known_hosts)
    gathered = run_facts(bed.inventory_ini(), [host], ssh_key=key, known_hosts=known_hosts,
                         model_cache={host: f"{tmp_path}/caches/{markers('facts-cache')}"})
    assert not isinstance(gathered[host], Exception) and getattr(gathered[host], "facts", None), gathered
    assert markers.found() == []

    cache = f"{tmp_path}/prepare-cache/{markers('prepare-cache')}"
    run = run_playbook("prepare.yml", inventory=bed.inventory_ini(), hosts=[host], ssh_key=key,
                       known_hosts=known_hosts, host_vars={host: {
        "lmstack_model_cache": cache,
        "lmstack_images": ["lmstack-standin:" + markers("prepare-image")],
        "lmstack_models": [{"source": markers("model-source"), "url": "http://127.0.0.1:9/" + markers("model-url"),
                            "path": "hf/" + markers("model-path"), "sha256": None}],
    }}, extravars={"lmstack_pull_timeout": 5})
    assert markers.found() == []
    assert Path(cache).is_dir()  # the module made the folder named as written, braces and all
    [result] = [r.result for r in run.hosts[host].results if r.action == "lmstack_prepare"]
    prepared = result["prepare"]
    assert prepared["model_cache"]["path"] == cache, prepared
    assert [image["image"] for image in prepared["images"]] == ["lmstack-standin:" + markers("prepare-image")]
    assert [model["source"] for model in prepared["models"]] == [markers("model-source")]

"""Engines answer only the gateway: each replica's engine gets its own API key, which only lmstack holds.

Before: an engine on a worker answered anyone who could reach its port (issue 10, finding 7), and error
messages to API clients named the engine's internal address (finding 12).

The test-bed engine is the stand-in OpenAI-compatible server (tests/testbed/standin.py): it reads
VLLM_API_KEY as vLLM does (vLLM needs a GPU and a registry, neither of which is here). The real llama.cpp
server refusing a request without its key is checked in tests/test_llamacpp.py.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import select
from test_gateway import add_key, serve_model, start_gateway, wait_until_routed  # noqa: F401 (a fixture)
from testbed.fleet import workers_yaml, write_fleet

from lmstack.api.services.status import get_deployment
from lmstack.backends import BACKENDS, EffectiveSpec, backend_for, effective_spec
from lmstack.backends.base import ReplicaContext
from lmstack.config import Settings
from lmstack.gitsource import load_source
from lmstack.manifests.schema import DeploymentSpec, Health, Resources
from lmstack.reconcile.apply import apply_source
from lmstack.state import Database, Replica

KEY = "k" * 43


def _context(key: str | None) -> ReplicaContext:
    return ReplicaContext(deployment="d", ordinal=0, served_name="d", gpus=(), port=8000,
                          model_cache="/var/lib/lmstack/models", revision=None, spec_hash="h", engine_key=key)


def _spec(backend: str) -> EffectiveSpec:
    model = "/models/m.gguf" if backend == "llamacpp" else "org/m"
    return effective_spec("d", DeploymentSpec(backend=backend, model=model, image="img", args=["--user-flag"],
                                              resources=Resources(gpus=0), health=Health(startup_timeout=60)))


@pytest.mark.parametrize(("backend", "env"), [("vllm", "VLLM_API_KEY"), ("llamacpp", "LLAMA_API_KEY")])
def test_the_key_goes_to_the_engine_in_its_environment_never_on_its_command_line(backend, env):
    container = backend_for(backend).container(_spec(backend), _context(KEY), {})
    assert container.env[env] == KEY
    assert KEY not in " ".join(container.command)
    assert KEY not in container.docker_run() and f"-e {env}" in container.docker_run()  # names only


def test_sglang_takes_the_key_as_a_flag_before_the_users_args():
    container = backend_for("sglang").container(_spec("sglang"), _context(KEY), {})
    command = list(container.command)
    assert command[command.index("--api-key") + 1] == KEY
    assert command.index("--api-key") < command.index("--user-flag")


def test_a_key_the_users_env_sets_does_not_replace_lmstacks():
    container = backend_for("vllm").container(_spec("vllm"), _context(KEY), {"VLLM_API_KEY": "pushed-by-git"})
    assert container.env["VLLM_API_KEY"] == KEY


def test_ollama_cannot_take_a_key_and_says_so():
    assert {name for name, b in BACKENDS.items() if not b.takes_engine_key} == {"ollama"}
    with pytest.raises(ValueError, match="cannot require an API key"):
        backend_for("ollama").container(_spec("ollama"), _context(KEY), {})


# -- on the test bed ------------------------------------------------------------------------------------


def _get(url: str, key: str | None = None) -> tuple[int, Any]:
    call = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(call, timeout=10) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as exc:
        return exc.code, None


@pytest.mark.testbed
def test_an_applied_engine_answers_only_its_own_key(tmp_path: Path, clean_testbed: Any, standin_image: str,
                                                    db: Database, start_gateway: Any) -> None:  # noqa: F811
    bed = clean_testbed
    deployment = ("apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: chat}\nspec:\n"
                  f"  backend: vllm\n  model: test/chat\n  image: {standin_image}\n  replicas: 2\n"
                  "  resources: {gpus: 0}\n  placement: {strategy: spread}\n  health: {startupTimeout: 60s}\n"
                  "  env: {VLLM_API_KEY: chosen-by-the-pusher}\n")
    repo = write_fleet(tmp_path / "fleet", bed, {"chat.yaml": deployment}, message="chat",
                       workers=workers_yaml(bed.hosts, model_cache=lambda h: f"/var/lib/lmstack/test-{h.name}"))
    source = load_source(repo=str(repo), ref="HEAD", directory=None, settings=Settings(home=tmp_path / "home"))
    _, report = apply_source(source, db, ssh_key=bed.ssh_key, known_hosts=bed.known_hosts)
    assert report is not None and report.ok, [r.message for r in report.failed] if report else None

    with db.session() as session:
        rows = list(session.scalars(select(Replica).order_by(Replica.ordinal)))
        shown = get_deployment(session=session, name="chat")
    keys = [row.engine_key for row in rows]
    assert len(rows) == 2 and all(keys) and len(set(keys)) == 2  # one key per replica
    assert shown is not None and not any(str(key) in shown.model_dump_json() for key in keys)  # status API
    for row in rows:
        endpoint = str(row.endpoint)
        assert _get(f"{endpoint}/v1/models")[0] == 401  # anyone on the network
        assert _get(f"{endpoint}/v1/models", "chosen-by-the-pusher")[0] == 401  # what Git can set
        assert _get(f"{endpoint}/v1/models", keys[1 - row.ordinal])[0] == 401  # another replica's key
        status, listed = _get(f"{endpoint}/v1/models", row.engine_key)
        assert status == 200 and [m["id"] for m in listed["data"]] == ["chat"]

    # The gateway holds the keys: the official SDK gets answers through it.
    api_key, _ = add_key(db)
    client = start_gateway().sdk(api_key)
    answer = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content.startswith("Hello from chat on ")


# -- what API clients are told --------------------------------------------------------------------------


def test_a_failing_engines_address_is_never_told_to_the_client(db, start_gateway):  # noqa: F811
    """A replica that refuses connections: the 502 names the replica, not its host and port."""
    serve_model(db, ["http://127.0.0.1:9"], deployment="m", served="m")  # port 9 (discard): refused
    api_key, _ = add_key(db)
    gateway = start_gateway()
    client = gateway.sdk(api_key)
    wait_until_routed(gateway, "m", 1)
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert failed.value.status_code == 502
    message = failed.value.response.text
    assert "replica m/0" in message
    assert "127.0.0.1" not in message and ":9" not in message, message

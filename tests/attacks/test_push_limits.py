"""What a push may make lmstack read on its own host (secrets) and where it may point workers (Docker, mounts).

Issue 10, points 3 and 4: `env: {fromFile: ANY_PATH}` / `{fromEnv: ANY_NAME}` copied any file or variable of
the lmstack host (the JWT secret, the database URL, /etc/shadow) into a container, and a missing file's error
said whether a path existed; `dockerHost: unix:///var/run/docker.sock` reached the lmstack host's own Docker,
`modelCache: /` mounted a worker's root read-write, and the plan showed neither.

Validation-time cases are data files (tests/attacks/push/*.yaml, `# expect: LINE: KEY.PATH: substring`, as
tests/manifests/bad/), loaded with the operator's default limits against the inventory hosts gpu-a (at
10.0.0.5), gpu-b (10.0.0.6) and gpu-c (gpu-c.example). What only the disk can tell (a symlink inside the
secrets directory leading out) is refused when apply reads it, on the test bed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import insert, select
from testbed.fleet import workers_yaml, write_fleet

from lmstack.config import Settings
from lmstack.gitsource import load_source
from lmstack.gitsource.source import push_limits
from lmstack.manifests import ManifestError, ManifestValidationError, load_manifests
from lmstack.manifests.policy import PushLimits
from lmstack.manifests.schema import EnvValue
from lmstack.reconcile.apply import Applier
from lmstack.reconcile.secrets import SecretError, resolve_env
from lmstack.state import Database, Replica, Worker

PUSH = Path(__file__).parent / "push"
CASES = sorted(PUSH.glob("*.yaml"))
INVENTORY = {"gpu-a": "10.0.0.5", "gpu-b": "10.0.0.6", "gpu-c": "gpu-c.example"}
_EXPECT = re.compile(r"^# expect: (\d+): (.+?): (.+)$")
TESTBED_CACHE_ROOT = Path("/tmp/lmstack-test-models")


def _expectations(text: str) -> list[tuple[int, str, str]]:
    return [(int(m[1]), m[2], m[3]) for line in text.splitlines() if (m := _EXPECT.match(line))]


def _errors(text: str, name: str = "x.yaml", limits: PushLimits | None = None) -> tuple[ManifestError, ...]:
    with pytest.raises(ManifestValidationError) as info:
        load_manifests({name: text}, inventory_hosts=INVENTORY, limits=limits or PushLimits())
    return info.value.errors


# --- validation: every case refused with FILE:LINE and the field ------------------------------------------


def test_every_case_states_its_expectations() -> None:
    assert len(CASES) >= 15
    for path in CASES:
        assert _expectations(path.read_text()), path.name


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_push_refused_at_validate(path: Path) -> None:
    text = path.read_text()
    expected = _expectations(text)
    errors = _errors(text, path.name)
    report = "\n".join(str(e) for e in errors)
    assert {(e.line, e.path) for e in errors} == {(line, key) for line, key, _ in expected}, report
    for line, key, substring in expected:
        assert any(substring in e.message for e in errors if (e.line, e.path) == (line, key)), \
            f"{path.name}:{line}: {key}: no message contains {substring!r}:\n{report}"
    assert all(e.file == path.name for e in errors)


# --- secrets, read on the lmstack host at apply time ---------------------------------------------------------


@pytest.fixture
def secrets(tmp_path: Path) -> PushLimits:
    """LMSTACK_HOME with its JWT secret beside the secrets directory, which holds one real secret and links."""
    home = tmp_path / "home"
    directory = home / "secrets"
    (directory / "team").mkdir(parents=True)
    (home / "jwt-secret").write_text("the-jwt-secret\n")
    (directory / "team" / "token").write_text("hf_real_token\n")
    (directory / "shadow").symlink_to("/etc/shadow")
    (directory / "jwt").symlink_to(home / "jwt-secret")
    (directory / "relative-up").symlink_to("../jwt-secret")
    (directory / "team" / "inside").symlink_to("token")  # a link that stays inside is fine
    (directory / "dir").mkdir()
    return push_limits(Settings(home=home))


def _resolve(limits: PushLimits, **env: Any) -> dict[str, str]:
    # Read as a stored spec is read back: the schema's checks only, none of the limits.
    typed = TypeAdapter(dict[str, EnvValue]).validate_python(env)
    return resolve_env("chat", typed, environ={"LMSTACK_JWT_SECRET": "x", "PATH": "/usr/bin",
                                               "LMSTACK_SECRET_HF": "hf_env"}, limits=limits)


def test_files_and_variables_inside_the_limits_resolve(secrets: PushLimits) -> None:
    assert _resolve(secrets, A={"fromFile": "team/token"}, B={"fromFile": "team/inside"},
                    C={"fromEnv": "LMSTACK_SECRET_HF"}, D="plain") == {
        "A": "hf_real_token", "B": "hf_real_token", "C": "hf_env", "D": "plain"}


@pytest.mark.parametrize("link", ["shadow", "jwt", "relative-up"])
def test_symlink_out_of_the_secrets_directory_is_refused_when_read(secrets: PushLimits, link: str) -> None:
    with pytest.raises(SecretError) as info:
        _resolve(secrets, TOKEN={"fromFile": link})
    message = str(info.value)
    assert message == f"deployment chat: spec.env.TOKEN.fromFile: {link!r} is not readable in the secrets directory"
    assert "/etc" not in message and "jwt-secret" not in message and "home" not in message


def test_missing_and_forbidden_files_read_the_same(secrets: PushLimits) -> None:
    """No existence oracle: a missing file, a link to an existing file outside, a link to nothing, a
    directory and an absolute path smuggled past validation all give the same words, without strerror."""
    (Path(str(secrets.secrets_dir)) / "dangling").symlink_to("/nonexistent/secret")
    messages = set()
    for name in ("missing", "shadow", "dangling", "dir", "team/missing", "jwt"):
        with pytest.raises(SecretError) as info:
            _resolve(secrets, TOKEN={"fromFile": name})
        messages.add(str(info.value).replace(repr(name), "NAME"))
    assert messages == {"deployment chat: spec.env.TOKEN.fromFile: NAME is not readable in the secrets directory"}


def test_refused_names_and_paths_are_refused_when_read_too(secrets: PushLimits) -> None:
    """A spec that never passed validation (stored, or built by hand) still cannot reach past the limits."""
    for value, words in [({"fromEnv": "LMSTACK_JWT_SECRET"}, "one of lmstack's own settings"),
                         ({"fromEnv": "PATH"}, "may only name variables starting with 'LMSTACK_SECRET_'"),
                         ({"fromFile": "/etc/shadow"}, "relative to the operator's secrets directory"),
                         ({"fromFile": "../jwt-secret"}, "must not contain '..'")]:
        with pytest.raises(SecretError, match=re.escape(words)):
            _resolve(secrets, TOKEN=value)


def test_secret_files_are_bounded(secrets: PushLimits) -> None:
    (Path(str(secrets.secrets_dir)) / "big").write_bytes(b"x" * (64 * 1024 + 1))
    os.mkfifo(Path(str(secrets.secrets_dir)) / "fifo")  # would block a plain read forever
    with pytest.raises(SecretError, match="larger than 64 KiB"):
        _resolve(secrets, TOKEN={"fromFile": "big"})
    with pytest.raises(SecretError, match="not readable in the secrets directory"):
        _resolve(secrets, TOKEN={"fromFile": "fifo"})


# --- the operator's settings: never / or a system directory, never lmstack's own settings ----------------------


@pytest.mark.parametrize("root", ["/", "/etc", "/var", "/tmp", "/usr/lib/x", "/var/lib/lmstack/../..", "data"])
def test_operator_cannot_make_a_system_directory_a_mount_root(root: str) -> None:
    with pytest.raises(ValidationError, match="mount_roots"):
        Settings(mount_roots=[Path("/var/lib/lmstack"), Path(root)])


def test_mount_roots_and_docker_hosts_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSTACK_MOUNT_ROOTS", "/var/lib/lmstack, /data/models")
    monkeypatch.setenv("LMSTACK_DOCKER_HOSTS", '["tcp://10.0.0.5:2376"]')
    settings = Settings()
    assert settings.mount_roots == [Path("/var/lib/lmstack"), Path("/data/models")]
    assert settings.docker_hosts == ["tcp://10.0.0.5:2376"]
    monkeypatch.setenv("LMSTACK_MOUNT_ROOTS", "/data/models,/")
    with pytest.raises(ValidationError, match="is \\(or holds\\) a system directory"):
        Settings()


@pytest.mark.parametrize("prefix", ["", "LMSTACK_", "LMSTACK_S"])
def test_no_prefix_opens_lmstacks_own_settings(prefix: str) -> None:
    limits = push_limits(Settings(secrets_env_prefix=prefix))
    for name in ("LMSTACK_JWT_SECRET", "LMSTACK_DATABASE_URL", "lmstack_jwt_secret", "LMSTACK_SECRETS_DIR"):
        assert limits.env_name_problem(name) is not None, (prefix, name)
    assert limits.env_name_problem("LMSTACK_SECRET_HF_TOKEN") is None


@pytest.mark.parametrize("directory", ["/", "/etc", "/root", "{home}", "{home}/.."])
def test_secrets_dir_never_exposes_the_system_or_lmstacks_state(tmp_path: Path, directory: str) -> None:
    home = tmp_path / "home"
    with pytest.raises(ValidationError, match="secrets_dir"):
        Settings(home=home, secrets_dir=Path(directory.format(home=home)))
    assert Settings(home=home, secrets_dir=tmp_path / "secrets").secrets_dir == tmp_path / "secrets"


def test_a_prefix_naming_lmstacks_settings_is_a_settings_error() -> None:
    with pytest.raises(ValidationError, match="lmstack's own settings"):
        Settings(secrets_env_prefix="LMSTACK_DATABASE_")


def test_what_the_operator_allows_validates() -> None:
    """The same kinds of values pass when the operator allows them: a listed endpoint, another root."""
    text = ("apiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {name: w}\n"
            "spec: {host: gpu-a, dockerHost: 'tcp://10.0.0.5:2376', modelCache: /data/models}\n")
    assert {e.path for e in _errors(text)} == {"spec.dockerHost", "spec.modelCache"}
    allowed = PushLimits(mount_roots=("/var/lib/lmstack", "/data"), docker_hosts=frozenset({"tcp://10.0.0.5:2376"}))
    state = load_manifests({"w.yaml": text}, inventory_hosts=INVENTORY, limits=allowed)
    assert state.workers["w"].spec.model_cache == "/data/models"
    for url in ("ssh://10.0.0.5", "ssh://deploy@10.0.0.5:2222", "ssh://root@10.0.0.5:22"):
        assert PushLimits().docker_host_problem(url, "10.0.0.5") is None, url


# --- the plan shows each worker's Docker endpoint and every mount -------------------------------------------


LMSTACK = [sys.executable, "-m", "lmstack"]
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def test_plan_shows_docker_endpoints_and_mounts(tmp_path: Path, database_url: str, db: Database) -> None:
    env = {**os.environ, **GIT_ENV, "LMSTACK_DATABASE_URL": database_url, "LMSTACK_HOME": str(tmp_path / "home"),
           "NO_COLOR": "1", "COLUMNS": "200", "LMSTACK_MOUNT_ROOTS": "/var/lib/lmstack,/srv/models"}
    fleet = tmp_path / "fleet"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LMSTACK, *args], env=env, capture_output=True, text=True, timeout=120)

    assert run("init", str(fleet)).returncode == 0
    workers = fleet / "manifests" / "workers.yaml"
    workers.write_text(workers.read_text().replace(
        "  host: gpu-b\n", "  host: gpu-b\n  dockerHost: ssh://deploy@10.0.0.12:2222\n  modelCache: /srv/models/b\n"))
    with db.session() as session:
        gpus = [{"index": 0, "name": "NVIDIA H100", "memory_total": 80 * 2**30, "memory_unmanaged": 0}]
        session.execute(insert(Worker), [{"name": n, "host": n, "facts": {"gpus": gpus}} for n in ("gpu-a", "gpu-b")])

    text = run("plan", "--dir", str(fleet))
    assert text.returncode == 2, text.stdout + text.stderr
    lines = text.stdout.splitlines()
    assert "Docker endpoints:" in lines
    assert "  gpu-a  ssh://root@10.0.0.11:22" in lines and "  gpu-b  ssh://deploy@10.0.0.12:2222" in lines
    placed = {line.split()[2]: line.split()[4] for line in lines if line.strip().startswith("+ create")}
    assert placed == {"qwen-7b/0": "gpu-a", "qwen-7b/1": "gpu-b"}
    mounts = [line.strip() for line in lines if line.strip().startswith("mount ")]
    assert sorted(mounts) == ["mount /srv/models/b -> /root/.cache/huggingface",
                              "mount /var/lib/lmstack/models -> /root/.cache/huggingface"]

    document = json.loads(run("plan", "--dir", str(fleet), "--json").stdout)
    assert document["workers"] == [
        {"name": "gpu-a", "dockerHost": "ssh://root@10.0.0.11:22", "modelCache": "/var/lib/lmstack/models"},
        {"name": "gpu-b", "dockerHost": "ssh://deploy@10.0.0.12:2222", "modelCache": "/srv/models/b"}]
    by_worker = {a["placement"]["worker"]: a["mounts"] for a in document["actions"]}
    assert by_worker["gpu-b"] == [{"host": "/srv/models/b", "container": "/root/.cache/huggingface"}]

    commands = run("plan", "--dir", str(fleet), "--show-commands").stdout
    assert "-v /srv/models/b:/root/.cache/huggingface" in commands


# --- on the test bed: a symlink out of the secrets directory, refused when apply reads it ------------------------


@pytest.mark.testbed
def test_apply_refuses_a_secret_symlink_leading_out(tmp_path: Path, clean_testbed: Any, standin_image: str,
                                                    db: Database) -> None:
    bed = clean_testbed
    home = tmp_path / "home"
    (home / "secrets").mkdir(parents=True)
    (home / "jwt-secret").write_text("the-jwt-secret\n")
    (home / "secrets" / "hf").write_text("hf_inside\n")
    (home / "secrets" / "leak").symlink_to(home / "jwt-secret")  # planted where a push cannot see

    def deployment(name: str, env: str, worker: str) -> str:
        return (f"apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n"
                f"  backend: vllm\n  model: test/{name}\n  image: {standin_image}\n  resources: {{gpus: 0}}\n"
                f"  placement: {{workers: [{worker}]}}\n  env: {env}\n  health: {{startupTimeout: 60s}}\n")

    first, second = bed.hosts[0].name, bed.hosts[1].name
    repo = write_fleet(tmp_path / "fleet", bed, {
        "leak.yaml": deployment("leak", "{TOKEN: {fromFile: leak}}", first),
        "good.yaml": deployment("good", "{TOKEN: {fromFile: hf}, OTHER: {fromEnv: LMSTACK_SECRET_OTHER}}", second),
    }, workers=workers_yaml(bed.hosts, model_cache=lambda host: TESTBED_CACHE_ROOT / host.name), message="secrets")
    settings = Settings(home=home, mount_roots=[TESTBED_CACHE_ROOT])
    source = load_source(repo=str(repo), ref="HEAD", directory=None, settings=settings)
    with Applier(source, db, ssh_key=bed.ssh_key, known_hosts=bed.known_hosts,
                 environ={"LMSTACK_SECRET_OTHER": "other-value", "LMSTACK_JWT_SECRET": "x"}) as applier:
        report = applier.execute(applier.survey())

    failed = {r.action.deployment: r.message for r in report.failed}
    assert set(failed) == {"leak"}, failed
    assert failed["leak"] == ("deployment leak: spec.env.TOKEN.fromFile: 'leak' is not readable in the secrets "
                              "directory (permanent: fix the manifest, the worker or the settings; a later pass "
                              "fails the same way)")
    names = {host.name: bed.docker(host, "ps", "-a", "--format", "{{.Names}}").stdout.split() for host in bed.hosts}
    assert "lmstack-leak-0" not in names[first]  # the replica was not created
    with db.session() as session:
        rows = {r.deployment_name: r for r in session.scalars(select(Replica))}
    assert rows["good"].status == "ready"
    assert "leak" not in rows or rows["leak"].container_id is None
    env = bed.docker(second, "inspect", "--format", "{{json .Config.Env}}", "lmstack-good-0").stdout
    assert "TOKEN=hf_inside" in env and "OTHER=other-value" in env and "the-jwt-secret" not in env

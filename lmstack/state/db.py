"""Opening the database: URL handling, the embedded fallback, and migrations (Alembic, run in-process)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from lmstack.config import Settings

from .embedded import EmbeddedStartError, start_embedded

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Key of the advisory lock held while migrating, so two processes starting at once migrate one after
# the other instead of both trying to create the same tables. Arbitrary, fixed ("lmstack" in ASCII).
MIGRATION_LOCK_KEY = 0x6C6D737461636B

# Without a timeout libpq waits for an unreachable host for as long as TCP does (minutes).
CONNECT_TIMEOUT_S = 10


class DatabaseError(Exception):
    """The database cannot be used."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached (server down, wrong host or port, credentials refused)."""


class SchemaMismatch(DatabaseError):
    """The database schema is at a revision this lmstack does not know (it was migrated by a newer one)."""


class Database:
    """An engine and a session factory for one PostgreSQL database."""

    def __init__(self, engine: Engine, *, embedded: bool = False) -> None:
        self.engine = engine
        # expire_on_commit=False: objects read in a session stay usable after it commits and closes.
        self.sessionmaker: sessionmaker[Session] = sessionmaker(engine, expire_on_commit=False)
        self.embedded = embedded

    @property
    def url(self) -> str:
        """The URL with the password masked, for logs and messages."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed when the block succeeds, rolled back when it raises."""
        with self.sessionmaker.begin() as session:
            yield session

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.url!r})"


def normalize_url(url: str) -> URL:
    """Parse a PostgreSQL URL (`postgres://`, `postgresql://`) and select the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError("not a database URL; expected postgresql://user@host:port/database") from exc
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    raise ValueError(
        f"unsupported database URL scheme {parsed.drivername!r}: lmstack needs PostgreSQL "
        "(postgresql://user@host:port/database)"
    )


def _describe(url: URL) -> str:
    """Where the URL points, without the password."""
    host = url.host or url.query.get("host") or "localhost"
    if isinstance(host, tuple):
        host = ",".join(host)
    port = url.port or url.query.get("port") or 5432
    if isinstance(port, tuple):
        port = ",".join(port)
    return f"{host}:{port} (database {url.database!r}, user {url.username!r})"


def _check_connection(engine: Engine) -> None:
    try:
        with engine.connect() as conn:
            conn.execute(select(1))
    except OperationalError as exc:
        reason = str(exc.orig) if exc.orig is not None else str(exc)
        password = engine.url.password
        if password:
            reason = reason.replace(str(password), "***")
        reason = " ".join(reason.split())  # libpq's messages span lines
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {_describe(engine.url)}: {reason}. Check that the server is "
            "running and reachable from here, and the host, port, user, password and database in "
            "LMSTACK_DATABASE_URL (unset it to use the embedded PostgreSQL)."
        ) from None  # not chained: the driver's exception can carry the connection parameters


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _migrate(database: Database, revision: str, *, up: bool) -> None:
    config = _alembic_config()
    # One transaction for all steps (PostgreSQL DDL is transactional), holding an advisory lock that
    # is released at commit: a second process waits, then finds the schema already at the target.
    with database.engine.begin() as conn:
        conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
        known = _known_revisions(config)
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and current not in known:
            raise SchemaMismatch(
                f"the database at {database.url} has schema revision {current!r}, which this lmstack "
                "does not know: it was migrated by a newer lmstack; upgrade lmstack"
            )
        config.attributes["connection"] = conn
        try:
            if up:
                command.upgrade(config, revision)
            else:
                command.downgrade(config, revision)
        except CommandError as exc:
            raise SchemaMismatch(f"cannot migrate {database.url} to {revision!r}: {exc}") from exc


def _known_revisions(config: Config) -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}


def upgrade(database: Database, revision: str = "head") -> None:
    """Migrate the schema up to `revision`."""
    _migrate(database, revision, up=True)


def downgrade(database: Database, revision: str) -> None:
    """Migrate the schema down to `revision` (`"base"`: drop every lmstack table)."""
    _migrate(database, revision, up=False)


def current_revision(database: Database) -> str | None:
    """The schema revision the database is at; None for a database never migrated."""
    with database.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The newest schema revision this lmstack ships."""
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def open_database(settings: Settings, *, migrate: bool = True, **engine_options: Any) -> Database:
    """Connect to `settings.database_url`, or to the embedded PostgreSQL when it is unset.

    With `migrate` (the default) the schema is upgraded to the newest revision, so a fresh database just
    works. Raises DatabaseUnavailable when the server cannot be reached.
    """
    # An empty LMSTACK_DATABASE_URL= counts as unset.
    embedded = not settings.database_url
    if settings.database_url:
        url = normalize_url(settings.database_url)
    else:
        try:
            url = start_embedded(settings.embedded_database_dir)
        except EmbeddedStartError as exc:
            raise DatabaseUnavailable(str(exc)) from exc
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    # pre_ping: a long-running controller outlives server restarts; stale pooled connections are replaced.
    options: dict[str, Any] = {"pool_pre_ping": True, "connect_args": connect_args, **engine_options}
    engine = create_engine(url, **options)
    database = Database(engine, embedded=embedded)
    try:
        _check_connection(engine)
        if migrate:
            upgrade(database)
    except BaseException:
        engine.dispose()
        raise
    return database

"""A database of a bench run's own, created on the test PostgreSQL and dropped after (bench scripts import it
as a sibling module: they run as `python bench/NAME.py`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def throwaway_database() -> Iterator[str]:
    """The URL of a fresh database (LMSTACK_TEST_POSTGRES's server), dropped when the block ends."""
    admin = make_url(os.environ.get("LMSTACK_TEST_POSTGRES", DEFAULT_ADMIN_URL))
    admin_dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"lmstack_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield admin.set(drivername="postgresql", database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        print(f"dropped database {name}", file=sys.stderr)

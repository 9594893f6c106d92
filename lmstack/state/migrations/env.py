"""Alembic environment, run in-process by lmstack.state.db (there is no alembic.ini).

lmstack passes an open connection in `config.attributes["connection"]`; for development
(`alembic revision --autogenerate`) a URL can be given with `-x url=postgresql+psycopg://...`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from lmstack.state.models import Base

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    # Joins the caller's transaction when there is one (lmstack migrates under an advisory lock in it).
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if url is None:
        raise RuntimeError("pass a database with -x url=postgresql+psycopg://... or run through lmstack")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported")
run_migrations_online()

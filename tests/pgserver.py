"""A PostgreSQL server of a test's own, to stop and start at will (the shared one on 127.0.0.1:5432 must stay
up for every other test). Used through the `throwaway_postgres` fixture in conftest.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class ThrowawayPostgres:
    """A PostgreSQL server of our own (initdb + pg_ctl as the postgres user), to stop and start at will."""

    bin_dir: Path
    root: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._pg(str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w",
                 "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._pg(str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")


@contextmanager
def throwaway_postgres_server() -> Iterator[ThrowawayPostgres]:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found or os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root, runuser and a PostgreSQL server installation (/usr/lib/postgresql/*/bin)")
    root = Path(tempfile.mkdtemp(prefix="lmstack-test-pg-"))
    shutil.chown(root, "postgres", "postgres")
    server = ThrowawayPostgres(found[-1].parent, root, _free_port())
    try:
        server._pg(str(server.bin_dir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres",
                   "--no-sync", "-E", "UTF8")
        server.start()
        yield server
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(server.bin_dir / "pg_ctl"), "-D",
                        str(root / "data"), "-m", "immediate", "-w", "stop"], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

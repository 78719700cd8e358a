"""A throwaway PostgreSQL server on loopback, for the README's target-postgres example.

Started from the machine's PostgreSQL binaries (Debian's postgresql package); as root, as the
`postgres` user, since initdb refuses to run as root. Trust authentication, data in a temporary
directory, stopped at once afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.s3_server import free_port

USER = "tap"
DATABASE = "warehouse"


def postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).parent if found and shutil.which("psql") else None


@dataclass(frozen=True)
class Postgres:
    port: int

    def environment(self) -> dict[str, str]:
        """target-postgres's settings, as Meltano reads them from the environment."""
        return {
            "TARGET_POSTGRES_HOST": "127.0.0.1",
            "TARGET_POSTGRES_PORT": str(self.port),
            "TARGET_POSTGRES_USER": USER,
            "TARGET_POSTGRES_PASSWORD": "unused",
            "TARGET_POSTGRES_DATABASE": DATABASE,
        }

    def query(self, sql: str) -> str:
        command = ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", DATABASE, "-tAc", sql]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    binaries = postgres_bin()
    assert binaries is not None, "no PostgreSQL binaries"
    # Not under pytest's tmp_path: its folders are root's alone (0700), and the server runs as postgres.
    workdir = Path(tempfile.mkdtemp(prefix="tap-postgres-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(workdir, "postgres")
    data, port = workdir / "data", free_port()
    initdb = [*as_user, str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", USER]
    subprocess.run(initdb, check=True, capture_output=True)
    options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [*as_user, str(binaries / "pg_ctl"), "-D", str(data)]
    start = [*pg_ctl, "-o", options, "-l", str(workdir / "postgres.log"), "-w", "start"]
    subprocess.run(start, check=True, capture_output=True)
    try:
        psql = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-d", "postgres"]
        subprocess.run([*psql, "-c", f"CREATE DATABASE {DATABASE}"], check=True, capture_output=True)
        yield Postgres(port)
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)

"""The main job: the tap against the sandbox, through `meltano run`, into DuckDB.

Starts the sandbox (all three emulated APIs) on free 127.0.0.1 ports, hands its URLs and
credentials to Meltano through the extractor's environment variables, runs
`meltano --environment sandbox run tap-commerce-exports target-duckdb` (the sandbox environment keeps
its bookmarks apart from real runs), then prints every loaded table and its rows.
It loads into output/sandbox.duckdb, the sandbox environment's warehouse (meltano.yml), which it
deletes first; a real run's output/warehouse.duckdb (environment dev) is never touched.
Run it with `make demo` (which installs everything first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from commerce_sandbox.server import Sandbox

ROOT = Path(__file__).resolve().parents[1]
#: The sandbox environment's target-duckdb path in meltano.yml; the only file the demo deletes.
WAREHOUSE = ROOT / "output" / "sandbox.duckdb"
SCHEMA = "commerce"


def tap_environment(settings: dict) -> dict[str, str]:
    """Meltano reads an extractor setting from TAP_COMMERCE_EXPORTS_<SETTING>."""
    env = {}
    for name, value in settings.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        env[f"TAP_COMMERCE_EXPORTS_{name.upper()}"] = text
    return env


def print_tables() -> None:
    connection = duckdb.connect(str(WAREHOUSE), read_only=True)
    tables = connection.execute(
        "select table_name from information_schema.tables where table_schema = ? order by table_name", [SCHEMA]
    ).fetchall()
    print(f"\nLoaded into {WAREHOUSE.relative_to(ROOT)} (schema {SCHEMA}):")
    total = 0
    for (table,) in tables:
        (rows,) = connection.execute(f'select count(*) from {SCHEMA}."{table}"').fetchone()
        total += rows
        print(f"  {table:45s} {rows:>8,d} rows")
    print(f"  {'total':45s} {total:>8,d} rows")
    connection.close()


def main() -> int:
    WAREHOUSE.parent.mkdir(exist_ok=True)
    for path in (WAREHOUSE, WAREHOUSE.with_name(WAREHOUSE.name + ".wal")):  # a killed demo's WAL too
        path.unlink(missing_ok=True)
    with Sandbox(export_latency_seconds=1.0) as sandbox:
        settings = {
            "start_date": "2024-01-01T00:00:00Z",
            "end_date": "2024-03-01T00:00:00Z",
            "export_window_days": 15,
            "poll_interval_seconds": 1,
            "poll_max_interval_seconds": 2,
            "max_concurrent_exports": 16,
            **sandbox.tap_config(),
        }
        # Nothing a shell holds for real runs (credentials, batch_config, a TARGET_DUCKDB_PATH) reaches
        # the demo; it loads into the file deleted above.
        real_runs = ("TAP_COMMERCE_EXPORTS_", "TARGET_DUCKDB_")
        env = {
            **{name: value for name, value in os.environ.items() if not name.startswith(real_runs)},
            **tap_environment(settings),
            "TARGET_DUCKDB_PATH": str(WAREHOUSE),
            "MELTANO_SEND_ANONYMOUS_USAGE_STATS": "false",
        }
        meltano = str(Path(sys.executable).parent / "meltano")
        # The sandbox environment keeps the demo's bookmarks apart from a real run's (environment dev).
        command = [
            meltano,
            "--environment",
            "sandbox",
            "run",
            "--full-refresh",
            "tap-commerce-exports",
            "target-duckdb",
        ]
        print(f"Running: {' '.join(command[1:])} (against the sandbox)")
        started = time.monotonic()
        result = subprocess.run(command, cwd=ROOT, env=env)
        elapsed = time.monotonic() - started
    if result.returncode != 0:
        print(f"meltano run failed with exit code {result.returncode}", file=sys.stderr)
        return result.returncode
    print(f"meltano run finished in {elapsed:.1f}s")
    print_tables()
    return 0


if __name__ == "__main__":
    sys.exit(main())

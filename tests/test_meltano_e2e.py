"""End to end through Meltano: `meltano run tap-commerce-exports <target>` against a sandbox in this process.

The tap runs as Meltano runs it (installed plugin venv, config from TAP_COMMERCE_EXPORTS_<SETTING>
env vars, stream selection from TAP_COMMERCE_EXPORTS__SELECT, state in Meltano's system database)
and loads through the real targets of meltano.yml. Nothing is copied: the commands run in the
project root, while every output goes to a temporary folder through env overrides:

- MELTANO_DATABASE_URI -> a sqlite file per module (state, runs); the project's .meltano/meltano.db
  is checked to be unchanged after every command;
- TARGET_DUCKDB_PATH / TARGET_JSONL_DESTINATION_PATH -> per-test files;
- `--state-id-suffix` (Meltano 4.4's `run` has no `--state-id`) -> a unique state id per test,
  `dev:tap-commerce-exports-to-<target>:<suffix>`.

The DuckDB file is written by the loader's duckdb (1.2.2, pinned in meltano.yml because
target-duckdb 0.8.0 with duckdb >= 1.3 drops the first row of each batch: the exact row counts
here catch that). It is read with this venv's duckdb, or with the loader venv's python when this
duckdb cannot open it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from commerce_sandbox.server import Sandbox
from tap_commerce_exports.tap import TapCommerceExports
from tests.postgres_server import postgres_bin, running_postgres

ROOT = Path(__file__).resolve().parents[1]
MELTANO = str(Path(sys.executable).parent / "meltano")
PROJECT_DB = ROOT / ".meltano" / "meltano.db"
LOADER_PYTHON = ROOT / ".meltano" / "loaders" / "target-duckdb" / "venv" / "bin" / "python"
ENVIRONMENT = "dev"  # meltano.yml's default environment; set explicitly so state ids are predictable
SCHEMA = "commerce"  # target-duckdb's default_target_schema in meltano.yml

STREAMS = ("voucherify_orders", "nextcommerce_order_list", "intelligems_orders")
START = "2024-01-01T00:00:00Z"
MIDDLE = "2024-02-01T00:00:00Z"
END = "2024-03-01T00:00:00Z"
UTC = dt.timezone.utc

NUMERIC_TYPES = {"INTEGER", "BIGINT", "HUGEINT", "DOUBLE"}  # and DECIMAL(p, s)
TIMESTAMP_TYPES = {"TIMESTAMP", "TIMESTAMP WITH TIME ZONE"}  # TIMESTAMPTZ as information_schema spells it
COMMAND_TIMEOUT = 300

pytestmark = pytest.mark.skipif(shutil.which(MELTANO) is None, reason=f"{MELTANO} missing: pip install -e '.[dev]'")

# Settings that keep a run short. Numbers are integers: Meltano 4.4 cannot pass `decimal` settings
# given as text (see meltano.yml), so they are declared `integer` there.
FAST_SETTINGS = {
    "start_date": START,
    "export_window_days": 30,
    "poll_interval_seconds": 1,
    "poll_max_interval_seconds": 1,
    "export_timeout_seconds": 120,
    # The sandbox's Next Commerce is raised to 100/s below; the e2e runs are not about pacing.
    "nextcommerce_requests_per_second": 20,
    # Runs here load exact ranges; re-reading recent hours is proven in tests/test_nextcommerce.py.
    "nextcommerce_reread_hours": 0,
    "intelligems_reread_hours": 0,
}


# ------------------------------------------------------------------------------------------ helpers


def file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that would steer Meltano or the plugins elsewhere."""
    dropped = ("TAP_COMMERCE_EXPORTS_", "TARGET_DUCKDB_", "TARGET_JSONL_", "TARGET_POSTGRES_", "MELTANO_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env["MELTANO_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    env["MELTANO_ENVIRONMENT"] = ENVIRONMENT
    return env


def tap_environment(settings: dict[str, Any]) -> dict[str, str]:
    """Meltano reads an extractor setting from TAP_COMMERCE_EXPORTS_<SETTING> (as scripts/demo.py does)."""
    env = {}
    for name, value in settings.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        env[f"TAP_COMMERCE_EXPORTS_{name.upper()}"] = text
    return env


class Meltano:
    """Runs meltano commands in the project root with the module's system database."""

    def __init__(self, database: Path, logs: Path) -> None:
        self.database_uri = f"sqlite:///{database}"
        self.logs = logs
        self.project_db_digest = file_digest(PROJECT_DB)
        self._count = 0

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        full_env = {**clean_environment(), "MELTANO_DATABASE_URI": self.database_uri, **(env or {})}
        result = subprocess.run(
            [MELTANO, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
        self._count += 1
        log = self.logs / f"{self._count:02d}-{'-'.join(a for a in args[:2] if not a.startswith('-'))}.log"
        log.write_text(f"$ meltano {' '.join(args)}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
        assert result.returncode == 0, (
            f"meltano {' '.join(args)} exited {result.returncode} (log: {log}):\n{result.stderr[-6000:]}"
        )
        assert file_digest(PROJECT_DB) == self.project_db_digest, (
            "the project's .meltano/meltano.db changed: MELTANO_DATABASE_URI was not honoured"
        )
        return result


def expected(sandbox: Sandbox, stream: str, start: str = START, end: str = END) -> list[dict]:
    emulator = getattr(sandbox, stream.split("_", 1)[0])
    return emulator.expected_records(stream, start=start, end=end)


def tap_streams(sandbox: Sandbox) -> dict[str, Any]:
    """The tap's own streams (schema, keys) for the sandbox's settings: what the targets were told."""
    tap = TapCommerceExports(config={**FAST_SETTINGS, **sandbox.tap_config()}, parse_env_config=False)
    return {name: tap.streams[name] for name in STREAMS}


def key_of(record: dict, key: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(str(record.get(k)) for k in key)


def duckdb_query(path: Path, sql: str) -> list[tuple]:
    """Rows of one query on the loaded file (read-only), falling back to the loader's own duckdb."""
    try:
        import duckdb

        connection = duckdb.connect(str(path), read_only=True)
        try:
            return [tuple(row) for row in connection.execute(sql).fetchall()]
        finally:
            connection.close()
    except Exception as exc:  # e.g. a storage version this duckdb cannot read
        first_error = exc
    script = (
        "import duckdb, json, sys\n"
        "c = duckdb.connect(sys.argv[1], read_only=True)\n"
        "print(json.dumps(c.execute(sys.argv[2]).fetchall(), default=str))\n"
    )
    result = subprocess.run([str(LOADER_PYTHON), "-c", script, str(path), sql], capture_output=True, text=True)
    assert result.returncode == 0, f"{first_error!r}; loader duckdb also failed: {result.stderr[-2000:]}"
    return [tuple(row) for row in json.loads(result.stdout)]


def duckdb_columns(path: Path, table: str) -> dict[str, str]:
    rows = duckdb_query(
        path,
        f"select column_name, data_type from information_schema.columns "
        f"where table_schema = '{SCHEMA}' and table_name = '{table}' order by ordinal_position",
    )
    return dict(rows)


def duckdb_records(path: Path, table: str) -> list[dict]:
    columns = list(duckdb_columns(path, table))
    quoted = ", ".join(f'"{c}"' for c in columns)
    return [dict(zip(columns, row)) for row in duckdb_query(path, f'select {quoted} from {SCHEMA}."{table}"')]


def kind_of(prop: dict) -> str:
    types = prop.get("type", [])
    types = [types] if isinstance(types, str) else types
    if "object" in types or "array" in types:
        return "json"
    if "integer" in types or "number" in types:
        return "number"
    if "string" in types and prop.get("format") == "date-time":
        return "timestamp"
    if "boolean" in types:
        return "boolean"
    return "string"


def canonical(value: Any, kind: str) -> Any:
    """One form for a value whether it came from the tap (JSON-ish) or from DuckDB (typed or as text)."""
    if value is None:
        return None
    if kind == "timestamp":
        moment = value if isinstance(value, dt.datetime) else instant(str(value))
        if moment.tzinfo is not None:  # target-duckdb stores UTC instants as naive TIMESTAMP
            moment = moment.astimezone(UTC).replace(tzinfo=None)
        return moment
    if kind == "json":
        return json.loads(value) if isinstance(value, str) else value
    if kind == "number":
        return float(value)
    if kind == "boolean" and isinstance(value, str):
        return value.lower() == "true"
    return value


def same_values(loaded: dict, want: dict, schema: dict) -> list[str]:
    """Differences between a loaded row and the record the sandbox says the tap must emit.

    Columns the sandbox's record leaves out are not compared here (see check_order_metadata).
    """
    problems = []
    for column, prop in schema["properties"].items():
        if column not in want:
            continue
        kind = kind_of(prop)
        got, exp = canonical(loaded.get(column), kind), canonical(want.get(column), kind)
        if kind == "number" and got is not None and exp is not None:
            equal = math.isclose(got, exp, rel_tol=1e-12, abs_tol=1e-9)
        else:
            equal = got == exp
        if not equal:
            problems.append(f"{column}: loaded {str(got)[:80]!r}, expected {str(exp)[:80]!r}")
    return problems


def check_order_metadata(rows) -> None:
    """Voucherify orders carry `metadata` (the whole object, JSON), which the sandbox's expected records
    leave out (as tests/test_voucherify.py notes): it must agree with the metadata_<name> columns."""
    with_metadata = 0
    for row in rows:
        metadata = canonical(row["metadata"], "json") or {}
        with_metadata += bool(metadata)
        assert metadata.get("payment_mean") == row["metadata_payment_mean"], row["id"]
        assert metadata.get("channel") == row["metadata_channel"], row["id"]
    assert with_metadata, "no order has metadata: the JSON column was never exercised"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def meltano(tmp_path_factory) -> Meltano:
    """The plugins installed once (quick when already installed) with a system database in tmp."""
    base = tmp_path_factory.mktemp("meltano")
    runner = Meltano(base / "meltano.db", base)
    for kind, name in (("extractor", "tap-commerce-exports"), ("loader", "target-duckdb"), ("loader", "target-jsonl")):
        runner("install", kind, name)
    assert (base / "meltano.db").exists(), "MELTANO_DATABASE_URI did not create the temporary system database"
    return runner


@pytest.fixture
def sandbox():
    with Sandbox(export_latency_seconds=0.05) as running:
        # Next Commerce allows 4 requests/s (burst 4); the e2e runs are not about pacing.
        running.nextcommerce.rate_per_second = 100
        running.nextcommerce.rate_burst = 100
        yield running


class Pipeline:
    """`meltano run tap-commerce-exports <target>` for STREAMS, with one state id for the whole test."""

    def __init__(self, meltano: Meltano, sandbox: Sandbox, workdir: Path, streams: tuple[str, ...] = STREAMS) -> None:
        self.meltano = meltano
        self.sandbox = sandbox
        self.workdir = workdir
        self.streams = streams
        self.suffix = f"e2e{uuid.uuid4().hex[:12]}"
        self.warehouse = workdir / "warehouse.duckdb"
        self.jsonl_dir = workdir / "jsonl"
        self.jsonl_dir.mkdir()
        #: The target's settings besides the DuckDB and JSONL paths (target-postgres's server).
        self.target_env: dict[str, str] = {}

    def state_id(self, target: str) -> str:
        return f"{ENVIRONMENT}:tap-commerce-exports-to-{target}:{self.suffix}"

    def run(
        self, target: str, *, end_date: str, env: dict[str, str] | None = None, full_refresh: bool = False
    ) -> subprocess.CompletedProcess:
        settings = {**FAST_SETTINGS, "end_date": end_date, **self.sandbox.tap_config()}
        run_env = {
            **tap_environment(settings),
            "TAP_COMMERCE_EXPORTS__SELECT": json.dumps([f"{stream}.*" for stream in self.streams]),
            "TARGET_DUCKDB_PATH": str(self.warehouse),
            "TARGET_JSONL_DESTINATION_PATH": str(self.jsonl_dir),
            **self.target_env,
            **(env or {}),
        }
        refresh = ["--full-refresh"] if full_refresh else []
        result = self.meltano(
            "run", *refresh, "--state-id-suffix", self.suffix, "tap-commerce-exports", target, env=run_env
        )
        assert f"Running job with name '{self.state_id(target)}'" in result.stderr + result.stdout
        return result

    def state(self, target: str) -> dict:
        result = self.meltano("state", "get", self.state_id(target))
        return json.loads(result.stdout)["singer_state"]

    def tables(self) -> set[str]:
        rows = duckdb_query(
            self.warehouse, f"select table_name from information_schema.tables where table_schema = '{SCHEMA}'"
        )
        return {name for (name,) in rows}

    def count(self, table: str, where: str = "true") -> int:
        ((rows,),) = duckdb_query(self.warehouse, f'select count(*) from {SCHEMA}."{table}" where {where}')
        return int(rows)


@pytest.fixture
def pipeline(meltano, sandbox, tmp_path) -> Pipeline:
    return Pipeline(meltano, sandbox, tmp_path)


def bookmark(state: dict, stream: str) -> str:
    return state["bookmarks"][stream]["replication_key_value"]


def partition_bookmarks(state: dict, stream: str) -> dict[str, str]:
    """Bookmark per experience; a partition with no window yet (not started by end_date) has none."""
    return {
        p["context"]["experience_id"]: p["replication_key_value"]
        for p in state["bookmarks"][stream].get("partitions", [])
        if "replication_key_value" in p
    }


def instant(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# ------------------------------------------------------------------------------------------ tests


def test_duckdb_rows_and_column_types(pipeline, sandbox):
    """Every expected row lands once, with its values, in typed DuckDB columns; only selected streams load."""
    pipeline.run("target-duckdb", end_date=END)

    assert pipeline.tables() == set(STREAMS), "TAP_COMMERCE_EXPORTS__SELECT was not applied"
    streams = tap_streams(sandbox)
    kinds_seen = set()
    for name in STREAMS:
        stream, want = streams[name], expected(sandbox, name)
        assert want, f"the sandbox has no {name} rows: the test would prove nothing"
        assert pipeline.count(name) == len(want), name

        columns = duckdb_columns(pipeline.warehouse, name)
        for column, prop in stream.schema["properties"].items():
            kind = kind_of(prop)
            assert column in columns, f"{name}.{column} missing; table has {sorted(columns)}"
            data_type = columns[column]
            if kind == "number":
                kinds_seen.add(kind)
                assert data_type in NUMERIC_TYPES or data_type.startswith("DECIMAL"), f"{name}.{column}: {data_type}"
            elif kind == "timestamp":
                kinds_seen.add(kind)
                assert data_type in TIMESTAMP_TYPES, f"{name}.{column}: {data_type}"
            elif kind == "json":
                kinds_seen.add(kind)
                assert data_type == "JSON", f"{name}.{column}: {data_type}"

        keys = tuple(stream.primary_keys)
        loaded = {key_of(row, keys): row for row in duckdb_records(pipeline.warehouse, name)}
        wanted = {key_of(record, keys): record for record in want}
        assert loaded.keys() == wanted.keys(), name
        problems = {k: p for k, row in loaded.items() if (p := same_values(row, wanted[k], stream.schema))}
        assert not problems, f"{name}: {len(problems)} rows differ, e.g. {next(iter(problems.items()))}"
        unchecked = set(stream.schema["properties"]) - set().union(*want) - {"metadata"}
        # Known columns this seed's files leave out (the vendor publishes none): in the table, all null.
        assert all(row[column] is None for row in loaded.values() for column in unchecked), (name, unchecked)
        if name == "voucherify_orders":
            check_order_metadata(loaded.values())
    assert kinds_seen == {"number", "timestamp", "json"}


def test_incremental_second_run_loads_only_new_rows(pipeline, sandbox):
    """Run 1 to 2024-02-01, rows added, run 2 (same state id) to 2024-03-01: only the new range is loaded."""
    metadata = {"TARGET_DUCKDB_ADD_METADATA_COLUMNS": "true"}  # _sdc_batched_at tells the runs apart
    pipeline.run("target-duckdb", end_date=MIDDLE, env=metadata)

    first = {name: expected(sandbox, name, START, MIDDLE) for name in STREAMS}
    for name in STREAMS:
        assert first[name], name
        assert pipeline.count(name) == len(first[name]), name
    state_1 = pipeline.state("target-duckdb")
    for name in ("voucherify_orders", "nextcommerce_order_list"):
        assert instant(bookmark(state_1, name)) == instant(MIDDLE), name
    ig_1 = partition_bookmarks(state_1, "intelligems_orders")
    assert ig_1 and all(instant(value) <= instant(MIDDLE) for value in ig_1.values()), ig_1
    last_batch = {
        name: duckdb_query(pipeline.warehouse, f'select max(_sdc_batched_at) from {SCHEMA}."{name}"')[0][0]
        for name in STREAMS
    }

    added_window = ("2024-02-10T00:00:00Z", "2024-02-20T00:00:00Z")
    added = {"voucherify_orders": 7, "nextcommerce_order_list": 5, "intelligems_orders": 4}
    unchanged_range = {name: expected(sandbox, name, MIDDLE, END) for name in STREAMS}
    sandbox.voucherify.add_rows("voucherify_orders", added["voucherify_orders"], *added_window)
    sandbox.nextcommerce.add_rows("nextcommerce_order_list", added["nextcommerce_order_list"], *added_window)
    # Intelligems: into the earliest running experience (alive until 2024-03-01).
    sandbox.intelligems.add_rows("intelligems_orders", added["intelligems_orders"], *added_window)
    new = {name: expected(sandbox, name, MIDDLE, END) for name in STREAMS}
    total = {name: expected(sandbox, name, START, END) for name in STREAMS}

    pipeline.run("target-duckdb", end_date=END, env=metadata)

    streams = tap_streams(sandbox)
    for name in STREAMS:
        assert len(new[name]) == len(unchanged_range[name]) + added[name], name
        assert len(total[name]) == len(first[name]) + len(new[name]), name
        assert pipeline.count(name) == len(total[name]), name
        keys = tuple(streams[name].primary_keys)
        loaded = {key_of(row, keys) for row in duckdb_records(pipeline.warehouse, name)}
        assert loaded == {key_of(record, keys) for record in total[name]}, name
        # Run 2 wrote exactly the new range (a re-sent old row would carry run 2's _sdc_batched_at).
        marker = f"_sdc_batched_at > '{last_batch[name]}'"
        assert pipeline.count(name, marker) == len(new[name]), name
        assert pipeline.count(name, f"not ({marker})") == len(first[name]), name

    state_2 = pipeline.state("target-duckdb")
    for name in ("voucherify_orders", "nextcommerce_order_list"):
        assert instant(bookmark(state_2, name)) == instant(END), name
    ig_2 = partition_bookmarks(state_2, "intelligems_orders")
    assert set(ig_1) <= set(ig_2)
    assert all(instant(ig_2[p]) >= instant(ig_1[p]) for p in ig_1), (ig_1, ig_2)
    assert any(instant(ig_2[p]) > instant(ig_1[p]) for p in ig_1), "no Intelligems bookmark moved"
    assert max(instant(value) for value in ig_2.values()) == instant(END)


def test_jsonl_files_hold_every_record(pipeline, sandbox):
    """The same streams through target-jsonl: one file per stream, one line per expected record."""
    pipeline.run("target-jsonl", end_date=END)

    files = {path.name for path in pipeline.jsonl_dir.iterdir()}
    assert files == {f"{name}.jsonl" for name in STREAMS}
    streams = tap_streams(sandbox)
    for name in STREAMS:
        lines = (pipeline.jsonl_dir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        want = expected(sandbox, name)
        assert len(lines) == len(want), name
        keys = tuple(streams[name].primary_keys)
        assert sorted(key_of(json.loads(line), keys) for line in lines) == sorted(key_of(r, keys) for r in want)
    assert bookmark(pipeline.state("target-jsonl"), "voucherify_orders")


class SettingDropped(AssertionError):
    """A setting given to Meltano never reached the tap's config."""


def test_every_tap_setting_reaches_the_tap(meltano, sandbox):
    """Each setting this module gives as TAP_COMMERCE_EXPORTS_<SETTING> is in the config Meltano hands the tap."""
    settings = {**FAST_SETTINGS, "end_date": END, **sandbox.tap_config()}
    result = meltano("config", "print", "tap-commerce-exports", env=tap_environment(settings))
    config = json.loads(result.stdout)
    assert config["voucherify_api_url"] == settings["voucherify_api_url"]  # the env vars do arrive
    assert config["poll_interval_seconds"] == 1  # as an integer, not "1" or Decimal
    missing = sorted(name for name in settings if name not in config)
    if missing:
        raise SettingDropped(f"Meltano dropped {missing}: declare them under the extractor's settings in meltano.yml")


def test_meltano_config_test_passes_with_good_credentials_and_fails_clearly_with_bad(meltano, sandbox):
    """`meltano config test tap-commerce-exports`: the tap checks every source's credentials first."""
    settings = {**FAST_SETTINGS, "end_date": END, **sandbox.tap_config()}
    passed = meltano("config", "test", "tap-commerce-exports", env=tap_environment(settings))
    assert "Plugin configuration is valid" in passed.stdout + passed.stderr

    bad = {**settings, "nextcommerce_api_token": "not-the-token"}
    env = {**clean_environment(), "MELTANO_DATABASE_URI": meltano.database_uri, **tap_environment(bad)}
    failed = subprocess.run(
        [MELTANO, "config", "test", "tap-commerce-exports"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert failed.returncode != 0
    assert "nextcommerce refused the credentials" in failed.stdout + failed.stderr, failed.stderr[-3000:]
    assert "not-the-token" not in failed.stdout + failed.stderr


# ------------------------------------------------------------------ files unlike the tap's guesses

GUESSED_STREAMS = (
    "nextcommerce_order_list",
    "nextcommerce_transaction_list",
    "nextcommerce_customer_list",
    "intelligems_order_line_items",
    "intelligems_order_reconciliation",
)


def as_utc_text(cell: str, zone: Any) -> str | None:
    try:
        moment = dt.datetime.fromisoformat(cell)
    except ValueError:
        return None
    return (moment.replace(tzinfo=zone) if moment.tzinfo is None else moment).astimezone(UTC).isoformat()


TEXT_TYPES = {"VARCHAR", "TEXT", "CHARACTER VARYING"}
WHOLE_NUMBER_TYPES = {"SMALLINT", "INTEGER", "BIGINT", "HUGEINT"}


def loaded_as_written(value: Any, cell: str, data_type: str, zone: Any) -> bool:
    """Whether a warehouse value is the CSV cell, read the way its column's type reads it (DuckDB's
    and Postgres's type names)."""
    data_type = data_type.upper()
    if cell == "" or value is None:
        return cell == "" and value is None
    if data_type in TEXT_TYPES:
        return value == cell
    if data_type == "BOOLEAN":
        return value == (cell.strip().lower() in ("true", "t", "yes", "y", "1"))
    if data_type in WHOLE_NUMBER_TYPES or data_type in ("NUMERIC", "DOUBLE", "DOUBLE PRECISION"):
        return math.isclose(float(value), float(cell), rel_tol=1e-12)
    if data_type.startswith(("DECIMAL", "NUMERIC")):
        return math.isclose(float(value), float(cell), rel_tol=1e-12)
    if data_type in TIMESTAMP_TYPES or data_type == "TIMESTAMP WITHOUT TIME ZONE":
        moment = dt.datetime.fromisoformat(cell)
        moment = moment.replace(tzinfo=zone) if moment.tzinfo is None else moment
        got = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
        return got == moment.astimezone(UTC).replace(tzinfo=None)
    if data_type in ("JSON", "JSONB"):
        return (json.loads(value) if isinstance(value, str) else value) == json.loads(cell)
    if data_type == "DATE":
        return str(value) == cell
    raise AssertionError(f"unexpected column type {data_type}")


class DuckDbTables:
    """The loaded tables of a DuckDB warehouse, as the checks below read them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def columns(self, table: str) -> dict[str, str]:
        return duckdb_columns(self.path, table)

    def rows(self, table: str) -> list[dict]:
        return duckdb_records(self.path, table)

    def count(self, table: str, where: str = "true") -> int:
        ((rows,),) = duckdb_query(self.path, f'select count(*) from {SCHEMA}."{table}" where {where}')
        return int(rows)


class PostgresTables:
    """The loaded tables of one schema of a Postgres warehouse (values as row_to_json gives them)."""

    def __init__(self, server: Any, schema: str) -> None:
        self.server, self.schema = server, schema

    def columns(self, table: str) -> dict[str, str]:
        text = self.server.query(
            "select json_object_agg(column_name, data_type) from information_schema.columns "
            f"where table_schema = '{self.schema}' and table_name = '{table}'"
        )
        return json.loads(text or "{}")

    def rows(self, table: str) -> list[dict]:
        text = self.server.query(f"select coalesce(json_agg(t), '[]') from {self.schema}.\"{table}\" t")
        return json.loads(text, parse_float=decimal.Decimal)

    def count(self, table: str, where: str = "true") -> int:
        return int(self.server.query(f'select count(*) from {self.schema}."{table}" where {where}'))


def check_every_cell_loaded(tables: Any, stream: Any, raw: list[dict], zone: Any) -> set[str]:
    """Every row of the files is in the table once, and every cell is either in its column, read as
    the column's type reads it, or (a cell that did not fit) exactly as written in its text companion.
    Returns the columns with a companion."""
    name = stream.name
    assert tables.count(name) == len(raw), name
    columns = tables.columns(name)
    assert not [c for c in columns if c.rsplit("_", 2)[-2:][0].isdigit()], f"{name}: a column was versioned: {columns}"
    key = tuple(stream.primary_keys)
    loaded = {tuple(row[k] for k in key): row for row in tables.rows(name)}
    for cells in raw:
        row = loaded[tuple(cells[k] for k in key)]
        wrong = [
            c
            for c, cell in cells.items()
            if not loaded_as_written(row[c], cell, columns[c], zone)
            and not (row[c] is None and row.get(f"{c}__text") == cell)
        ]
        assert not wrong, f"{name} {cells[key[-1]]}: {[(c, row[c], cells[c], columns[c]) for c in wrong][:3]}"
    companions = {c.removesuffix("__text") for c in columns if c.endswith("__text")}
    for c in companions:
        assert columns[f"{c}__text"].upper() in TEXT_TYPES, (name, c)
        assert not [row for row in loaded.values() if row[c] is not None and row[f"{c}__text"] is not None]
    return companions


def check_files_unlike_the_guesses_load(pipeline: Pipeline, tables: Any, target: str) -> None:
    """Run 1 loads clean Next Commerce files and messy Intelligems ones; run 2 loads messy files of
    both. Every row lands, each cell as written; no column ever changes type (so no loader is asked
    to alter one), and cells that do not fit their column are in its text companion."""
    sandbox = pipeline.sandbox
    sandbox.intelligems.messy_cells = True
    streams = {
        name: TapCommerceExports(config={**FAST_SETTINGS, **sandbox.tap_config()}).streams[name]
        for name in GUESSED_STREAMS
    }
    zones = {
        name: ZoneInfo(sandbox.nextcommerce.store_timezone if name.startswith("nextcommerce") else "UTC")
        for name in GUESSED_STREAMS
    }
    raw = {name: getattr(sandbox, name.split("_", 1)[0]).raw_rows(name, end=MIDDLE) for name in GUESSED_STREAMS}
    pipeline.run(target, end_date=MIDDLE)
    first_types = {}
    for name, stream in streams.items():
        check_every_cell_loaded(tables, stream, raw[name], zones[name])
        first_types[name] = tables.columns(name)

    sandbox.nextcommerce.messy_cells = True
    for name in GUESSED_STREAMS:
        raw[name] += getattr(sandbox, name.split("_", 1)[0]).raw_rows(name, start=MIDDLE, end=END)
    pipeline.run(target, end_date=END)
    state = pipeline.state(target)
    for name, stream in streams.items():
        companions = check_every_cell_loaded(tables, stream, raw[name], zones[name])
        assert companions, f"{name}: the messy files put no cell beside its column"
        assert set(state["bookmarks"][name]["columns_with_text_companion"]) == companions, name
        now = tables.columns(name)
        assert {c: t for c, t in now.items() if c in first_types[name]} == first_types[name], name


def test_files_unlike_the_guesses_load_every_row_and_cell_into_duckdb(meltano, sandbox, tmp_path):
    """Next Commerce and Intelligems publish no columns: their files here carry ids of any shape, N/A
    in a number column, another date format, yes/no booleans, text in a JSON column and a renamed
    column, from the first run (Intelligems) or only from the second (Next Commerce)."""
    pipeline = Pipeline(meltano, sandbox, tmp_path, GUESSED_STREAMS)
    check_files_unlike_the_guesses_load(pipeline, DuckDbTables(pipeline.warehouse), "target-duckdb")


@pytest.fixture(scope="module")
def postgres_server(meltano):
    """A throwaway PostgreSQL and meltano.yml's target-postgres, for the tests that load it."""
    if postgres_bin() is None:
        pytest.skip("no PostgreSQL binaries (Debian's postgresql package)")
    meltano("install", "loader", "target-postgres")
    with running_postgres() as server:
        yield server


def postgres_pipeline(meltano, sandbox, tmp_path, server, streams: tuple[str, ...]) -> tuple[Pipeline, PostgresTables]:
    """A Pipeline into its own schema of the server, so tests never see each other's tables."""
    pipeline = Pipeline(meltano, sandbox, tmp_path, streams)
    schema = f"s_{pipeline.suffix}"
    pipeline.target_env = {**server.environment(), "TARGET_POSTGRES_DEFAULT_TARGET_SCHEMA": schema}
    return pipeline, PostgresTables(server, schema)


def test_files_unlike_the_guesses_load_every_row_and_cell_into_postgres(meltano, sandbox, tmp_path, postgres_server):
    """The same files into target-postgres, which refuses to alter a column's type: every row loads,
    since no column ever changes type."""
    pipeline, tables = postgres_pipeline(meltano, sandbox, tmp_path, postgres_server, GUESSED_STREAMS)
    check_files_unlike_the_guesses_load(pipeline, tables, "target-postgres")


def test_the_sdks_own_settings_reach_the_tap_from_the_environment(meltano, sandbox):
    """`batch_config` and the other SDK settings are declared, so Meltano passes them on."""
    batch = {"encoding": {"format": "jsonl", "compression": "gzip"}, "storage": {"root": "file:///tmp/b"}}
    settings = {**sandbox.tap_config(), "batch_config": batch, "flattening_enabled": True}
    result = meltano("config", "print", "tap-commerce-exports", env=tap_environment(settings))
    config = json.loads(result.stdout)
    assert config["batch_config"] == batch and config["flattening_enabled"] is True


def test_a_merged_state_cannot_bring_back_exports_already_read(pipeline, sandbox):
    """Meltano merges a run's state into the stored one, so a key the tap removed would survive: an
    export an earlier, killed run had in flight would be resumed again and again. The tap empties the
    list instead of removing it."""
    pipeline.run("target-duckdb", end_date=MIDDLE)
    stale = pipeline.state("target-duckdb")
    window = {"window_start": "2024-01-01T00:00:00+00:00", "window_end": "2024-01-31T00:00:00+00:00"}
    stale["bookmarks"]["voucherify_orders"]["exports_in_flight"] = [{"export_id": "exp_killed_run", **window}]
    pipeline.meltano("state", "set", "--force", pipeline.state_id("target-duckdb"), json.dumps({"singer_state": stale}))

    pipeline.run("target-duckdb", end_date=MIDDLE, full_refresh=True)
    merged = pipeline.state("target-duckdb")
    for name in ("voucherify_orders", "nextcommerce_order_list"):
        assert merged["bookmarks"][name]["exports_in_flight"] == [], name


def test_warehouse_values_as_users_query_them(meltano, sandbox, tmp_path):
    """Empty JSON cells are SQL NULL (not the JSON literal 'null'); ids keep their text; money is a
    number. What the loader cannot do is stated in the README: target-duckdb 0.8 stores JSON numbers as
    DOUBLE and `format: date` columns as VARCHAR (ISO dates, cast with ::DATE)."""
    pipeline = Pipeline(meltano, sandbox, tmp_path, ("nextcommerce_order_list", "voucherify_customers"))
    pipeline.run("target-duckdb", end_date=END)
    name = "nextcommerce_order_list"
    want = expected(sandbox, name)
    empty = sum(1 for record in want if record.get("metadata") is None)
    assert 0 < empty < len(want), "the data should hold empty and filled metadata cells"
    assert pipeline.count(name, "metadata is null") == empty
    assert pipeline.count(name, "metadata::varchar = 'null'") == 0
    columns = duckdb_columns(pipeline.warehouse, name)
    assert columns["order_number"] == "VARCHAR" and columns["total_incl_tax"] == "DOUBLE"
    ids = {record["order_number"] for record in want}
    loaded = {row[0] for row in duckdb_query(pipeline.warehouse, f'select order_number from {SCHEMA}."{name}"')}
    assert loaded == ids  # leading zeros, letters and all
    customers = {c["id"]: c for c in expected(sandbox, "voucherify_customers")}
    assert duckdb_columns(pipeline.warehouse, "voucherify_customers")["birthday"] == "VARCHAR"
    birthdays = duckdb_query(pipeline.warehouse, f"select id, birthday::date from {SCHEMA}.voucherify_customers")
    assert len(birthdays) == len(customers) and any(day for _, day in birthdays)
    assert all((str(day) if day else None) == customers[id_]["birthday"] for id_, day in birthdays)


def test_warehouse_values_in_postgres_as_users_query_them(meltano, sandbox, tmp_path, postgres_server):
    """target-postgres keeps money exact (NUMERIC), dates as DATE and instants as UTC TIMESTAMP without a
    zone. It stores an absent JSON value as the JSON literal null (SQLAlchemy's JSONB default), which
    the README's query `NULLIF(metadata, 'null'::jsonb) IS NULL` finds."""
    streams = ("nextcommerce_order_list", "voucherify_customers")
    pipeline, tables = postgres_pipeline(meltano, sandbox, tmp_path, postgres_server, streams)
    pipeline.run("target-postgres", end_date=END)
    name = "nextcommerce_order_list"
    want = {record["order_number"]: record for record in expected(sandbox, name)}
    empty = sum(1 for record in want.values() if record.get("metadata") is None)
    assert 0 < empty < len(want)
    columns = tables.columns(name)
    assert columns["metadata"] == "jsonb" and columns["order_number"] == "text"
    assert tables.count(name, "nullif(metadata, 'null'::jsonb) is null") == empty
    assert columns["total_incl_tax"] == "numeric" and columns["date_created"] == "timestamp without time zone"
    raw = {row["order_number"]: row for row in sandbox.nextcommerce.raw_rows(name)}
    rows = tables.rows(name)
    assert {row["order_number"] for row in rows} == set(want)
    for row in rows:
        cell = raw[row["order_number"]]["total_incl_tax"]
        assert row["total_incl_tax"] == (decimal.Decimal(cell) if cell else None), row["order_number"]  # exact
        moment = dt.datetime.fromisoformat(row["date_created"]).replace(tzinfo=UTC)
        assert moment == instant(want[row["order_number"]]["date_created"]), row["order_number"]  # UTC
    customers = {c["id"]: c for c in expected(sandbox, "voucherify_customers")}
    assert tables.columns("voucherify_customers")["birthday"] == "date"
    loaded = {row["id"]: row["birthday"] for row in tables.rows("voucherify_customers")}
    assert loaded == {id_: customer["birthday"] for id_, customer in customers.items()}

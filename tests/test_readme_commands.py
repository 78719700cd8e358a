"""The README's shell commands, run verbatim as a new user would type them, against the sandbox.

Each block is taken from the README itself, so the README cannot drift from what works. Commands that
change the project (`meltano config set` writes meltano.yml and .env) run in a copy of the project
that shares the installed plugins; the sandbox stands in for the vendors through the environment a
user would set (credentials, the API URL of the cluster).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from commerce_sandbox.server import Sandbox
from tap_commerce_exports.sources import SOURCES
from tests.postgres_server import postgres_bin, running_postgres
from tests.s3_server import LocalS3

ROOT = Path(__file__).resolve().parents[1]
#: Every stream of every source: the sandbox serves them all.
STREAM_COUNT = sum(len(source.stream_types) for source in SOURCES)
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
TARGET_JSONL_BIN = ROOT / ".meltano" / "loaders" / "target-jsonl" / "venv" / "bin"

pytestmark = pytest.mark.skipif(not (BIN / "meltano").exists(), reason=f"{BIN / 'meltano'} missing: make setup")


@pytest.fixture(scope="module", autouse=True)
def plugins_installed(tmp_path_factory):
    """The plugins the blocks use, installed as a fresh clone would (quick when they already are)."""
    env = {**os.environ, "MELTANO_DATABASE_URI": f"sqlite:///{tmp_path_factory.mktemp('install') / 'm.db'}"}
    plugins = [("extractor", "tap-commerce-exports"), ("loader", "target-duckdb"), ("loader", "target-jsonl")]
    if postgres_bin() is not None:  # for the object-storage example
        plugins.append(("loader", "target-postgres"))
    for kind, name in plugins:
        subprocess.run(
            [str(BIN / "meltano"), "install", kind, name], cwd=ROOT, env=env, check=True, capture_output=True
        )


#: README bash blocks no test here runs, and why; every other block is run by a `bash_block(...)` call
#: below (tests/test_project_files.py checks that each block is one or the other).
NOT_RUN_HERE = {
    "## Quick start": "`make demo` and `make test` set up .venv themselves and take minutes; the demo's"
    " steps (plugins installed, the sandbox, `meltano --environment sandbox run`) are what the blocks"
    " below and tests/test_project_files.py cover",
}


def readme_bash_blocks(text: str = README) -> list[tuple[str, str]]:
    """Every ```bash block of the README with the heading it is under: (heading line, block). Lines in
    fenced blocks (`# comments` in YAML or bash) are not headings."""
    blocks: list[tuple[str, str]] = []
    heading, fence, body = "", None, []
    for line in text.splitlines(keepends=True):
        if fence is None:
            if line.startswith("```"):
                fence, body = line[3:].strip(), []
            elif line.startswith("#"):
                heading = line.strip()
        elif line.startswith("```"):
            if fence == "bash":
                blocks.append((heading, "".join(body)))
            fence = None
        else:
            body.append(line)
    return blocks


def bash_block(heading: str) -> str:
    """The bash block under `heading` in the README: exactly one, so none goes unrun beside it."""
    found = [block for under, block in readme_bash_blocks() if under == heading]
    assert len(found) == 1, f"{len(found)} bash blocks under {heading!r}: a test runs one block per heading"
    return found[0]


def project_copy(tmp_path: Path) -> Path:
    """meltano.yml and plugins/ copied; the installed venvs and plugins shared (read, not changed)."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "meltano.yml", project)
    shutil.copytree(ROOT / "plugins", project / "plugins")
    (project / "output").mkdir()  # as a clone has it (output/.gitkeep): target-duckdb makes no folders
    shutil.copy(ROOT / "output" / ".gitkeep", project / "output")
    (project / ".venv").symlink_to(ROOT / ".venv")
    (project / ".meltano").mkdir()
    for kind in ("extractors", "loaders"):
        (project / ".meltano" / kind).symlink_to(ROOT / ".meltano" / kind)
    return project


def run_block(block: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    dropped = ("TAP_COMMERCE_EXPORTS_", "TARGET_", "MELTANO_")
    base = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    path = f"{BIN}:{TARGET_JSONL_BIN}:{base.get('PATH', '')}"
    full = {**base, "PATH": path, "MELTANO_SEND_ANONYMOUS_USAGE_STATS": "false", **env}
    script = "set -euo pipefail\n" + block
    result = subprocess.run(["bash", "-c", script], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"README block failed:\n{block}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"
    )
    return result


def duckdb_tables(path: Path) -> dict[str, int]:
    import duckdb

    connection = duckdb.connect(str(path), read_only=True)
    try:
        names = [row[0] for row in connection.execute("select table_name from information_schema.tables").fetchall()]
        return {name: connection.execute(f'select count(*) from commerce."{name}"').fetchone()[0] for name in names}
    finally:
        connection.close()


def test_the_meltano_commands_work_as_written(tmp_path):
    """`meltano config set` / `invoke :check` / `config test` / `run`, with the user's credentials in
    the environment (the sandbox's, and its URL as the cluster's)."""
    project = project_copy(tmp_path)
    with Sandbox(("voucherify",), export_latency_seconds=0.05) as sandbox:
        config = sandbox.voucherify.tap_config()
        env = {
            "VOUCHERIFY_APP_ID": config["voucherify_app_id"],
            "VOUCHERIFY_APP_TOKEN": config["voucherify_app_token"],
            "TAP_COMMERCE_EXPORTS_VOUCHERIFY_API_URL": config["voucherify_api_url"],
            "TAP_COMMERCE_EXPORTS_END_DATE": "2024-03-01T00:00:00Z",
            "TAP_COMMERCE_EXPORTS_POLL_INTERVAL_SECONDS": "1",
            "MELTANO_DATABASE_URI": f"sqlite:///{tmp_path / 'meltano.db'}",
        }
        result = run_block(bash_block("## Using it with Meltano"), project, env)
    assert "PASS: voucherify" in result.stdout + result.stderr
    assert config["voucherify_app_token"] in (project / ".env").read_text()  # where Meltano keeps secrets
    assert config["voucherify_app_token"] not in (project / "meltano.yml").read_text()
    tables = duckdb_tables(project / "output" / "warehouse.duckdb")
    assert tables["voucherify_orders"] == len(sandbox.voucherify.expected_records("voucherify_orders"))


def test_meltano_run_against_a_standalone_sandbox_keeps_its_own_state(tmp_path):
    project = project_copy(tmp_path)
    env = {"MELTANO_DATABASE_URI": f"sqlite:///{tmp_path / 'meltano.db'}"}
    run_block(bash_block("### Try `meltano run` against the sandbox"), project, env, timeout=600)
    tables = duckdb_tables(project / "output" / "sandbox.duckdb")  # the sandbox environment's own file
    assert len(tables) == STREAM_COUNT and all(tables.values()), tables
    assert not (project / "output" / "warehouse.duckdb").exists()  # a real run's warehouse is untouched
    listed = subprocess.run(
        [str(BIN / "meltano"), "state", "list"], cwd=project, env={**os.environ, **env}, capture_output=True, text=True
    )
    assert "sandbox:tap-commerce-exports-to-target-duckdb" in listed.stdout
    assert "dev:" not in listed.stdout  # a real run's bookmarks are untouched


def test_the_plain_singer_commands_work_from_the_first_run_on(tmp_path, voucherify_sandbox):
    config = {
        "start_date": "2024-01-01T00:00:00Z",
        "end_date": "2024-03-01T00:00:00Z",
        "poll_interval_seconds": 0.05,
        **voucherify_sandbox.voucherify.tap_config(),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    block = bash_block("### Plain Singer")
    run_block(block, tmp_path, {})
    first = json.loads((tmp_path / "state.json").read_text())
    assert first["bookmarks"]["voucherify_orders"]["replication_key_value"].startswith("2024-03-01")
    creates = len(voucherify_sandbox.log.entries(method="POST"))

    run_block(block, tmp_path, {})  # the next run starts at the bookmarks: only the full table again
    again = voucherify_sandbox.log.entries(method="POST")[creates:]
    assert [entry.body.get("exported_object") for entry in again] == ["points_expiration"]


def test_the_sandbox_commands_work_as_written(tmp_path):
    project = project_copy(tmp_path)
    run_block(bash_block("## The sandbox"), project, {}, timeout=600)
    catalog = json.loads((project / "catalog.json").read_text())
    assert len(catalog["streams"]) == STREAM_COUNT
    assert sum(1 for line in (project / "out.jsonl").read_text().splitlines() if '"RECORD"' in line) > 1000


@pytest.mark.skipif(postgres_bin() is None, reason="no PostgreSQL binaries (Debian's postgresql package)")
def test_the_object_storage_example_loads_postgres_from_s3_as_written(tmp_path):
    """The tap writes BATCH files to a real S3-compatible server (moto's, on loopback) and
    target-postgres loads them from there; credentials and endpoint come from the environment."""
    project = project_copy(tmp_path)
    with LocalS3() as s3, Sandbox(("voucherify",), export_latency_seconds=0.05) as sandbox, running_postgres() as pg:
        s3.client().create_bucket(Bucket="my-exports")
        env = {
            **s3.environment(),
            **pg.environment(),
            **{
                f"TAP_COMMERCE_EXPORTS_{name.upper()}": value for name, value in sandbox.voucherify.tap_config().items()
            },
            "TAP_COMMERCE_EXPORTS_VOUCHERIFY_ORDER_METADATA_FIELDS": json.dumps(
                sandbox.voucherify.tap_config()["voucherify_order_metadata_fields"]
            ),
            "TAP_COMMERCE_EXPORTS_END_DATE": "2024-03-01T00:00:00Z",
            "TAP_COMMERCE_EXPORTS_POLL_INTERVAL_SECONDS": "1",
            "TAP_COMMERCE_EXPORTS__SELECT": json.dumps(["voucherify_orders.*", "voucherify_customers.*"]),
            "MELTANO_DATABASE_URI": f"sqlite:///{tmp_path / 'meltano.db'}",
        }
        result = run_block(bash_block("## BATCH to object storage"), project, env, timeout=900)
        keys = s3.keys("my-exports")
        for stream in ("voucherify_orders", "voucherify_customers"):
            loaded = int(pg.query(f"select count(distinct id) from commerce.{stream}"))
            assert loaded == len(sandbox.voucherify.expected_records(stream)) > 0, stream
            assert any(key.startswith(f"commerce/tap-commerce-exports--{stream}-") for key in keys)
    assert "a probe object was written and removed" in result.stderr
    assert s3.secret not in result.stdout + result.stderr and s3.key not in result.stdout + result.stderr

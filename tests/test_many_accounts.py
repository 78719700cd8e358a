"""Many stores or accounts at once: tap instances running side by side never interfere.

An agency runs one extractor per account (meltano.yml: `tap-commerce-exports--store-a`, `--store-b`),
each with its own credentials and state id, in parallel, all writing BATCH files under one root.
Two instances against two sandboxes (other data, other credentials) run at the same moment here:
each gets its own rows, files and state; no temporary file, batch file name or state is shared.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest

from commerce_sandbox.server import Sandbox
from tests.harness import catalog_selecting, start_tap_process
from tests.s3_server import LocalS3
from tests.test_readme_commands import BIN, plugins_installed, project_copy

STORES = ("store-a", "store-b")
STREAM = "voucherify_orders"


# The plugins the Meltano test runs, installed as a fresh clone would (quick when they already are).
pytestmark = pytest.mark.usefixtures(plugins_installed.__name__)


@pytest.fixture(scope="module")
def sandboxes():
    """Two accounts: other seeds (other ids, other data), other credentials, other ports."""
    with (
        Sandbox(("voucherify",), seed=7, export_latency_seconds=0.05, rows_per_type=300) as a,
        Sandbox(("voucherify",), seed=11, export_latency_seconds=0.05, rows_per_type=300) as b,
    ):
        yield dict(zip(STORES, (a, b)))


@pytest.fixture(scope="module")
def s3():
    with LocalS3() as server:
        yield server


def expected_ids(sandbox: Sandbox) -> set[str]:
    return {row["id"] for row in sandbox.voucherify.expected_records(STREAM)}


def batch_rows(messages: list[dict], read) -> tuple[list[str], list[dict]]:
    urls = [url for m in messages if m["type"] == "BATCH" for url in m["manifest"]]
    rows = [json.loads(line) for url in urls for line in gzip.decompress(read(url)).splitlines()]
    return urls, rows


@pytest.mark.parametrize("storage", ["local files", "object storage"])
def test_two_accounts_at_once_write_their_own_files_and_state_under_one_root(
    sandboxes, s3, tmp_path, storage, monkeypatch
):
    shared_tmp = tmp_path / "tmp"  # both taps' downloads go through the same temporary directory
    shared_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(shared_tmp))
    if storage == "local files":
        storage_config = {"root": f"file://{tmp_path / 'batches'}", "prefix": "same-prefix-"}

        def read(url: str) -> bytes:
            return Path(url.removeprefix("file://")).read_bytes()
    else:
        bucket = s3.new_bucket()
        storage_config = {"root": f"s3://{bucket}/shared", "prefix": "same-prefix-", "params": s3.storage_params()}
        read = s3.read
    batch_config = {"encoding": {"format": "jsonl", "compression": "gzip"}, "storage": storage_config, "batch_size": 50}

    processes = {}
    for store, sandbox in sandboxes.items():
        config = {**sandbox.voucherify.tap_config(), "batch_config": batch_config}
        workdir = tmp_path / store
        workdir.mkdir()
        catalog = catalog_selecting(config, {STREAM})
        processes[store] = start_tap_process(config, catalog=catalog, workdir=str(workdir))
    outputs = {store: process.communicate(timeout=120)[0] for store, process in processes.items()}

    files: dict[str, list[str]] = {}
    for store, process in processes.items():
        assert process.returncode == 0, Path(process.stderr_path).read_text()
        messages = [json.loads(line) for line in outputs[store].splitlines()]
        files[store], rows = batch_rows(messages, read)
        assert {row["id"] for row in rows} == expected_ids(sandboxes[store])
        assert len(rows) == len(expected_ids(sandboxes[store]))  # each row once: no file read twice
        states = [m["value"] for m in messages if m["type"] == "STATE"]
        assert states[-1]["bookmarks"][STREAM]["replication_key_value"].startswith("2024-03-01")
    assert expected_ids(sandboxes["store-a"]).isdisjoint(expected_ids(sandboxes["store-b"]))
    assert set(files["store-a"]).isdisjoint(files["store-b"])  # no batch file name is shared

    if storage == "local files":
        stored = {path.as_uri() for path in (tmp_path / "batches").iterdir()}
    else:
        stored = {f"s3://{bucket}/{key}" for key in s3.keys(bucket)}
    assert stored == {*files["store-a"], *files["store-b"]}  # none overwritten, nothing else left
    assert list(shared_tmp.iterdir()) == []  # every download's temporary file was removed


def meltano(project: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    dropped = ("TAP_COMMERCE_EXPORTS", "TARGET_", "MELTANO_", "AWS_")
    base = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    return subprocess.Popen(
        [str(BIN / "meltano"), *args],
        cwd=project,
        env={**base, "PATH": f"{BIN}:{base.get('PATH', '')}", "MELTANO_SEND_ANONYMOUS_USAGE_STATS": "false", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def account_environment(store: str, sandbox: Sandbox) -> dict[str, str]:
    """Each account's settings in its own extractor's variables, as a secret store would hand them."""
    prefix = "TAP_COMMERCE_EXPORTS__" + store.upper().replace("-", "_") + "_"
    settings = {
        **sandbox.voucherify.tap_config(),
        "end_date": "2024-03-01T00:00:00Z",
        "poll_interval_seconds": 1,
    }
    env = {
        prefix + name.upper(): value if isinstance(value, str) else json.dumps(value)
        for name, value in settings.items()
    }
    env[prefix.rstrip("_") + "__SELECT"] = json.dumps([f"{STREAM}.*"])
    return env


@pytest.mark.skipif(not (BIN / "meltano").exists(), reason="meltano missing: make setup")
def test_one_inherited_extractor_per_account_runs_in_parallel_with_its_own_state_id(sandboxes, tmp_path):
    project = project_copy(tmp_path)
    database = {"MELTANO_DATABASE_URI": f"sqlite:///{tmp_path / 'meltano.db'}"}
    subprocess.run(
        [str(BIN / "meltano"), "state", "list"],
        cwd=project,
        env={**os.environ, **database},
        check=True,
        capture_output=True,
    )
    runs = {}
    for store, sandbox in sandboxes.items():
        env = {
            **database,
            **account_environment(store, sandbox),
            "TARGET_JSONL_DESTINATION_PATH": str(tmp_path / store),  # each account's own tables
        }
        (tmp_path / store).mkdir()
        runs[store] = meltano(project, env, "run", f"tap-commerce-exports--{store}", "target-jsonl")
    for store, run in runs.items():
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-5000:]
        loaded = [json.loads(line) for line in (tmp_path / store / f"{STREAM}.jsonl").read_text().splitlines()]
        assert {row["id"] for row in loaded} == expected_ids(sandboxes[store])
        for other in sandboxes.values():
            if other is not sandboxes[store]:
                assert other.voucherify.tap_config()["voucherify_app_token"] not in stderr

    listed = subprocess.run(
        [str(BIN / "meltano"), "state", "list"],
        cwd=project,
        env={**os.environ, **database},
        capture_output=True,
        text=True,
    )
    for store in STORES:
        state_id = f"dev:tap-commerce-exports--{store}-to-target-jsonl"
        assert state_id in listed.stdout
        state = subprocess.run(
            [str(BIN / "meltano"), "state", "get", state_id],
            cwd=project,
            env={**os.environ, **database},
            capture_output=True,
            text=True,
        )
        bookmark = json.loads(state.stdout)["singer_state"]["bookmarks"][STREAM]["replication_key_value"]
        assert bookmark.startswith("2024-03-01")

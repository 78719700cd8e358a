"""BATCH files straight to object storage: a real S3-compatible server (moto's) on loopback.

The files hold what RECORD mode writes, worker processes write there too, and a storage that cannot
take the files fails the run in seconds, before any export is created, naming the root and the
cause, creating no bucket and showing no secret.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from commerce_sandbox.server import Sandbox
from tap_commerce_exports.output.jsonl_batches import WorkerStorage, open_for_writing
from tap_commerce_exports.output.storage_check import check_batch_storage, secret_values, shown_root
from tap_commerce_exports.sources.base import ConfigError
from tests.harness import run_tap, start_tap_process
from tests.s3_server import LocalS3

GZIP_JSONL = {"format": "jsonl", "compression": "gzip"}


@pytest.fixture(scope="module")
def s3_server():
    with LocalS3() as server:
        yield server


def s3_batch_config(s3, bucket: str, **storage) -> dict:
    return {
        "encoding": GZIP_JSONL,
        "storage": {"root": f"s3://{bucket}/tap", "prefix": "run-", "params": s3.storage_params(), **storage},
        "batch_size": 7,
    }


def manifest_urls(messages: list[dict], stream: str | None = None) -> list[str]:
    return [
        url
        for m in messages
        if m["type"] == "BATCH" and (stream is None or m["stream"] == stream)
        for url in m["manifest"]
    ]


def rows_in(s3, urls: list[str]) -> list[dict]:
    return [json.loads(line) for url in urls for line in gzip.decompress(s3.read(url)).splitlines()]


def assert_no_secret(s3, *texts: str) -> None:
    for text in texts:
        assert s3.secret not in text
        assert s3.key not in text  # an access key id is half a credential: not shown either


def test_batch_files_in_object_storage_hold_exactly_the_records_of_record_mode(s3_server, voucherify_sandbox):
    config = voucherify_sandbox.voucherify.tap_config()
    bucket = s3_server.new_bucket()
    as_records = run_tap(config)
    as_batches = run_tap({**config, "batch_config": s3_batch_config(s3_server, bucket)})
    assert as_records.error is None and as_batches.error is None, as_batches.error

    streams = as_records.streams_with_records()
    assert len(streams) > 3
    for stream in streams:
        urls = manifest_urls(as_batches.messages, stream)
        assert all(url.startswith(f"s3://{bucket}/tap/run-tap-commerce-exports--{stream}-") for url in urls)
        assert rows_in(s3_server, urls) == as_records.records(stream), stream
    assert as_batches.final_state["bookmarks"] == as_records.final_state["bookmarks"]
    # Every object is a file of the manifests: the probe was removed, nothing half-written is left.
    assert s3_server.keys(bucket) == sorted(
        url.removeprefix(f"s3://{bucket}/") for url in manifest_urls(as_batches.messages)
    )
    assert "a probe object was written and removed" in as_batches.log_text
    assert_no_secret(s3_server, as_batches.text())


@pytest.fixture(scope="module")
def orders_sandbox():
    """10,000 orders in one window: a 2.3 MB file, cut into slices for worker processes."""
    with Sandbox(("voucherify",), export_latency_seconds=0.1, rows_per_type=10_000) as sandbox:
        yield sandbox


def test_worker_processes_write_a_large_export_straight_to_object_storage(s3_server, orders_sandbox, tmp_path):
    config = {**orders_sandbox.voucherify.tap_config(), "export_window_days": 400}
    bucket = s3_server.new_bucket()
    batch_config = {**s3_batch_config(s3_server, bucket), "batch_size": 1000}
    local = {**batch_config, "storage": {"root": f"file://{tmp_path}", "prefix": "run-"}}
    alone = run_tap({**config, "batch_config": local, "batch_worker_processes": 1}, streams={"voucherify_orders"})
    sliced = run_tap(
        {**config, "batch_config": batch_config, "batch_worker_processes": 2}, streams={"voucherify_orders"}
    )
    assert alone.error is None and sliced.error is None, sliced.error

    assert "in 2 worker processes" in sliced.log_text
    local_rows = []
    for url in manifest_urls(alone.messages):
        with gzip.open(url.removeprefix("file://")) as handle:
            local_rows += [json.loads(line) for line in handle]
    urls = manifest_urls(sliced.messages)
    assert rows_in(s3_server, urls) == local_rows and len(local_rows) == 10_000
    assert s3_server.keys(bucket) == sorted(url.removeprefix(f"s3://{bucket}/") for url in urls)
    assert sliced.final_state["bookmarks"] == alone.final_state["bookmarks"]
    assert_no_secret(s3_server, sliced.text())


@pytest.mark.parametrize(
    "fault, cause",
    [
        ("missing bucket", "the bucket 'no-such-bucket' does not exist"),
        ("refused credentials", "the storage refused the credentials"),
        ("unreachable endpoint", "could not reach the storage endpoint"),
    ],
)
def test_a_storage_that_cannot_take_the_files_fails_in_seconds_before_any_export(
    s3_server, voucherify_sandbox, fault, cause
):
    bucket = "no-such-bucket" if fault == "missing bucket" else s3_server.new_bucket()
    batch_config = s3_batch_config(s3_server, bucket)
    params = batch_config["storage"]["params"]
    if fault == "refused credentials":
        params["secret"] = "not-the-secret-" + s3_server.secret[:8]
    if fault == "unreachable endpoint":
        params["endpoint_url"] = "http://127.0.0.1:9"  # the discard port: nothing listens
    buckets_before = s3_server.buckets()

    started = time.monotonic()
    output = run_tap({**voucherify_sandbox.voucherify.tap_config(), "batch_config": batch_config})
    assert time.monotonic() - started < 10
    assert isinstance(output.error, ConfigError)
    assert str(output.error).startswith(f"BATCH storage s3://{bucket}/tap: {cause}")
    assert voucherify_sandbox.log.entries(method="POST") == []  # no export was created
    assert not [m for m in output.messages if m["type"] in ("RECORD", "BATCH")]
    assert s3_server.buckets() == buckets_before  # the missing bucket was not created
    assert_no_secret(s3_server, output.text(), str(output.error))
    assert params["secret"] not in output.text() + str(output.error)  # nor the refused one


def test_without_s3fs_the_run_names_the_extra_and_exits_2_before_any_export(
    s3_server, voucherify_sandbox, tmp_path, monkeypatch
):
    hidden = tmp_path / "no-s3fs"
    (hidden / "s3fs").mkdir(parents=True)
    (hidden / "s3fs" / "__init__.py").write_text("raise ImportError('No module named s3fs')\n")
    config = {**voucherify_sandbox.voucherify.tap_config(), "batch_config": s3_batch_config(s3_server, "b")}
    monkeypatch.setenv("PYTHONPATH", f"{hidden}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    process = start_tap_process(config, workdir=str(tmp_path))
    stdout, _ = process.communicate(timeout=60)
    stderr = Path(process.stderr_path).read_text()
    assert process.returncode == 2, stderr
    assert "the filesystem for s3:// is not installed: pip install 'tap-commerce-exports[s3]'" in stderr
    assert voucherify_sandbox.log.entries(method="POST") == []
    assert_no_secret(s3_server, stdout, stderr)


def test_credentials_and_endpoint_can_come_from_the_environment_alone(
    s3_server, voucherify_sandbox, tmp_path, monkeypatch
):
    """The README's way: batch_config names only the root; AWS_* variables carry the rest."""
    bucket = s3_server.new_bucket()
    batch_config = {"encoding": GZIP_JSONL, "storage": {"root": f"s3://{bucket}/tap"}}
    config = {**voucherify_sandbox.voucherify.tap_config(), "batch_config": batch_config}
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    process = start_tap_process(config, workdir=str(tmp_path))
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0, Path(process.stderr_path).read_text()
    messages = [json.loads(line) for line in stdout.splitlines()]
    urls = manifest_urls(messages, "voucherify_orders")
    want = voucherify_sandbox.voucherify.expected_records("voucherify_orders")
    assert {row["id"] for row in rows_in(s3_server, urls)} == {row["id"] for row in want}
    assert_no_secret(s3_server, stdout, Path(process.stderr_path).read_text())


@pytest.mark.parametrize("writer", ["the tap's own", "a worker's"])
def test_the_tap_writes_no_file_that_would_create_a_bucket(s3_server, writer):
    """Should a bucket vanish after the check, a file write fails; the SDK's mkdir would create it."""
    from singer_sdk.helpers._batch import StorageTarget

    storage_params = s3_server.storage_params()
    root = "s3://vanished-bucket/tap"
    sdk_storage = StorageTarget(root=root, params=storage_params)
    storage = sdk_storage if writer == "the tap's own" else WorkerStorage(None, root, storage_params)
    with pytest.raises(FileNotFoundError), open_for_writing(storage, "f.json.gz") as out:
        out.write(b"{}\n")
    assert "vanished-bucket" not in s3_server.buckets()


def test_local_roots_are_made_as_before(tmp_path):
    root = tmp_path / "new" / "dir"
    check_batch_storage({"encoding": GZIP_JSONL, "storage": {"root": f"file://{root}", "prefix": "sub/p-"}})
    assert root.is_dir() and list(root.rglob("*probe*")) == []


@pytest.mark.parametrize(
    "root, params, hint",
    [
        ("gs://bucket/path", {}, "pip install 'tap-commerce-exports[gcs]'"),
        ("az://container/path", {"account_name": "acct", "account_key": "s3cr3t-account-key"}, "[azure]"),
    ],
)
def test_a_missing_extra_is_named_for_each_cloud(root, params, hint):
    if importlib.util.find_spec("gcsfs" if root.startswith("gs") else "adlfs"):
        pytest.skip("the backend is installed here")
    with pytest.raises(ConfigError) as raised:
        check_batch_storage({"encoding": GZIP_JSONL, "storage": {"root": root, "params": params}})
    assert hint in str(raised.value) and str(raised.value).startswith(f"BATCH storage {root}:")
    assert "s3cr3t" not in str(raised.value)


def test_an_encoding_the_tap_cannot_write_fails_before_any_export():
    with pytest.raises(ConfigError, match="take compression 'gzip' or none, not 'zstd'"):
        check_batch_storage({"encoding": {"format": "jsonl", "compression": "zstd"}, "storage": {"root": "x"}})


def test_roots_are_shown_without_credentials():
    assert shown_root("s3://bucket/p") == "s3://bucket/p"
    assert shown_root("abfs://user:pa55word@container/p?sig=abc") == "abfs://container/p"
    assert shown_root("/data/batches") == "/data/batches"
    found = secret_values({"key": "AKIA123", "client_kwargs": {"region_name": "eu"}, "creds": {"token": "tok-1"}})
    assert found == {"AKIA123", "tok-1"}

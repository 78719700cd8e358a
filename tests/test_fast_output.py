"""The RECORD fast path writes exactly what the SDK's path writes, and steps aside when it must."""

from __future__ import annotations

import gzip
import json
import os

from tap_commerce_exports.stream import ExportStream
from tests.harness import run_tap


def comparable(output) -> dict:
    """Each stream's RECORD and SCHEMA messages in order, without the extraction time; the final
    bookmarks. (Streams are synced in the order their exports become ready, which varies between
    runs; interim STATE messages carry timing-dependent exports_in_flight and signposts.)"""
    streams: dict[str, list[dict]] = {}
    for message in output.messages:
        if message["type"] in ("RECORD", "SCHEMA"):
            streams.setdefault(message["stream"], []).append(
                {k: v for k, v in message.items() if k != "time_extracted"}
            )
    bookmarks = {
        stream: [p.get("replication_key_value") for p in entry.get("partitions", [entry])]
        for stream, entry in output.final_state.get("bookmarks", {}).items()
    }
    return {"messages": streams, "bookmarks": bookmarks}


def test_fast_path_and_sdk_path_emit_the_same_messages(voucherify_sandbox, request):
    config = voucherify_sandbox.voucherify.tap_config()
    fast = run_tap(config)
    ExportStream.fast_path_enabled = False
    request.addfinalizer(lambda: setattr(ExportStream, "fast_path_enabled", True))
    slow = run_tap(config)
    assert fast.error is None and slow.error is None
    assert len(fast.records("voucherify_orders")) > 0
    assert comparable(fast) == comparable(slow)
    assert "RECORD fast path on" in fast.log_text and "RECORD fast path on" not in slow.log_text


def test_stream_maps_turn_the_fast_path_off_and_still_apply(voucherify_sandbox):
    config = {
        **voucherify_sandbox.voucherify.tap_config(),
        "stream_maps": {"voucherify_orders": {"referrer_id": "__NULL__", "amount_in_units": "amount / 100"}},
    }
    output = run_tap(config, streams={"voucherify_orders"})
    assert output.error is None
    records = output.records("voucherify_orders")
    assert records and all("referrer_id" not in r for r in records)
    assert all(r["amount_in_units"] == r["amount"] / 100 for r in records if r["amount"] is not None)
    assert "voucherify_orders: RECORD fast path off" in output.log_text


def test_flattening_turns_the_fast_path_off(voucherify_sandbox):
    config = {**voucherify_sandbox.voucherify.tap_config(), "flattening_enabled": True, "flattening_max_depth": 1}
    output = run_tap(config, streams={"voucherify_orders"})
    assert output.error is None and output.records("voucherify_orders")
    assert "voucherify_orders: RECORD fast path off" in output.log_text


def test_batch_messages_carry_every_row_and_state_follows_its_batch(voucherify_sandbox, tmp_path):
    emulator = voucherify_sandbox.voucherify
    config = {
        **emulator.tap_config(),
        "batch_config": {
            "encoding": {"format": "jsonl", "compression": "gzip"},
            "storage": {"root": f"file://{tmp_path}", "prefix": "batch-"},
        },
    }
    output = run_tap(config, streams={"voucherify_orders"})
    assert output.error is None
    batches = [m for m in output.messages if m["type"] == "BATCH"]
    assert batches and output.records("voucherify_orders") == []
    rows = []
    for batch in batches:
        for url in batch["manifest"]:
            with gzip.open(url.removeprefix("file://")) as handle:
                rows += [json.loads(line) for line in handle]
    assert {r["id"] for r in rows} == {r["id"] for r in emulator.expected_records("voucherify_orders")}
    first_batch = output.messages.index(batches[0])
    bookmark_states = [
        i
        for i, m in enumerate(output.messages)
        if m["type"] == "STATE"
        and m["value"].get("bookmarks", {}).get("voucherify_orders", {}).get("replication_key_value")
    ]
    assert bookmark_states and min(bookmark_states) > first_batch
    assert os.listdir(tmp_path)


def test_batch_files_hold_exactly_the_records_and_bookmarks_of_record_mode(voucherify_sandbox, tmp_path):
    """Every stream, partitioned ones too; batch_size 7 cuts files in the middle of blocks and windows."""
    config = voucherify_sandbox.voucherify.tap_config()
    as_records = run_tap(config)
    batch_config = {
        "encoding": {"format": "jsonl", "compression": "gzip"},
        "storage": {"root": f"file://{tmp_path}", "prefix": "b-"},
        "batch_size": 7,
    }
    as_batches = run_tap({**config, "batch_config": batch_config})
    assert as_records.error is None and as_batches.error is None

    streams = as_records.streams_with_records()
    assert "voucherify_campaign_transactions" in streams or len(streams) > 3
    for stream in streams:
        files = [
            url.removeprefix("file://")
            for m in as_batches.messages
            if m["type"] == "BATCH" and m["stream"] == stream
            for url in m["manifest"]
        ]
        sizes, rows = [], []
        for path in files:
            with gzip.open(path) as handle:
                lines = [json.loads(line) for line in handle]
            sizes.append(len(lines))
            rows += lines
        assert rows == as_records.records(stream), stream
        assert all(size == 7 for size in sizes[:-1]) and 0 < sizes[-1] <= 7, (stream, sizes)
    assert comparable(as_batches)["bookmarks"] == comparable(as_records)["bookmarks"]  # the same final bookmarks


def test_the_tap_widens_its_stdout_pipe_so_blocks_of_records_do_not_wait_on_the_reader(voucherify_sandbox):
    import fcntl
    import sys
    from pathlib import Path

    import pytest

    from tap_commerce_exports.output.fast_records import STDOUT_PIPE_BYTES
    from tests.harness import start_tap_process

    if not hasattr(fcntl, "F_GETPIPE_SZ"):
        pytest.skip("pipe sizes are a Linux feature")
    process = start_tap_process(voucherify_sandbox.voucherify.tap_config())
    first = json.loads(process.stdout.readline())
    size = fcntl.fcntl(process.stdout.fileno(), fcntl.F_GETPIPE_SZ)  # one pipe: the same size at both ends
    rest = process.stdout.read()
    assert process.wait(timeout=60) == 0, Path(process.stderr_path).read_text()[-2000:]
    assert first["type"] in ("SCHEMA", "STATE") and '"type":"RECORD"' in rest.replace(" ", "")
    assert size >= STDOUT_PIPE_BYTES or sys.platform != "linux"

"""Logs that answer "what is it doing?": queued exports, one metric per stream, wall-clock summaries."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tap_commerce_exports.exports import download
from tests.harness import run_tap


def test_an_export_waiting_for_a_free_slot_says_so_and_when_it_starts(voucherify_sandbox):
    config = {**voucherify_sandbox.voucherify.tap_config(), "max_concurrent_exports": 1}
    output = run_tap(config, streams={"voucherify_orders", "voucherify_customers"})
    assert output.error is None, output.error
    assert "queued: all 1 export slots are busy (max_concurrent_exports)" in output.log_text
    assert re.search(r"export slot free after \d+s in the queue", output.log_text)


def test_each_stream_logs_one_record_count_and_a_wall_clock_summary(voucherify_sandbox):
    output = run_tap(voucherify_sandbox.voucherify.tap_config(), streams={"voucherify_orders"})
    assert output.error is None, output.error
    counts = re.findall(r'"metric":"record_count","value":(\d+),"tags":\{"stream":"voucherify_orders"', output.log_text)
    assert counts == [str(len(output.records("voucherify_orders")))]
    summary = re.search(r"Summary voucherify_orders: (.*)", output.log_text).group(1)
    assert "4 windows, 4 exports" in summary and "from its first export to its last row" in summary
    assert "Sync finished in" in output.log_text and "with 0 failures" in output.log_text


def test_one_of_a_kind_is_not_plural(voucherify_sandbox):
    config = {**voucherify_sandbox.voucherify.tap_config(), "export_window_days": 60}
    output = run_tap(config, streams={"voucherify_orders"})
    assert "1 window, 1 export," in output.log_text and "1 windows" not in output.log_text


def test_an_export_ready_at_its_first_poll_says_1_poll(voucherify_sandbox):
    # One window, polled first well after the sandbox's export is ready: exactly one poll.
    config = {
        **voucherify_sandbox.voucherify.tap_config(),
        "export_window_days": 60,
        "poll_interval_seconds": 0.3,
        "poll_max_interval_seconds": 1,
    }
    output = run_tap(config, streams={"voucherify_orders"})
    assert output.error is None, output.error
    assert re.search(r"voucherify_orders .* export \S+ is \S+ after \d+s \(1 poll\)$", output.log_text, re.MULTILINE)
    assert "1 polls" not in output.log_text
    assert ", 1 poll, " in re.search(r"Summary voucherify_orders: (.*)", output.log_text).group(1)


def record_count_metrics(log_text: str, stream: str) -> list[dict]:
    metrics = [json.loads(line.split("METRIC: ", 1)[1]) for line in log_text.splitlines() if "METRIC: " in line]
    return [m for m in metrics if m["metric"] == "record_count" and m["tags"]["stream"] == stream]


def test_a_partitioned_stream_logs_one_record_count_and_a_wall_clock_summary(intelligems_sandbox):
    """One partition per experience, waited for in parallel: one count for the stream (not one
    partition's), and the summary's seconds are wall time, not a sum over partitions."""
    output = run_tap(intelligems_sandbox.intelligems.tap_config(), streams={"intelligems_orders"})
    assert output.error is None, output.error
    records = output.records("intelligems_orders")
    assert len({record["experience_id"] for record in records}) > 1  # several partitions
    [count] = record_count_metrics(output.log_text, "intelligems_orders")
    assert count["value"] == len(records)
    assert not count["tags"].get("context"), count  # the whole stream's count carries no partition
    summary_seconds = float(re.search(r"Summary intelligems_orders: .*; ([\d.]+)s from", output.log_text).group(1))
    total_seconds = float(re.search(r"Sync finished in ([\d.]+)s", output.log_text).group(1))
    assert summary_seconds <= total_seconds


def test_a_long_download_reports_the_bytes_so_far(voucherify_sandbox, monkeypatch):
    monkeypatch.setattr(download, "PROGRESS_EVERY_SECONDS", 0.0)  # every chunk counts as "long"
    output = run_tap(voucherify_sandbox.voucherify.tap_config(), streams={"voucherify_orders"})
    assert output.error is None, output.error
    assert re.search(
        r"voucherify_orders .* export \S+: downloading, \d+\.\d MB( of \d+\.\d MB)? so far after \d+s", output.log_text
    )


def test_errors_reach_the_log_at_error_level(tmp_path):
    """Meltano shows a plugin's lines at the level they carry: a failed run must not look like info."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"start_date": "2024-01-01T00:00:00Z"}))
    result = subprocess.run(
        [sys.executable, "-m", "tap_commerce_exports.tap", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    line = next(line for line in result.stderr.splitlines() if "no source is configured" in line)
    assert "ERROR" in line or '"level":"error"' in line, line

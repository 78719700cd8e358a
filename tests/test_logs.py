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

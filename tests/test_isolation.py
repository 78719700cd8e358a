"""One source's trouble stays its own: a failed stream stops costing, a waiting source holds up no other
source's rows, and a stop ends the run in seconds wherever it is."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

from commerce_sandbox.server import Sandbox
from tests.harness import drain, run_tap, start_tap_process, wait_for_log, wait_until

#: A wait's end as logs and errors write it: a full UTC date-time (a per-hour wait may end tomorrow).
ISO_UNTIL = r"until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_after_a_window_fails_its_later_windows_are_not_exported(voucherify_sandbox):
    """Later windows could not move the bookmark past the failed one: creating them only costs."""
    voucherify_sandbox.faults.arm("export_error", -1)
    config = {**voucherify_sandbox.voucherify.tap_config(), "max_concurrent_exports": 1, "export_window_days": 10}
    output = run_tap(config, streams={"voucherify_orders"})

    creates = voucherify_sandbox.log.entries(method="POST")
    assert len(creates) == 4  # the first window, created once and again three times; no other window
    assert {
        entry.body["parameters"]["filters"]["updated_at"]["conditions"]["$before"][0][:10] for entry in creates
    } == {"2024-01-11"}
    assert "voucherify_orders" in str(output.error) and "not exported: an earlier window failed" not in str(
        output.error
    )
    assert not output.records("voucherify_orders")


def started_with_voucherify_blocked(sandbox: Sandbox, block_seconds: float):
    """The tap in a subprocess while Voucherify answers its first call with a long per-minute block."""
    sandbox.nextcommerce.rate_per_second = sandbox.nextcommerce.rate_burst = 100
    # A plan of one request per window: the connection check passes, the first export waits. The
    # windows are aligned to multiples of their length in Unix time (as Voucherify's minutes are), so
    # a long one keeps a window's end from falling inside the test.
    sandbox.voucherify.requests_per_minute, sandbox.voucherify.rate_window_seconds = 1, block_seconds
    config = {
        **sandbox.tap_config(),
        "nextcommerce_requests_per_second": 50,
        "export_window_days": 60,
        "max_rate_limit_wait_seconds": 2 * block_seconds,  # waited out, not given up
    }
    return start_tap_process(config)


def test_while_voucherify_waits_out_a_rate_limit_the_other_sources_rows_flow_and_a_stop_ends_it_in_seconds():
    """Issue: one Voucherify wait on the thread that writes messages froze every source, and SIGTERM in
    it took 40 s. Now the wait holds up Voucherify only; SIGTERM ends the run within 5 s with a STATE."""
    with Sandbox(export_latency_seconds=0.05) as sandbox:
        process = started_with_voucherify_blocked(sandbox, block_seconds=86_400)
        stderr = Path(process.stderr_path)
        wait_for_log(stderr, "voucherify: the API's request budget is spent")
        seen: list[str] = []

        def other_sources_done() -> bool:
            line = process.stdout.readline()
            if '"type":"RECORD"' in line.replace(" ", ""):
                seen.append(json.loads(line)["stream"])
            return {"nextcommerce_order_list", "intelligems_orders", "nextcommerce_fulfillment_line_items"} <= set(seen)

        wait_until(other_sources_done, "Next Commerce and Intelligems rows while Voucherify waits", timeout=60)
        assert not [stream for stream in seen if stream.startswith("voucherify_")]
        assert re.search(ISO_UNTIL, stderr.read_text().split("request budget is spent", 1)[1].splitlines()[0])

        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        rest, _ = drain(process)
        assert time.monotonic() - stopped_at < 5
        assert process.returncode == 128 + signal.SIGTERM
        assert rest and rest[-1]["type"] == "STATE"
        assert not sandbox.log.entries(host="voucherify-api", method="POST")


def run_with_the_other_sources(sandbox: Sandbox, **settings: float):
    sandbox.nextcommerce.rate_per_second = sandbox.nextcommerce.rate_burst = 100
    config = {**sandbox.tap_config(), "nextcommerce_requests_per_second": 50, "export_window_days": 60}
    return run_tap({**config, **settings})


def assert_voucherify_stopped_at_once_and_the_others_finished(sandbox: Sandbox, output) -> None:
    assert output.records("nextcommerce_order_list") and output.records("intelligems_orders")
    assert not {name for name in output.streams_with_records() if name.startswith("voucherify")}
    voucherify_calls = sandbox.log.entries(host="voucherify-api")
    assert len(voucherify_calls) == 1, [entry.path for entry in voucherify_calls]  # the check, then nothing
    assert not re.search(r"voucherify: .*(waiting|waits) \d", output.log_text)  # no wait was even begun


def test_a_spent_billing_cycle_quota_stops_voucherify_at_once_while_the_other_sources_finish(every_seed):
    """Over every seed: X-Rate-Limit-Type is optional, and only some seeds send it."""
    with Sandbox(seed=every_seed, export_latency_seconds=0.05) as sandbox:
        sandbox.voucherify.meter.spend_cycle()  # the faults are shared by the three emulators
        output = run_with_the_other_sources(sandbox)

        message = str(output.error)
        if sandbox.voucherify.sends_rate_limit_type:
            assert "billing-cycle quota is used up (X-Rate-Limit-Type: api_calls_cycle)" in message
            assert re.search(r"resets at \d{4}-\d\d-\d\dT00:00:00Z", message)
        else:  # then only the wait, weeks long, says so
            assert "is longer than max_rate_limit_wait_seconds (3660s)" in message
            assert re.search(r"until \d{4}-\d\d-\d\dT00:00:00Z", message)
        assert_voucherify_stopped_at_once_and_the_others_finished(sandbox, output)


def test_a_pacer_wait_longer_than_the_setting_stops_voucherify_at_once_while_the_other_sources_finish():
    """The issue: with max_rate_limit_wait_seconds 5 and the hour's budget spent, the tap logged a wait of
    35381.6s and hung. A Sandbox project's 100 calls an hour, shrunk to one: the check spends it, and
    every later call would wait for the hour to end: the source fails instead, before sending it."""
    with Sandbox(export_latency_seconds=0.05) as sandbox:
        sandbox.voucherify.use_plan("sandbox")
        sandbox.voucherify.requests_per_minute = 1
        if (left := 3600 - time.time() % 3600) < 15:  # the hour would end mid-run: begin in the next one
            time.sleep(left)
        output = run_with_the_other_sources(sandbox, max_rate_limit_wait_seconds=5)

        message = str(output.error)
        assert "voucherify: " in message and "is rate limited: the API's request budget (limit: 1) is spent" in message
        assert re.search(
            rf"renews in \d+\.\ds, {ISO_UNTIL}; that is longer than max_rate_limit_wait_seconds \(5s\)", message
        )
        assert "raise that setting to wait it out" in message
        assert sandbox.voucherify.rate_limited == 0  # the pacer sent nothing bound to be refused
        assert_voucherify_stopped_at_once_and_the_others_finished(sandbox, output)


def test_exports_remembered_from_a_killed_run_stay_in_state_until_their_windows_are_read(voucherify_sandbox):
    """A run killed again before it reached a remembered export must not forget it: the next run would
    pay for it once more."""
    windows = [
        ("2024-01-01T00:00:00+00:00", "2024-01-16T00:00:00+00:00"),
        ("2024-01-16T00:00:00+00:00", "2024-01-31T00:00:00+00:00"),
        ("2024-01-31T00:00:00+00:00", "2024-02-15T00:00:00+00:00"),
        ("2024-02-15T00:00:00+00:00", "2024-03-01T00:00:00+00:00"),
    ]
    remembered = [
        {"export_id": f"exp_remembered_{n}", "window_start": start, "window_end": end}
        for n, (start, end) in enumerate(windows)
    ]
    state = {"bookmarks": {"voucherify_orders": {"exports_in_flight": remembered}}}
    config = {**voucherify_sandbox.voucherify.tap_config(), "max_concurrent_exports": 1}
    output = run_tap(config, state=state, streams={"voucherify_orders"})
    assert output.error is None, output.error

    for value in output.states():
        stream_state = value.get("bookmarks", {}).get("voucherify_orders", {})
        done = stream_state.get("replication_key_value") or "0"
        listed = {(item["window_start"], item["window_end"]) for item in stream_state.get("exports_in_flight", [])}
        not_read = {window for window in windows if window[1] > done.replace("Z", "+00:00")}
        assert not_read <= listed, (done, sorted(listed))

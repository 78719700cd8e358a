"""One source's trouble stays its own: a failed stream stops costing, a waiting source holds up no other
source's rows, and a stop ends the run in seconds wherever it is."""

from __future__ import annotations

import signal
import time

from tests.harness import drain, run_tap, start_tap_process, wait_for_log


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

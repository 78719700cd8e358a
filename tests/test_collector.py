"""The sync runs with the garbage collector tuned for rows, and leaves it as it found it."""

from __future__ import annotations

import gc

from tap_commerce_exports.engine.collector import YOUNG_GENERATION_THRESHOLD, collector_tuned_for_rows
from tests.harness import run_tap


def test_the_collector_is_tuned_inside_and_restored_after():
    before = gc.get_threshold()
    with collector_tuned_for_rows() as frozen:
        assert frozen > 1000 and gc.get_freeze_count() > 1000  # at least the modules loaded so far
        assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, *before[1:])
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_sync_tunes_the_collector_and_restores_it_even_when_it_fails(voucherify_sandbox):
    before = gc.get_threshold()
    config = voucherify_sandbox.voucherify.tap_config()
    good = run_tap(config, streams={"voucherify_orders"})
    assert good.error is None and good.records("voucherify_orders")
    assert f"young generation collected every {YOUNG_GENERATION_THRESHOLD} allocations" in good.log_text
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0

    bad = run_tap({**config, "voucherify_app_token": "wrong"}, streams={"voucherify_orders"})
    assert bad.error is not None
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0

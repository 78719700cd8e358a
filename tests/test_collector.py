"""The sync runs with the garbage collector tuned for rows, and leaves it as it found it."""

from __future__ import annotations

import contextlib
import gc

import pytest

from tap_commerce_exports.output.collector import YOUNG_GENERATION_THRESHOLD, collector_tuned_for_rows
from tap_commerce_exports.stream import StopRequested
from tests.harness import run_tap


@pytest.mark.parametrize("ending", [None, RuntimeError("a failure"), StopRequested(15), SystemExit(143)])
def test_the_collector_is_tuned_inside_and_restored_however_the_sync_ends(ending):
    before = gc.get_threshold()
    expected_end = pytest.raises(type(ending)) if ending else contextlib.nullcontext()
    with expected_end, collector_tuned_for_rows() as frozen:
        assert frozen > 1000 and gc.get_freeze_count() > 1000  # at least the modules loaded so far
        assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, *before[1:])
        if ending:
            raise ending
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_objects_a_host_program_froze_stay_frozen():
    gc.collect()
    gc.freeze()
    try:
        host_frozen = gc.get_freeze_count()
        with collector_tuned_for_rows():
            pass
        # Still frozen (unfreezing would empty the count); frozen objects that die leave it.
        assert gc.get_freeze_count() > host_frozen // 2
    finally:
        gc.unfreeze()


def test_a_sync_runs_tuned_and_restores_the_collector(voucherify_sandbox):
    before = gc.get_threshold()
    good = run_tap(voucherify_sandbox.voucherify.tap_config(), streams={"voucherify_orders"})
    assert good.error is None and good.records("voucherify_orders")
    assert f"young generation collected every {YOUNG_GENERATION_THRESHOLD} allocations" in good.log_text
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0

"""Next Commerce end to end: all 13 export types, the row cap (truncated or refused), rate limits, URL
expiry, reuse. The sandbox's seed (conftest.py) decides ids, column order, extra and missing columns and
header spelling, so these tests compare with the sandbox's own records, never with one shape."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import re

import pytest

from tap_commerce_exports.exports.http import ApiError
from tap_commerce_exports.exports.job import ExportRequest, ExportTooLarge
from tap_commerce_exports.exports.windows import Window
from tap_commerce_exports.records.columns import header_key
from tap_commerce_exports.sources.nextcommerce import STREAM_TYPES, build_api, speaks_of_row_cap
from tests.harness import by_key, run_tap

UTC = dt.timezone.utc
STREAMS = {stream.name: tuple(stream.primary_keys) for stream in STREAM_TYPES}
FAST = {"nextcommerce_requests_per_second": 50, "export_window_days": 30}


def fast_config(emulator, **extra) -> dict:
    emulator.rate_per_second = 100
    emulator.rate_burst = 100
    return {**emulator.tap_config(), **FAST, **extra}


def emitted(output, stream: str, expected_rows: list[dict]) -> dict:
    """The tap's records keyed by primary key. A column that appeared in later files (schema drift)
    is null in rows read from files that lacked it, where the sandbox's row has no such key."""
    key = STREAMS[stream]
    expected_by_key = {tuple(row[k] for k in key): row for row in expected_rows}
    records = []
    for record in output.records(stream):
        expected_row = expected_by_key.get(tuple(record[k] for k in key), {})
        records.append({k: v for k, v in record.items() if v is not None or k in expected_row})
    return by_key(records, key)


def test_all_13_streams_are_synced_exactly_with_utc_timestamps(nextcommerce_sandbox):
    emulator = nextcommerce_sandbox.nextcommerce
    output = run_tap(fast_config(emulator))

    assert output.error is None, output.error
    assert len(STREAMS) == 13
    for stream, key in STREAMS.items():
        want_rows = emulator.expected_records(stream)
        assert want_rows, stream
        assert emitted(output, stream, want_rows) == by_key(want_rows, key), stream
    order = output.records("nextcommerce_order_list")[0]
    assert order["date_created"].endswith("+00:00")
    # The store is in America/Chicago: naive 'YYYY-MM-DD HH:MM:SS' cells are 6 hours behind UTC in winter.
    assert emulator.store_timezone == "America/Chicago"
    drifted = [r for r in output.records("nextcommerce_order_list") if r.get("metadata_sales_channel")]
    assert drifted, "the column that appears in later files reached no record"


def test_requests_are_paced_under_four_per_second_by_default(nextcommerce_sandbox):
    emulator = nextcommerce_sandbox.nextcommerce
    config = {**emulator.tap_config(), "export_window_days": 60}
    output = run_tap(config, streams={"nextcommerce_order_list", "nextcommerce_customer_list"})
    assert output.error is None
    assert emulator.rate_limited == 0
    api_calls = sorted(e.at for e in nextcommerce_sandbox.log.entries(host="nextcommerce-api"))
    worst = max(sum(1 for t in api_calls if start <= t < start + 1.0) for start in api_calls)
    assert worst <= 4


def rows_in_export(emulator, stream: str, create) -> int:
    """Rows of the window a logged `POST exports/` asked for (both ends inclusive, whole seconds)."""
    last = dt.datetime.fromisoformat(create.body["date_to"].replace("Z", "+00:00")) + dt.timedelta(seconds=1)
    return len(emulator.expected_records(stream, start=create.body["date_from"], end=last))


@pytest.mark.parametrize("behavior", ["truncate", "refuse"])
def test_a_window_over_the_row_cap_is_split_until_nothing_is_lost_whether_truncated_or_refused(
    nextcommerce_sandbox, behavior
):
    """NOTES.md: exports are capped at 100,000 objects; whether an over-cap export is truncated or
    refused is not documented, so both must cost no row."""
    emulator, stream = nextcommerce_sandbox.nextcommerce, "nextcommerce_customer_list"
    emulator.row_cap, emulator.row_cap_behavior = 25, behavior
    output = run_tap(fast_config(emulator, nextcommerce_export_row_cap=25), streams={stream})

    assert output.error is None, output.error
    want = emulator.expected_records(stream)
    assert len(want) > 25 * 2
    assert len(output.records(stream)) == len(want), "a row was emitted twice or lost"
    assert emitted(output, stream, want) == by_key(want, ("customer_id",))
    why = {"truncate": "hit the API's row cap (25 rows)", "refuse": "was refused as too large"}[behavior]
    assert re.search(rf"{re.escape(why)}.*; exporting \[.*\) and \[.*\) separately", output.log_text)
    creates = nextcommerce_sandbox.log.entries(host="nextcommerce-api", method="POST", path_pattern=r"/exports/$")
    created = [create for create in creates if create.status == 201]
    refused = [create for create in creates if create.status == 400]
    assert emulator.downloads == len(created)
    if behavior == "refuse":
        assert refused and all(rows_in_export(emulator, stream, create) > 25 for create in refused)
        assert all(rows_in_export(emulator, stream, create) <= 25 for create in created), "an over-cap file"
    else:
        assert not refused and any(rows_in_export(emulator, stream, create) > 25 for create in created)
    bookmarks = [
        s["bookmarks"][stream]["replication_key_value"]
        for s in output.states()
        if s.get("bookmarks", {}).get(stream, {}).get("replication_key_value")
    ]
    assert bookmarks == sorted(bookmarks)


def test_create_raises_export_too_large_only_for_a_refusal_that_speaks_of_the_cap(nextcommerce_sandbox):
    emulator = nextcommerce_sandbox.nextcommerce
    api = build_api(fast_config(emulator), logging.getLogger("test"))  # the tap's cap: 100000
    window = Window(dt.datetime(2024, 1, 1, tzinfo=UTC), dt.datetime(2024, 2, 1, tzinfo=UTC))
    request = ExportRequest("nextcommerce_order_list", "order_list", window)
    emulator.row_cap, emulator.row_cap_behavior = 5, "refuse"
    with pytest.raises(ExportTooLarge) as too_large:  # the API's own cap, named in words
        api.create(request)
    assert "Exports are limited to 5 objects" in too_large.value.detail
    assert "127.0.0.1" not in too_large.value.detail

    emulator.api_version = "2099-01-01"  # every request now answers 400, in words that say nothing of size
    with pytest.raises(ApiError) as other:
        api.create(request)
    assert other.value.status == 400 and "Unsupported API version" in str(other.value)
    assert emulator.exports_created == 0


@pytest.mark.parametrize(
    "status,body,cap,too_large",
    [
        (400, '{"non_field_errors": ["Exports are limited to 100000 objects; this export has 123456."]}', 100000, True),
        (400, '{"detail": "This export would have 150,000 rows (100,000 allowed)."}', 100000, True),
        (422, '{"error": "Export exceeds the maximum size"}', 100000, True),
        (413, "<html><head><title>413 Request Entity Too Large</title></head></html>", 100000, True),
        (400, '{"detail": "Too many objects to export: 123,456"}', 100000, True),
        (400, '{"date_from": ["Datetime has wrong format. Use one of these formats instead: ..."]}', 100000, False),
        (400, '{"non_field_errors": ["date_from must be on or before date_to."]}', 100000, False),
        (400, '{"date_to": ["2024-01-25T00:00:25Z is not a valid date."]}', 25, False),
        (400, '{"detail": "Exports hold at most 25 rows"}', 25, True),
        (404, '{"detail": "Not found: limit reached"}', 100000, False),
        (429, '{"detail": "Request was throttled: too many requests"}', 100000, False),
    ],
)
def test_which_refusals_speak_of_the_row_cap(status, body, cap, too_large):
    assert speaks_of_row_cap(status, body, cap) is too_large


def test_exports_waiting_together_are_polled_through_one_listing_not_one_request_each(nextcommerce_sandbox):
    emulator = nextcommerce_sandbox.nextcommerce
    nextcommerce_sandbox.faults.arm("export_latency", -1, value=1.2)
    config = fast_config(emulator, export_window_days=60, poll_interval_seconds=0.1, poll_max_interval_seconds=0.4)
    output = run_tap(config)

    assert output.error is None, output.error
    for stream, key in STREAMS.items():
        want_rows = emulator.expected_records(stream)
        assert emitted(output, stream, want_rows) == by_key(want_rows, key), stream
    log = nextcommerce_sandbox.log
    single_polls = log.entries(host="nextcommerce-api", method="GET", path_pattern=r"/exports/\d+/$")
    listings = log.entries(host="nextcommerce-api", method="GET", path_pattern=r"/exports/$")
    polls_reported = sum(int(n) for n in re.findall(r"Summary nextcommerce_\w+: .*?(\d+) polls", output.log_text))
    assert single_polls == [], "an export was polled on its own although the listing showed it"
    # Every poll of 13 exports was answered, by far fewer requests than one each.
    assert polls_reported >= 13
    assert len(listings) < polls_reported / 3, (len(listings), polls_reported)
    assert emulator.rate_limited == 0


def test_429_answers_are_honoured(nextcommerce_sandbox):
    emulator = nextcommerce_sandbox.nextcommerce
    nextcommerce_sandbox.faults.arm("rate_limit", 3)
    output = run_tap(fast_config(emulator), streams={"nextcommerce_return_list"})

    assert output.error is None
    want = emulator.expected_records("nextcommerce_return_list")
    assert emitted(output, "nextcommerce_return_list", want) == by_key(want, ("return_id",))
    assert nextcommerce_sandbox.faults.fired["rate_limit"] == 3
    assert "rate limited, waiting 1.0s as the API asked" in output.log_text


def test_an_expired_file_url_is_refreshed_without_a_new_export(nextcommerce_sandbox):
    emulator = nextcommerce_sandbox.nextcommerce
    nextcommerce_sandbox.faults.arm("url_expired", 1)
    output = run_tap(fast_config(emulator, export_window_days=60), streams={"nextcommerce_dispute_list"})

    assert output.error is None
    want = emulator.expected_records("nextcommerce_dispute_list")
    assert emitted(output, "nextcommerce_dispute_list", want) == by_key(want, ("dispute_id",))
    assert emulator.exports_created == 1
    assert emulator.download_urls_issued == 2
    downloads = nextcommerce_sandbox.log.entries(host="nextcommerce-files")
    assert [d.status for d in downloads] == [403, 200]
    assert all("authorization" not in d.headers for d in downloads)


def test_a_rerun_reuses_the_export_already_made_for_the_same_range(nextcommerce_sandbox):
    emulator = nextcommerce_sandbox.nextcommerce
    config = fast_config(emulator, export_window_days=60)
    run_tap(config, streams={"nextcommerce_fulfillment_list"})
    created_after_first = emulator.exports_created

    second = run_tap(config, streams={"nextcommerce_fulfillment_list"})  # no state: a re-run after a crash
    assert second.error is None
    assert emulator.exports_created == created_after_first
    assert "reusing existing export" in second.log_text
    want = emulator.expected_records("nextcommerce_fulfillment_list")
    assert emitted(second, "nextcommerce_fulfillment_list", want) == by_key(want, ("fulfillment_id",))


def test_an_export_stuck_in_pending_times_out_naming_the_export(nextcommerce_sandbox):
    emulator = nextcommerce_sandbox.nextcommerce
    nextcommerce_sandbox.faults.arm("export_stuck", -1)
    output = run_tap(
        fast_config(emulator, export_timeout_seconds=0.5, export_window_days=60), streams={"nextcommerce_order_list"}
    )
    assert output.error is not None
    assert re.search(r"nextcommerce_order_list.* export \d+ was still 'pending' after \d+s", str(output.error))
    assert output.records("nextcommerce_order_list") == []


def test_date_ranges_sent_are_inclusive_whole_seconds_that_meet_exactly(nextcommerce_sandbox):
    emulator = nextcommerce_sandbox.nextcommerce
    run_tap(fast_config(emulator, export_window_days=20), streams={"nextcommerce_order_list"})
    creates = nextcommerce_sandbox.log.entries(host="nextcommerce-api", method="POST")
    ranges = sorted((e.body["date_from"], e.body["date_to"]) for e in creates)
    assert ranges[0][0] == "2024-01-01T00:00:00Z"
    assert ranges[-1][1] == "2024-02-29T23:59:59Z"
    for (_, end), (start, _) in itertools.pairwise(ranges):
        gap = dt.datetime.fromisoformat(start.replace("Z", "+00:00")) - dt.datetime.fromisoformat(
            end.replace("Z", "+00:00")
        )
        assert gap == dt.timedelta(seconds=1)
    assert all(e.headers.get("x-29next-api-version") == "2024-04-01" for e in creates)


def test_a_listing_that_shows_one_export_finished_lists_again_soon_for_the_others(nextcommerce_sandbox):
    """Exports started together tend to finish together: the board does not leave the others to
    their own (here 30 s) poll schedule once a listing shows one of them finished."""
    import logging
    import threading
    import time

    from tap_commerce_exports.exports.job import ExportRequest, ExportState
    from tap_commerce_exports.exports.status_board import StatusBoard
    from tap_commerce_exports.exports.windows import Window
    from tap_commerce_exports.sources.nextcommerce import build_api

    emulator, faults = nextcommerce_sandbox.nextcommerce, nextcommerce_sandbox.faults
    api = build_api(fast_config(emulator), logging.getLogger("test"))
    window = Window(dt.datetime(2024, 1, 1, tzinfo=UTC), dt.datetime(2024, 1, 15, tzinfo=UTC))
    requests = [ExportRequest(f"nextcommerce_{code}", code, window) for code in ("order_list", "customer_list")]
    faults.arm("export_latency", 1, value=0.3)
    quick = api.create(requests[0])
    faults.arm("export_latency", 1, value=1.2)
    slow = api.create(requests[1])
    board = StatusBoard(api, threading.Event())
    board.track(quick)
    board.track(slow)
    nextcommerce_sandbox.log.clear()

    woke: dict = {}

    def wait_for_slow() -> None:
        started = time.monotonic()
        woke["handle"], woke["after"] = board.sleep(slow.export_id, 30), time.monotonic() - started

    sleeper = threading.Thread(target=wait_for_slow)
    sleeper.start()
    time.sleep(0.5)
    assert board.status(requests[0], quick, max_age=0).state is ExportState.READY  # the quick one's due poll
    sleeper.join(timeout=10)

    assert woke["handle"].export_id == slow.export_id and woke["handle"].state is ExportState.READY
    assert woke["after"] < 5, woke  # not its own 30 s
    listings = nextcommerce_sandbox.log.entries(host="nextcommerce-api", method="GET", path_pattern=r"/exports/$")
    assert 2 <= len(listings) <= 4, [e.at for e in listings]


def test_an_order_changed_after_its_window_was_read_comes_back_updated_on_the_next_run(nextcommerce_sandbox):
    """Which date Next Commerce's range filters on is undocumented (creation, most likely): an order
    refunded a week later is not in any newer window, so each run re-reads nextcommerce_reread_hours."""
    emulator = nextcommerce_sandbox.nextcommerce
    emulator.rate_per_second = emulator.rate_burst = 100
    missing = {label for code, label in emulator.reality.missing_columns if code == "order_list"}
    label = next(label for label in ("Status", "Customer Email", "Currency") if label not in missing)
    key = header_key(label)
    config = {**emulator.tap_config(), "nextcommerce_requests_per_second": 50, "end_date": "2024-02-15T00:00:00Z"}
    first = run_tap(config, streams={"nextcommerce_order_list"})
    assert first.error is None, first.error
    orders = first.records("nextcommerce_order_list")
    changed = len(orders) - 1  # the last order of the window: three days before the bookmark
    emulator.change_row("nextcommerce_order_list", changed, {label: "refunded-later"})
    old_value = orders[changed][key]

    second = run_tap(
        {**config, "end_date": "2024-02-16T00:00:00Z"}, state=first.final_state, streams={"nextcommerce_order_list"}
    )
    assert second.error is None, second.error
    again = {r["order_number"]: r for r in second.records("nextcommerce_order_list")}
    assert again[orders[changed]["order_number"]][key] == "refunded-later" != old_value
    creates = [e.body for e in nextcommerce_sandbox.log.entries(method="POST", path_pattern=r"exports/$")]
    assert creates[-1]["date_from"] == "2024-02-08T00:00:00Z"  # the bookmark less a week

    without = run_tap(
        {**config, "end_date": "2024-02-16T00:00:00Z", "nextcommerce_reread_hours": 0},
        state=first.final_state,
        streams={"nextcommerce_order_list"},
    )
    assert orders[changed]["order_number"] not in {
        r["order_number"] for r in without.records("nextcommerce_order_list")
    }

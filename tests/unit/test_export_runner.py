"""The export lifecycle's rules, against a scripted API: no HTTP, no sleeps worth the name."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from tap_commerce_exports.exports.download import ExportCancelled
from tap_commerce_exports.exports.job import (
    ExportFailed,
    ExportRequest,
    ExportState,
    ExportTimedOut,
    PollPolicy,
    SourceHalted,
)
from tap_commerce_exports.exports.runner import ExportRunner
from tap_commerce_exports.exports.windows import UTC, Window
from tests.unit.fakes import LOGGER, QUICK_POLLS, FakeDownloader, ScriptedApi

JANUARY = Window(dt.datetime(2024, 1, 1, tzinfo=UTC), dt.datetime(2024, 2, 1, tzinfo=UTC))
REQUEST = ExportRequest("orders", "order", JANUARY)


def runner_for(api: ScriptedApi, downloader: FakeDownloader | None = None, **policy) -> ExportRunner:
    poll_policy = PollPolicy(**{**QUICK_POLLS.__dict__, **policy})
    return ExportRunner(api, downloader or FakeDownloader(), poll_policy, LOGGER)


def test_an_export_is_polled_until_ready_then_downloaded_once():
    api = ScriptedApi(script=("pending", "pending", "pending", "done"))
    downloader = FakeDownloader()
    ready = runner_for(api, downloader).prepare(REQUEST)
    assert ready.handle.state is ExportState.READY
    assert (api.count("create"), api.count("poll"), ready.polls) == (1, 3, 3)
    assert downloader.fetched == ["https://files.example/exp-1.csv"]
    ready.file.remove()


def test_a_failed_export_is_created_again_up_to_max_recreates_then_named_in_the_error():
    api = ScriptedApi(script=("pending", "error"))
    api.max_recreates = 2
    with pytest.raises(ExportFailed) as failed:
        runner_for(api).prepare(REQUEST)
    assert api.count("create") == 3
    assert "exp-1 (error), exp-2 (error), exp-3 (error)" in str(failed.value)
    assert "orders" in str(failed.value) and str(JANUARY) in str(failed.value)


def test_a_file_that_never_arrives_whole_is_cured_by_a_new_export():
    api = ScriptedApi(script=("done",))
    downloader = FakeDownloader(broken={"https://files.example/exp-1.csv"})
    ready = runner_for(api, downloader).prepare(REQUEST)
    assert ready.handle.export_id == "exp-2"
    ready.file.remove()


def test_an_export_still_pending_at_the_timeout_names_the_setting_to_raise():
    api = ScriptedApi(script=("pending",))
    with pytest.raises(ExportTimedOut, match=r"export_timeout_seconds=0\.05") as timed_out:
        runner_for(api, timeout=0.05).prepare(REQUEST)
    assert "exp-1" in str(timed_out.value)


def test_an_export_remembered_in_state_is_resumed_instead_of_paid_for_again():
    api = ScriptedApi(can_resume=True, resumable={"exp-old": "done"})
    runner = runner_for(api)
    request = ExportRequest("orders", "order", JANUARY, remembered_export_id="exp-old")
    ready = runner.prepare(request)
    assert ready.handle.export_id == "exp-old" and api.count("create") == 0
    assert runner.started_export_ids() == {request.key: "exp-old"}
    runner.forget(request)
    assert runner.started_export_ids() == {}
    ready.file.remove()


def test_a_remembered_export_the_api_no_longer_has_is_created_anew():
    api = ScriptedApi(can_resume=True)
    ready = runner_for(api).prepare(ExportRequest("orders", "order", JANUARY, remembered_export_id="exp-gone"))
    assert api.calls[0] == ("resume", "exp-gone") and ready.handle.export_id == "exp-1"
    ready.file.remove()


class QuotaSpent(RuntimeError):
    stops_source = True


def test_an_error_that_stops_the_source_halts_every_later_export_without_a_call():
    api = ScriptedApi(create_error=lambda request: QuotaSpent("api_calls_cycle: quota spent"))
    runner = runner_for(api)
    with pytest.raises(QuotaSpent):
        runner.prepare(REQUEST)
    api.create_error = lambda request: None
    with pytest.raises(SourceHalted, match="quota spent"):
        runner.prepare(ExportRequest("orders", "order", None))
    assert api.count("create") == 0


def test_stopping_ends_the_wait_for_a_pending_export():
    api = ScriptedApi(script=("pending",))
    stopping = threading.Event()
    runner = ExportRunner(
        api, FakeDownloader(), PollPolicy(interval=0.01, max_interval=0.01, timeout=60.0), LOGGER, stopping
    )
    threading.Timer(0.05, stopping.set).start()
    with pytest.raises(ExportCancelled, match="exp-1"):
        runner.prepare(REQUEST)


def test_an_abandoned_export_is_not_created_again_after_it_failed():
    api = ScriptedApi(script=("error",))
    with pytest.raises(ExportFailed, match="not created again"):
        runner_for(api).prepare(REQUEST, abandoned=lambda: True)
    assert api.count("create") == 1


def test_exports_waiting_together_are_polled_through_one_listing():
    created_together = threading.Barrier(4)  # every export waits from the first poll on
    api = ScriptedApi(
        script=("pending", "pending", "done"),
        lists_statuses=True,
        create_error=lambda request: (created_together.wait(5), None)[1],
    )
    runner = runner_for(api, interval=0.01, max_interval=0.01)
    requests = [ExportRequest("orders", "order", JANUARY, {"store": str(n)}) for n in range(4)]
    results: list = []
    threads = [threading.Thread(target=lambda r=r: results.append(runner.prepare(r))) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 4 and api.count("poll") == 0
    assert api.count("list") < 4 * 2, api.calls  # fewer listings than one poll per export per step
    for ready in results:
        ready.file.remove()


def test_the_shared_settings_have_one_default_each_and_parse_once():
    from tap_commerce_exports.settings import COMMON_SETTINGS, DEFAULTS, SyncSettings

    declared = {p.name: p.to_dict()[p.name].get("default") for p in COMMON_SETTINGS}
    assert {name: declared[name] for name in DEFAULTS} == DEFAULTS
    settings = SyncSettings.of({"start_date": "2024-01-01T00:00:00Z", "poll_interval_seconds": "0.5"})
    assert settings.export_timeout_seconds == 3600 and settings.max_concurrent_exports == 16
    assert settings.poll_policy.interval == 0.5 and settings.lookahead == 16 and settings.end_date is None


def test_a_status_listing_is_read_until_every_export_is_found_or_a_page_reaches_the_oldest():
    from tap_commerce_exports.exports.status_board import statuses_in_listing

    pages_read = []

    def pages():
        for page in ([{"id": "9"}, {"id": "8"}], [{"id": "7"}, {"id": "6"}], [{"id": "5"}]):
            pages_read.append(page)
            yield page

    def handle_of(export):  # "8" is refused (a file on a host the tap will not call): polled alone
        return None if export["id"] == "8" else ScriptedApi._handle(export["id"], "done")

    found = statuses_in_listing(pages(), {"8", "7"}, handle_of, lambda page: min(e["id"] for e in page) <= "7")
    assert list(found) == ["7"] and len(pages_read) == 2

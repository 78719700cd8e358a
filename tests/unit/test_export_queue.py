"""One partition's exports: window order, look-ahead, failures and splits, with a scripted runner."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import pytest

from tap_commerce_exports.exports.job import ExportFailed, ExportRequest, ExportTooLarge
from tap_commerce_exports.exports.scheduler import ExportQueue, ExportScheduler
from tap_commerce_exports.exports.windows import UTC, Window

DAY = dt.timedelta(days=1)
START = dt.datetime(2024, 1, 1, tzinfo=UTC)


def daily_requests(days: int) -> list[ExportRequest]:
    return [ExportRequest("orders", "order", Window(START + n * DAY, START + (n + 1) * DAY)) for n in range(days)]


class Prepared:
    """A stand-in for `ExportRunner.prepare`: returns the request's window, fails where told, and
    holds each export until the test releases it (so look-ahead can be counted)."""

    def __init__(self, failing: set[int] = frozenset(), held: bool = False) -> None:
        self.failing = failing
        self.started: list[int] = []
        self.release = threading.Event()
        if not held:
            self.release.set()
        self._lock = threading.Lock()
        self._running = 0
        self.most_at_once = 0

    def __call__(self, request: ExportRequest, abandoned) -> object:
        day = (request.window.start - START).days
        with self._lock:
            self.started.append(day)
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)
        self.release.wait(5)
        with self._lock:
            self._running -= 1
        if day in self.failing:
            raise ExportFailed(f"{request.describe()}: export failed")
        return request.window


@pytest.fixture
def scheduler():
    scheduler = ExportScheduler(8, logging.getLogger("tests.unit"))
    yield scheduler
    scheduler.shutdown()


def test_exports_are_handed_over_in_window_order(scheduler):
    queue = ExportQueue(scheduler, Prepared(), daily_requests(5), lookahead=3)
    read = []
    while queue:
        read.append(queue.next_ready())
    assert read == [r.window for r in daily_requests(5)]


def test_no_more_than_lookahead_exports_run_ahead_of_the_reader(scheduler):
    prepared = Prepared(held=True)
    queue = ExportQueue(scheduler, prepared, daily_requests(6), lookahead=2)
    assert len(queue.requests()) == 6
    time.sleep(0.05)
    assert not queue.head_done  # nothing ready yet
    assert sorted(prepared.started) == [0, 1]
    prepared.release.set()
    read = [queue.next_ready() for _ in range(6)]
    assert read == [r.window for r in daily_requests(6)]
    assert prepared.most_at_once <= 2


def test_a_failed_window_spares_earlier_windows_and_stops_later_ones(scheduler):
    prepared = Prepared(failing={2})
    queue = ExportQueue(scheduler, prepared, daily_requests(5), lookahead=1)
    assert queue.next_ready() == daily_requests(5)[0].window
    assert queue.next_ready() == daily_requests(5)[1].window
    with pytest.raises(ExportFailed):
        queue.next_ready()
    time.sleep(0.05)  # days 3 and 4 are never created: they could not move the bookmark
    assert sorted(prepared.started) == [0, 1, 2]


def test_the_halves_of_a_split_window_are_read_before_the_windows_after_it(scheduler):
    requests = daily_requests(2)
    queue = ExportQueue(scheduler, Prepared(), requests, lookahead=1)
    first = queue.next_ready()
    whole = requests[1].window
    middle = whole.start + (whole.end - whole.start) / 2
    halves = [
        ExportRequest("orders", "order", Window(whole.start, middle)),
        ExportRequest("orders", "order", Window(middle, whole.end)),
    ]
    queue.push_front(halves)
    assert [first, queue.next_ready(), queue.next_ready(), queue.next_ready()] == [
        requests[0].window,
        halves[0].window,
        halves[1].window,
        whole,
    ]


def test_a_window_too_large_is_not_the_partitions_failure(scheduler):
    requests = daily_requests(2)

    def prepare(request, abandoned):
        if request is requests[0]:
            raise ExportTooLarge(request, "over the row cap")
        return request.window

    queue = ExportQueue(scheduler, prepare, requests, lookahead=2)
    with pytest.raises(ExportTooLarge):
        queue.next_ready()
    assert queue.next_ready() == requests[1].window


def test_a_queued_export_says_so_and_says_how_long_it_waited(caplog):
    scheduler = ExportScheduler(1, logging.getLogger("tests.unit"))
    release = threading.Event()
    try:
        with caplog.at_level(logging.INFO, logger="tests.unit"):
            first = scheduler.submit(lambda request: release.wait(5), daily_requests(1)[0])
            second = scheduler.submit(lambda request: "done", daily_requests(2)[1])
            release.set()
            assert first.result(5) and second.result(5) == "done"
    finally:
        scheduler.shutdown()
    assert "queued: all 1 export slots are busy (max_concurrent_exports)" in caplog.text
    assert "export slot free after" in caplog.text

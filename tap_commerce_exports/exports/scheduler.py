"""Where exports wait in parallel: one pool for the whole tap, bounded by max_concurrent_exports.

Exports take minutes on the vendor's side, so the tap starts the first exports of every selected
stream and partition before it syncs the first stream (see `ExportStream.start_exports`). Workers
run create -> poll -> download; the main thread parses files in order and writes messages, so
Singer output stays ordered and single-threaded.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from tap_commerce_exports.exports.download import ExportCancelled
from tap_commerce_exports.exports.job import ExportFailed, ExportRequest, ExportTooLarge, ReadyExport

#: The runner's prepare: the export's file, unless `abandoned()` says it is no longer wanted.
Prepare = Callable[[ExportRequest, Callable[[], bool]], ReadyExport]
WAIT_TICK_SECONDS = 1.0


class ExportScheduler:
    """A shared pool of export workers. An export that must wait for a free slot says so, and says
    how long it waited when it starts: otherwise a queued stream looks stuck."""

    def __init__(self, max_concurrent_exports: int, logger: logging.Logger | None = None) -> None:
        self.max_concurrent_exports = max_concurrent_exports
        self.logger = logger or logging.getLogger(__name__)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent_exports, thread_name_prefix="export")
        self._lock = threading.Lock()
        self._busy = 0  # exports submitted and not finished: above the pool's size, some wait
        #: Set when the run ends: waits, polls and retries of every source stop.
        self.stopping = threading.Event()

    def submit(self, prepare: Callable[[ExportRequest], ReadyExport], request: ExportRequest) -> Future[ReadyExport]:
        with self._lock:
            self._busy += 1
            queued = self._busy > self.max_concurrent_exports
            if queued:
                self.logger.info(
                    "%s: queued: all %d export slots are busy (max_concurrent_exports)",
                    request.describe(),
                    self.max_concurrent_exports,
                )
            future = self._pool.submit(self._run, prepare, request, time.monotonic() if queued else None)
        future.add_done_callback(self._finished)  # also when cancelled before it ran
        return future

    def _finished(self, future: Future[ReadyExport]) -> None:
        with self._lock:
            self._busy -= 1

    def _run(
        self, prepare: Callable[[ExportRequest], ReadyExport], request: ExportRequest, queued_at: float | None
    ) -> ReadyExport:
        if queued_at is not None:
            self.logger.info(
                "%s: export slot free after %.0fs in the queue", request.describe(), time.monotonic() - queued_at
            )
        return prepare(request)

    def shutdown(self) -> None:
        self.stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


class PartitionFailed(ExportFailed):
    """An earlier window of the partition failed: its later windows are not exported (they could not
    move the bookmark past the failed one, so they would be paid for and thrown away)."""


class ExportQueue:
    """One partition's exports in window order, at most `lookahead` running ahead of the reader.

    Row-cap splitting pushes the halves of a window to the front, so they are read before the
    windows after them and the bookmark still moves forward in order. Once one export of the
    partition fails, its other exports are not created.
    """

    def __init__(self, scheduler: ExportScheduler, prepare: Prepare, requests: list[ExportRequest], lookahead: int):
        self._scheduler = scheduler
        self._prepare = prepare
        self._waiting: deque[ExportRequest] = deque(requests)
        self._running: deque[tuple[ExportRequest, Future[ReadyExport]]] = deque()
        self._lookahead = max(1, lookahead)
        #: The earliest window of this partition that failed, and why: windows from it on are not
        #: exported (they could not move the bookmark); earlier ones still are.
        self._failure: BaseException | None = None
        self._failed_from: dt.datetime | None = None
        self.top_up()

    def top_up(self) -> None:
        while self._waiting and len(self._running) < self._lookahead and not self._abandoned(self._waiting[0]):
            request = self._waiting.popleft()
            self._running.append((request, self._scheduler.submit(self._prepare_unless_failed, request)))

    def _abandoned(self, request: ExportRequest) -> bool:
        if self._failure is None:
            return False
        return request.window is None or self._failed_from is None or request.window.start >= self._failed_from

    def push_front(self, requests: list[ExportRequest]) -> None:
        for request in reversed(requests):
            self._running.appendleft((request, self._scheduler.submit(self._prepare_unless_failed, request)))

    def _prepare_unless_failed(self, request: ExportRequest) -> ReadyExport:
        """In a worker: the export, unless one before it in this partition failed already."""
        if self._abandoned(request):
            raise PartitionFailed(f"{request.describe()}: not exported: an earlier window failed ({self._failure})")
        try:
            return self._prepare(request, lambda: self._abandoned(request))
        except (ExportTooLarge, ExportCancelled):
            raise  # a split, or the run stopping: not the partition's failure
        except Exception as exc:
            self._note_failure(request, exc)
            raise

    def _note_failure(self, request: ExportRequest, error: BaseException) -> None:
        start = request.window.start if request.window is not None else None
        if self._failure is None or (start is not None and self._failed_from is not None and start < self._failed_from):
            self._failure, self._failed_from = error, start

    def allow_lookahead(self, lookahead: int) -> None:
        """Let more exports run ahead of the reader (a stream starts every partition's first export
        before any partition's second)."""
        self._lookahead = max(1, lookahead)
        self.top_up()

    def requests(self) -> list[ExportRequest]:
        """The exports this queue has yet to hand over, running or waiting, in window order."""
        return [request for request, _ in self._running] + list(self._waiting)

    @property
    def head_done(self) -> bool:
        """Whether the next export in order is settled (ready or failed): reading it will not wait."""
        self.top_up()
        return not self._running or self._running[0][1].done()

    def __bool__(self) -> bool:
        return bool(self._running or self._waiting)

    def next_ready(self, while_waiting: Callable[[], None] = lambda: None) -> ReadyExport:
        """The next export in order, once its file is on disk (raises what its worker raised).

        `while_waiting` runs on this (the main) thread about once a second while the export is
        not ready, so the stream can write STATE about exports started in the meantime.
        """
        self.top_up()
        _, future = self._running.popleft()
        while True:
            try:
                ready = future.result(timeout=WAIT_TICK_SECONDS)
                break
            except FutureTimeout:
                while_waiting()
        self.top_up()
        return ready

    def cancel(self) -> None:
        """Stop what has not started; delete files downloaded but never read, now or once downloaded."""
        for _, future in self._running:
            if not future.cancel():
                future.add_done_callback(_remove_unread_file)
        self._running.clear()
        self._waiting.clear()


def _remove_unread_file(future: Future[ReadyExport]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().file.remove()

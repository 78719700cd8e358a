"""The export-job engine: create -> poll -> resolve the file URL -> download whole -> (parse).

Each API says how it spells those steps by implementing `ExportApi`; the lifecycle is written once
in `ExportRunner`. "Where do we wait" is `ExportRunner._wait_until_ready`; a failed export is
re-created a bounded number of times in `ExportRunner.prepare`; an expired file URL is renewed the
cheapest way the API allows (`ExportApi.fresh_file_url`).
"""

from __future__ import annotations

import csv
import enum
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tap_commerce_exports.engine.download import DownloadedFile, DownloadError, ExportCancelled, FileDownloader
from tap_commerce_exports.engine.windows import Window


class ExportState(enum.Enum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


class ExportFailed(RuntimeError):
    """An export could not be produced; the message names the stream, window and export id."""


class ExportTimedOut(ExportFailed):
    pass


class SourceHalted(ExportFailed):
    """An error earlier in the run means no call to this API can succeed until it resets (its quota
    for the billing cycle is spent): the source's other exports are not tried."""


def stops_source(error: BaseException) -> bool:
    """Whether the error ends every export of its API for the rest of the run (engine/http.py marks
    such errors: a spent billing-cycle quota, a rate-limit wait longer than allowed)."""
    return bool(getattr(error, "stops_source", False))


class ExportTooLarge(ExportFailed):
    """The API refused to create an export because its window holds more than the API's row cap.

    Raised by `ExportApi.create`; the stream splits the window in two and exports each half, just as
    it does for a file that came back truncated at the cap (Next Commerce documents the cap, not
    which of the two it does: ../shared/reference/NOTES.md).
    """

    def __init__(self, request: ExportRequest, detail: str) -> None:
        super().__init__(f"{request.describe()}: the API refused the export as too large: {detail}")
        self.request = request
        self.detail = detail


@dataclass(frozen=True)
class ExportRequest:
    """One export a stream wants: a type, a window (None: everything) and a partition."""

    stream_name: str
    export_type: str
    window: Window | None
    partition: dict[str, Any] = field(default_factory=dict)
    fields: tuple[str, ...] = ()
    #: An export a previous run created for exactly this request and never read (from state).
    remembered_export_id: str | None = field(default=None, compare=False)

    def describe(self) -> str:
        where = "".join(f" {key}={value}" for key, value in self.partition.items())
        return f"{self.stream_name}{where} {self.window or '(whole export)'}"

    @property
    def key(self) -> tuple:
        return (self.stream_name, tuple(sorted(self.partition.items())), self.window)


@dataclass
class ExportHandle:
    """What the API told us about one export, in the API's own words plus our reading of them."""

    export_id: str
    status: str
    state: ExportState
    file_url: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class PollPolicy:
    """Poll from `interval` up to `max_interval` (x1.25 each time); give up after `timeout` seconds.

    A gentle growth: an export is noticed at most a quarter of its age after it became ready.
    """

    interval: float = 2.0
    max_interval: float = 60.0
    timeout: float = 3600.0
    progress_every: float = 30.0

    def intervals(self):
        wait = self.interval
        while True:
            yield wait
            wait = min(self.max_interval, wait * 1.25)


class ExportApi(ABC):
    """How one API spells the export lifecycle. Only `create` is required."""

    name: str = "api"
    #: Re-create an export that ended FAILED at most this many times.
    max_recreates: int = 3
    #: Rows at which an export is silently truncated (Next Commerce); None when uncapped.
    row_cap: int | None = None
    #: Whether an export created by an earlier run can be polled and downloaded later.
    can_resume: bool = False
    #: The API's client (engine/http.py); the runner shares its stop signal with it.
    client: Any = None
    #: Whether `poll_many` can answer for many exports in one request (see StatusBoard).
    lists_statuses: bool = False

    @abstractmethod
    def create(self, request: ExportRequest) -> ExportHandle:
        """Start an export. Synchronous APIs answer READY with a file URL at once."""

    def poll(self, request: ExportRequest, handle: ExportHandle) -> ExportHandle:
        """Ask for the export's status again."""
        return handle

    def poll_many(self, handles: list[ExportHandle]) -> dict[str, ExportHandle]:
        """The status of as many of these exports as one listing shows, by export id."""
        raise NotImplementedError

    def file_url(self, request: ExportRequest, handle: ExportHandle) -> str:
        """Where the finished file is (Next Commerce needs a separate call for it)."""
        if not handle.file_url:
            raise ExportFailed(f"{request.describe()}: export {handle.export_id} is ready but has no file URL")
        return handle.file_url

    def fresh_file_url(self, request: ExportRequest, handle: ExportHandle) -> str | None:
        """A new URL for the same file after the old one expired; None: the export must be re-created."""
        return None

    def file_headers(self) -> dict[str, str]:
        """Headers for the file host. Empty unless that host needs the API's credentials."""
        return {}

    def find_reusable(self, request: ExportRequest) -> ExportHandle | None:
        """An export the API already holds for exactly this request (a re-run after a crash)."""
        return None

    def resume(self, request: ExportRequest, export_id: str) -> ExportHandle | None:
        """The export remembered in state, if the API still has it; None: create a new one."""
        return None


#: How often a waiting export looks at the stop signal while it sleeps on the board.
STOP_CHECK_SECONDS = 0.25
#: The oldest listing that may answer a poll that falls due.
STATUS_MAX_AGE = 1.0


class StatusBoard:
    """The latest listing of export statuses of one API, shared by every worker waiting on it.

    A rate limit counts requests, not exports: with 13 exports in flight under Next Commerce's 4
    requests/second, polling each export on its own spends most of the budget on "still pending" and
    leaves too little for creates and downloads. Where an API can list its exports with their status
    (`ExportApi.lists_statuses`), each export keeps its own backoff schedule, but a poll that falls due
    is answered by the latest listing when that listing is recent enough (`max_age`), and a listing made
    for one export wakes every other export it shows ready. Exports missing from a listing are polled
    one by one, so a listing that pages out of reach costs time, never correctness.
    """

    def __init__(self, api: ExportApi, stopping: threading.Event) -> None:
        self.api = api
        self.stopping = stopping
        self._listing_lock = threading.Lock()  # one listing at a time; the others reuse it
        self._changed = threading.Condition()
        self._waiting: dict[str, ExportHandle] = {}
        self._latest: dict[str, ExportHandle] = {}
        self._listed_at = float("-inf")
        #: Whether the latest listing showed some waiting export finished (see `sleep`).
        self._latest_showed_finished = False

    def track(self, handle: ExportHandle) -> None:
        with self._changed:
            self._waiting[handle.export_id] = handle

    def untrack(self, export_id: str) -> None:
        with self._changed:
            self._waiting.pop(export_id, None)

    def sleep(self, export_id: str, seconds: float) -> ExportHandle | None:
        """Sleep until `seconds` pass (None) or a listing shows the export no longer pending.

        Exports started together tend to finish together: while the latest listing showed some
        finished, the board lists again after STATUS_MAX_AGE instead of waiting for the next poll
        that falls due (without moving any export's own schedule). Returns None early when the
        run is stopping: the caller checks `stopping`.
        """
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set():
            with self._changed:
                latest = self._latest.get(export_id)
                if latest is not None and latest.state is not ExportState.PENDING:
                    return latest
                now = time.monotonic()
                if now >= deadline:
                    return None
                relist_at = self._listed_at + STATUS_MAX_AGE if self._latest_showed_finished else deadline
                if now < relist_at:
                    self._changed.wait(min(relist_at - now, STOP_CHECK_SECONDS))
                    continue
            self._refresh(STATUS_MAX_AGE)
        return None

    def status(self, request: ExportRequest, handle: ExportHandle, max_age: float) -> ExportHandle:
        """The export's status as of at most `max_age` seconds ago: listed again only when older."""
        self._refresh(max_age)
        latest = self._latest.get(handle.export_id)
        return latest if latest is not None else self.api.poll(request, handle)

    def _refresh(self, max_age: float) -> None:
        """List again unless the latest listing started less than `max_age` seconds ago."""
        asked = time.monotonic()
        with self._listing_lock:
            if self._listed_at >= asked - max_age:
                return
            with self._changed:
                waiting = list(self._waiting.values())
            started = time.monotonic()
            answers = self.api.poll_many(waiting) if waiting else {}
            with self._changed:
                self._latest, self._listed_at = answers, started
                self._latest_showed_finished = any(a.state is not ExportState.PENDING for a in answers.values())
                self._changed.notify_all()


@dataclass
class ReadyExport:
    """A finished export whose file is on local disk, whole."""

    request: ExportRequest
    handle: ExportHandle
    file: DownloadedFile
    waited_seconds: float
    polls: int
    #: Data rows in the file, counted only for APIs that truncate at a row cap.
    row_count: int | None = None

    @property
    def at_row_cap(self) -> bool:
        return self.row_count is not None and self.row_count >= self.request_row_cap

    request_row_cap: int = 0


def count_csv_rows(path: str) -> int:
    """Data rows in a CSV file (quoted newlines are part of a row, so lines are not rows)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as text:
        return max(0, sum(1 for _ in csv.reader(text)) - 1)


@dataclass
class _Tracked:
    handle: ExportHandle
    started: float
    polls: int = 0


class ExportRunner:
    """Runs the lifecycle for one request. Thread-safe: one runner serves all of a tap's exports."""

    def __init__(
        self,
        api: ExportApi,
        downloader: FileDownloader,
        poll_policy: PollPolicy,
        logger: logging.Logger,
        stopping: threading.Event | None = None,
    ) -> None:
        self.api = api
        self.downloader = downloader
        self.poll_policy = poll_policy
        self.logger = logger
        self.stopping = stopping or threading.Event()
        self.status_board = StatusBoard(api, self.stopping) if api.lists_statuses else None
        self._started_lock = threading.Lock()
        self._started: dict[tuple, str] = {}
        #: The error that stopped this API for the rest of the run, if one did (see `stops_source`).
        self.halted_by: BaseException | None = None

    def halt(self, error: BaseException) -> None:
        """No more calls for this API's exports: `error` says none can succeed this run."""
        if self.halted_by is None:
            self.halted_by = error
            self.logger.error("%s: no more exports this run: %s", self.api.name, error)

    def raise_if_halted(self, request: ExportRequest) -> None:
        if self.halted_by is not None:
            raise SourceHalted(f"{request.describe()}: not exported: {self.halted_by}")

    def started_export_ids(self) -> dict[tuple, str]:
        """Exports created (or resumed) and not yet read, by request key: remembered in state."""
        with self._started_lock:
            return dict(self._started)

    def forget(self, request: ExportRequest) -> None:
        with self._started_lock:
            self._started.pop(request.key, None)

    def prepare(self, request: ExportRequest, abandoned: Callable[[], bool] = lambda: False) -> ReadyExport:
        """Create (or reuse) the export, wait for it, and download its file whole. `abandoned` says
        the export is no longer wanted (its partition failed): it is not created again."""
        self.raise_if_halted(request)
        try:
            return self._prepare(request, abandoned)
        except Exception as exc:
            if stops_source(exc):
                self.halt(exc)
            raise

    def _prepare(self, request: ExportRequest, abandoned: Callable[[], bool]) -> ReadyExport:
        failures: list[str] = []
        # At least one re-creation: a file damaged at the source is only cured by a new export.
        attempts = max(self.api.max_recreates, 1) + 1
        for attempt in range(attempts):
            tracked = self._start(request, request.remembered_export_id, first_attempt=attempt == 0)
            tracked = self._wait_until_ready(request, tracked)
            if tracked.handle.state is ExportState.READY:
                try:
                    file = self._download(request, tracked)
                except DownloadError as exc:
                    failures.append(f"{tracked.handle.export_id} (file never complete)")
                    self.logger.warning("%s; creating the export again (%d of %d)", exc, attempt + 1, attempts - 1)
                    continue
                waited = time.monotonic() - tracked.started
                ready = ReadyExport(request, tracked.handle, file, waited, tracked.polls)
                if self.api.row_cap:
                    ready.row_count, ready.request_row_cap = count_csv_rows(file.path), self.api.row_cap
                return ready
            failures.append(f"{tracked.handle.export_id} ({tracked.handle.status})")
            if attempt >= self.api.max_recreates:
                break
            delay = min(self.poll_policy.interval * 2**attempt, self.poll_policy.max_interval)
            self.logger.warning(
                "%s: export %s ended '%s'; creating it again in %.1fs (%d of %d)",
                request.describe(),
                tracked.handle.export_id,
                tracked.handle.status,
                delay,
                attempt + 1,
                self.api.max_recreates,
            )
            if self.stopping.wait(delay):
                raise ExportCancelled(f"{request.describe()}: stopped before re-creating the export")
            if abandoned():
                raise ExportFailed(f"{request.describe()}: not created again: an earlier window of it failed")
        raise ExportFailed(
            f"{request.describe()}: export failed {len(failures)} times: {', '.join(failures)}; giving up"
        )

    def _start(self, request: ExportRequest, remembered_export_id: str | None, *, first_attempt: bool) -> _Tracked:
        """Resume or reuse an export on the first attempt; later attempts always create a new one."""
        handle = None
        if first_attempt and remembered_export_id:
            handle = self.api.resume(request, remembered_export_id)
            if handle:
                self.logger.info("%s: resuming export %s from state", request.describe(), handle.export_id)
        if handle is None and first_attempt:
            handle = self.api.find_reusable(request)
            if handle:
                self.logger.info("%s: reusing existing export %s", request.describe(), handle.export_id)
        if handle is None:
            self.raise_if_halted(request)
            handle = self.api.create(request)
            self.logger.info("%s: created export %s (status %s)", request.describe(), handle.export_id, handle.status)
        if self.api.can_resume:
            with self._started_lock:
                self._started[request.key] = handle.export_id
        return _Tracked(handle, time.monotonic())

    def _wait_until_ready(self, request: ExportRequest, tracked: _Tracked) -> _Tracked:
        board = self.status_board
        if board is not None:
            board.track(tracked.handle)
        try:
            return self._poll_until_ready(request, tracked)
        finally:
            if board is not None:
                board.untrack(tracked.handle.export_id)

    def _poll_until_ready(self, request: ExportRequest, tracked: _Tracked) -> _Tracked:
        policy = self.poll_policy
        last_status = tracked.handle.status
        last_report = tracked.started
        for wait in policy.intervals():
            if tracked.handle.state is not ExportState.PENDING:
                return tracked
            elapsed = time.monotonic() - tracked.started
            if elapsed >= policy.timeout:
                raise ExportTimedOut(
                    f"{request.describe()}: export {tracked.handle.export_id} was still "
                    f"'{tracked.handle.status}' after {elapsed:.0f}s (export_timeout_seconds={policy.timeout:g}); "
                    "raise export_timeout_seconds or try a smaller export_window_days"
                )
            tracked.handle = self._next_status(request, tracked.handle, min(wait, max(0.0, policy.timeout - elapsed)))
            tracked.polls += 1
            now = time.monotonic()
            if tracked.handle.status != last_status or now - last_report >= policy.progress_every:
                self.logger.info(
                    "%s: export %s is %s after %.0fs (%d polls)",
                    request.describe(),
                    tracked.handle.export_id,
                    tracked.handle.status,
                    now - tracked.started,
                    tracked.polls,
                )
                last_status, last_report = tracked.handle.status, now
        raise AssertionError("unreachable")  # intervals() never ends

    def _next_status(self, request: ExportRequest, handle: ExportHandle, wait: float) -> ExportHandle:
        """Wait, then ask for the status: through the board when the API can list statuses."""
        board = self.status_board
        if board is None:
            if self.stopping.wait(wait):
                raise self._cancelled(request, handle)
            return self.api.poll(request, handle)
        settled = board.sleep(handle.export_id, wait)
        if self.stopping.is_set():
            raise self._cancelled(request, handle)
        if settled is not None:
            return settled  # a listing made for another export showed this one finished
        # A listing up to a quarter of the wait old (at most STATUS_MAX_AGE) is as good as a poll now.
        return board.status(request, handle, max_age=min(STATUS_MAX_AGE, wait / 4))

    @staticmethod
    def _cancelled(request: ExportRequest, handle: ExportHandle) -> ExportCancelled:
        return ExportCancelled(f"{request.describe()}: stopped while waiting for export {handle.export_id}")

    def _download(self, request: ExportRequest, tracked: _Tracked) -> DownloadedFile:
        describe = f"{request.describe()} export {tracked.handle.export_id}"

        def refresh() -> str:
            url = self.api.fresh_file_url(request, tracked.handle)
            if url is None:
                # The API cannot re-sign this file: a new export is the only way to a fresh URL.
                tracked.handle = self.api.create(request)
                self.logger.info("%s: re-created as export %s for a fresh URL", describe, tracked.handle.export_id)
                tracked.handle = self._wait_until_ready(request, tracked).handle
                if tracked.handle.state is not ExportState.READY:
                    raise ExportFailed(f"{describe}: re-created export ended {tracked.handle.status}")
                url = self.api.file_url(request, tracked.handle)
            return url

        url = self.api.file_url(request, tracked.handle)
        file = self.downloader.fetch(url, describe=describe, refresh_url=refresh, headers=self.api.file_headers())
        self.logger.info(
            "%s: downloaded %d bytes in %.1fs (%d attempt%s)",
            describe,
            file.size_bytes,
            file.seconds,
            file.attempts,
            "" if file.attempts == 1 else "s",
        )
        return file

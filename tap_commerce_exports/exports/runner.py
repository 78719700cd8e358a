"""The export lifecycle, written once: create (or resume) -> poll -> file URL -> download whole.

Each API says how it spells those steps by implementing `ExportApi` (exports/job.py). "Where do we
wait" is `ExportRunner._wait_until_ready`; a failed export is re-created a bounded number of times in
`ExportRunner.prepare`; an expired file URL is renewed the cheapest way the API allows
(`ExportApi.fresh_file_url`).
"""

from __future__ import annotations

import csv
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tap_commerce_exports.exports.download import DownloadedFile, DownloadError, ExportCancelled, FileDownloader
from tap_commerce_exports.exports.job import (
    ExportApi,
    ExportFailed,
    ExportHandle,
    ExportRequest,
    ExportState,
    ExportTimedOut,
    PollPolicy,
    ReadyExport,
    SourceHalted,
    stops_source,
)
from tap_commerce_exports.exports.status_board import STATUS_MAX_AGE, StatusBoard


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
                    "%s: export %s is %s after %.0fs (%d poll%s)",
                    request.describe(),
                    tracked.handle.export_id,
                    tracked.handle.status,
                    now - tracked.started,
                    tracked.polls,
                    "" if tracked.polls == 1 else "s",
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
            "%s: downloaded %d byte%s in %.1fs (%d attempt%s)",
            describe,
            file.size_bytes,
            "" if file.size_bytes == 1 else "s",
            file.seconds,
            file.attempts,
            "" if file.attempts == 1 else "s",
        )
        return file

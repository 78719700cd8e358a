"""Where waiting exports share one listing of statuses (APIs that list their exports)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from tap_commerce_exports.exports.job import ExportApi, ExportHandle, ExportRequest, ExportState

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


def statuses_in_listing(
    pages: Iterable[list[dict]],
    wanted: set[str],
    handle_of: Callable[[dict], ExportHandle | None],
    reached_oldest: Callable[[list[dict]], bool],
) -> dict[str, ExportHandle]:
    """The waiting exports a newest-first listing shows, by id (an API's `poll_many`): pages are read
    until every wanted export was found or a page reaches back past the oldest of them, since later
    pages hold none. `handle_of` may refuse an entry (None): that export is then polled alone."""
    found: dict[str, ExportHandle] = {}
    for exports in pages:
        for export in exports:
            if str(export.get("id")) in wanted and (handle := handle_of(export)) is not None:
                found[handle.export_id] = handle
        if len(found) == len(wanted) or reached_oldest(exports):
            break
    return found

"""What an export is, in the tap's own words: the request, the API's handle, the ready file, the errors.

`ExportApi` is how one API spells the lifecycle (create, poll, file URL, fresh URL, resume); each
source module implements it, and exports/runner.py drives it.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from tap_commerce_exports.exports.download import DownloadedFile
from tap_commerce_exports.exports.windows import Window


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
    """Whether the error ends every export of its API for the rest of the run (exports/http.py marks
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

    A gentle growth: an export is noticed at most a quarter of its age after it became ready. The
    values come from the settings (settings.py: SyncSettings.poll_policy).
    """

    interval: float
    max_interval: float
    timeout: float
    #: How often a long wait is logged (export id, status, elapsed, polls).
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
    #: The API's client (exports/http.py); the runner shares its stop signal with it.
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

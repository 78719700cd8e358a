"""In-memory stand-ins for an API and a file host: the lifecycle's own rules, tested in milliseconds.

`ScriptedApi` answers each export's polls from a script of statuses; `FakeDownloader` "downloads" by
writing a small file, or fails as told. Neither speaks HTTP: the HTTP side is tested against the
sandbox elsewhere.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tap_commerce_exports.exports.download import DownloadedFile, DownloadError
from tap_commerce_exports.exports.job import ExportApi, ExportHandle, ExportRequest, ExportState, PollPolicy

STATES = {"pending": ExportState.PENDING, "done": ExportState.READY, "error": ExportState.FAILED}
QUICK_POLLS = PollPolicy(interval=0.001, max_interval=0.002, timeout=5.0, progress_every=0.0)
LOGGER = logging.getLogger("tests.unit")


@dataclass
class ScriptedApi(ExportApi):
    """Each created export walks through `script` (its statuses, one per poll); then stays at the last."""

    script: tuple[str, ...] = ("pending", "done")
    name: str = "fake"
    can_resume: bool = False
    lists_statuses: bool = False
    resumable: dict[str, str] = field(default_factory=dict)  # export id -> status, for `resume`
    scripts: list[tuple[str, ...]] = field(default_factory=list)  # per created export, overriding `script`
    create_error: Callable[[ExportRequest], Exception | None] = lambda request: None
    calls: list[tuple[str, str]] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _polled: dict[str, int] = field(default_factory=dict)
    _scripts_of: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, request: ExportRequest) -> ExportHandle:
        if (error := self.create_error(request)) is not None:
            raise error
        with self._lock:
            export_id = f"exp-{next(self._ids)}"
            self._scripts_of[export_id] = self.scripts.pop(0) if self.scripts else self.script
            self.calls.append(("create", export_id))
            self._polled[export_id] = 0
        return self._handle(export_id, self._scripts_of[export_id][0])

    def poll(self, request: ExportRequest, handle: ExportHandle) -> ExportHandle:
        return self._next(handle.export_id, "poll")

    def poll_many(self, handles: list[ExportHandle]) -> dict[str, ExportHandle]:
        self.calls.append(("list", ",".join(sorted(h.export_id for h in handles))))
        return {h.export_id: self._next(h.export_id, None) for h in handles}

    def resume(self, request: ExportRequest, export_id: str) -> ExportHandle | None:
        self.calls.append(("resume", export_id))
        status = self.resumable.get(export_id)
        return self._handle(export_id, status) if status else None

    def _next(self, export_id: str, call: str | None) -> ExportHandle:
        with self._lock:
            if call:
                self.calls.append((call, export_id))
            script = self._scripts_of.get(export_id, ("done",))
            self._polled[export_id] = polled = self._polled.get(export_id, 0) + 1
            return self._handle(export_id, script[min(polled, len(script) - 1)])

    @staticmethod
    def _handle(export_id: str, status: str) -> ExportHandle:
        state = STATES[status]
        url = f"https://files.example/{export_id}.csv" if state is ExportState.READY else None
        return ExportHandle(export_id, status, state, url)

    def count(self, call: str) -> int:
        return sum(1 for name, _ in self.calls if name == call)


@dataclass
class FakeDownloader:
    """Writes a one-row CSV for each URL; `broken` URLs fail as a file that never arrived whole."""

    broken: set[str] = field(default_factory=set)
    fetched: list[str] = field(default_factory=list)

    def fetch(self, url: str, *, describe: str, refresh_url: Callable[[], str], headers: dict) -> DownloadedFile:
        self.fetched.append(url)
        if url in self.broken:
            raise DownloadError(f"{describe}: the file never arrived whole")
        with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as out:
            out.write("id\n1\n")
        return DownloadedFile(out.name, 5, 1, 0.0)

"""Exports created and not yet read, remembered in each partition's state (key `exports_in_flight`).

An export takes minutes and may cost money; a run killed while it waited should not pay for it
again. So every export the runner started is written into its partition's state as soon as it is
known, and the next run resumes it (`ExportRequest.remembered_export_id`) instead of creating a new
one. An entry leaves the state once the export's rows are all out.
"""

from __future__ import annotations

from collections.abc import Iterable

from tap_commerce_exports.exports.job import ExportRequest
from tap_commerce_exports.exports.runner import ExportRunner
from tap_commerce_exports.exports.windows import Window

STATE_KEY = "exports_in_flight"


def window_key(window: Window | None) -> tuple[str | None, str | None]:
    """How a window is written in state: its bounds as ISO-8601 text."""
    return (window.start.isoformat(), window.end.isoformat()) if window else (None, None)


def remembered_exports(partition_state: dict) -> dict[tuple[str | None, str | None], str]:
    """Exports an earlier run created and never read, by window."""
    return {
        (item.get("window_start"), item.get("window_end")): str(item["export_id"])
        for item in partition_state.get(STATE_KEY, [])
        if item.get("export_id")
    }


def exports_in_flight(
    runner: ExportRunner, stream_name: str, context: dict | None, waiting: Iterable[ExportRequest]
) -> list[dict]:
    """The partition's state entries: the exports the runner started for it and has not read, and the
    remembered ones among `waiting` (its requests not handed over yet) that this run did not reach."""
    partition = tuple(sorted((context or {}).items()))
    started = {
        key[2]: export_id
        for key, export_id in runner.started_export_ids().items()
        if key[0] == stream_name and key[1] == partition
    }
    for request in waiting:
        if request.remembered_export_id and request.window not in started:
            started[request.window] = request.remembered_export_id
    return [
        {"export_id": export_id, "window_start": window_key(window)[0], "window_end": window_key(window)[1]}
        for window, export_id in started.items()
    ]

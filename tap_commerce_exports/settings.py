"""The settings every source shares: declared once (name, type, default, description), parsed once.

`COMMON_SETTINGS` is what the tap declares to the SDK (`--about`, Meltano); `SyncSettings.of(config)`
is the same settings as typed values, each default written here and nowhere else. The tap parses them
at start-up and passes them down (SourceRuntime.settings): nothing else reads them by name.
Each source declares its own settings in its module (sources/*.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from singer_sdk import typing as th

from tap_commerce_exports.exports.job import PollPolicy
from tap_commerce_exports.exports.windows import parse_instant

DEFAULTS: dict[str, Any] = {
    "export_window_days": 30,
    "lookback_hours": 0,
    "poll_interval_seconds": 2,
    "poll_max_interval_seconds": 60,
    "export_timeout_seconds": 3600,
    "max_rate_limit_wait_seconds": 3660,
    "max_concurrent_exports": 16,
}

COMMON_SETTINGS = [
    th.Property(
        "start_date",
        th.DateTimeType,
        required=True,
        description="Export data from this moment on (first run; later runs start at the bookmark).",
    ),
    th.Property("end_date", th.DateTimeType, description="Export data before this moment. Default: now."),
    th.Property(
        "export_window_days",
        th.NumberType,
        default=DEFAULTS["export_window_days"],
        description="Largest date range asked for in one export; smaller windows mean smaller files "
        "and finer-grained bookmarks.",
    ),
    th.Property(
        "lookback_hours",
        th.NumberType,
        default=DEFAULTS["lookback_hours"],
        description="Re-export this many hours before the bookmark, for rows that reach the vendor's "
        "exports late (Intelligems analytics lag up to ~2 h).",
    ),
    th.Property(
        "poll_interval_seconds",
        th.NumberType,
        default=DEFAULTS["poll_interval_seconds"],
        description="First wait between status polls of an export (Next Commerce answers the polls of "
        "all waiting exports with one listing).",
    ),
    th.Property(
        "poll_max_interval_seconds",
        th.NumberType,
        default=DEFAULTS["poll_max_interval_seconds"],
        description="Polls back off (x1.25 each) up to this wait.",
    ),
    th.Property(
        "export_timeout_seconds",
        th.NumberType,
        default=DEFAULTS["export_timeout_seconds"],
        description="Give up on an export still not ready after this long, naming its id and status.",
    ),
    th.Property(
        "max_rate_limit_wait_seconds",
        th.NumberType,
        default=DEFAULTS["max_rate_limit_wait_seconds"],
        description="Longest single wait for a rate limit, whether a 429 asks for it or the tap paces itself "
        "by the request budget the API reports. A per-minute or per-hour limit is waited out, each wait logged "
        "with its end time; a longer wait, or a spent billing-cycle quota, stops that source with an error "
        "while the other sources finish. The default, 3660 (an hour and a minute), waits out the longest "
        "documented window, a Voucherify Sandbox project's 100 calls per hour (up to 3600 s), with a "
        "minute to spare for clock difference and rounding.",
    ),
    th.Property(
        "max_concurrent_exports",
        th.IntegerType,
        default=DEFAULTS["max_concurrent_exports"],
        description="Exports created, polled and downloaded at the same time across all streams. Also how "
        "many of one partition's windows may be exported ahead of the one being read.",
    ),
    th.Property(
        "batch_worker_processes",
        th.IntegerType,
        description="BATCH messages only: processes that write the batch files of a large export in "
        "parallel, a slice of its rows each (~26 MB each). Default: the CPUs the tap may use (its CPU "
        "affinity and cgroup quota), at most 4. 1 writes every file in the tap's own process.",
    ),
]


def _number(config: Mapping[str, Any], name: str) -> float:
    value = config.get(name)
    return float(DEFAULTS[name] if value is None or value == "" else value)


@dataclass(frozen=True)
class SyncSettings:
    """The shared settings as typed values (the SDK has validated their types against COMMON_SETTINGS)."""

    start_date: dt.datetime
    end_date: dt.datetime | None
    export_window_days: float
    lookback_hours: float
    poll_interval_seconds: float
    poll_max_interval_seconds: float
    export_timeout_seconds: float
    max_rate_limit_wait_seconds: float
    max_concurrent_exports: int
    #: None: as many as the CPUs the tap may use allow (output/parallel_batches.py).
    batch_worker_processes: int | None

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> SyncSettings:
        workers = config.get("batch_worker_processes")
        return cls(
            start_date=parse_instant(config["start_date"]),
            end_date=parse_instant(config["end_date"]) if config.get("end_date") else None,
            export_window_days=_number(config, "export_window_days"),
            lookback_hours=_number(config, "lookback_hours"),
            poll_interval_seconds=_number(config, "poll_interval_seconds"),
            poll_max_interval_seconds=_number(config, "poll_max_interval_seconds"),
            export_timeout_seconds=_number(config, "export_timeout_seconds"),
            max_rate_limit_wait_seconds=_number(config, "max_rate_limit_wait_seconds"),
            max_concurrent_exports=int(_number(config, "max_concurrent_exports")),
            batch_worker_processes=int(workers) if workers else None,
        )

    @property
    def poll_policy(self) -> PollPolicy:
        return PollPolicy(
            interval=self.poll_interval_seconds,
            max_interval=self.poll_max_interval_seconds,
            timeout=self.export_timeout_seconds,
        )

    @property
    def lookahead(self) -> int:
        """How many of a partition's windows may be exported ahead of the one being read: as many as
        may run at once (max_concurrent_exports says so)."""
        return self.max_concurrent_exports


def source_hours(config: Mapping[str, Any], setting: str | None, default: float = 0.0) -> float:
    """A source's hours setting (`*_reread_hours`), as a number."""
    value = config.get(setting) if setting else None
    return float(default if value is None or value == "" else value)

"""Date-range windows: where a stream's export range comes from and how it is cut.

A stream exports `[bookmark - lookback_hours, now)` (or `[start_date, end_date)`) in windows of at
most `export_window_days`. The bookmark is the end of the last window whose rows were all emitted,
so it is always a window boundary, never a record's timestamp.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

UTC = dt.timezone.utc


@dataclass(frozen=True, order=True)
class Window:
    """A half-open time range `[start, end)` in UTC."""

    start: dt.datetime
    end: dt.datetime

    def __str__(self) -> str:
        return f"[{self.start.isoformat()}, {self.end.isoformat()})"

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    def halves(self) -> tuple[Window, Window]:
        """Two adjacent windows covering this one, split on a whole second."""
        middle = self.start + dt.timedelta(seconds=int(self.seconds // 2))
        return Window(self.start, middle), Window(middle, self.end)


def parse_instant(value: str | dt.datetime | dt.date) -> dt.datetime:
    """A setting or state value as an aware UTC datetime (a date means its midnight UTC)."""
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day)
    else:
        moment = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def export_range(
    *,
    bookmark: dt.datetime | None,
    start_date: dt.datetime,
    end_date: dt.datetime | None,
    lookback_hours: float,
    now: dt.datetime,
) -> Window | None:
    """The range a run exports for one stream or partition, or None when nothing is due.

    The lookback re-exports the recent past because vendors' exports lag behind their data;
    it never reaches before `start_date`. Bounds are whole seconds, the precision every one of the
    APIs accepts, so consecutive windows meet exactly however the APIs round.
    """
    start_date, now = _whole_second(start_date), _whole_second(now)
    end_date = _whole_second(end_date) if end_date else None
    if bookmark is None:
        start = start_date
    else:
        start = max(start_date, _whole_second(bookmark - dt.timedelta(hours=lookback_hours)))
    end = min(end_date, now) if end_date else now
    if start >= end:
        return None
    return Window(start, end)


def _whole_second(moment: dt.datetime) -> dt.datetime:
    return moment.replace(microsecond=0)


def plan_windows(export_span: Window, max_days: float) -> list[Window]:
    """Cut a range into consecutive windows of at most `max_days`."""
    step = dt.timedelta(days=max_days)
    windows = []
    start = export_span.start
    while start < export_span.end:
        end = min(start + step, export_span.end)
        windows.append(Window(start, end))
        start = end
    return windows

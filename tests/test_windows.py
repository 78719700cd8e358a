"""Export ranges and windows: where a run starts and how it is cut."""

import datetime as dt
import itertools

from tap_commerce_exports.exports.windows import Window, export_range, parse_instant, plan_windows

UTC = dt.timezone.utc
JAN1 = dt.datetime(2024, 1, 1, tzinfo=UTC)


def test_first_run_exports_from_start_date_to_end_date():
    span = export_range(
        bookmark=None,
        start_date=JAN1,
        end_date=JAN1 + dt.timedelta(days=10),
        lookback_hours=5,
        now=JAN1 + dt.timedelta(days=100),
    )
    assert span == Window(JAN1, JAN1 + dt.timedelta(days=10))


def test_later_runs_start_at_the_bookmark_minus_lookback_but_never_before_start_date():
    bookmark = JAN1 + dt.timedelta(days=3)
    span = export_range(
        bookmark=bookmark,
        start_date=JAN1,
        end_date=None,
        lookback_hours=2,
        now=JAN1 + dt.timedelta(days=4, microseconds=500),
    )
    assert span == Window(bookmark - dt.timedelta(hours=2), JAN1 + dt.timedelta(days=4))
    early = export_range(bookmark=JAN1, start_date=JAN1, end_date=None, lookback_hours=48, now=bookmark)
    assert early.start == JAN1


def test_nothing_is_due_when_the_bookmark_reached_the_end():
    assert export_range(bookmark=JAN1, start_date=JAN1, end_date=JAN1, lookback_hours=0, now=JAN1) is None


def test_windows_are_consecutive_and_at_most_the_configured_days():
    span = Window(JAN1, JAN1 + dt.timedelta(days=31, hours=12))
    windows = plan_windows(span, 15)
    assert [w.end - w.start for w in windows] == [
        dt.timedelta(days=15),
        dt.timedelta(days=15),
        dt.timedelta(days=1, hours=12),
    ]
    assert all(a.end == b.start for a, b in itertools.pairwise(windows))
    first, second = windows[0].halves()
    assert first.start == JAN1 and first.end == second.start and second.end == windows[0].end


def test_settings_and_state_values_parse_as_utc_instants():
    assert parse_instant("2024-01-01") == JAN1
    assert parse_instant("2024-01-01T01:00:00+01:00") == JAN1
    assert parse_instant("2024-01-01T00:00:00Z") == JAN1

"""Intelligems experiment results end to end against the sandbox: keys, types, incrementality by day,
the lifetime rules and the bodies the tap sends, in whatever reality the test's seed draws."""

from __future__ import annotations

import datetime as dt

import jsonschema

from tap_commerce_exports.openapi import SpecValidator
from tap_commerce_exports.sources.intelligems_results import RESOURCE_PATH, TIMESERIES_PATH, timeseries_metrics
from tests.harness import run_tap

UTC = dt.timezone.utc
OVERVIEW = "intelligems_experiment_results"
DAILY = "intelligems_experiment_results_daily"
RESULTS = {OVERVIEW, DAILY}
KEYS = {OVERVIEW: ("experience_id", "variation_id", "metric"), DAILY: ("experience_id", "variation_id", "date")}


def oldest_running(emulator) -> str:
    """The running experience since 2024-01-01: it has data on every day of the data period."""
    return min((e for e in emulator.experiences() if e.status == "started"), key=lambda e: e.started_at).id


def partition_state(state: dict, stream: str, experience_id: str) -> dict:
    partitions = state["bookmarks"][stream]["partitions"]
    return next(p for p in partitions if p["context"] == {"experience_id": experience_id})


def test_keys_are_unique_and_every_record_has_the_declared_types(intelligems_sandbox):
    emulator = intelligems_sandbox.intelligems
    output = run_tap(emulator.tap_config(), streams=RESULTS)

    assert output.error is None, output.error
    for stream in RESULTS:
        records = output.records(stream)
        keys = [tuple(record[name] for name in KEYS[stream]) for record in records]
        assert records and len(keys) == len(set(keys)), stream
        assert all(value is not None for key in keys for value in key)
        (schema,) = output.schemas(stream)
        validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        for record in records:
            assert list(validator.iter_errors(record)) == [], (stream, record)
    daily = output.records(DAILY)
    assert all(isinstance(r["n_visitors"], float) for r in daily)
    assert {metric for metric in timeseries_metrics()} <= set(daily[0])


def test_overview_has_every_metric_of_every_variation_and_agrees_with_the_daily_rows(intelligems_sandbox):
    """Whatever this seed's overview shape (bare counts or {value}, optional fields left out, an unknown
    catalogue metric): one row per variation and metric, the counts those of the days."""
    emulator = intelligems_sandbox.intelligems
    ended = next(e for e in emulator.experiences() if e.status == "ended")
    output = run_tap(
        {**emulator.tap_config(), "intelligems_experience_ids": [ended.id], "end_date": None}, streams=RESULTS
    )
    assert output.error is None, output.error

    overview = output.records(OVERVIEW)
    metrics = {(r["variation_id"], r["metric"]): r for r in overview}
    reality = emulator.results_reality
    for variation in ended.variations:
        assert {"n_visitors", "n_orders", "conversion_rate", reality.extra_metric} <= {
            metric for variation_id, metric in metrics if variation_id == variation.id
        }
        totals = emulator.expected_overview_totals(ended.id)[variation.id]
        assert metrics[(variation.id, "n_orders")]["value"] == totals.orders
        assert metrics[(variation.id, "n_visitors")]["value"] == totals.visitors
        days = [r for r in output.records(DAILY) if r["variation_id"] == variation.id]
        assert sum(r["n_orders"] for r in days) == totals.orders
        assert metrics[(variation.id, "conversion_rate")]["variation_name"] == variation.name
    challenger = next(v for v in ended.variations if not v.is_control)
    assert metrics[(challenger.id, "conversion_rate")]["p2bc"] is not None
    assert metrics[(challenger.id, "conversion_rate")]["uplift"] is not None
    profit = metrics[(challenger.id, "gross_profit_per_visitor")]["value"]
    assert (profit is not None) == reality.cogs_configured


def last_day(emulator, experience_id: str, end: str) -> dt.date:
    """The last day bucket before `end`: the seed's zone decides whether it is `end`'s UTC date or the day before."""
    return dt.date.fromisoformat(max(row["date"] for row in emulator.expected_daily_results(experience_id, end=end)))


def test_a_second_run_re_reads_only_the_recent_days_and_emits_the_later_ones(intelligems_sandbox):
    emulator = intelligems_sandbox.intelligems
    target = oldest_running(emulator)
    other = next(e.id for e in emulator.experiences() if e.status == "started" and e.id != target)
    config = {
        **emulator.tap_config(),
        "intelligems_experience_ids": [target, other],
        "end_date": "2024-02-10T00:00:00Z",
    }
    first = run_tap(config, streams={DAILY})
    assert first.error is None, first.error
    bookmark = last_day(emulator, target, "2024-02-10T00:00:00Z")
    assert partition_state(first.final_state, DAILY, target)["replication_key_value"] == bookmark.isoformat()
    first_other = partition_state(first.final_state, DAILY, other)["replication_key_value"]

    second = run_tap(
        {**config, "end_date": "2024-02-20T00:00:00Z", "intelligems_results_reread_days": 3},
        state=first.final_state,
        streams={DAILY},
    )

    assert second.error is None, second.error
    reread_from = bookmark - dt.timedelta(days=2)  # 3 days up to the bookmark, then the later days
    latest = last_day(emulator, target, "2024-02-20T00:00:00Z")
    got = {(r["variation_id"], r["date"]): r for r in second.records(DAILY) if r["experience_id"] == target}
    assert (
        min(date for _, date in got) == reread_from.isoformat() and max(date for _, date in got) == latest.isoformat()
    )
    day_before = dt.datetime.combine(reread_from - dt.timedelta(days=1), dt.time(), tzinfo=UTC)
    expected = {
        (row["variation_id"], row["date"]): row["n_orders"]
        for row in emulator.expected_daily_results(target, day_before, "2024-02-20T00:00:00Z")
        if row["date"] >= reread_from.isoformat()
    }
    assert {key: record["n_orders"] for key, record in got.items()} == expected
    last = emulator.results_calls_for(target, "timeseries")[-1]
    # One day early, so a day cut short by startTs in another zone is dropped, never loaded.
    assert last.body["startTs"] == str(int(day_before.timestamp()))
    assert partition_state(second.final_state, DAILY, target)["replication_key_value"] == latest.isoformat()
    assert partition_state(second.final_state, DAILY, other)["replication_key_value"] >= first_other


def test_an_ended_experience_read_after_its_results_settled_makes_no_more_calls(intelligems_sandbox):
    emulator = intelligems_sandbox.intelligems
    ended = next(e for e in emulator.experiences() if e.status == "ended")
    config = {**emulator.tap_config(), "intelligems_experience_ids": [ended.id], "end_date": None}
    first = run_tap(config, streams=RESULTS)
    assert first.error is None, first.error
    calls = len(emulator.results_calls_for(ended.id))
    assert calls == 2

    second = run_tap(config, state=first.final_state, streams=RESULTS)

    assert second.error is None, second.error
    assert len(emulator.results_calls_for(ended.id)) == calls
    assert second.records(OVERVIEW) == [] and second.records(DAILY) == []
    assert "were read after they settled; no call needed" in second.log_text


def test_results_read_before_they_settled_are_read_again(intelligems_sandbox):
    emulator = intelligems_sandbox.intelligems
    target = oldest_running(emulator)
    emulator.set_status(target, "ended", dt.datetime.now(UTC) - dt.timedelta(hours=1))
    config = {**emulator.tap_config(), "intelligems_experience_ids": [target], "end_date": None}
    first = run_tap(config, streams={OVERVIEW})
    second = run_tap(config, state=first.final_state, streams={OVERVIEW})  # 1 h after its end: not settled
    assert second.error is None and second.records(OVERVIEW)
    third = run_tap({**config, "intelligems_reread_hours": 0.5}, state=second.final_state, streams={OVERVIEW})
    assert third.error is None and third.records(OVERVIEW) == []
    assert len(emulator.results_calls_for(target)) == 2


def test_an_experience_that_never_started_is_never_called(intelligems_sandbox):
    emulator = intelligems_sandbox.intelligems
    pending = next(e.id for e in emulator.experiences() if e.started_at is None)
    everything = run_tap(emulator.tap_config(), streams=RESULTS)
    assert everything.error is None, everything.error
    named = run_tap({**emulator.tap_config(), "intelligems_experience_ids": [pending]}, streams=RESULTS)
    assert named.error is None, named.error
    assert emulator.results_calls_for(pending) == []
    assert "has not started; no call made" in named.log_text
    started = {e.id for e in emulator.experiences() if e.started_at is not None}
    assert {call.experience_id for call in emulator.results_calls} == started


def test_the_bodies_sent_match_the_published_request_schemas(intelligems_sandbox):
    emulator = intelligems_sandbox.intelligems
    output = run_tap(emulator.tap_config(), streams=RESULTS)
    assert output.error is None, output.error
    validator = SpecValidator("intelligems-analytics.openapi.json")
    sent = {
        RESOURCE_PATH: intelligems_sandbox.log.entries(
            host="intelligems-api", method="POST", path_pattern="/analytics/resource/"
        ),
        TIMESERIES_PATH: intelligems_sandbox.log.entries(
            host="intelligems-api", method="POST", path_pattern="/timeseries$"
        ),
    }
    for path, entries in sent.items():
        assert entries, path
        for entry in entries:
            assert entry.status == 200 and validator.errors(path, "post", entry.body) == []
    assert {tuple(sorted(e.body.items())) for e in sent[RESOURCE_PATH]} == {(("view", "overview"),)}
    for entry in sent[TIMESERIES_PATH]:
        assert entry.body["granularity"] == "day" and entry.body["mode"] == "noncumulative"
        assert entry.body["metrics"] == list(timeseries_metrics()) and len(entry.body["startTs"]) == 10

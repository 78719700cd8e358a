"""Intelligems experiment results: each experience's per-variation metrics, as a snapshot and per day.

How Intelligems spells results (sources: the vendor's OpenAPI `intelligems-analytics.openapi.yaml`, and
NOTES.md "Intelligems External API"):
- overview: `POST /v25-10-beta/analytics/resource/{experienceId}` with `{"view": "overview"}` answers
  `metrics`, an array of objects "all optional": dimension fields (`variation_id`) beside metric fields.
  A statistical metric is an object `{value, ci_low, ci_high, plus_minus, p2bb, p2bc, uplift: {value,
  ci_low, ci_high, plus_minus}}` (`p2bc` and `uplift` on non-control variations only). The catalogue
  is open: "additional metric keys may be present. Clients should tolerate unknown keys". The file
  has a `GET` on the same path too, deprecated ("Use the POST variant"): POST is used, as the issue says.
- timeseries: `POST /v25-10-beta/analytics/experience/{experienceId}/timeseries` with `granularity`,
  `mode` and `metrics` (a published enum) answers `segments` keyed by variation **name**, each a
  `data` array of `{dt: "YYYY-MM-DD HH:mm:ss", <metric>: number | null}`, and `variations` (id, name,
  isControl) to map names to ids. `startTs`/`endTs` are optional 10-digit epoch seconds, clamped to
  the experience's lifetime; "Defaults to now or experience end date".
- Both answer JSON at once: no job, no file. Both sit in the list/detail/resource/timeseries rate-limit
  bucket (NOTES.md: burst 50, refill 25 every 30 s; "the headers are the authority"), apart from the
  export bucket: the client draws them on that bucket (`rate_limit_bucket`, sources/intelligems.py).

Streams, as a warehouse uses them:
- `intelligems_experiment_results`: the overview, one row per experience x variation x metric, keyed
  (experience_id, variation_id, metric). Long, not wide, because the catalogue is open and differs per
  store: a metric the tap never heard of arrives as rows, typed like the others, with no schema change.
  The key holds the *latest* results of each variation (an upsert replaces them; results are
  cumulative over the experience, so the latest is what a dashboard shows); `retrieved_at` says when
  they were read and `analysis_run_at` when Intelligems computed them. A history of snapshots is an
  append-only load away (every run's rows carry their own `retrieved_at`); a history per day is the
  daily stream. Replication key `retrieved_at`, bookmarked per experience.
- `intelligems_experiment_results_daily`: per-day metrics (`granularity: day`, `mode: noncumulative`,
  every published metric), one row per experience x variation x day, keyed (experience_id,
  variation_id, date). Wide, because the metrics are the published enum we ask for. Incremental by
  day with a bookmark per experience: each run asks again from `intelligems_results_reread_days` days
  before the bookmark, because results settle while an experience runs (NOTES.md: analytics lag
  behind orders), and the target's upsert replaces those days.
  The API does not say in which time zone its days are cut (the spec only gives the `dt` format), so
  a day's bucket is trusted only when the request started before that day in every zone: each
  request starts one day before the first day emitted, and the earlier bucket, maybe cut short by
  `startTs`, is dropped.

Lifetime, as for the exports (sources/intelligems.py): one partition per experience, the
`intelligems_experience_ids` setting or every experience that has started; an experience that never
started is not called. An ended or paused experience whose results were read at least
`intelligems_reread_hours` after it stopped makes no more calls: by then its results have settled
(NOTES.md: "Analytics can lag behind orders (minutes to ~2 hours)"), and they cannot change any more.

The overview ignores `start_date`/`end_date`: a snapshot is the experience's whole lifetime, as the
dashboard shows it. The daily stream starts at `start_date` and, when set, stops at `end_date`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

from tap_commerce_exports.exports.http import ApiError
from tap_commerce_exports.exports.windows import UTC, parse_instant
from tap_commerce_exports.openapi import load_spec
from tap_commerce_exports.sdk_adapter import SdkStream
from tap_commerce_exports.settings import SyncSettings, source_hours

if TYPE_CHECKING:
    from tap_commerce_exports.sources.intelligems import Experience, IntelligemsApi

PREFIX = "/v25-10-beta"
SPEC_FILE = "intelligems-analytics.openapi.json"
RESOURCE_PATH = PREFIX + "/analytics/resource/{experienceId}"
TIMESERIES_PATH = PREFIX + "/analytics/experience/{experienceId}/timeseries"
#: Partition state: when this experience's results were last read (ISO-8601), for the lifetime rule.
READ_AT = "results_read_at"
#: The overview's dimension fields (the `metrics` description): not metrics.
DIMENSIONS = ("variation_id", "dt", "audience")
#: A statistical metric's fields and its uplift's, as the `metrics` description lists them.
STAT_FIELDS = ("value", "ci_low", "ci_high", "plus_minus", "p2bb", "p2bc")
UPLIFT_FIELDS = ("value", "ci_low", "ci_high", "plus_minus")
NUMBER = {"type": ["number", "null"]}
TEXT = {"type": ["string", "null"]}
INSTANT = {"type": ["string", "null"], "format": "date-time"}


@cache
def timeseries_metrics() -> tuple[str, ...]:
    """Every metric the timeseries endpoint publishes (its `metrics` enum): the daily stream asks for all."""
    operation = load_spec(SPEC_FILE)["paths"][TIMESERIES_PATH]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    return tuple(body["properties"]["metrics"]["items"]["enum"])


def number(value: Any) -> float | None:
    """A metric value as a number: the schema says number, but the overview's items are open (`{}`)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def epoch_instant(value: Any) -> str | None:
    """`latestRunTs` (typed only `number`) as ISO-8601: milliseconds like every other `*Ts` of this API
    (NOTES.md), or seconds when it has ten digits."""
    moment = number(value)
    if not moment:
        return None
    seconds = moment / 1000 if moment >= 1e11 else moment
    return dt.datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def epoch_seconds(moment: dt.datetime) -> str:
    """`startTs`/`endTs`: "a 10-digit Unix epoch string in seconds" (both operations' request schemas)."""
    return str(int(moment.timestamp()))


@dataclass(frozen=True)
class ResultsSettings:
    """The settings the results streams read, parsed once: their own, and the dates every stream
    shares (settings.py)."""

    reread_days: int
    settle: dt.timedelta
    start_date: dt.date
    end_date: dt.datetime | None

    @classmethod
    def of(cls, config: Mapping[str, Any], shared: SyncSettings) -> ResultsSettings:
        return cls(
            reread_days=max(0, int(config.get("intelligems_results_reread_days") or 0)),
            settle=dt.timedelta(hours=source_hours(config, "intelligems_reread_hours")),
            start_date=shared.start_date.date(),
            end_date=shared.end_date,
        )


class ResultsStream(SdkStream):
    """One results endpoint, partitioned by experience; a partition's bookmark moves once all its rows are
    out (`_mark_read`), never per record (SdkStream)."""

    partition_key = "experience_id"
    #: What a skipped experience's log line says was already read.
    read_what: ClassVar[str] = "results"

    def __init__(self, tap: Any, runtime: Any) -> None:
        self.runtime = runtime
        self.settings = ResultsSettings.of(tap.config, runtime.settings)
        super().__init__(tap=tap, schema=self.build_schema())

    def build_schema(self) -> dict:
        raise NotImplementedError

    @property
    def api(self) -> IntelligemsApi:
        return self.runtime.api  # type: ignore[no-any-return]

    @property
    def partitions(self) -> list[dict] | None:
        if not hasattr(self, "_partitions"):
            ids = self.api.partition_ids(self.config, self.logger, self.name)
            self._partitions = [{self.partition_key: value} for value in ids]
        return self._partitions

    def prefetch(self) -> None:
        """List the experiences on the source's own thread (tap.py), like the other Intelligems streams."""
        _ = self.partitions

    def get_records(self, context: Mapping[str, Any] | None) -> Iterable[dict]:
        experience = self.api.experience(str((context or {})[self.partition_key]))
        state = self.get_context_state(dict(context or {}))
        now = dt.datetime.now(UTC)
        if not self._due(experience, state, now):
            return
        records = list(self.read(experience, state, now))
        yield from records
        self._mark_read(state, records, now)

    def _due(self, experience: Experience, state: dict, now: dt.datetime) -> bool:
        """The lifetime rules (module docstring): never started, or stopped and read after it settled."""
        if experience.lifetime(now) is None:
            self.logger.info("%s: experience %s has not started; no call made", self.name, experience.id)
            return False
        read_at = state.get(READ_AT)
        if read_at and experience.stopped_before(parse_instant(read_at) - self.settings.settle):
            self.logger.info(
                "%s: experience %s is %s and its %s were read after they settled; no call needed",
                self.name,
                experience.id,
                experience.status,
                self.read_what,
            )
            return False
        return True

    def read(self, experience: Experience, state: dict, now: dt.datetime) -> Iterable[dict]:
        raise NotImplementedError

    def _mark_read(self, state: dict, records: list[dict], now: dt.datetime) -> None:
        latest = max((str(record[self.replication_key]) for record in records), default=None)
        previous = state.get("replication_key_value") if state.get("replication_key") == self.replication_key else None
        if latest is not None or previous is not None:
            state["replication_key"] = self.replication_key
            state["replication_key_value"] = max(value for value in (latest, previous) if value is not None)
        state[READ_AT] = now.isoformat()

    def _post(self, path: str, experience: Experience, body: dict) -> dict:
        url = path.format(experienceId=quote(experience.id, safe=""))
        answer = self.api.client.post(url, body=body, ok=(200,))
        if not isinstance(answer, dict):
            raise ApiError(f"{self.name}: POST {url} answered {type(answer).__name__}, not a JSON object")
        return answer


def _variation_facts(experience: Experience, listed: list[dict] | None) -> dict[str, tuple[str, str, bool]]:
    """(id, name, is_control) by id and by name: from the answer's `variations` when it has them (optional
    in the overview), else from the experience as listed."""
    facts: dict[str, tuple[str, str, bool]] = {}
    for variation in experience.variations:
        facts[variation.id] = facts[variation.name] = (variation.id, variation.name, variation.is_control)
    for item in listed or []:
        if isinstance(item, dict) and item.get("id"):
            fact = (str(item["id"]), str(item.get("name") or ""), bool(item.get("isControl")))
            facts[fact[0]] = facts[fact[1]] = fact
    return facts


# ------------------------------------------------------------------------ overview


def _metric_columns(metric: Any) -> dict[str, float | None]:
    """A metric's value and statistics; a bare number (a count, a total) is its value alone."""
    stats = metric if isinstance(metric, dict) else {"value": metric}
    columns = {name: number(stats.get(name)) for name in STAT_FIELDS}
    uplift = stats.get("uplift")
    uplift = uplift if isinstance(uplift, dict) else {"value": uplift}
    columns["uplift"] = number(uplift.get("value"))
    for name in UPLIFT_FIELDS[1:]:
        columns[f"uplift_{name}"] = number(uplift.get(name))
    return columns


class ExperimentResultsStream(ResultsStream):
    """Per-variation results of each experience (view `overview`): latest per variation and metric."""

    name = "intelligems_experiment_results"
    window_filters_on = "(none: each run takes a snapshot of the whole lifetime)"
    primary_keys = ("experience_id", "variation_id", "metric")
    replication_key = "retrieved_at"

    def build_schema(self) -> dict:
        key = {"type": ["string"]}
        stats = {name: NUMBER for name in STAT_FIELDS}
        uplift = {"uplift": NUMBER, **{f"uplift_{name}": NUMBER for name in UPLIFT_FIELDS[1:]}}
        properties = {
            "experience_id": key,
            "variation_id": key,
            "metric": key,
            "retrieved_at": {"type": ["string"], "format": "date-time"},
            "variation_name": TEXT,
            "is_control": {"type": ["boolean", "null"]},
            **stats,
            **uplift,
            "analysis_run_at": INSTANT,
            "cogs_configured": {"type": ["boolean", "null"]},
            "cogs_coverage_pct": NUMBER,
            "est_monthly_revenue_increase": NUMBER,
        }
        return {"type": "object", "properties": properties}

    def read(self, experience: Experience, state: dict, now: dt.datetime) -> Iterable[dict]:
        # The whole lifetime (no startTs/endTs): "Defaults to ... start ... through end/pause or now".
        answer = self._post(RESOURCE_PATH, experience, {"view": "overview"})
        facts = _variation_facts(experience, answer.get("variations"))
        impact: dict = answer["impact"] if isinstance(answer.get("impact"), dict) else {}
        shared = {
            "experience_id": experience.id,
            "retrieved_at": now.isoformat(),
            "analysis_run_at": epoch_instant(answer.get("latestRunTs")),
            "cogs_configured": answer.get("cogsConfigured"),
            "cogs_coverage_pct": number(answer.get("cogsCoveragePct")),
            "est_monthly_revenue_increase": number(impact.get("est_monthly_revenue_increase")),
        }
        for item in answer.get("metrics") or []:
            yield from self._rows(experience, item, facts, shared)

    def _rows(self, experience: Experience, item: Any, facts: dict, shared: dict) -> Iterable[dict]:
        variation_id = item.get("variation_id") if isinstance(item, dict) else None
        if not variation_id:
            # Every overview row is per variation (the description: "variation-level metrics").
            self.logger.warning(
                "%s: experience %s: a metrics item without variation_id, skipped", self.name, experience.id
            )
            return
        _, name, is_control = facts.get(str(variation_id), (variation_id, None, None))
        for metric, value in item.items():
            if metric in DIMENSIONS:
                continue
            yield {
                **shared,
                "variation_id": str(variation_id),
                "metric": metric,
                "variation_name": name,
                "is_control": is_control,
                **_metric_columns(value),
            }


# ------------------------------------------------------------------------ per day


class ExperimentResultsDailyStream(ResultsStream):
    """Per-variation metrics per day of each experience: incremental by day, recent days re-read."""

    name = "intelligems_experiment_results_daily"
    window_filters_on = "day (startTs); the last intelligems_results_reread_days re-read, as results settle"
    primary_keys = ("experience_id", "variation_id", "date")
    replication_key = "date"
    read_what = "days"

    def build_schema(self) -> dict:
        key = {"type": ["string"]}
        properties = {
            "experience_id": key,
            "variation_id": key,
            "date": {"type": ["string"], "format": "date"},
            "variation_name": TEXT,
            "is_control": {"type": ["boolean", "null"]},
            "currency": TEXT,
            "retrieved_at": {"type": ["string"], "format": "date-time"},
            **{metric: NUMBER for metric in timeseries_metrics()},
            "cogs_configured": {"type": ["boolean", "null"]},
        }
        return {"type": "object", "properties": properties}

    def first_day(self, experience: Experience, state: dict) -> dt.date:
        """The first day to emit: `intelligems_results_reread_days` days up to the bookmark, or the start."""
        bookmark = state.get("replication_key_value") if state.get("replication_key") == self.replication_key else None
        if bookmark:
            return dt.date.fromisoformat(bookmark) - dt.timedelta(days=self.settings.reread_days - 1)
        started = experience.started_at.date() if experience.started_at else self.settings.start_date
        return max(self.settings.start_date, started)

    def request_body(self, first_day: dt.date) -> dict:
        # One day early: the bucket before `first_day` may be cut short by startTs (module docstring).
        start = dt.datetime.combine(first_day - dt.timedelta(days=1), dt.time(), tzinfo=UTC)
        body = {
            "granularity": "day",
            "mode": "noncumulative",
            "metrics": list(timeseries_metrics()),
            "startTs": epoch_seconds(start),
        }
        if self.settings.end_date is not None:
            body["endTs"] = epoch_seconds(self.settings.end_date)
        return body

    def read(self, experience: Experience, state: dict, now: dt.datetime) -> Iterable[dict]:
        first_day = self.first_day(experience, state)
        if self.settings.end_date is not None and first_day >= self.settings.end_date.date():
            return
        answer = self._post(TIMESERIES_PATH, experience, self.request_body(first_day))
        facts = _variation_facts(experience, answer.get("variations"))
        shared = {
            "experience_id": experience.id,
            "currency": answer.get("currency"),
            "retrieved_at": now.isoformat(),
            "cogs_configured": answer.get("cogsConfigured"),
        }
        for segment, content in (answer.get("segments") or {}).items():
            variation = facts.get(segment)
            if variation is None:
                raise ApiError(
                    f"{self.name}: experience {experience.id}: segment {segment!r} names no variation of the "
                    "experience (segments are keyed by variation name, the answer's `variations` map them to ids)"
                )
            for point in content.get("data") or []:
                day = bucket_day(point.get("dt"), experience.id)
                if day >= first_day:
                    yield self._row(shared, variation, day, point)

    @staticmethod
    def _row(shared: dict, variation: tuple[str, str, bool], day: dt.date, point: dict) -> dict:
        return {
            **shared,
            "variation_id": variation[0],
            "variation_name": variation[1],
            "is_control": variation[2],
            "date": day.isoformat(),
            **{metric: number(point.get(metric)) for metric in timeseries_metrics()},
        }


def bucket_day(value: Any, experience_id: str) -> dt.date:
    """A bucket's day from `dt`: "YYYY-MM-DD HH:mm:ss" for day granularity (the operation's description)."""
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).date()
    except ValueError:
        raise ApiError(f"experience {experience_id}: a timeseries bucket's dt {value!r} is not a date") from None


RESULTS_STREAM_TYPES = (ExperimentResultsStream, ExperimentResultsDailyStream)

"""Intelligems External API (beta): experience (A/B test) exports, one partition per experience.

How Intelligems spells the lifecycle (sources: NOTES.md "Intelligems External API" and the OpenAPI
operation `POST /v25-10-beta/analytics/experience/{experienceId}/export`):
- create: `POST /v25-10-beta/analytics/experience/{id}/export {exportType, startTs, endTs, filters}`
  is synchronous (NOTES.md: "Synchronous") and answers READY with a presigned S3 URL valid
  `expiresIn` seconds (NOTES.md: "valid 900 s (then 403)"); `url: null` ("Export timed out, please
  retry", NOTES.md and the operation's description) counts as a failed export and is retried with
  backoff;
- there is nothing to poll; an expired URL (403) is renewed by exporting again (the operation's
  description: "Call the endpoint again to generate a new URL");
- the S3 file is fetched with no API credentials (NOTES.md, Singer SDK facts: S3 rejects a second
  auth mechanism).

Each experience is exported only inside its lifetime (NOTES.md: "Ranges are clamped to the
experience's start and end/pause"): start to end/pause, or now; an ended or paused experience whose
bookmark reached its end makes no more calls. `startTs`/`endTs` are 10-digit epoch seconds as strings
(NOTES.md; the operation's schema types both as `string`); windows are whole seconds so
`[start, end)` maps exactly. Experience ids are validated as UUIDs (the path parameter's published
pattern) before they go into a path. Pacing follows the x-ratelimit-* headers (NOTES.md: token bucket;
`x-ratelimit-reset` in epoch milliseconds; export burst 20, separate from the other calls).

Experiment results (per-variation metrics, JSON answers rather than files) are the streams of
sources/intelligems_results.py; they share this module's experiences, partitions and lifetime rules.

Columns: NOTES.md, "What nobody publishes": Intelligems publishes no CSV columns, so the export
streams' `known_columns` are guesses. Identifier columns (`*_id`, `order_name`, `sku`,
`discount_code`) are text, emitted exactly as the file writes them ("00042", "ord_9XkQ"); the file's
header names its columns, so their order and spelling do not matter, an unknown column is kept as
text and a guessed column the file lacks is absent from its records.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from singer_sdk import typing as th
from singer_sdk.streams import Stream

from tap_commerce_exports.exports.http import ApiClient, ApiTimeout
from tap_commerce_exports.exports.job import ExportApi, ExportHandle, ExportRequest, ExportState
from tap_commerce_exports.exports.windows import UTC, Window
from tap_commerce_exports.openapi import SpecValidator
from tap_commerce_exports.records.columns import columns_from_spec
from tap_commerce_exports.settings import SyncSettings
from tap_commerce_exports.sources.base import ConfigError, SourceDefinition, checked_base_url, pacer, string_list
from tap_commerce_exports.sources.intelligems_results import RESULTS_STREAM_TYPES
from tap_commerce_exports.stream import ExportStream

PREFIX = "/v25-10-beta"
EXPORT_PATH = PREFIX + "/analytics/experience/{experienceId}/export"
LIST_PAGE_SIZE = 100
# The published path pattern for experienceId.
UUID = re.compile(
    r"^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-8][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}"
    r"|00000000-0000-0000-0000-000000000000|ffffffff-ffff-ffff-ffff-ffffffffffff)$"
)


def checked_experience_id(value: str, where: str) -> str:
    if not UUID.match(value):
        raise ConfigError(f"{where}: {value!r} is not an Intelligems experience id (a UUID)")
    return value


def _from_millis(value: Any) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(int(value) / 1000, tz=UTC) if value not in (None, "", 0) else None


@dataclass(frozen=True)
class Variation:
    id: str
    name: str
    is_control: bool


@dataclass(frozen=True)
class Experience:
    id: str
    name: str
    status: str
    started_at: dt.datetime | None
    ended_at: dt.datetime | None  # end or pause; None while it runs
    #: As listed (list and detail items both carry `variations`): results name variations by id or name.
    variations: tuple[Variation, ...] = ()

    @classmethod
    def from_api(cls, item: dict) -> Experience:
        status = str(item.get("status") or "")
        stop = {"ended": item.get("endedAtTs"), "paused": item.get("pausedAtTs")}.get(status)
        variations = tuple(
            Variation(str(v["id"]), str(v.get("name") or ""), bool(v.get("isControl")))
            for v in item.get("variations") or []
            if isinstance(v, dict) and v.get("id")
        )
        return cls(
            str(item["id"]),
            str(item.get("name") or ""),
            status,
            _from_millis(item.get("startedAtTs")),
            _from_millis(stop),
            variations,
        )

    def lifetime(self, now: dt.datetime) -> Window | None:
        if self.started_at is None:
            return None
        end = self.ended_at or now
        return Window(self.started_at, end) if end > self.started_at else None

    def stopped_before(self, moment: dt.datetime | None) -> bool:
        """Ended or paused at or before `moment`: nothing read after `moment` can change any more."""
        return self.ended_at is not None and moment is not None and moment >= self.ended_at


class IntelligemsApi(ExportApi):
    name = "intelligems"
    max_recreates = 4  # url: null answers are retried this many times, with backoff

    def __init__(
        self,
        client: ApiClient,
        filters: dict | None,
        export_timeout_seconds: float,
    ) -> None:
        self.client = client
        self.filters = filters
        # The export call is synchronous: export_timeout_seconds bounds the wait for its answer.
        self.export_timeout_seconds = export_timeout_seconds
        self._experiences: dict[str, Experience] | None = None

    def create(self, request: ExportRequest) -> ExportHandle:
        experience_id = checked_experience_id(str(request.partition["experience_id"]), request.stream_name)
        body: dict[str, Any] = {"exportType": request.export_type}
        if request.window is not None:
            body["startTs"] = str(int(request.window.start.timestamp()))
            body["endTs"] = str(int(request.window.end.timestamp()))
        if self.filters:
            body["filters"] = self.filters
        handle_id = f"{experience_id}/{request.export_type}/{body.get('startTs', '')}-{body.get('endTs', '')}"
        path = EXPORT_PATH.format(experienceId=quote(experience_id, safe=""))
        try:
            answer = self.client.post(path, body=body, ok=(200,), read_timeout=self.export_timeout_seconds)
        except ApiTimeout:
            status = f"no answer within export_timeout_seconds={self.export_timeout_seconds:g}"
            return ExportHandle(handle_id, status, ExportState.FAILED)
        url = answer.get("url")
        message = str(answer.get("message") or "")
        if not url:
            return ExportHandle(handle_id, message or "no url", ExportState.FAILED)
        return ExportHandle(handle_id, message or "ready", ExportState.READY, str(url))

    # -- experiences
    def experiences(self) -> dict[str, Experience]:
        """Every experience on the account (all pages), by id."""
        if self._experiences is None:
            found: dict[str, Experience] = {}
            for item in self._list_items():
                found[str(item["id"])] = Experience.from_api(item)
            self._experiences = found
        return self._experiences

    def experience_items(self) -> list[dict]:
        return list(self._list_items())

    def _list_items(self) -> Iterable[dict]:
        page = 1
        while True:
            answer = self.client.get(PREFIX + "/experiences-list", params={"page": page, "limit": LIST_PAGE_SIZE})
            yield from answer.get("experiencesList") or []
            if page >= int(answer.get("totalPages") or 1):
                return
            page += 1

    def partition_ids(self, config: Mapping[str, Any], logger: logging.Logger, stream_name: str) -> list[str]:
        """The experiences a stream syncs: the `intelligems_experience_ids` setting, else every experience
        that has started (one that never started has nothing to export and no results)."""
        configured = string_list(config, "intelligems_experience_ids")
        if configured:
            return [checked_experience_id(value, "setting 'intelligems_experience_ids'") for value in configured]
        listed = self.experiences()
        started = [e for e in listed.values() if e.started_at is not None]
        if len(listed) > len(started):
            logger.info("%s: skipping %d experiences that never started", stream_name, len(listed) - len(started))
        return [checked_experience_id(e.id, "experiences list") for e in started]

    def experience(self, experience_id: str) -> Experience:
        known = self.experiences() if self._experiences is not None else {}
        if experience_id in known:
            return known[experience_id]
        answer = self.client.get(f"{PREFIX}/experiences/{quote(experience_id, safe='')}")
        return Experience.from_api(answer["experience"])


# ------------------------------------------------------------------------ streams


class IntelligemsExportStream(ExportStream):
    """An experience export type; partitioned by experience and clamped to its lifetime."""

    partition_key = "experience_id"
    replication_key = "created_at"
    reread_setting = "intelligems_reread_hours"
    window_filters_on = "order time (startTs/endTs); recent hours re-read, as analytics lag"

    @property
    def api(self) -> IntelligemsApi:
        return self.runtime.api  # type: ignore[return-value]

    def partition_values(self) -> list[str]:
        return self.api.partition_ids(self.config, self.logger, self.name)

    def bookmark_after(self, context: dict | None, window: Window) -> dt.datetime:
        """Never past what has settled: analytics lag behind orders by up to ~2 hours (NOTES.md), so
        the bookmark stops `intelligems_reread_hours` short of the sync's start: no export of this run
        was made before then, so whatever it missed arrived after that. An ended experience counts as
        fully exported (no more calls) only once a run read its end after that lag had passed; an
        export made minutes after the end would otherwise be its last, and late rows would be lost."""
        started = self.sync_started_at or dt.datetime.now(UTC)
        settled = started - dt.timedelta(hours=self.reread_hours())
        previous = self.bookmark(context)
        bookmark = min(window.end, settled)
        return max(bookmark, previous) if previous is not None else bookmark

    def hours_before_bookmark(self) -> float:
        """Zero: the bookmark itself already stays `intelligems_reread_hours` short of the run's start
        (bookmark_after), so starting that much earlier again would read those hours twice."""
        return 0.0

    def export_span(self, context: dict | None) -> Window | None:
        span = super().export_span(context)
        experience = self.api.experience(str((context or {})["experience_id"]))
        now = dt.datetime.now(UTC)
        lifetime = experience.lifetime(now)
        bookmark = self.bookmark(context)
        if span is None or lifetime is None:
            return None
        if experience.stopped_before(bookmark):
            self.logger.info(
                "%s: experience %s is %s and fully exported; no export needed",
                self.name,
                experience.id,
                experience.status,
            )
            return None
        start = max(span.start, lifetime.start.replace(microsecond=0))
        end = min(span.end, lifetime.end)
        if end.microsecond:  # keep the whole last second of a lifetime that ends mid-second
            end = min(span.end, end.replace(microsecond=0) + dt.timedelta(seconds=1))
        return Window(start, end) if start < end else None


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _experience_key(name: str) -> str:
    """`startedAtTs` -> `started_at`: millisecond timestamps become date-times without the suffix."""
    return _snake(name[:-2]) if name.endswith("Ts") else _snake(name)


def _experience_property_schema(name: str, schema: dict) -> dict:
    if name.endswith("Ts"):
        return {"type": ["string", "null"], "format": "date-time"}
    options = [schema] if "type" in schema else schema.get("anyOf", [])
    kinds = [option.get("type") for option in options if option.get("type") not in (None, "null")]
    kind = kinds[0] if kinds and isinstance(kinds[0], str) else "object"
    return {"type": [kind, "null"]}


def experiences_schema() -> dict:
    """The experiences-list item of the published spec, with snake_case keys."""
    spec = SpecValidator("intelligems-exports.openapi.json").spec
    answer = spec["paths"][PREFIX + "/experiences-list"]["get"]["responses"]["200"]["content"]["application/json"]
    item = answer["schema"]["properties"]["experiencesList"]["items"]["properties"]
    properties = {_experience_key(name): _experience_property_schema(name, schema) for name, schema in item.items()}
    return {"type": "object", "properties": properties}


class ExperiencesStream(Stream):
    """The experiences themselves (names, statuses, lifetimes): a small list, read whole each run.

    Every field of the published list item, with snake_case keys; `*Ts` milliseconds become
    ISO-8601 date-times named without the suffix (`startedAtTs` -> `started_at`).
    """

    name = "intelligems_experiences"
    primary_keys = ("id",)
    replication_key = None

    def __init__(self, tap: Any, runtime: Any) -> None:
        self.runtime = runtime
        self._items: list[dict] | None = None
        super().__init__(tap=tap, schema=experiences_schema())

    def prefetch(self) -> None:
        """List the experiences on the source's own thread (tap.py), so a rate-limited listing holds up
        no other source's rows on the thread that writes them."""
        self._items = self.runtime.api.experience_items()

    def get_records(self, context: Mapping[str, Any] | None) -> Iterable[dict]:
        items, self._items = self._items, None
        for item in items if items is not None else self.runtime.api.experience_items():
            record = {}
            for name, value in item.items():
                if name.endswith("Ts"):
                    moment = _from_millis(value)
                    value = moment.isoformat() if moment else None
                record[_experience_key(name)] = value
            yield record


class OrdersStream(IntelligemsExportStream):
    name = "intelligems_orders"
    export_type = "orders"
    primary_keys = ("experience_id", "order_id")
    known_columns = columns_from_spec(
        "order_id order_name created_at:datetime variation_id variation_name is_control:boolean visitor_id "
        "device_type country_code source_channel landing_page is_new_visitor:boolean currency subtotal:number "
        "discount:number shipping:number tax:number revenue:number items_count:integer discount_code note "
        "experience_id"
    )


class OrderLineItemsStream(IntelligemsExportStream):
    name = "intelligems_order_line_items"
    export_type = "order_line_items"
    primary_keys = ("experience_id", "line_item_id")
    known_columns = columns_from_spec(
        "line_item_id order_id created_at:datetime variation_id variation_name product_id product_title variant_id "
        "variant_title sku quantity:integer price:number compare_at_price:number discount:number line_total:number "
        "currency is_test_product:boolean properties:json experience_id"
    )


class OrderReconciliationStream(IntelligemsExportStream):
    name = "intelligems_order_reconciliation"
    export_type = "order_reconciliation"
    primary_keys = ("experience_id", "order_id")
    known_columns = columns_from_spec(
        "order_id order_name created_at:datetime variation_id variation_name currency shopify_total:number "
        "intelligems_total:number difference:number included_in_analysis:boolean exclusion_reason "
        "analytics_synced_at:datetime experience_id"
    )


STREAM_TYPES = (ExperiencesStream, OrdersStream, OrderLineItemsStream, OrderReconciliationStream, *RESULTS_STREAM_TYPES)


# ------------------------------------------------------------------------ source


def _filters(config: dict) -> dict | None:
    filters = config.get("intelligems_filters")
    if not filters:
        return None
    errors = SpecValidator("intelligems-exports.openapi.json").property_errors(EXPORT_PATH, "post", "filters", filters)
    if errors:
        raise ConfigError("setting 'intelligems_filters' does not match the published schema: " + "; ".join(errors))
    return dict(filters)


def validate(config: dict) -> None:
    checked_base_url(config, "intelligems_api_url")
    for value in string_list(config, "intelligems_experience_ids"):
        checked_experience_id(value, "setting 'intelligems_experience_ids'")
    _filters(config)


def rate_limit_bucket(method: str, url: str) -> str:
    """NOTES.md: exports have a bucket of their own (burst 20); list, detail, resource and timeseries
    calls share another (burst 50)."""
    return "export" if url.rstrip("/").endswith("/export") else "api"


def build_api(config: dict, logger: logging.Logger) -> IntelligemsApi:
    client = ApiClient(
        api_name="intelligems",
        base_url=checked_base_url(config, "intelligems_api_url"),
        credential_headers={"intelligems-access-token": config["intelligems_api_token"]},
        logger=logger,
        extra_headers={"Content-Type": "application/json"},
        # The export bucket holds 20; x-ratelimit-remaining/-reset and 429 pace us beyond that.
        bucket_of=rate_limit_bucket,
        pacer=pacer(config.get("intelligems_requests_per_second"), burst=5),
    )
    return IntelligemsApi(
        client,
        _filters(config),
        SyncSettings.of(config).export_timeout_seconds,
    )


def check_connection(api: ExportApi) -> str:
    assert isinstance(api, IntelligemsApi)
    answer = api.client.get(PREFIX + "/experiences-list", params={"page": 1, "limit": 1})
    return f"authenticated; {answer.get('total', 0)} experiences"


SOURCE = SourceDefinition(
    name="intelligems",
    settings=[
        th.Property(
            "intelligems_api_token",
            th.StringType,
            secret=True,
            description="External API key (header intelligems-access-token). Intelligems streams are "
            "discovered when set.",
        ),
        th.Property(
            "intelligems_api_url", th.StringType, default="https://api.intelligems.io", description="API base URL."
        ),
        th.Property(
            "intelligems_experience_ids",
            th.ArrayType(th.StringType),
            description="Experiences to export (UUIDs). Default: every experience that has started.",
        ),
        th.Property(
            "intelligems_filters",
            th.ObjectType(additional_properties=True),
            description="Analytics filters sent with every export (`filters` of the export endpoint), "
            "validated against the published schema.",
        ),
        th.Property(
            "intelligems_reread_hours",
            th.NumberType,
            default=3,
            description="The bookmark stays this many hours behind the run that wrote it, and the next run "
            "starts at it: analytics lag behind orders by up to ~2 hours (NOTES.md), so recent orders may be "
            "missing at first. Each run reads those hours again once; targets deduplicate on the key. Experiment "
            "results of an ended or paused experience are read until they were read this many hours after it "
            "stopped.",
        ),
        th.Property(
            "intelligems_results_reread_days",
            th.IntegerType,
            default=3,
            description="Every run reads experiment results per day again from this many days up to the "
            "bookmark (intelligems_experiment_results_daily): results settle while an experience runs, "
            "as orders reach analytics late. 0 reads only days after the bookmark.",
        ),
        th.Property(
            "intelligems_requests_per_second",
            th.NumberType,
            description="Client-side pace for API calls. Default: unpaced, relying on the rate-limit headers and 429.",
        ),
    ],
    credential_settings=("intelligems_api_token",),
    build_api=build_api,
    stream_types=STREAM_TYPES,  # type: ignore[arg-type]
    validate=validate,
    check_connection=check_connection,
)

"""Next Commerce (29next) Admin API: asynchronous exports of 13 types.

How Next Commerce spells the lifecycle:
- create: `POST exports/ {type, date_from, date_to}`; a re-run first looks for an export of the same
  type and range made in the last day (`GET exports/?type=...`) and reuses it;
- poll: `GET exports/{id}/` until `available`; there is no failed status, so the timeout is the
  only way out. Exports waiting together are polled through one listing (`GET exports/`, newest
  first) instead of one request each, which keeps 13 streams inside the 4 requests/second;
- file: `GET exports/{id}/download/` gives a temporary signed URL, fetched without credentials; an
  expired URL is replaced by asking the download endpoint again (no new export).

`date_from`/`date_to` are both inclusive and the API works in whole seconds, so the window
`[start, end)` is sent as `[start, end - 1 s]` on second boundaries. Timestamps in the files are
naive, in the store's timezone (`nextcommerce_store_timezone`). Requests are paced under the
documented 4 requests/second per token, across all exports.

The row cap (NOTES.md: "Exports are capped at 100,000 objects per export"; changelog 2025-08-06:
"Users attempting to export more will see a warning"; whether an over-cap export is truncated or
refused is not documented) is handled both ways, and either way the engine splits the window in
halves and exports each: a file holding `nextcommerce_export_row_cap` rows may be truncated
(stream.py), and a create the API refuses because of the cap raises `ExportTooLarge`
(`speaks_of_row_cap` says which refusals those are).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections.abc import Iterator
from itertools import islice
from typing import Any
from urllib.parse import urlsplit

from singer_sdk import typing as th

from tap_commerce_exports.exports.http import ApiClient, ApiError
from tap_commerce_exports.exports.job import ExportApi, ExportHandle, ExportRequest, ExportState, ExportTooLarge
from tap_commerce_exports.exports.status_board import statuses_in_listing
from tap_commerce_exports.exports.windows import UTC, Window
from tap_commerce_exports.records.columns import columns_from_spec, zone
from tap_commerce_exports.sources.base import ConfigError, SourceDefinition, checked_base_url, pacer
from tap_commerce_exports.stream import ExportStream

API_VERSION = "2024-04-01"
REQUESTS_PER_SECOND = 3.8  # documented limit 4/s per token; a little headroom for clock jitter
STATES = {"pending": ExportState.PENDING, "available": ExportState.READY}
REUSE_WITHIN = dt.timedelta(days=1)
#: A week: refunds, fulfillments and disputes mostly land within it (a judgement; nothing is published).
REREAD_HOURS = 168
#: Pages of the newest-first export list read for one status listing; older exports are polled alone.
STATUS_LIST_PAGES = 3
#: Statuses a create refused for its size could plausibly carry: DRF's validation error (400), a
#: proxy's or framework's "payload too large" (413) and "unprocessable" (422).
OVER_CAP_STATUSES = (400, 413, 422)
CAP_WORDS = re.compile(r"\b(?:limit\w*|maximum|exceed\w*|too\s+many|too\s+large|too\s+big)\b", re.IGNORECASE)
_URL = re.compile(r"\w+://\S+")


def _whole_second(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


def _api_time(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def speaks_of_row_cap(status: int | None, body: str, row_cap: int | None) -> bool:
    """Whether a refused `POST exports/` refuses the export for holding more rows than the cap.

    The vendor documents the cap but not the refusal (NOTES.md), so this reads the answer the way a
    person would: a 400, 413 or 422 whose body names the cap (the configured number, written with or
    without thousands separators) or speaks of a limit, maximum, exceeding, too many or too large.
    Any other refusal (a bad date, a bad type) stays an error.
    """
    if status not in OVER_CAP_STATUSES:
        return False
    return bool(CAP_WORDS.search(body) or (row_cap and _names_number(body, row_cap)))


def _names_number(text: str, number: int) -> bool:
    """Whether `number` stands alone in the text: "100000", "100,000", "100.000" or "100 000",
    never part of a longer number, a date or a time."""
    groups = f"{number:,}".split(",")
    written = r"[,.\u00a0\u202f ]?".join(groups)
    return re.search(rf"(?<![\w.,:/-]){written}(?![\w:/-]|[.,]\d)", text) is not None


def refusal_body(error: ApiError) -> str:
    """What the API answered, without the URL (a store named "limitless" is no refusal by size)."""
    text = str(error)
    _, found, body = text.partition(f"answered HTTP {error.status}:")
    return body.strip() if found else _URL.sub("", text)


def api_range(window: Window) -> tuple[str, str]:
    """`[start, end)` as the API's inclusive `date_from`, `date_to` in whole seconds."""
    start, end = _whole_second(window.start), _whole_second(window.end)
    return _api_time(start), _api_time(end - dt.timedelta(seconds=1))


class NextCommerceApi(ExportApi):
    name = "nextcommerce"
    can_resume = True
    lists_statuses = True
    max_recreates = 0  # no failed status exists; a stuck export ends in the timeout

    def __init__(self, client: ApiClient, row_cap: int) -> None:
        self.client = client
        self.row_cap = row_cap
        self._recent_exports: list[dict] | None = None
        self._recent_lock = threading.Lock()

    def create(self, request: ExportRequest) -> ExportHandle:
        """`POST exports/`; a refusal that speaks of the row cap raises ExportTooLarge (the stream splits)."""
        body: dict[str, Any] = {"type": request.export_type}
        if request.window is not None:
            body["date_from"], body["date_to"] = api_range(request.window)
        try:
            return self._handle(self.client.post("exports/", body=body, ok=(200, 201)))
        except ApiError as exc:
            detail = refusal_body(exc)
            if self.row_cap is not None and speaks_of_row_cap(exc.status, detail, self.row_cap):
                raise ExportTooLarge(request, detail) from exc
            raise

    def poll(self, request: ExportRequest, handle: ExportHandle) -> ExportHandle:
        return self._handle(self.client.get(f"exports/{int(handle.export_id)}/"))

    def poll_many(self, handles: list[ExportHandle]) -> dict[str, ExportHandle]:
        wanted = {handle.export_id for handle in handles}
        oldest = min(int(export_id) for export_id in wanted)
        return statuses_in_listing(
            islice(self._export_pages(), STATUS_LIST_PAGES),
            wanted,
            self._handle,
            lambda exports: any(int(export.get("id", 0)) <= oldest for export in exports),
        )

    def _export_pages(self, params: dict[str, str] | None = None) -> Iterator[list[dict]]:
        """The export list, a page of results at a time, following the API's cursor."""
        page: Any = self.client.get("exports/", params=params)
        while page:
            yield page.get("results") or []
            page = self.client.get(page["next"]) if page.get("next") else None

    def file_url(self, request: ExportRequest, handle: ExportHandle) -> str:
        return str(self.client.get(f"exports/{int(handle.export_id)}/download/")["url"])

    def fresh_file_url(self, request: ExportRequest, handle: ExportHandle) -> str | None:
        return self.file_url(request, handle)

    def find_reusable(self, request: ExportRequest) -> ExportHandle | None:
        if request.window is None:
            return None
        wanted = api_range(request.window)
        for export in self._exports_made_recently():
            if export.get("type") == request.export_type and self._range_of(export) == wanted:
                return self._handle(export)
        return None

    def _exports_made_recently(self) -> list[dict]:
        """Every export of the last day, listed once per run for all types: requests cost 1/4 s each."""
        with self._recent_lock:
            if self._recent_exports is None:
                created_from = (dt.datetime.now(UTC) - REUSE_WITHIN).date().isoformat()
                pages = self._export_pages({"date_created_from": created_from})
                self._recent_exports = [export for results in pages for export in results]
            return self._recent_exports

    def resume(self, request: ExportRequest, export_id: str) -> ExportHandle | None:
        try:
            return self.poll(request, ExportHandle(export_id, "", ExportState.PENDING))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    @staticmethod
    def _range_of(export: dict) -> tuple[str, str] | None:
        try:
            start = dt.datetime.fromisoformat(str(export["date_from"]).replace("Z", "+00:00"))
            end = dt.datetime.fromisoformat(str(export["date_to"]).replace("Z", "+00:00"))
        except (KeyError, ValueError):
            return None
        return _api_time(_whole_second(start)), _api_time(_whole_second(end))

    @staticmethod
    def _handle(export: dict) -> ExportHandle:
        status = str(export.get("status") or "")
        return ExportHandle(str(export["id"]), status, STATES.get(status, ExportState.PENDING))


# ------------------------------------------------------------------------ streams


class NextCommerceStream(ExportStream):
    """One Next Commerce export type; the class attributes below are all that differs."""

    reread_setting = "nextcommerce_reread_hours"
    window_filters_on = "creation date, most likely (undocumented: NOTES.md); later changes come back by re-reading"


def _stream(code: str, primary_keys: tuple[str, ...], replication_key: str, columns: str) -> type[NextCommerceStream]:
    return type(
        f"{''.join(part.title() for part in code.split('_'))}Stream",
        (NextCommerceStream,),
        {
            "name": f"nextcommerce_{code}",
            "export_type": code,
            "primary_keys": primary_keys,
            "replication_key": replication_key,
            "known_columns": columns_from_spec(columns),
            "__doc__": f"Next Commerce `{code}` export.",
        },
    )


# Export columns are not published; these are the ones the tap types. Any other column a file
# brings (store metadata columns appear over time) is kept as text (see records/columns.py).
STREAM_TYPES: tuple[type[NextCommerceStream], ...] = (
    _stream(
        "order_list",
        ("order_number",),
        "date_created",
        "order_number date_created:datetime status customer_id customer_email customer_name "
        "currency lines_count:integer subtotal_incl_tax:number shipping_incl_tax:number total_discounts:number "
        "total_tax:number total_incl_tax:number payment_method shipping_address shipping_country is_test:boolean "
        "notes metadata:json",
    ),
    _stream(
        "order_line_items",
        ("line_id",),
        "order_date_created",
        "line_id order_number order_date_created:datetime line_number product_id "
        "product_title sku quantity:integer unit_price_incl_tax:number total_incl_tax:number tax_amount:number "
        "is_subscription:boolean fulfillment_status attributes:json",
    ),
    _stream(
        "customer_list",
        ("customer_id",),
        "date_joined",
        "customer_id date_joined:datetime email first_name last_name phone accepts_marketing:boolean "
        "language orders_count:integer total_spent:number default_address tags:json metadata:json "
        "last_login:datetime",
    ),
    _stream(
        "transaction_list",
        ("transaction_id",),
        "date_created",
        "transaction_id date_created:datetime order_number type status amount:number currency "
        "gateway payment_method card_last4 reference is_test:boolean error_message response_data:json",
    ),
    _stream(
        "dispute_list",
        ("dispute_id",),
        "date_created",
        "dispute_id date_created:datetime transaction_id order_number status reason "
        "amount:number currency evidence_due_by:datetime gateway customer_email notes",
    ),
    _stream(
        "subscription_list",
        ("subscription_id",),
        "date_created",
        "subscription_id date_created:datetime status customer_id customer_email interval "
        "interval_count:integer next_renewal_date:datetime lines_count:integer total_incl_tax:number currency "
        "shipping_address cancel_reason metadata:json",
    ),
    _stream(
        "subscription_line_items",
        ("subscription_line_id",),
        "subscription_date_created",
        "subscription_line_id subscription_id subscription_date_created:datetime "
        "product_id product_title sku quantity:integer unit_price_incl_tax:number total_incl_tax:number "
        "is_trial:boolean",
    ),
    _stream(
        "open_cart_list",
        ("cart_id",),
        "date_created",
        "cart_id date_created:datetime customer_email customer_name currency lines_count:integer "
        "subtotal_incl_tax:number total_incl_tax:number voucher_code checkout_url is_abandoned:boolean "
        "attribution:json",
    ),
    _stream(
        "open_cart_line_items",
        ("cart_line_id",),
        "cart_date_created",
        "cart_line_id cart_id cart_date_created:datetime product_id product_title sku "
        "quantity:integer unit_price_incl_tax:number total_incl_tax:number",
    ),
    _stream(
        "return_list",
        ("return_id",),
        "date_created",
        "return_id date_created:datetime order_number status reason customer_email "
        "lines_count:integer refund_amount:number currency restock:boolean return_tracking_number customer_note",
    ),
    _stream(
        "return_line_items",
        ("return_line_id",),
        "return_date_created",
        "return_line_id return_id return_date_created:datetime order_line_id "
        "product_title sku quantity:integer refund_amount:number condition",
    ),
    _stream(
        "fulfillment_list",
        ("fulfillment_id",),
        "date_created",
        "fulfillment_id date_created:datetime order_number status location_name carrier "
        "tracking_number tracking_url shipped_at:datetime lines_count:integer shipping_address "
        "notify_customer:boolean",
    ),
    _stream(
        "fulfillment_line_items",
        ("fulfillment_line_id",),
        "fulfillment_date_created",
        "fulfillment_line_id fulfillment_id fulfillment_date_created:datetime "
        "order_line_id product_title sku quantity:integer lot_number",
    ),
)


# ------------------------------------------------------------------------ source


def _api_url(config: dict) -> str:
    if config.get("nextcommerce_api_url"):
        return checked_base_url(config, "nextcommerce_api_url")
    store = str(config.get("nextcommerce_store") or "").strip()
    if not store or not store.replace("-", "").isalnum():
        raise ConfigError(
            "setting 'nextcommerce_store' must be your store's subdomain (the part before .29next.store), "
            f"got {store!r}; or set 'nextcommerce_api_url'"
        )
    return f"https://{store}.29next.store/api/admin"


def validate(config: dict) -> None:
    _api_url(config)
    zone_name = str(config.get("nextcommerce_store_timezone") or "UTC")
    try:
        zone(zone_name)
    except Exception:
        raise ConfigError(
            f"setting 'nextcommerce_store_timezone' must be an IANA timezone name such as 'America/Chicago', "
            f"got {zone_name!r}"
        ) from None
    cap = config.get("nextcommerce_export_row_cap", 100000)
    if int(cap) < 2:
        raise ConfigError(f"setting 'nextcommerce_export_row_cap' must be at least 2, got {cap!r}")


def build_api(config: dict, logger: logging.Logger) -> NextCommerceApi:
    client = ApiClient(
        api_name="nextcommerce",
        base_url=_api_url(config),
        credential_headers={"Authorization": f"Bearer {config['nextcommerce_api_token']}"},
        logger=logger,
        extra_headers={"X-29next-API-Version": str(config.get("nextcommerce_api_version") or API_VERSION)},
        pacer=pacer(float(config.get("nextcommerce_requests_per_second") or REQUESTS_PER_SECOND), burst=1),
    )
    return NextCommerceApi(client, int(config.get("nextcommerce_export_row_cap", 100000)))


def check_connection(api: ExportApi) -> str:
    assert isinstance(api, NextCommerceApi)
    types = api.client.get("exports/types/").get("types") or []
    host = urlsplit(api.client.base_url).hostname
    return f"authenticated to {host}; {len(types)} export types available"


SOURCE = SourceDefinition(
    name="nextcommerce",
    settings=[
        th.Property(
            "nextcommerce_api_token",
            th.StringType,
            secret=True,
            description="Admin API access token (OAuth app with exports:read and exports:write). "
            "Next Commerce streams are discovered when set.",
        ),
        th.Property(
            "nextcommerce_store",
            th.StringType,
            description="Store subdomain: `mystore` for https://mystore.29next.store.",
        ),
        th.Property(
            "nextcommerce_api_url",
            th.StringType,
            description="Admin API base URL; overrides nextcommerce_store (e.g. the sandbox).",
        ),
        th.Property(
            "nextcommerce_api_version", th.StringType, default=API_VERSION, description="Sent as X-29next-API-Version."
        ),
        th.Property(
            "nextcommerce_store_timezone",
            th.StringType,
            default="UTC",
            description="IANA timezone of the store: export timestamps are naive, in this zone, "
            "and are emitted as UTC instants.",
        ),
        th.Property(
            "nextcommerce_requests_per_second",
            th.NumberType,
            default=REQUESTS_PER_SECOND,
            description="Client-side pace for API calls, shared by all exports. Next Commerce allows 4 "
            "requests/second per token; raise it only if your token's limit is higher.",
        ),
        th.Property(
            "nextcommerce_reread_hours",
            th.NumberType,
            default=REREAD_HOURS,
            description="Every run exports again this many hours before the bookmark. Which date the export "
            "range filters on is not documented (creation, most likely), so an order refunded or fulfilled "
            "after its window was read comes back only this way. Re-reads that many hours of rows each run "
            "(targets deduplicate on the key), and makes ceil((this + hours since the last run) / (24 x "
            "export_window_days)) exports per stream: 1 for daily runs with the default 30-day windows.",
        ),
        th.Property(
            "nextcommerce_export_row_cap",
            th.IntegerType,
            default=100000,
            description="Rows at which Next Commerce caps an export; a window whose file holds the cap, or "
            "whose export the API refuses as too large, is split and exported again.",
        ),
    ],
    credential_settings=("nextcommerce_api_token",),
    build_api=build_api,
    stream_types=STREAM_TYPES,
    naive_zone=lambda config: zone(str(config.get("nextcommerce_store_timezone") or "UTC")),
    validate=validate,
    check_connection=check_connection,
)

"""Voucherify: asynchronous CSV exports of orders, campaign transactions and other export objects.

How Voucherify spells the lifecycle (NOTES.md, Voucherify; voucherify-exports.openapi.yaml):
- create: `POST /v1/orders/export` (orders) or `POST /v1/exports` with `exported_object` and
  `parameters: {order, fields, filters}` (everything else);
- poll: `GET /v1/exports/{id}` until `DONE` (`ERROR` re-creates the export, a bounded number of times);
  while several exports wait together, one `GET /v1/exports` listing answers for all of them
  (`poll_many`);
- file: `result.url` of the DONE export, on the download host, which needs the X-App headers too;
  an expired token is renewed by reading the export again (no new export). Only `result.url` is
  read: anything else `result` may hold is undocumented.

Campaign transactions are one `voucher_transactions` export per window for every campaign, not one
per campaign: `ExportVoucherTransactionsFields` has `campaign_id` and `ExportVoucherTransactionsFilters`
filters on it (FieldConditions, whose values are lists: `{"$in": [ids]}`, as the campaign
transactions response example writes the filter it adds). A daily run therefore costs the same
few calls for 2 campaigns or 2,000 (Business plan: 100 requests a minute, NOTES.md). The
per-campaign endpoint (`POST /v1/campaigns/{id}/transactions/export`) is no longer used: it offers
nothing the filter does not, and costs an export per campaign.

Listing (`GET /v1/exports`, operation list-exports): documented query parameters are only `limit`
(1-100, default 10), `page` (from 1) and `order` (`created_at`, `-created_at`, `status`,
`-status`); the answer is `{object, data_ref, exports, total}` with each export as `GET
/v1/exports/{id}` returns it (its example shows `result.url` on DONE exports). The `limit`/`page`
ranges are in the vendor's full OpenAPI (voucherifyio/voucherify-openapi,
production/readOnly-openAPI.json, components.parameters), not in the cut-down file. There is no
filter by id, type or status, so the listing is read newest first, a bounded number of pages; an
export it does not show is polled on its own.

Windows filter on a date field with `$after`/`$before`, which are strict: the window's start is
sent 1 ms early so `[start, end)` is covered exactly (Voucherify timestamps have millisecond
precision). Both are written as one-element arrays, `{"$after": ["2024-01-01T00:00:00.000Z"]}`,
because every request example the vendor publishes writes them so (NOTES.md: "Date conditions");
FieldConditions (voucher_transactions filters) wants lists, the other objects leave filters untyped.
CSV headers are human labels ("Source ID") in the order of the requested fields, so records are
keyed by the requested field names.

The transactions stream was partitioned by campaign until it made one export for all: its state
then held one bookmark per `campaign_id` partition. `migrate_partitioned_state` turns that into
the one bookmark the stream keeps now, the oldest of them, so no campaign skips a row (rows of the
other campaigns between their bookmark and the oldest are read again: targets deduplicate on
`id`, "Unique transaction ID" in the field tables, one id space for all campaigns). The state also
records the campaigns its bookmark covers: a campaign added to `voucherify_campaign_ids` later
makes the stream start again at start_date, or its history would be skipped.

Metadata columns (`voucherify_<object>_metadata_fields`): Voucherify documents `metadata.X` export
fields for orders only (the field tables of POST /v1/orders/export and POST /v1/exports, and the
request examples with `metadata.payment_mean`; the ExportOrderFields enum itself leaves it out).
Vouchers, redemptions, publications and customers document only a `metadata` field ("Custom
voucher metadata", "Customer metadata. All metadata fields defined in Metadata Schema for the
Customer object"), and their field enums refuse `metadata.X`: their named properties are read out
of the `metadata` JSON column instead (`MetadataColumnsReader`), which needs no undocumented field.
Either way a property `tier` becomes column `metadata_tier`, text as the CSV cell would hold it.
Transactions and points expirations have no metadata field.

Credentials go only to Voucherify. The download host needs the X-App headers (NOTES.md), so a
`result.url` decides where our secret goes; it is checked where the API's answer becomes an
`ExportHandle` (`VoucherifyApi._handle`, and again in `file_url`), so no file URL reaches the
downloader, or a refreshed one its retries, without passing. Accepted hosts: the configured API
host, and its cluster's download host as NOTES.md documents them (`api.voucherify.io` ->
`download.voucherify.io`, `us1.api...` -> `us1.download...`, `as1.api...` -> `as1.download...`);
for an API on a loopback host (the sandbox), any loopback host. Only https outside loopback. The
host is the one requests would connect to (urllib3's reading of the URL); a URL with user info,
or that another parser reads as another host, is refused. Anything else fails its window with
`ExportFailed` naming the host (never the query string, which holds the download token) and
saying that no credentials were sent. An unknown cluster (an API host not in the list) accepts
only its own host: the pairing of API and download hosts is documented for these three only.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

import urllib3.util
from singer_sdk import typing as th

from tap_commerce_exports.exports.http import ApiClient, ApiError
from tap_commerce_exports.exports.job import ExportApi, ExportFailed, ExportHandle, ExportRequest, ExportState
from tap_commerce_exports.exports.status_board import statuses_in_listing
from tap_commerce_exports.exports.windows import Window, parse_instant
from tap_commerce_exports.records.columns import Column, columns_from_spec, header_key
from tap_commerce_exports.records.csv_reader import CsvLayout, CsvRecordReader, RecordBuilder

# The same loopback rule as checked_base_url's: plain http and any loopback file host go together.
from tap_commerce_exports.sources.base import (
    ConfigError,
    SourceDefinition,
    checked_base_url,
    is_loopback,
    pacer,
    string_list,
)
from tap_commerce_exports.stream import ExportStream

STATES = {
    "SCHEDULED": ExportState.PENDING,
    "IN_PROGRESS": ExportState.PENDING,
    "DONE": ExportState.READY,
    "ERROR": ExportState.FAILED,
}
#: GET /v1/exports `limit`: 1 to 100 (vendor's OpenAPI, components.parameters.limit).
LIST_PAGE_SIZE = 100
#: Listing pages read for one status check; exports further back are polled one by one.
STATUS_LIST_PAGES = 3
#: NOTES.md (Voucherify): each cluster's API host and the host its `result.url` files are on.
DOWNLOAD_HOSTS = {
    "api.voucherify.io": "download.voucherify.io",
    "us1.api.voucherify.io": "us1.download.voucherify.io",
    "as1.api.voucherify.io": "as1.download.voucherify.io",
}


def _voucherify_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _date_condition(moment: dt.datetime) -> list[str]:
    """NOTES.md: every vendor request example writes `$after`/`$before` as one-element arrays."""
    return [_voucherify_time(moment)]


def _host_name(host: str | None) -> str:
    return (host or "").strip("[]").rstrip(".").lower()


def vendor_file_hosts(api_url: str) -> frozenset[str] | None:
    """Hosts a file URL may name to receive the X-App headers; None: any loopback host (the API is
    on loopback: the sandbox)."""
    api_host = _host_name(urlsplit(api_url).hostname)
    if is_loopback(api_host):
        return None
    return frozenset(host for host in (api_host, DOWNLOAD_HOSTS.get(api_host)) if host)


def foreign_file_url(url: str, allowed: frozenset[str] | None) -> str | None:
    """Why `url` must not get our credentials (naming its host, never its query), or None."""
    try:
        parts = urllib3.util.parse_url(url)
    except ValueError:
        return "the file URL cannot be read"
    host = _host_name(parts.host)
    if not host or parts.auth is not None or host != _host_name(urlsplit(url).hostname):
        return f"the file URL's host {host or '(none)'!r} is ambiguous"
    if allowed is None:
        return None if is_loopback(host) else f"the file URL is on {host!r}, not on a loopback host like the API"
    if host not in allowed:
        hosts = ", ".join(sorted(allowed))
        return f"the file URL is on {host!r}, which is not a Voucherify host of this cluster ({hosts})"
    if parts.scheme != "https":
        return f"the file URL on {host!r} is not https"
    return None


def _instant_or_none(value: Any) -> dt.datetime | None:
    try:
        return parse_instant(str(value)) if value else None
    except ValueError:
        return None


class VoucherifyApi(ExportApi):
    name = "voucherify"
    max_recreates = 3
    can_resume = True
    lists_statuses = True

    def __init__(self, client: ApiClient, campaign_ids: tuple[str, ...] | None = None) -> None:
        self.client = client
        self.file_hosts = vendor_file_hosts(client.base_url)
        #: `voucherify_campaign_ids`: the campaigns whose transactions are exported (None: all).
        self.campaign_ids = campaign_ids

    # -- create
    def create(self, request: ExportRequest) -> ExportHandle:
        stream = STREAM_TYPES_BY_NAME[request.stream_name]
        parameters: dict[str, Any] = {"fields": list(request.fields)}
        if stream.sort_order:
            parameters["order"] = stream.sort_order
        filters = self._filters(stream, request.window)
        if filters:
            parameters["filters"] = {"junction": "and", **filters}
        path, body = self._create_call(request, parameters)
        return self._handle(request, self.client.post(path, body=body))

    def _filters(self, stream: type[VoucherifyStream], window: Window | None) -> dict[str, Any]:
        """`{<field>: {conditions: {...}}}` (NOTES.md: Filters): the window's dates and, for
        transactions, the campaigns asked for (ExportVoucherTransactionsFilters.campaign_id)."""
        filters: dict[str, Any] = {}
        if window is not None and stream.filter_field:
            filters[stream.filter_field] = {
                "conditions": {
                    "$after": _date_condition(window.start - dt.timedelta(milliseconds=1)),
                    "$before": _date_condition(window.end),
                }
            }
        if stream.filters_campaigns and self.campaign_ids:
            filters["campaign_id"] = {"conditions": {"$in": list(self.campaign_ids)}}
        return filters

    @staticmethod
    def _create_call(request: ExportRequest, parameters: dict) -> tuple[str, dict]:
        if request.export_type == "order":
            return "/v1/orders/export", {"parameters": parameters}
        return "/v1/exports", {"exported_object": request.export_type, "parameters": parameters}

    # -- poll and file
    def poll(self, request: ExportRequest, handle: ExportHandle) -> ExportHandle:
        return self._handle(request, self._read_export(handle.export_id))

    def poll_many(self, handles: list[ExportHandle]) -> dict[str, ExportHandle]:
        """One call for every waiting export: `GET /v1/exports` newest first (list-exports), or
        `GET /v1/exports/{id}` when only one waits (a listing would cost the same call, and more bytes)."""
        if len(handles) == 1:
            listed = self._listed(self._read_export(handles[0].export_id))
            return {listed.export_id: listed} if listed else {}
        created = [moment for handle in handles if (moment := handle.detail.get("created_at"))]
        oldest = min(created) if len(created) == len(handles) else None
        return statuses_in_listing(
            self._newest_exports(),
            {handle.export_id for handle in handles},
            self._listed,
            lambda exports: _reached(exports, oldest),
        )

    def _newest_exports(self) -> Iterator[list[dict]]:
        """The export list newest first, a page at a time, at most STATUS_LIST_PAGES pages."""
        for page in range(1, STATUS_LIST_PAGES + 1):
            params = {"limit": LIST_PAGE_SIZE, "page": page, "order": "-created_at"}
            exports = self.client.get("/v1/exports", params=params).get("exports") or []
            yield exports
            if len(exports) < LIST_PAGE_SIZE:
                return

    def file_url(self, request: ExportRequest, handle: ExportHandle) -> str:
        return self._vendor_url(request, handle.export_id, super().file_url(request, handle))

    def fresh_file_url(self, request: ExportRequest, handle: ExportHandle) -> str | None:
        # Each read of a DONE export carries a new download token (checked in `_handle`).
        return self.poll(request, handle).file_url

    def file_headers(self) -> dict[str, str]:
        """NOTES.md: the download host wants the X-App headers; `_vendor_url` keeps them on Voucherify."""
        return dict(self.client.credential_headers)

    def resume(self, request: ExportRequest, export_id: str) -> ExportHandle | None:
        try:
            return self._handle(request, self._read_export(export_id))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def _read_export(self, export_id: str) -> dict:
        return self.client.get(f"/v1/exports/{quote(export_id, safe='')}")

    def _handle(self, request: ExportRequest, export: dict) -> ExportHandle:
        """GET /v1/exports/{exportId}: `status`, and `result.url` once DONE (checked before anyone sees it)."""
        handle = _unchecked_handle(export)
        if handle.file_url is not None:
            handle.file_url = self._vendor_url(request, handle.export_id, handle.file_url)
        return handle

    def _listed(self, export: dict) -> ExportHandle | None:
        """An export as a listing shows it; None when its file URL is refused: polled on its own,
        the refusal then names its stream and window (`_handle`)."""
        handle = _unchecked_handle(export)
        if handle.file_url is not None and foreign_file_url(handle.file_url, self.file_hosts):
            return None
        return handle

    def _vendor_url(self, request: ExportRequest, export_id: str, url: str) -> str:
        """`url`, if the X-App headers may go there (see the module docstring); ExportFailed if not."""
        problem = foreign_file_url(url, self.file_hosts)
        if problem:
            raise ExportFailed(
                f"{request.describe()}: export {export_id} is refused: {problem}; "
                "its file was not downloaded and no credentials were sent to that host"
            )
        return url


def _unchecked_handle(export: dict) -> ExportHandle:
    """An export object (ExportBase): `id`, `status`, `result.url`; `created_at` bounds listings."""
    status = str(export.get("status") or "")
    url = (export.get("result") or {}).get("url")
    handle = ExportHandle(str(export["id"]), status, STATES.get(status, ExportState.PENDING), url and str(url))
    created = _instant_or_none(export.get("created_at"))
    if created is not None:
        handle.detail["created_at"] = created
    return handle


def _reached(exports: list[dict], oldest: dt.datetime | None) -> bool:
    """Whether a newest-first page went back past the oldest export waited for: later pages hold none."""
    moments = [moment for export in exports if (moment := _instant_or_none(export.get("created_at")))]
    return oldest is not None and bool(moments) and min(moments) < oldest


# ------------------------------------------------------------- campaign transactions state

#: Stream state key: the campaigns the bookmark covers (null: every campaign).
CAMPAIGNS_COVERED = "campaign_ids_covered"


def migrate_partitioned_state(state: dict, replication_key: str, campaign_ids: Sequence[str] | None) -> str | None:
    """A state written when the stream had one partition per campaign, rewritten in place to the
    one bookmark the stream keeps now: the oldest bookmark of the campaigns asked for, so no campaign
    skips a row. A campaign asked for that has no bookmark there starts the stream at start_date.

    Returns the bookmark it chose ('' for none), or None when the state needed no migration.
    `partitions` is emptied, not removed: Meltano merges a new state into the stored one, and a
    key left out would bring the old bookmarks back. Campaign exports they had in flight are
    forgotten (they were per-campaign exports, of no use to the new one).
    """
    partitions = state.get("partitions")
    if not partitions or state.get("replication_key_value"):
        return None
    bookmarks = {
        str((partition.get("context") or {}).get("campaign_id")): partition.get("replication_key_value")
        if partition.get("replication_key") == replication_key
        else None
        for partition in partitions
    }
    # Unset, the old stream listed every campaign: one missing from the state was created since.
    wanted = list(campaign_ids) if campaign_ids else list(bookmarks)
    values = [bookmarks.get(campaign) for campaign in wanted]
    given = [value for value in values if value]
    oldest = min(given, key=parse_instant) if values and len(given) == len(values) else None
    state["partitions"] = []
    state["replication_key"] = replication_key
    if oldest:
        state["replication_key_value"] = parse_instant(oldest).isoformat()
    state[CAMPAIGNS_COVERED] = sorted(campaign_ids) if campaign_ids else None
    return state.get("replication_key_value", "")


def campaigns_not_covered(state: dict, campaign_ids: Sequence[str] | None) -> str | None:
    """Which campaigns asked for now the bookmark does not cover (words for a log), or None.

    A bookmark made for some campaigns says nothing of another one added to the setting later:
    it must be read from start_date, or its history would be lost.
    """
    covered = state.get(CAMPAIGNS_COVERED)
    if covered is None or not state.get("replication_key_value"):
        return None
    if not campaign_ids:
        return "every campaign (voucherify_campaign_ids was emptied)"
    missing = sorted(set(campaign_ids) - set(covered))
    return ", ".join(missing) if missing else None


# ----------------------------------------------------------------------------- metadata

#: Objects whose exports hold `metadata` and the setting naming the properties to make columns of.
#: Voucherify documents `metadata.X` fields for orders only (POST /v1/orders/export, POST
#: /v1/exports field tables); vouchers, redemptions, publications and customers document a
#: `metadata` field (the object's metadata), which the tap reads the properties out of.
#: Points expirations and transactions have no metadata field (their field enums).
METADATA_SETTINGS = {
    "order": "voucherify_order_metadata_fields",
    "voucher": "voucherify_voucher_metadata_fields",
    "redemption": "voucherify_redemption_metadata_fields",
    "publication": "voucherify_publication_metadata_fields",
    "customer": "voucherify_customer_metadata_fields",
}
#: A property name per METADATA_SETTINGS entry, for the settings' descriptions.
METADATA_EXAMPLES = ("payment_mean", "region", "locale", "source", "tier")
#: A metadata property name the tap accepts. Voucherify publishes no rule for metadata keys (a
#: "Property name (key)" of the metadata schema; JSON keys in the API), so the tap refuses only what
#: it cannot carry faithfully: a `.` (`metadata.a.b` would address a nested property, which no
#: export documents), spaces and commas (the setting is also a comma-separated environment
#: variable), and other characters, which would not survive in the column name `metadata_<name>`.
METADATA_NAME = re.compile(r"[A-Za-z0-9_-]+")


def metadata_column(name: str) -> str:
    """The record key of a metadata property: `payment_mean` -> `metadata_payment_mean`."""
    return header_key(f"metadata.{name}")


def check_metadata_names(config: dict, setting: str) -> None:
    """A ConfigError naming the setting and the name, for a name the tap cannot export as a column."""
    columns: dict[str, str] = {}
    for name in string_list(config, setting):
        if not METADATA_NAME.fullmatch(name):
            raise ConfigError(
                f"setting {setting!r}: {name!r} is not a metadata property name the tap can export: use letters, "
                "digits, '_' and '-' (no dots, spaces or commas; nested properties are not exported)"
            )
        column = metadata_column(name)
        if column in columns:
            raise ConfigError(f"setting {setting!r}: {columns[column]!r} and {name!r} would both be column {column!r}")
        columns[column] = name


def validate(config: dict) -> None:
    for setting in METADATA_SETTINGS.values():
        check_metadata_names(config, setting)


def _metadata_cell(metadata: Any, name: str) -> str | None:
    """One property of a `metadata` cell as a `metadata.X` column holds it: text as it is, other
    values as JSON (`true`, `12`, `{...}`), an absent or empty one as null."""
    if not isinstance(metadata, dict):
        return None
    value = metadata.get(name)
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class MetadataColumnsReader(CsvRecordReader):
    """Adds a `metadata_<name>` column per named property, read out of the file's `metadata` JSON
    column (objects whose `metadata.X` fields Voucherify does not document). A file that already has
    such a column keeps its own; one without `metadata` (or whose metadata is not JSON) gets none."""

    def __init__(self, columns: dict[str, Column], *, metadata_names: tuple[str, ...], **options: Any) -> None:
        super().__init__(columns, **options)
        self.metadata_names = metadata_names

    def make_build(self, layout: CsvLayout) -> RecordBuilder:
        derived = [(metadata_column(name), name) for name in self.metadata_names]
        derived = [(key, name) for key, name in derived if key not in layout.keys]
        if "metadata" not in layout.keys or not derived:
            return super().make_build(layout)
        source = layout.keys.index("metadata")
        keys = layout.record_keys + [key for key, _ in derived]
        json_keys = self.json_keys(layout)
        inner = self.builder(keys, self.constants, json_keys) if json_keys else self.builder(keys, self.constants)

        def build(columns: list[Sequence[Any]]) -> list[Any]:
            metadata = columns[source]
            return inner([*columns, *([_metadata_cell(cell, name) for cell in metadata] for _, name in derived)])

        return build


# ------------------------------------------------------------------------ streams


class VoucherifyStream(ExportStream):
    """A Voucherify export object. `filter_field` is the date the window filters on."""

    filter_field: str | None = None
    sort_order: str | None = None
    #: Whether the export is filtered to `voucherify_campaign_ids` (campaign transactions).
    filters_campaigns: ClassVar[bool] = False
    #: The setting naming metadata properties to export as columns `metadata_<name>` (see METADATA).
    metadata_setting: ClassVar[str | None] = None
    #: Whether Voucherify documents `metadata.<name>` export fields for this object (orders only);
    #: the others' columns are read out of the documented `metadata` column (MetadataColumnsReader).
    metadata_fields_documented: ClassVar[bool] = False

    @classmethod
    def windows_follow(cls) -> str:
        if cls.filter_field == "updated_at":
            return "`updated_at`: a change moves the object into a later window, so it comes back"
        return f"`{cls.filter_field}`: these objects do not change once made"

    @property
    def api(self) -> VoucherifyApi:
        return self.runtime.api  # type: ignore[return-value]

    def metadata_names(self) -> list[str]:
        return string_list(self.config, self.metadata_setting) if self.metadata_setting else []

    def columns(self) -> list[Column]:
        return [*self.known_columns, *(Column(metadata_column(name)) for name in self.metadata_names())]

    def fields_to_request(self) -> tuple[str, ...]:
        """Every known column; metadata properties as `metadata.<name>` fields where documented."""
        known = tuple(column.key for column in self.known_columns if column.key != self.partition_key)
        if not self.metadata_fields_documented:
            return known
        return (*known, *(f"metadata.{name}" for name in self.metadata_names()))

    def new_reader(self, columns: dict[str, Column], **options: Any) -> CsvRecordReader:
        names = () if self.metadata_fields_documented else tuple(self.metadata_names())
        if not names:
            return super().new_reader(columns, **options)
        return MetadataColumnsReader(columns, metadata_names=names, **options)


class OrdersStream(VoucherifyStream):
    name = "voucherify_orders"
    export_type = "order"
    primary_keys = ("id",)
    replication_key = "updated_at"
    filter_field = "updated_at"
    sort_order = "updated_at"
    metadata_setting = METADATA_SETTINGS["order"]
    # POST /v1/orders/export: its field table documents `metadata.X` and its examples request
    # `metadata.payment_mean` (the ExportOrderFields enum leaves it out).
    metadata_fields_documented = True
    known_columns = columns_from_spec(
        "id source_id created_at:datetime updated_at:datetime status amount:integer discount_amount:integer "
        "items_discount_amount:integer total_discount_amount:integer total_amount:integer customer_id "
        "referrer_id metadata:json"
    )


class CampaignTransactionsStream(VoucherifyStream):
    """Gift card and loyalty card transactions of every campaign (or of `voucherify_campaign_ids`),
    one `voucher_transactions` export per window; rows carry their `campaign_id` column.

    The stream kept its name when it stopped being partitioned by campaign: a state written then
    (one bookmark per `campaign_id` partition) is migrated by `prepare_sync`, starting from the oldest
    of those bookmarks, so nothing is skipped; rows read again are deduplicated on `id` by targets
    ("Unique transaction ID", POST /v1/exports field tables: one id space for every campaign).
    """

    name = "voucherify_campaign_transactions"
    export_type = "voucher_transactions"
    primary_keys = ("id",)
    replication_key = "created_at"
    filter_field = "created_at"
    sort_order = "created_at"  # ExportVoucherTransactionsOrder
    filters_campaigns = True
    known_columns = columns_from_spec(
        "id type source_id reason balance:integer amount:integer created_at:datetime voucher_id source "
        "details:json related_transaction_id campaign_id"
    )

    def prepare_sync(self) -> None:
        super().prepare_sync()
        oldest = migrate_partitioned_state(self.stream_state, self.replication_key or "", self.api.campaign_ids)
        if oldest is not None:
            self.logger.warning(
                "%s: state from per-campaign exports migrated: one export now covers every campaign, "
                "starting from the oldest campaign bookmark, %s (rows read again are deduplicated on id)",
                self.name,
                oldest or "none: start_date",
            )

    def bookmark(self, context: dict | None) -> dt.datetime | None:
        """The bookmark, unless it leaves out campaigns asked for now: they start at start_date."""
        missing = campaigns_not_covered(self.stream_state, self.api.campaign_ids)
        if missing is None:
            return super().bookmark(context)
        if not getattr(self, "_warned_uncovered", False):
            self._warned_uncovered = True
            self.logger.warning(
                "%s: the bookmark covers only the campaigns exported until now, not %s: exporting from "
                "start_date again (rows read again are deduplicated on id)",
                self.name,
                missing,
            )
        return None

    def _move_bookmark(self, context: dict | None, window: Window | None) -> None:
        ids = self.api.campaign_ids
        self.stream_state[CAMPAIGNS_COVERED] = sorted(ids) if ids else None
        super()._move_bookmark(context, window)


class VouchersStream(VoucherifyStream):
    name = "voucherify_vouchers"
    export_type = "voucher"
    primary_keys = ("id",)
    replication_key = "updated_at"
    filter_field = "updated_at"
    sort_order = "updated_at"
    metadata_setting = METADATA_SETTINGS["voucher"]
    known_columns = columns_from_spec(
        "id code voucher_type value:number formula discount_type campaign campaign_id category "
        "start_date:datetime expiration_date:datetime gift_balance:integer loyalty_balance:integer "
        "redemption_quantity:integer redemption_count:integer active:boolean qr_code bar_code metadata:json "
        "is_referral_code:boolean created_at:datetime updated_at:datetime validity_timeframe_interval "
        "validity_timeframe_duration validity_day_of_week discount_amount_limit:number additional_info "
        "customer_id customer_source_id discount_effect discount_unit_type discount_unit_effect validation_rules_id"
    )


class RedemptionsStream(VoucherifyStream):
    name = "voucherify_redemptions"
    export_type = "redemption"
    primary_keys = ("id",)
    replication_key = "date"
    filter_field = "created_at"  # the redemption's creation, exported as `date`
    sort_order = "created_at"
    metadata_setting = METADATA_SETTINGS["redemption"]
    known_columns = columns_from_spec(
        "id object date:datetime voucher_code campaign promotion_tier_id customer_id customer_source_id "
        "customer_name tracking_id order_id order_amount:integer gift_amount:integer loyalty_points:integer "
        "result failure_code failure_message metadata:json"
    )


class PublicationsStream(VoucherifyStream):
    name = "voucherify_publications"
    export_type = "publication"
    # The export offers no publication id: a voucher is published to a customer at one moment.
    primary_keys = ("voucher_code", "customer_id", "date")
    replication_key = "date"
    filter_field = "created_at"  # the publication's creation, exported as `date`
    sort_order = "created_at"
    metadata_setting = METADATA_SETTINGS["publication"]
    known_columns = columns_from_spec(
        "voucher_code customer_id customer_source_id date:datetime channel campaign is_winner:boolean metadata:json"
    )


class CustomersStream(VoucherifyStream):
    name = "voucherify_customers"
    export_type = "customer"
    primary_keys = ("id",)
    replication_key = "updated_at"
    filter_field = "updated_at"
    sort_order = "updated_at"
    metadata_setting = METADATA_SETTINGS["customer"]
    known_columns = columns_from_spec(
        "id name description email source_id created_at:datetime updated_at:datetime address_city "
        "address_state address_line_1 address_line_2 address_country address_postal_code "
        "redemptions_total_redeemed:integer redemptions_total_failed:integer redemptions_total_succeeded:integer "
        "redemptions_total_rolled_back:integer redemptions_total_rollback_failed:integer "
        "redemptions_total_rollback_succeeded:integer orders_total_amount:integer orders_total_count:integer "
        "orders_average_amount:integer orders_last_order_amount:integer orders_last_order_date:datetime "
        "loyalty_points:integer loyalty_referred_customers:integer phone birthday:date birthdate:date metadata:json"
    )


class PointsExpirationsStream(VoucherifyStream):
    """Point buckets and when they expire: a snapshot, exported whole each run (no date to window on)."""

    name = "voucherify_points_expirations"
    export_type = "points_expiration"
    primary_keys = ("id",)
    replication_key = None
    sort_order = "expires_at"
    known_columns = columns_from_spec("id campaign_id voucher_id points:integer status expires_at:date")


STREAM_TYPES: tuple[type[VoucherifyStream], ...] = (
    OrdersStream,
    CampaignTransactionsStream,
    VouchersStream,
    RedemptionsStream,
    PublicationsStream,
    CustomersStream,
    PointsExpirationsStream,
)
STREAM_TYPES_BY_NAME = {stream.name: stream for stream in STREAM_TYPES}  # type: ignore[misc]


# ------------------------------------------------------------------------ source


def build_api(config: dict, logger: logging.Logger) -> VoucherifyApi:
    client = ApiClient(
        api_name="voucherify",
        base_url=checked_base_url(config, "voucherify_api_url"),
        credential_headers={"X-App-Id": config["voucherify_app_id"], "X-App-Token": config["voucherify_app_token"]},
        logger=logger,
        extra_headers={"Content-Type": "application/json"},
        # Voucherify's limits depend on the plan (e.g. 100/min); its 429s say how long to wait.
        pacer=pacer(config.get("voucherify_requests_per_second"), burst=5),
    )
    return VoucherifyApi(client, tuple(string_list(config, "voucherify_campaign_ids")) or None)


def check_connection(api: ExportApi) -> str:
    assert isinstance(api, VoucherifyApi)
    api.client.get("/v1/campaigns", params={"limit": 1, "page": 1})
    return "authenticated; campaigns listed"


SOURCE = SourceDefinition(
    name="voucherify",
    settings=[
        th.Property(
            "voucherify_app_id",
            th.StringType,
            secret=False,
            description="Voucherify application ID (X-App-Id). Voucherify streams are discovered when set.",
        ),
        th.Property(
            "voucherify_app_token", th.StringType, secret=True, description="Voucherify secret key (X-App-Token)."
        ),
        th.Property(
            "voucherify_api_url",
            th.StringType,
            default="https://api.voucherify.io",
            description="API base URL for your cluster: https://api.voucherify.io, "
            "https://us1.api.voucherify.io or https://as1.api.voucherify.io.",
        ),
        th.Property(
            "voucherify_campaign_ids",
            th.ArrayType(th.StringType),
            description="Campaigns whose transactions to export (one export per window, filtered to them). "
            "Default: the transactions of every campaign.",
        ),
        *(
            th.Property(
                setting,
                th.ArrayType(th.StringType),
                description=f"{exported.capitalize()} metadata properties to export as their own columns "
                f"(`{example}` becomes column `metadata_{example}`): letters, digits, '_' and '-'.",
            )
            for (exported, setting), example in zip(METADATA_SETTINGS.items(), METADATA_EXAMPLES, strict=True)
        ),
        th.Property(
            "voucherify_requests_per_second",
            th.NumberType,
            description="Client-side pace for API calls (your plan's limit). Default: unpaced, "
            "relying on 429 X-Rate-Limit-Retry.",
        ),
    ],
    credential_settings=("voucherify_app_id", "voucherify_app_token"),
    build_api=build_api,
    stream_types=STREAM_TYPES,
    validate=validate,
    check_connection=check_connection,
)

"""Voucherify: asynchronous CSV exports of orders, campaign transactions and other export objects.

How Voucherify spells the lifecycle (NOTES.md, Voucherify; voucherify-exports.openapi.yaml):
- create: `POST /v1/orders/export`, `POST /v1/campaigns/{id}/transactions/export` or
  `POST /v1/exports` with `parameters: {order, fields, filters}`;
- poll: `GET /v1/exports/{id}` until `DONE` (`ERROR` re-creates the export, a bounded number of times);
- file: `result.url` of the DONE export, on the download host, which needs the X-App headers too;
  an expired token is renewed by reading the export again (no new export). Only `result.url` is
  read: anything else `result` may hold is undocumented.

Windows filter on a date field with `$after`/`$before`, which are strict: the window's start is
sent 1 ms early so `[start, end)` is covered exactly (Voucherify timestamps have millisecond
precision). Both are written as one-element arrays, `{"$after": ["2024-01-01T00:00:00.000Z"]}`,
because every request example the vendor publishes writes them so (NOTES.md: "Date conditions");
the campaign-transactions schema also allows a string, the others leave filters untyped or want
lists. CSV headers are human labels ("Source ID") in the order of the requested fields, so
records are keyed by the requested field names.

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
import logging
from typing import Any
from urllib.parse import quote, urlsplit

import urllib3.util
from singer_sdk import typing as th

from tap_commerce_exports.engine.csv_records import Column, columns_from_spec, header_key
from tap_commerce_exports.engine.export_job import ExportApi, ExportFailed, ExportHandle, ExportRequest, ExportState
from tap_commerce_exports.engine.http import ApiClient, ApiError
from tap_commerce_exports.engine.stream import ExportStream

# The same loopback rule as checked_base_url's: plain http and any loopback file host go together.
from tap_commerce_exports.sources.base import SourceDefinition, _is_loopback, checked_base_url, pacer, string_list

STATES = {
    "SCHEDULED": ExportState.PENDING,
    "IN_PROGRESS": ExportState.PENDING,
    "DONE": ExportState.READY,
    "ERROR": ExportState.FAILED,
}
TRANSACTION_CAMPAIGN_TYPES = ("GIFT_VOUCHERS", "LOYALTY_PROGRAM")
CAMPAIGN_PAGE_SIZE = 100
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
    if _is_loopback(api_host):
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
        return None if _is_loopback(host) else f"the file URL is on {host!r}, not on a loopback host like the API"
    if host not in allowed:
        hosts = ", ".join(sorted(allowed))
        return f"the file URL is on {host!r}, which is not a Voucherify host of this cluster ({hosts})"
    if parts.scheme != "https":
        return f"the file URL on {host!r} is not https"
    return None


class VoucherifyApi(ExportApi):
    name = "voucherify"
    max_recreates = 3
    can_resume = True

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.file_hosts = vendor_file_hosts(client.base_url)

    # -- create
    def create(self, request: ExportRequest) -> ExportHandle:
        stream = STREAM_TYPES_BY_NAME[request.stream_name]
        parameters: dict[str, Any] = {"fields": list(request.fields)}
        if stream.sort_order:
            parameters["order"] = stream.sort_order
        if request.window is not None and stream.filter_field:
            parameters["filters"] = {
                "junction": "and",
                stream.filter_field: {
                    "conditions": {
                        "$after": _date_condition(request.window.start - dt.timedelta(milliseconds=1)),
                        "$before": _date_condition(request.window.end),
                    }
                },
            }
        path, body = self._create_call(request, parameters)
        return self._handle(request, self.client.post(path, body=body))

    @staticmethod
    def _create_call(request: ExportRequest, parameters: dict) -> tuple[str, dict]:
        if request.export_type == "order":
            return "/v1/orders/export", {"parameters": parameters}
        if request.export_type == "campaign_transactions":
            campaign = quote(str(request.partition["campaign_id"]), safe="")
            return f"/v1/campaigns/{campaign}/transactions/export", {"parameters": parameters}
        return "/v1/exports", {"exported_object": request.export_type, "parameters": parameters}

    # -- poll and file
    def poll(self, request: ExportRequest, handle: ExportHandle) -> ExportHandle:
        return self._handle(request, self.client.get(f"/v1/exports/{quote(handle.export_id, safe='')}"))

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
            return self._handle(request, self.client.get(f"/v1/exports/{quote(export_id, safe='')}"))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def _handle(self, request: ExportRequest, export: dict) -> ExportHandle:
        """GET /v1/exports/{exportId}: `status`, and `result.url` once DONE (checked before anyone sees it)."""
        export_id = str(export["id"])
        status = str(export.get("status") or "")
        url = (export.get("result") or {}).get("url")
        if url is not None:
            url = self._vendor_url(request, export_id, str(url))
        return ExportHandle(export_id, status, STATES.get(status, ExportState.PENDING), url)

    def _vendor_url(self, request: ExportRequest, export_id: str, url: str) -> str:
        """`url`, if the X-App headers may go there (see the module docstring); ExportFailed if not."""
        problem = foreign_file_url(url, self.file_hosts)
        if problem:
            raise ExportFailed(
                f"{request.describe()}: export {export_id} is refused: {problem}; "
                "its file was not downloaded and no credentials were sent to that host"
            )
        return url

    # -- partitions
    def transaction_campaign_ids(self) -> list[str]:
        """Every gift card and loyalty campaign, all pages."""
        ids: list[str] = []
        for campaign_type in TRANSACTION_CAMPAIGN_TYPES:
            page = 1
            while True:
                answer = self.client.get(
                    "/v1/campaigns", params={"campaign_type": campaign_type, "limit": CAMPAIGN_PAGE_SIZE, "page": page}
                )
                campaigns = answer.get("campaigns") or []
                ids += [str(campaign["id"]) for campaign in campaigns]
                if len(campaigns) < CAMPAIGN_PAGE_SIZE:
                    break
                page += 1
        return ids


# ------------------------------------------------------------------------ streams


class VoucherifyStream(ExportStream):
    """A Voucherify export object. `filter_field` is the date the window filters on."""

    filter_field: str | None = None
    sort_order: str | None = None
    #: Voucherify documents its export fields (the spec's field enums and tables, NOTES.md): a file is
    #: not read twice for misfits; one that turns up anyway widens its column where it is met.
    column_kinds_documented = True

    @classmethod
    def windows_follow(cls) -> str:
        if cls.filter_field == "updated_at":
            return "`updated_at`: a change moves the object into a later window, so it comes back"
        return f"`{cls.filter_field}`: these objects do not change once made"

    @property
    def api(self) -> VoucherifyApi:
        return self.runtime.api  # type: ignore[return-value]

    def fields_to_request(self) -> tuple[str, ...]:
        return tuple(column.key for column in self.known_columns if column.key != self.partition_key)


class OrdersStream(VoucherifyStream):
    name = "voucherify_orders"
    export_type = "order"
    primary_keys = ("id",)
    replication_key = "updated_at"
    filter_field = "updated_at"
    sort_order = "updated_at"
    known_columns = columns_from_spec(
        "id source_id created_at:datetime updated_at:datetime status amount:integer discount_amount:integer "
        "items_discount_amount:integer total_discount_amount:integer total_amount:integer customer_id "
        "referrer_id metadata:json"
    )

    def metadata_fields(self) -> list[str]:
        return string_list(self.config, "voucherify_order_metadata_fields")

    def columns(self) -> list[Column]:
        return [*self.known_columns, *(Column(header_key(f"metadata.{name}")) for name in self.metadata_fields())]

    def fields_to_request(self) -> tuple[str, ...]:
        return (*super().fields_to_request(), *(f"metadata.{name}" for name in self.metadata_fields()))


class CampaignTransactionsStream(VoucherifyStream):
    name = "voucherify_campaign_transactions"
    export_type = "campaign_transactions"
    primary_keys = ("id",)
    replication_key = "created_at"
    partition_key = "campaign_id"
    filter_field = "created_at"
    sort_order = "created_at"
    known_columns = columns_from_spec(
        "id type source_id reason balance:integer amount:integer created_at:datetime voucher_id source "
        "details:json related_transaction_id campaign_id"
    )

    def partition_values(self) -> list[str]:
        return string_list(self.config, "voucherify_campaign_ids") or self.api.transaction_campaign_ids()


class VouchersStream(VoucherifyStream):
    name = "voucherify_vouchers"
    export_type = "voucher"
    primary_keys = ("id",)
    replication_key = "updated_at"
    filter_field = "updated_at"
    sort_order = "updated_at"
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
    return VoucherifyApi(client)


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
            description="Campaigns whose transactions to export. Default: every GIFT_VOUCHERS and "
            "LOYALTY_PROGRAM campaign.",
        ),
        th.Property(
            "voucherify_order_metadata_fields",
            th.ArrayType(th.StringType),
            description="Order metadata properties to export as their own columns "
            "(`payment_mean` becomes column `metadata_payment_mean`).",
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
    check_connection=check_connection,
)

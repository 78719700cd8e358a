"""Voucherify emulator: asynchronous CSV exports on an API host, files on a separate download host.

What it emulates (from voucherify-exports.openapi.json and ../shared/reference/NOTES.md):

- Two hosts, like `api.voucherify.io` and `download.voucherify.io`. Both demand the `X-App-Id` and
  `X-App-Token` headers (the download host does too, as Voucherify's does); anything else is
  401 with Voucherify's error body `{code, key, message, details, request_id}`.
- `GET /v1/campaigns?campaign_type=&limit=&page=`: two GIFT_VOUCHERS, two LOYALTY_PROGRAM and one
  DISCOUNT_COUPONS campaign. `delete_campaign()` removes one; later exports of it answer 404.
- Creating exports: `POST /v1/orders/export`, `POST /v1/campaigns/{id}/transactions/export`,
  `POST /v1/loyalties/{id}/transactions/export` and `POST /v1/exports` (`exported_object` voucher,
  redemption, publication, customer, order, points_expiration, voucher_transactions). Each body is
  validated against its operation's published schema; errors answer 400 `invalid_payload` whose
  `details` name the failing fields (for `POST /v1/exports`, whose schema is a oneOf, the branch
  named by `exported_object` is reported, which says far more than "not valid under any").
- `GET /v1/exports/{id}`: SCHEDULED, then IN_PROGRESS after half the latency, then DONE with
  `result.url = <download host>/v1/exports/{id}?token=...`; every read issues a fresh token valid
  `download_token_ttl_seconds`. `GET /v1/exports` lists every export as `GET /v1/exports/{id}`
  shows it, `{object, data_ref, exports, total}`, taking only the documented `limit` (1-100, default
  10), `page` (from 1) and `order` (`created_at`, `status`, either with `-`; default `-created_at`);
  any other query parameter answers 400. `DELETE /v1/exports/{id}` answers 204. Unknown ids answer 404.
- The download host serves `text/plain` CSV for a valid, unexpired token of that export; an
  expired and a tampered token both answer the same 403, so a client cannot tell them apart.
- Rate limits (NOTES.md, guides/limits): every JSON answer of the API host (401, 400, 404 and 500
  included) carries `X-Rate-Limit-Limit`, `X-Rate-Limit-Remaining` and `X-Rate-Limit-Retry`, the
  Unix time in seconds at which the next request may be made: now while calls are left, the end
  of the window when none is. A 429 has the error body `{code, key, message, details,
  request_id}`, `Remaining: 0`, `Retry` at the moment the API takes calls again, and, as the seed
  says, `X-Rate-Limit-Type` and `Retry-After` (both optional in the docs). Limits, set by
  constructor keyword or attribute:
  - `requests_per_minute` (None: unmetered; the headers then describe a window of 1,000,000) per
    `rate_window_seconds` (60; tests shorten it): a fixed window aligned to multiples of its
    length in Unix time; over it, 429 `api_calls` until the window ends.
  - `requests_per_cycle` (None: none): over it, 429 `api_calls_cycle` until the first instant of
    next month (UTC), the cycle's reset here; `reset_cycle()` starts a new cycle.
  - `plan` (`business`, `organization`, `sandbox`; default: `$TAP_SANDBOX_VOUCHERIFY_PLAN`, else
    none) sets all three as NOTES.md gives them: 100/60 s and 100,000 per cycle; 2,000/60 s and
    300,000; 100/3,600 s. A limit given on its own wins over the plan's.
  "Exceeding a limit blocks the API until it resets": calls during a block are refused too, and
  refused calls count toward no limit (`rate_limited` counts them).

Where the vendor docs are silent or contradict themselves, this emulator chooses:

- The published schema has two defects that refuse valid requests (`repaired_spec`): `Any`, the
  value type of FieldConditions (voucher_transactions and points_expiration filters), is a oneOf
  of string variants that every string matches, so oneOf refuses every string: it is read as
  anyOf; and campaign transaction date conditions are typed as strings while the operation's own
  example sends a list (see Filters). Everything else is validated exactly as published.
- Download tokens are `<expiry>.<nonce>.<HMAC>` over the file path, nonce and expiry (core's
  UrlSigner). The nonce makes each read's token new; the expiry has one-second resolution, so a TTL
  of 0 issues tokens that are expired at once.
- Credentials are random UUIDs per instance (Voucherify's application ids and keys look like that).
- The download host is not rate limited and carries no rate headers; neither do the gateway's
  HTML 502 and 503 pages. A 401 reports the budget without counting the call.
- Order of checks on the API host: credentials, the `server_error` fault, an ongoing block, the
  `quota_exhausted` and `rate_limit` faults, the cycle quota, the window, then the request itself
  (404s, 400s).
- Error keys: `unauthorized`, `invalid_payload`, `not_found`, `forbidden`, `too_many_requests`,
  `internal_server_error`. The `server_error` fault answers 500 (JSON error body), then 502 and
  503 with small HTML bodies, as a gateway in front of the API would.
- `ExportOrderFields` does not list `metadata.X`, yet the same document's field table and its
  request example use `metadata.payment_mean`: order exports (both endpoints) accept
  `metadata.<name>` fields besides the enum; they are stripped before schema validation. An unknown
  metadata name gives an empty column. No other object documents `metadata.<name>` fields (their
  tables describe only `metadata`, the whole object, as a JSON cell), so their enums refuse them
  (400), and `metadata` cells are the only place their properties are.
- Fields omitted (or an empty list): the defaults table in the `POST /v1/exports` description. Its
  publication default `code` is served as the voucher code, and its voucher_transactions default
  `status` (no documented meaning for transactions) as an empty column. Campaign transaction
  exports use the voucher_transactions defaults.
- Filters: `{junction, <field>: {conditions: {...}}}`. Date conditions `$after`/`$before` are
  strict (`>` and `<`) ISO-8601 date-times. Every request example the spec publishes for the
  export endpoints is accepted and applied (a test posts each). Condition values may be a
  string or a one-element list, as the schemas allow: voucher_transactions and points_expiration
  filters are typed as lists (FieldConditions); campaign transaction filters as strings
  (FilterConditionsDateTime) while the same operations' example sends a list, so both are
  accepted there (`repaired_spec`); the other types' filters are untyped objects. Whatever else
  a schema refuses is refused. Date filter fields: order, voucher, customer: `updated_at`,
  `created_at`; redemption and publication: `created_at` (exported as `date`); transactions:
  `created_at`; points_expiration: none (the tap exports it whole). Any exported field also
  takes `$is`, `$is_not`, `$in`, `$not_in` (on the cell text) and, when it holds numbers,
  `$more_than`, `$more_than_equal`, `$less_than`, `$less_than_equal` (the orders example filters
  `discount_amount: {$more_than: 100000}`). Other fields and conditions (such as
  FilterConditionsDateTime's "days ago" `$more_than`) answer 400 naming them: the sandbox does
  not pretend to filter when it cannot.
- `order` (sort) is honoured; when absent, rows come oldest first on the type's own timeline
  (`updated_at`, `created_at`, `date`, or `expires_at`). Campaign transaction bodies may also
  carry `order` at the top level, as the docs' example does; `parameters.order` wins.
- Campaign paths accept the campaign id or its name (as documented); an unknown or deleted campaign
  answers 404 before the body is validated. The `/v1/loyalties/` path answers 404 for a campaign
  that is not a loyalty program. A DISCOUNT_COUPONS campaign has no transactions: its export is a
  header-only file. `exported_object: voucher_transactions` on `/v1/exports` merges the
  transactions of every live gift card and loyalty campaign by `created_at`, each row with its
  `campaign_id` (a field and a filter of ExportVoucherTransactionsFields/Filters: `{"campaign_id":
  {"conditions": {"$in": [ids]}}}` keeps those campaigns' rows; an unknown id matches no row).
  That is the export the tap's `voucherify_campaign_transactions` makes; `add_campaigns` adds
  campaigns for load tests.
- `parameters` are echoed as sent; campaign transaction exports add the
  `campaign_id: {conditions: {$in: [id]}}` filter, as the docs' response example shows. An
  export that ends in ERROR keeps `result: null`.
- Files: UTF-8 (BOM and line ending as the seed says), a header row of human labels in the order of the
  requested fields (`source_id` -> "Source ID", `metadata.payment_mean` -> "Metadata Payment
  Mean"; "Id", "Url", "Qr" are upper-cased), ISO-8601 UTC dates with milliseconds and `Z`, plain
  dates for `expires_at`/`birthdate`/`birthday`, integer amounts in cents, voucher `value` with
  two decimals for money (`2000.00`, as the documented example shows) and whole points for loyalty
  cards, JSON objects in `details`/`metadata` cells, `true`/`false`, and empty cells for nulls.
- Content-Length (on seeds that send it) is exact and computed without holding the file: the body
  is generated twice (once to count, once to send); the count is cached per export, so only the
  first download pays it.
- An export's rows are fixed when it is created: rows added later (`add_rows`) are not in it.

What each seed varies (the docs leave it open and the tap relies on it; attributes of the
emulator, which tests read and may set; seeds outside the table draw each choice from their hash):

| seed | Retry-After | X-Rate-Limit-Type | X-Rate-Limit-Retry | more in `result` | BOM | lines | Content-Length |
|:--|:--|:--|:--|:--|:--|:--|:--|
| 7  | no  | yes | whole seconds | no  | yes | CRLF | yes |
| 11 | yes | no  | milliseconds  | yes | no  | LF   | no (chunked) |
| 23 | no  | no  | whole seconds | yes | yes | LF   | yes |
| 42 | yes | yes | milliseconds  | no  | no  | CRLF | no (chunked) |

- `sends_retry_after`: 429s carry `Retry-After` in whole seconds, rounded up (never earlier than
  X-Rate-Limit-Retry). `sends_rate_limit_type`: 429s name the limit (`api_calls`,
  `api_calls_cycle`); without it, a spent cycle quota shows only as an X-Rate-Limit-Retry weeks
  ahead. `retry_with_milliseconds`: X-Rate-Limit-Retry as `1733480000.250` or `1733480001` (a
  moment ahead is rounded up, "now" down).
- `result_extra_fields`: a DONE export's `result` also holds `file_name` and `expires_at` (the
  token's expiry); the schema leaves `result` open, and the tap must read only `url`.
- `file_bom`, `file_line_ending`: the docs' file example lost its line breaks; fixed per export
  when it is created. `sends_content_length`: without it the body is chunked, so only a whole
  chunked stream (and whole quoting) tells a complete file.
- Not varied: header labels, dates with milliseconds and `Z`, `true`/`false`, cents (documented
  by the field tables and examples); the download token's lifetime (`download_token_ttl_seconds`,
  900; tests shorten it, and the tap renews a refused token by reading the export again). Answers
  of unknown paths (core's 404 and 405) carry no rate headers: they never reach the emulator.

Faults (armed on `ctx.faults`):
- API requests: `rate_limit` (429 `api_calls`, and a block for its value in seconds, else
  `rate_limit_fault_retry_seconds` = 1; X-Rate-Limit-Retry says when it ends),
  `quota_exhausted` (the billing-cycle quota is spent: 429 `api_calls_cycle` on this and every
  later call until `reset_cycle()`), `server_error` (500, then 502, then 503).
- Issuing a file URL: `foreign_download_host` (the URL names another host: the fault's value, a
  base URL, else `https://files.example.invalid`, which never resolves), `url_expired`.
- Decided when an export is created: `export_error` (ends in ERROR), `export_stuck` (stays
  IN_PROGRESS), `export_latency` (value: seconds until ready). File content, one per export and
  baked into its file (downloading again gives the same file; only a new export helps):
  `empty_file` (0 bytes), `header_only`, `new_column` ("Loyalty Tier" after the last column),
  `malformed_row` and `bad_utf8` (the third data row, or the last when there are fewer, gets an
  extra field, or the bytes FF FE at the start of its first cell), `misfit_cell` (that row's first
  integer cell, an amount in cents, reads "N/A": a documented column whose file turns out otherwise).
- The next download: `download_redirect` (302 to another host: the fault's value, a base URL,
  else `https://files.example.invalid`; Voucherify documents no redirect, but a client that
  follows one must not take the X-App headers along), `download_reset` (half the file's bytes,
  then the connection drops),
  `download_short` (Content-Length larger than the body, then the connection closes),
  `download_cut_quote` (an honest Content-Length for a file that ends inside a quoted field),
  `download_slow` (value: seconds of pause before each 64 KiB chunk; default 0.2).

Data: rows are a deterministic function of (seed, source, index); each source (an export type, or
one campaign's transactions, so `rows_per_type` is per campaign there) holds `rows_per_type` rows
(default: 30 to 150), spread over 2024-01-01..2024-03-01 in index order (points buckets expire
2024-01-15..2024-12-31), some exactly at midnight so window boundaries are exercised.
Because timestamps grow with the index, a window is found by binary search and a million-row
source is never held in memory. Sorting on another field keeps one small key per row in memory.
Running balances and cross-references are plausible, not reconciled.
"""

from __future__ import annotations

import base64
import copy
import csv
import datetime as dt
import hashlib
import heapq
import hmac
import io
import json
import math
import os
import re
import secrets
import string
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, TypeVar

import jsonschema
from werkzeug.wrappers import Request, Response

from commerce_sandbox.core import (
    Emulator,
    FaultMatrixProfile,
    Host,
    SandboxContext,
    SpecValidator,
    UrlSigner,
    chunked,
    json_response,
    load_spec,
)

SPEC_FILE = "voucherify-exports.openapi.json"
UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
DAY_MS = 86_400_000
PERIOD_START = dt.datetime(2024, 1, 1, tzinfo=UTC)
PERIOD_END = dt.datetime(2024, 3, 1, tzinfo=UTC)
# Points buckets expire in the future of the data period, day by day.
EXPIRY_START = dt.datetime(2024, 1, 15, tzinfo=UTC)
EXPIRY_END = dt.datetime(2025, 1, 1, tzinfo=UTC)
# Share of rows whose time slot holds a midnight that sit exactly on it (window boundaries).
MIDNIGHT_SHARE = 0.35

DEFAULT_ROW_COUNTS = {
    "order": 150,
    "voucher_transactions": 40,  # per gift card or loyalty campaign
    "voucher": 60,
    "redemption": 90,
    "publication": 50,
    "customer": 60,
    "points_expiration": 30,
}
CHUNK_BYTES = 64 * 1024
BOM = "\ufeff".encode()
# The data row (1-based) that row-level file faults damage; the last row when a file has fewer.
FAULT_ROW_NUMBER = 3
NEW_COLUMN_LABEL = "Loyalty Tier"
NEW_COLUMN_VALUES = ("Bronze", "Silver", "Gold")
LONG_FIELD_VOUCHER_INDEX = 2
LONG_FIELD_CHARS = 100_000
#: Where the foreign_download_host fault points by default: a name that never resolves (RFC 6761).
FOREIGN_DOWNLOAD_BASE = "https://files.example.invalid"
CONTENT_FAULTS = ("empty_file", "header_only", "new_column", "malformed_row", "bad_utf8", "misfit_cell")
#: What the misfit_cell fault writes into a documented integer column.
MISFIT_CELL = "N/A"
SERVER_ERROR_STATUSES = (500, 502, 503)
TEXT_CONDITIONS = ("$is", "$is_not", "$in", "$not_in")
DATE_CONDITIONS = ("$after", "$before")
#: Comparisons of a number cell with a number (the orders example filters `discount_amount`).
NUMBER_CONDITIONS = {
    "$more_than": lambda cell, operand: cell > operand,
    "$more_than_equal": lambda cell, operand: cell >= operand,
    "$less_than": lambda cell, operand: cell < operand,
    "$less_than_equal": lambda cell, operand: cell <= operand,
}

ALPHANUMERIC = string.ascii_letters + string.digits
# base64 minus its two symbols: ids stay alphanumeric (the slight bias toward "A" and "B" is harmless).
BASE64_TO_ALPHANUMERIC = bytes.maketrans(b"+/", b"AB")
CODE_CHARSET = string.ascii_uppercase + string.digits  # voucher codes
T = TypeVar("T")
_END = object()


# ------------------------------------------------------------------ export types


@dataclass(frozen=True)
class KindSpec:
    """One exported object: the field its rows are ordered by, its date filters and default fields."""

    name: str
    fields_schema: str
    branch_schema: str
    primary_field: str
    date_filters: dict[str, str]  # filter (and sort) name -> row field
    default_fields: tuple[str, ...]
    aliases: dict[str, str] = field(default_factory=dict)  # default-only names -> row field

    @property
    def fields(self) -> tuple[str, ...]:
        return spec_enum(self.fields_schema)


KINDS: dict[str, KindSpec] = {
    kind.name: kind
    for kind in (
        KindSpec(
            "order",
            "ExportOrderFields",
            "ExportOrderBase",
            "updated_at",
            {"updated_at": "updated_at", "created_at": "created_at"},
            ("id", "source_id", "status"),
        ),
        KindSpec(
            "voucher",
            "ExportVoucherFields",
            "ExportVoucherBase",
            "updated_at",
            {"updated_at": "updated_at", "created_at": "created_at"},
            ("code", "voucher_type", "value", "discount_type"),
        ),
        KindSpec(
            "redemption",
            "ExportRedemptionFields",
            "ExportRedemptionBase",
            "date",
            {"created_at": "date"},
            ("id", "object", "voucher_code", "customer_id", "date", "result"),
        ),
        KindSpec(
            "publication",
            "ExportPublicationFields",
            "ExportPublicationBase",
            "date",
            {"created_at": "date"},
            ("code", "customer_id", "date", "channel"),
            {"code": "voucher_code"},
        ),
        KindSpec(
            "customer",
            "ExportCustomerFields",
            "ExportCustomerBase",
            "updated_at",
            {"updated_at": "updated_at", "created_at": "created_at"},
            ("name", "source_id"),
        ),
        KindSpec(
            "points_expiration",
            "ExportPointsExpirationFields",
            "ExportPointsExpirationBase",
            "expires_at",
            {},
            ("id", "campaign_id", "voucher_id", "status", "expires_at", "points"),
        ),
        KindSpec(
            "voucher_transactions",
            "ExportVoucherTransactionsFields",
            "ExportVoucherTransactionsBase",
            "created_at",
            {"created_at": "created_at"},
            ("id", "type", "source_id", "status", "reason", "source", "balance", "amount", "created_at"),
        ),
    )
}


@lru_cache(maxsize=1)
def repaired_spec() -> dict:
    """The published document with two defects repaired, in a copy (the loaded one is shared).

    - `Any`, the value of every FieldConditions condition (voucher_transactions and
      points_expiration filters), is a oneOf of `string`, `string` + format date and `string` +
      format date-time: every string matches all three, so oneOf refuses every string, even the
      docs' own examples. The branches are alternatives, so they are read as anyOf.
    - FilterConditionsDateTime (campaign transaction filters) types `$after`/`$before` as a string,
      yet the request example of the same operations sends `{"$after": ["2024-10-01T00:00:00.000Z"]}`
      (NOTES.md: every vendor request example writes one-element arrays). Both are accepted.
    """
    spec = copy.deepcopy(load_spec(SPEC_FILE))
    schemas = spec["components"]["schemas"]
    items = schemas["Any"]["items"]
    items["anyOf"] = items.pop("oneOf")
    for operator in DATE_CONDITIONS:
        published = schemas["FilterConditionsDateTime"]["properties"][operator]
        as_list = {"type": "array", "items": {"type": "string", "format": "date-time"}, "minItems": 1}
        schemas["FilterConditionsDateTime"]["properties"][operator] = {"anyOf": [published, as_list]}
    return spec


class RepairedSpecValidator(SpecValidator):
    """SpecValidator over `repaired_spec()`: core's validator reads the operation from `self.spec`."""

    def __init__(self) -> None:
        super().__init__(SPEC_FILE)
        self.spec = repaired_spec()


@cache
def spec_enum(schema_name: str) -> tuple[str, ...]:
    """The values of an enum schema in the published document (None from `nullable` left out)."""
    schema = load_spec(SPEC_FILE)["components"]["schemas"][schema_name]
    return tuple(value for value in schema["enum"] if value is not None)


@cache
def campaign_transaction_fields() -> tuple[str, ...]:
    """The 11 fields the campaign transactions export documents (its schema inlines the enum)."""
    parameters = load_spec(SPEC_FILE)["components"]["schemas"]["CampaignsTransactionsExportParameters"]
    return tuple(parameters["properties"]["fields"]["items"]["enum"])


# ---------------------------------------------------------------------- streams

ORDER_METADATA_FIELDS = ("payment_mean", "channel")


@dataclass(frozen=True)
class StreamSpec:
    """A tap stream: which rows it reads and which requested fields become its record keys."""

    name: str
    kind: str
    replication_key: str | None
    fields: Callable[[], tuple[str, ...]]
    #: Rows come from one source per campaign: expected_records and add_rows take {"campaign_id": ...}.
    per_campaign: bool = False


STREAMS: dict[str, StreamSpec] = {
    stream.name: stream
    for stream in (
        StreamSpec(
            "voucherify_orders",
            "order",
            "updated_at",
            lambda: (
                *(name for name in KINDS["order"].fields if name != "metadata"),
                *(f"metadata.{name}" for name in ORDER_METADATA_FIELDS),
            ),
        ),
        StreamSpec(
            "voucherify_campaign_transactions",
            "voucher_transactions",
            "created_at",
            lambda: KINDS["voucher_transactions"].fields,  # the tap's one export for every campaign
            per_campaign=True,
        ),
        StreamSpec("voucherify_vouchers", "voucher", "updated_at", lambda: KINDS["voucher"].fields),
        StreamSpec("voucherify_redemptions", "redemption", "date", lambda: KINDS["redemption"].fields),
        StreamSpec("voucherify_publications", "publication", "date", lambda: KINDS["publication"].fields),
        StreamSpec("voucherify_customers", "customer", "updated_at", lambda: KINDS["customer"].fields),
        StreamSpec(
            "voucherify_points_expirations", "points_expiration", None, lambda: KINDS["points_expiration"].fields
        ),
    )
}


@lru_cache(maxsize=4096)
def record_key(field_name: str) -> str:
    """A requested field as the tap's record key: `metadata.payment_mean` -> `metadata_payment_mean`."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", field_name).strip("_").lower()


# ------------------------------------------------------------ time and hashing


def from_ms(ms: int) -> dt.datetime:
    return EPOCH + dt.timedelta(milliseconds=ms)


def to_ms(moment: dt.datetime) -> int:
    return (moment - EPOCH) // dt.timedelta(milliseconds=1)


def iso_ms(moment: dt.datetime) -> str:
    """Voucherify's timestamp format: 2024-01-05T10:11:12.345Z (hand-formatted: strftime is slow per cell)."""
    m = moment.astimezone(UTC)
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
        f".{m.microsecond // 1000:03d}Z"
    )


def parse_instant(value: str | dt.datetime | dt.date) -> dt.datetime:
    """An ISO-8601 text, datetime or date as an aware UTC datetime (naive means UTC)."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    if not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def value_ms(value: Any) -> int | None:
    """The instant a date or datetime cell stands for, in epoch milliseconds."""
    if isinstance(value, dt.datetime):
        return to_ms(value)
    if isinstance(value, dt.date):
        return to_ms(dt.datetime(value.year, value.month, value.day, tzinfo=UTC))
    return None


def _digest(*parts: Any, size: int = 32) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=size).digest()


def token(length: int, *parts: Any) -> str:
    """A deterministic, random-looking alphanumeric id part of up to 64 characters."""
    encoded = base64.b64encode(_digest(*parts, size=48)).translate(BASE64_TO_ALPHANUMERIC)
    return encoded[:length].decode()


def hex_token(length: int, *parts: Any) -> str:
    return _digest(*parts).hex()[:length]


class Dice:
    """Deterministic draws for one row, from a hash of the row's identity.

    Much cheaper than seeding a `random.Random` per row (which hashes and fills 2.5 KB of state):
    a million-row file is generated twice per download, so this is most of a row's cost.
    """

    def __init__(self, *parts: Any) -> None:
        self._parts = parts
        self._refills = 0
        self._bits = 0
        self._left = 0

    def _next32(self) -> int:
        if self._left == 0:
            self._bits = int.from_bytes(_digest(*self._parts, self._refills, size=64), "big")
            self._refills += 1
            self._left = 16
        self._left -= 1
        value = self._bits & 0xFFFFFFFF
        self._bits >>= 32
        return value

    def randrange(self, start: int, stop: int | None = None) -> int:
        """Like random.randrange: [0, start) or [start, stop)."""
        low, high = (0, start) if stop is None else (start, stop)
        return low + (self._next32() * (high - low) >> 32)

    def choice(self, options: tuple | list) -> Any:
        return options[self.randrange(len(options))]


def request_id() -> str:
    return "v-" + secrets.token_hex(9)


# ------------------------------------------------------------------- timelines


@dataclass(frozen=True)
class Timeline:
    """Row timestamps growing with the index: row i falls in the i-th of `count` equal slots.

    Non-decreasing by construction, so the rows of a window are found by binary search. A slot
    that holds a midnight puts its row exactly on it for a share of rows, so windows that start or
    end at midnight have rows on their boundaries.
    """

    start_ms: int
    end_ms: int
    count: int
    salt: tuple

    def at(self, index: int) -> int:
        slot = (self.end_ms - self.start_ms) / self.count
        low = self.start_ms + slot * index
        high = low + slot
        digest = _digest(*self.salt, index, size=16)
        midnight = math.ceil(low / DAY_MS) * DAY_MS
        if midnight < high and int.from_bytes(digest[:8], "big") / 2**64 < MIDNIGHT_SHARE:
            return midnight
        return int(low + slot * (int.from_bytes(digest[8:], "big") / 2**64))

    def first_index_after(self, ms: int) -> int:
        """The smallest index whose timestamp is > ms (count when none is)."""
        low, high = 0, self.count
        while low < high:
            middle = (low + high) // 2
            if self.at(middle) > ms:
                high = middle
            else:
                low = middle + 1
        return low


# ------------------------------------------------------------------- campaigns

CAMPAIGN_SEEDS = (
    ("GIFT_VOUCHERS", "Gift Cards 2024"),
    ("GIFT_VOUCHERS", "Holiday Gift Cards, Winter Edition"),
    ("LOYALTY_PROGRAM", "Loyalty Club"),
    ("LOYALTY_PROGRAM", "Zoë's Café Rewards"),
    ("DISCOUNT_COUPONS", "Spring Discounts 20% off"),
)
VOUCHER_TYPES = {
    "GIFT_VOUCHERS": "GIFT_VOUCHER",
    "LOYALTY_PROGRAM": "LOYALTY_CARD",
    "DISCOUNT_COUPONS": "DISCOUNT_VOUCHER",
}
TRANSACTION_CAMPAIGN_TYPES = ("GIFT_VOUCHERS", "LOYALTY_PROGRAM")
VOUCHERS_PER_CAMPAIGN = 25


@dataclass(frozen=True)
class Campaign:
    id: str
    name: str
    campaign_type: str
    position: int
    created_at: dt.datetime

    @property
    def has_transactions(self) -> bool:
        return self.campaign_type in TRANSACTION_CAMPAIGN_TYPES

    def voucher_id(self, number: int) -> str:
        return "v_" + token(32, self.id, "voucher", number % VOUCHERS_PER_CAMPAIGN)

    def as_json(self) -> dict:
        """The campaign as GET /v1/campaigns lists it (CampaignBase)."""
        voucher_type = VOUCHER_TYPES[self.campaign_type]
        voucher: dict[str, Any] = {
            "type": voucher_type,
            "is_referral_code": False,
            "redemption": {"quantity": None},
            "code_config": {"charset": CODE_CHARSET, "length": 8, "pattern": "########"},
        }
        if voucher_type == "GIFT_VOUCHER":
            voucher["gift"] = {"amount": 200_000, "balance": 200_000, "effect": "APPLY_TO_ORDER"}
        elif voucher_type == "LOYALTY_CARD":
            voucher["loyalty_card"] = {"points": 0}
        else:
            voucher["discount"] = {"type": "PERCENT", "percent_off": 20, "effect": "APPLY_TO_ORDER"}
        loyalty = self.campaign_type == "LOYALTY_PROGRAM"
        return {
            "id": self.id,
            "name": self.name,
            "campaign_type": self.campaign_type,
            "type": "AUTO_UPDATE",
            "object": "campaign",
            "created_at": iso_ms(self.created_at),
            "updated_at": iso_ms(self.created_at),
            "start_date": iso_ms(PERIOD_START),
            "active": True,
            "auto_join": loyalty,
            "join_once": loyalty,
            "category_id": None,
            "creation_status": "DONE",
            "vouchers_generation_status": "DONE",
            "protected": False,
            "use_voucher_metadata_schema": True,
            "metadata": {},
            "vouchers_count": VOUCHERS_PER_CAMPAIGN,
            "voucher": voucher,
        }


def seed_campaigns(seed: int) -> tuple[Campaign, ...]:
    return tuple(
        Campaign(
            "camp_" + token(24, seed, "campaign", position),
            name,
            campaign_type,
            position,
            dt.datetime(2023, 10, 2 + position * 3, 9, 30, tzinfo=UTC),
        )
        for position, (campaign_type, name) in enumerate(CAMPAIGN_SEEDS)
    )


# ---------------------------------------------------------------- row sources


@dataclass
class RowSource:
    """The rows of one export type, or of one campaign's transactions."""

    key: str
    kind: str
    timeline: Timeline
    campaign: Campaign | None = None
    # (ms, index) from add_rows, in the order added: an export keeps the first N it saw.
    added: list[tuple[int, int]] = field(default_factory=list)

    @property
    def base_count(self) -> int:
        return self.timeline.count

    def refs(
        self, after_ms: int | None, before_ms: int | None, added_count: int, descending: bool
    ) -> Iterator[tuple[int, int]]:
        """(ms, index) of rows with after < ms < before, in time order."""
        low = 0 if after_ms is None else self.timeline.first_index_after(after_ms)
        high = self.base_count if before_ms is None else self.timeline.first_index_after(before_ms - 1)
        indexes = range(high - 1, low - 1, -1) if descending else range(low, high)
        base = ((self.timeline.at(index), index) for index in indexes)
        extra = sorted(
            (
                ref
                for ref in self.added[:added_count]
                if (after_ms is None or ref[0] > after_ms) and (before_ms is None or ref[0] < before_ms)
            ),
            reverse=descending,
        )
        return heapq.merge(base, extra, reverse=descending)


# --------------------------------------------------------------- synthetic data

CUSTOMER_NAMES = (
    ("Zoë Ångström", "zoe.angstrom"),
    ("山田太郎", "taro.yamada"),
    ("Smith, John", "john.smith"),
    ('Anna "Ania" Kowalska', "anna.kowalska"),
    ("José Álvarez", "jose.alvarez"),
    ("Ольга Петрова", "olga.petrova"),
    ("Liam O'Brien", "liam.obrien"),
    ("Chloé Dubois", "chloe.dubois"),
    ("Mohammed Al-Farsi", "mohammed.alfarsi"),
    ("Emma Müller", "emma.mueller"),
)
ADDRESSES = (
    ("Houston", "TX", "72738 Main St", "Bld 2, Apt 4", "United States of America", "77042-4143"),
    ("Kraków", "Małopolskie", "ul. Floriańska 3", None, "Poland", "31-019"),
    ("東京", "東京都", "千代田区丸の内1-1", None, "Japan", "100-0005"),
    (None, None, None, None, None, None),
)
ORDER_STATUSES = ("PAID", "CREATED", "FULFILLED", "CANCELED")
PAYMENT_MEANS = ("card", "paypal", "bank_transfer", "gift card, partial")
ORDER_CHANNELS = ("web", "pos", "app")
GIFT_TRANSACTION_TYPES = (
    "CREDITS_REDEMPTION",
    "CREDITS_REDEMPTION",
    "CREDITS_ADDITION",
    "CREDITS_REMOVAL",
    "CREDITS_REFUND",
)
LOYALTY_TRANSACTION_TYPES = (
    "POINTS_ACCRUAL",
    "POINTS_ACCRUAL",
    "POINTS_REDEMPTION",
    "POINTS_ADDITION",
    "POINTS_REMOVAL",
    "POINTS_EXPIRATION",
    "POINTS_TRANSFER_IN",
    "POINTS_TRANSFER_OUT",
    "POINTS_REFUND",
)
MANUAL_TRANSACTION_TYPES = {
    "CREDITS_ADDITION",
    "CREDITS_REMOVAL",
    "POINTS_ADDITION",
    "POINTS_REMOVAL",
    "POINTS_TRANSFER_OUT",
    "POINTS_TRANSFER_IN",
}
MANUAL_GIFT_TYPES = tuple(sorted(MANUAL_TRANSACTION_TYPES.intersection(GIFT_TRANSACTION_TYPES)))
MANUAL_LOYALTY_TYPES = tuple(sorted(MANUAL_TRANSACTION_TYPES.intersection(LOYALTY_TRANSACTION_TYPES)))
OUTGOING_TRANSACTION_TYPES = {
    "CREDITS_REDEMPTION",
    "CREDITS_REMOVAL",
    "POINTS_REDEMPTION",
    "POINTS_REMOVAL",
    "POINTS_EXPIRATION",
    "POINTS_TRANSFER_OUT",
}
TRANSFER_TRANSACTION_TYPES = {"POINTS_TRANSFER_IN", "POINTS_TRANSFER_OUT"}
TRANSACTION_REASONS = (
    "Apology for sending a broken item",
    "Goodwill credit, ticket #4521\nApproved by: Zoë (support)",
    'Migrated from the "old" card system',
)
TRANSACTION_SOURCES = ("API", "voucherify-web-ui", "Automation")
DISCOUNT_TYPES = ("AMOUNT", "PERCENT", "UNIT", "FIXED")
REDEMPTION_FAILURES = (
    ("invalid_customer", "Customer must be a holder of a loyalty card."),
    ("voucher_expired", "Voucher expired, sorry"),
    ("quantity_exceeded", 'Voucher "SPRING20" was redeemed too many times'),
)
PUBLICATION_CHANNELS = ("voucherify-website", "API", "Automation")
CUSTOMER_DESCRIPTIONS = (None, "Prefers e-mail,\nnever call before 10:00", None, 'Asked for the "VIP" tier')


@lru_cache(maxsize=1)
def long_additional_info() -> str:
    """~100 KB of card terms with quotes, commas and newlines: one cell longer than any read buffer."""
    paragraph = 'Terms, part {n}: valid in "Zoë\'s Café" and online; not exchangeable for cash.\n'
    parts: list[str] = []
    size = 0
    number = 1
    while size < LONG_FIELD_CHARS:
        parts.append(paragraph.format(n=number))
        size += len(parts[-1])
        number += 1
    return "".join(parts)[:LONG_FIELD_CHARS]


@dataclass(frozen=True)
class CustomerRef:
    id: str
    name: str
    email: str | None
    source_id: str


class SyntheticData:
    """The seeded data set: campaigns and row sources, and one builder per export type."""

    def __init__(self, seed: int, rows_per_type: int | None) -> None:
        self.seed = seed
        self.rows_per_type = rows_per_type
        self.campaigns = seed_campaigns(seed)
        self.sources: dict[str, RowSource] = {}
        for kind in KINDS:
            if kind == "voucher_transactions":
                for campaign in self.campaigns:
                    count = DEFAULT_ROW_COUNTS[kind] if rows_per_type is None else rows_per_type
                    self._add_source(f"{kind}:{campaign.id}", kind, count if campaign.has_transactions else 0, campaign)
            else:
                self._add_source(kind, kind, DEFAULT_ROW_COUNTS[kind] if rows_per_type is None else rows_per_type)
        self._builders: dict[str, Callable[[RowSource, int, int], dict]] = {
            "order": self._order,
            "voucher_transactions": self._transaction,
            "voucher": self._voucher,
            "redemption": self._redemption,
            "publication": self._publication,
            "customer": self._customer,
            "points_expiration": self._points_expiration,
        }

    def _add_source(self, key: str, kind: str, count: int, campaign: Campaign | None = None) -> None:
        start, end = (EXPIRY_START, EXPIRY_END) if kind == "points_expiration" else (PERIOD_START, PERIOD_END)
        timeline = Timeline(to_ms(start), to_ms(end), count, (self.seed, key))
        self.sources[key] = RowSource(key, kind, timeline, campaign)

    def transaction_source(self, campaign: Campaign) -> RowSource:
        return self.sources[f"voucher_transactions:{campaign.id}"]

    def build(self, source: RowSource, index: int, ms: int) -> dict:
        return self._builders[source.kind](source, index, ms)

    def _rng(self, source: RowSource, index: int) -> Dice:
        return Dice(self.seed, source.key, index, "row")

    def _id(self, source: RowSource, index: int, purpose: str = "id", length: int = 24) -> str:
        return token(length, self.seed, source.key, index, purpose)

    # -- cross references
    def customer_ref(self, number: int) -> CustomerRef | None:
        count = self.sources["customer"].base_count
        return None if count == 0 else self._customer_ref(number % count)

    @lru_cache(maxsize=65_536)  # noqa: B019 (the data set lives as long as its emulator)
    def _customer_ref(self, number: int) -> CustomerRef:
        name, local = CUSTOMER_NAMES[number % len(CUSTOMER_NAMES)]
        email = None if number % 10 == 9 else f"{local}.{number}@example.com"
        source_id = email or f"crm-{number:06d}"
        return CustomerRef("cust_" + token(24, self.seed, "customer", number, "id"), name, email, source_id)

    def voucher_code(self, number: int) -> str:
        return token(8, self.seed, "voucher-code", number).upper()

    # -- builders: one dict per row, keyed by the export's field names
    def _order(self, source: RowSource, index: int, ms: int) -> dict:
        rng = self._rng(source, index)
        amount = rng.randrange(500, 50_000)
        discount = rng.choice((0, 0, 500, 1000, amount // 10))
        items_discount = rng.choice((0, 0, 100, 250))
        customer = self.customer_ref(rng.randrange(1 << 30))
        referrer = self.customer_ref(rng.randrange(1 << 30)) if index % 5 == 2 else None
        metadata: dict[str, Any] = {"channel": rng.choice(ORDER_CHANNELS)}
        if index % 6 != 4:
            metadata["payment_mean"] = PAYMENT_MEANS[index % len(PAYMENT_MEANS)]
        if index % 11 == 4:
            metadata["gift_message"] = "Alles Gute, Zoë!\nViele Grüße"
        return {
            "id": "ord_" + self._id(source, index),
            "source_id": None if index % 9 == 5 else f"WEB-{100_000 + index}",
            "created_at": from_ms(ms - rng.randrange(0, 5 * DAY_MS)),
            "updated_at": from_ms(ms),
            "status": rng.choice(ORDER_STATUSES),
            "amount": amount,
            "discount_amount": discount,
            "items_discount_amount": items_discount,
            "total_discount_amount": discount + items_discount,
            "total_amount": amount - discount - items_discount,
            "customer_id": customer.id if customer else None,
            "referrer_id": referrer.id if referrer else None,
            "metadata": metadata,
        }

    def _transaction(self, source: RowSource, index: int, ms: int) -> dict:
        rng = self._rng(source, index)
        campaign = source.campaign
        assert campaign is not None
        gift = campaign.campaign_type == "GIFT_VOUCHERS"
        types = GIFT_TRANSACTION_TYPES if gift else LOYALTY_TRANSACTION_TYPES
        # Every fifth row is a manual operation, so reasons (with their newlines) always appear.
        manual_types = MANUAL_GIFT_TYPES if gift else MANUAL_LOYALTY_TYPES
        kind = manual_types[index % len(manual_types)] if index % 5 == 1 else rng.choice(types)
        magnitude = rng.randrange(100, 20_000) if gift else rng.randrange(10, 2_000)
        amount = -magnitude if kind in OUTGOING_TRANSACTION_TYPES else magnitude
        balance = rng.randrange(0, 200_000 if gift else 20_000)
        voucher_id = campaign.voucher_id(rng.randrange(VOUCHERS_PER_CAMPAIGN))
        manual = kind in MANUAL_TRANSACTION_TYPES
        return {
            "id": "vtx_" + hex_token(18, self.seed, source.key, index),
            "type": kind,
            "source_id": f"adj-{index:06d}" if manual and index % 3 else None,
            "reason": TRANSACTION_REASONS[index % len(TRANSACTION_REASONS)] if manual else None,
            "balance": balance,
            "amount": amount,
            "created_at": from_ms(ms),
            "voucher_id": voucher_id,
            "campaign_id": campaign.id,
            "source": rng.choice(TRANSACTION_SOURCES),
            "details": self._transaction_details(source, index, kind, gift, amount, balance, voucher_id),
            "related_transaction_id": (
                "vtx_" + hex_token(18, self.seed, source.key, index, "related")
                if kind in TRANSFER_TRANSACTION_TYPES
                else None
            ),
        }

    def _transaction_details(
        self, source: RowSource, index: int, kind: str, gift: bool, amount: int, balance: int, voucher_id: str
    ) -> dict:
        details: dict[str, Any] = {
            "balance": {
                "type": "gift_voucher" if gift else "loyalty_card",
                "object": "balance",
                "total": balance + max(0, -amount),
                ("amount" if gift else "points"): amount,
                "balance": balance,
                "related_object": {"id": voucher_id, "type": "voucher"},
            }
        }
        if kind in ("CREDITS_REDEMPTION", "POINTS_REDEMPTION", "CREDITS_REFUND", "POINTS_REFUND"):
            details["order"] = {"id": "ord_" + self._id(source, index, "order"), "source_id": f"WEB-{index}"}
            details["redemption"] = {"id": "r_" + hex_token(18, self.seed, source.key, index, "redemption")}
        if kind == "POINTS_ACCRUAL":
            details["earning_rule"] = {
                "id": "ern_" + self._id(source, index, "rule"),
                "source": {"banner": "Order paid, 1 point per €1"},
            }
        return details

    def _voucher(self, source: RowSource, index: int, ms: int) -> dict:
        rng = self._rng(source, index)
        campaign = self.campaigns[index % len(self.campaigns)]
        voucher_type = VOUCHER_TYPES[campaign.campaign_type]
        created_at = from_ms(ms - rng.randrange(0, 30 * DAY_MS))
        customer = self.customer_ref(rng.randrange(1 << 30)) if index % 3 else None
        row: dict[str, Any] = {
            "id": "v_" + self._id(source, index, length=32),
            "code": self.voucher_code(index),
            "voucher_type": voucher_type,
            "formula": None,
            "discount_type": None,
            "campaign": campaign.name,
            "campaign_id": campaign.id,
            "category": (None, "Retail", "VIP, Gold")[index % 3],
            "start_date": created_at if index % 4 else None,
            "expiration_date": created_at + dt.timedelta(days=365) if voucher_type != "LOYALTY_CARD" else None,
            "gift_balance": None,
            "loyalty_balance": None,
            "redemption_quantity": None,
            "redemption_count": rng.randrange(0, 60),
            "active": index % 10 != 3,
            "qr_code": f"https://dl.voucherify.io/api/v1/assets/qr/{self._id(source, index, 'qr', 40)}",
            "bar_code": f"https://dl.voucherify.io/api/v1/assets/barcode/{self._id(source, index, 'bar', 40)}",
            "metadata": {}
            if index % 7 == 0
            else {"source": rng.choice(("import", "api", "dashboard")), "region": rng.choice(("EU", "AMER", "APAC"))},
            "is_referral_code": index % 17 == 8,
            "created_at": created_at,
            "updated_at": from_ms(ms),
            "validity_timeframe_interval": "P2D" if index % 6 == 1 else None,
            "validity_timeframe_duration": "PT1H" if index % 6 == 1 else None,
            "validity_day_of_week": "1,2,3,4,5" if index % 4 == 2 else None,
            "discount_amount_limit": None,
            "additional_info": self._additional_info(index),
            "customer_id": customer.id if customer else None,
            "customer_source_id": customer.source_id if customer else None,
            "discount_effect": None,
            "discount_unit_type": None,
            "discount_unit_effect": None,
            "validation_rules_id": "val_" + self._id(source, index, "rules") if index % 4 == 1 else None,
        }
        row.update(self._voucher_value(rng, index, voucher_type))
        return row

    @staticmethod
    def _additional_info(index: int) -> str | None:
        if index == LONG_FIELD_VOUCHER_INDEX:
            return long_additional_info()
        return f"Printed on card #{index},\nsecond batch" if index % 5 == 0 else None

    @staticmethod
    def _voucher_value(rng: Dice, index: int, voucher_type: str) -> dict:
        """Value and the fields that go with the voucher type; money values are exact in binary."""
        if voucher_type == "GIFT_VOUCHER":
            balance = rng.choice((50_000, 100_000, 200_000, 205_000))
            return {"gift_balance": balance, "value": balance / 100}
        if voucher_type == "LOYALTY_CARD":
            points = rng.randrange(0, 5_000)
            return {"loyalty_balance": points, "value": points}
        discount_type = DISCOUNT_TYPES[index % len(DISCOUNT_TYPES)]
        fields: dict[str, Any] = {"discount_type": discount_type, "redemption_quantity": (None, 1, 5)[index % 3]}
        if discount_type == "AMOUNT":
            fields |= {"value": rng.choice((10.0, 25.0, 50.0)), "discount_effect": "APPLY_TO_ORDER"}
        elif discount_type == "PERCENT":
            fields |= {
                "value": rng.choice((10.0, 12.5, 20.0)),
                "discount_amount_limit": rng.choice((50, 100)),
                "discount_effect": "APPLY_TO_ITEMS",
                "formula": "MIN(order.amount * 0.1, 5000)",
            }
        elif discount_type == "UNIT":
            fields |= {"value": 1.0, "discount_unit_type": "prod_5h1pp1ng", "discount_unit_effect": "ADD_MISSING_ITEMS"}
        else:
            fields |= {"value": 49.5, "discount_effect": "APPLY_TO_ORDER"}
        return fields

    def _redemption(self, source: RowSource, index: int, ms: int) -> dict:
        rng = self._rng(source, index)
        campaign = self.campaigns[index % len(self.campaigns)] if index % 7 else None
        customer = self.customer_ref(rng.randrange(1 << 30))
        failed = index % 6 == 5
        failure = REDEMPTION_FAILURES[index % len(REDEMPTION_FAILURES)] if failed else (None, None)
        campaign_type = campaign.campaign_type if campaign else None
        return {
            "id": "r_" + hex_token(18, self.seed, source.key, index),
            "object": "redemption",
            "date": from_ms(ms),
            "voucher_code": self.voucher_code(rng.randrange(1 << 30)) if campaign else None,
            "campaign": campaign.name if campaign else None,
            "promotion_tier_id": None if campaign else "promo_" + self._id(source, index, "tier"),
            "customer_id": customer.id if customer else None,
            "customer_source_id": customer.source_id if customer else None,
            "customer_name": customer.name if customer else None,
            "tracking_id": "track_" + self._id(source, index, "tracking", 32),
            "order_id": "ord_" + self._id(source, index, "order"),
            "order_amount": rng.randrange(1_000, 80_000),
            "gift_amount": rng.randrange(100, 5_000) if campaign_type == "GIFT_VOUCHERS" else None,
            "loyalty_points": rng.randrange(10, 500) if campaign_type == "LOYALTY_PROGRAM" else None,
            "result": "FAILURE" if failed else "SUCCESS",
            "failure_code": failure[0],
            "failure_message": failure[1],
            "metadata": {"locale": rng.choice(("de-DE", "pl-PL", "ja-JP")), "store": "Berlin, Mitte"}
            if index % 4
            else {},
        }

    def _publication(self, source: RowSource, index: int, ms: int) -> dict:
        rng = self._rng(source, index)
        customer = self.customer_ref(rng.randrange(1 << 30))
        return {
            "voucher_code": self.voucher_code(index + 10_000),
            "customer_id": customer.id if customer else None,
            "customer_source_id": customer.source_id if customer else None,
            "date": from_ms(ms),
            "channel": rng.choice(PUBLICATION_CHANNELS),
            "campaign": self.campaigns[index % len(self.campaigns)].name,
            "is_winner": index % 8 == 3,
            "metadata": {"source": "newsletter", "note": "Grüße, Zoë"} if index % 3 else {},
        }

    def _customer(self, source: RowSource, index: int, ms: int) -> dict:
        rng = self._rng(source, index)
        reference = self.customer_ref(index)
        assert reference is not None
        city, state, line_1, line_2, country, postal_code = ADDRESSES[index % len(ADDRESSES)]
        succeeded, failed = rng.randrange(0, 10), rng.randrange(0, 3)
        rollback_succeeded, rollback_failed = rng.randrange(0, 2), rng.randrange(0, 2)
        order_count = rng.randrange(0, 12)
        total_amount = sum(rng.randrange(1_000, 20_000) for _ in range(order_count))
        last_amount = rng.randrange(1_000, 20_000) if order_count else None
        return {
            "name": reference.name,
            "id": reference.id,
            "email": reference.email,
            "source_id": reference.source_id,
            "description": CUSTOMER_DESCRIPTIONS[index % len(CUSTOMER_DESCRIPTIONS)],
            "created_at": from_ms(ms - rng.randrange(0, 200 * DAY_MS)),
            "updated_at": from_ms(ms),
            "address_city": city,
            "address_state": state,
            "address_line_1": line_1,
            "address_line_2": line_2,
            "address_country": country,
            "address_postal_code": postal_code,
            "redemptions_total_redeemed": succeeded + failed,
            "redemptions_total_failed": failed,
            "redemptions_total_succeeded": succeeded,
            "redemptions_total_rolled_back": rollback_succeeded + rollback_failed,
            "redemptions_total_rollback_failed": rollback_failed,
            "redemptions_total_rollback_succeeded": rollback_succeeded,
            "orders_total_amount": total_amount,
            "orders_total_count": order_count,
            "orders_average_amount": total_amount // order_count if order_count else 0,
            "orders_last_order_amount": last_amount,
            "orders_last_order_date": from_ms(ms - rng.randrange(0, 20 * DAY_MS)) if order_count else None,
            "loyalty_points": rng.randrange(0, 5_000),
            "loyalty_referred_customers": rng.randrange(0, 4),
            "phone": f"+1 ({200 + index % 700}) 752-{1000 + index % 9000}" if index % 3 else None,
            "birthday": dt.date(1980 + index % 20, 1 + index % 12, 1 + index % 28) if index % 9 == 0 else None,
            "birthdate": dt.date(1970 + index % 40, 1 + index % 12, 1 + index % 28) if index % 2 else None,
            "metadata": {"tier": ("bronze", "silver", "gold")[index % 3], "newsletter": index % 2 == 0}
            if index % 5
            else {},
        }

    def _points_expiration(self, source: RowSource, index: int, ms: int) -> dict:
        rng = self._rng(source, index)
        loyalty = [campaign for campaign in self.campaigns if campaign.campaign_type == "LOYALTY_PROGRAM"]
        campaign = loyalty[index % len(loyalty)]
        expires_at = from_ms(ms).date()
        return {
            "id": "lopb_" + self._id(source, index),
            "campaign_id": campaign.id,
            "voucher_id": campaign.voucher_id(rng.randrange(VOUCHERS_PER_CAMPAIGN)),
            "points": rng.randrange(10, 2_000),
            "status": "EXPIRED" if expires_at < PERIOD_END.date() else "ACTIVE",
            "expires_at": expires_at,
        }


# ------------------------------------------------------------- cells and labels

LABEL_WORDS = {"id": "ID", "url": "URL", "qr": "QR"}


def header_label(field_name: str) -> str:
    """The CSV label of a requested field: `source_id` -> "Source ID", `metadata.x_y` -> "Metadata X Y"."""
    words = [word for word in re.split(r"[._]+", field_name) if word]
    return " ".join(LABEL_WORDS.get(word.lower(), word[:1].upper() + word[1:]) for word in words)


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# Formatting dispatches on the exact type: it runs for every cell of million-row files.
CELL_FORMATS: dict[type, Callable[[Any], str]] = {
    str: str,
    type(None): lambda _: "",
    bool: lambda value: "true" if value else "false",
    int: str,
    float: lambda value: f"{value:.2f}",
    dt.datetime: iso_ms,
    dt.date: dt.date.isoformat,
    dict: _json_text,
    list: _json_text,
}
RECORD_FORMATS: dict[type, Callable[[Any], Any]] = {
    dt.datetime: lambda value: value.astimezone(UTC).isoformat(),
    dt.date: dt.date.isoformat,
    str: lambda value: value or None,
}


def cell_text(value: Any) -> str:
    """How the export writes a value: see the module docstring for the formats."""
    return CELL_FORMATS[type(value)](value)


def record_value(value: Any) -> Any:
    """A row value typed as the tap emits it: ISO strings with +00:00, dates, dicts, None for empty."""
    formatter = RECORD_FORMATS.get(type(value))
    return formatter(value) if formatter else value


def field_getter(field_name: str, kind: KindSpec) -> Callable[[dict], Any]:
    """How to read a requested field from a row: plain, `metadata.<name>`, or a default-only alias."""
    if field_name.startswith("metadata."):
        name = field_name[len("metadata.") :]
        return lambda row: row["metadata"].get(name) if isinstance(row.get("metadata"), dict) else None
    key = kind.aliases.get(field_name, field_name)
    return lambda row: row.get(key)


class LineWriter:
    """One CSV line at a time (minimal quoting), without keeping what was written."""

    def __init__(self, line_ending: str = "\r\n") -> None:
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, lineterminator=line_ending)

    def line(self, cells: list[str]) -> str:
        self._buffer.seek(0)
        self._buffer.truncate()
        self._writer.writerow(cells)
        return self._buffer.getvalue()


# --------------------------------------------------------------------- filters


class InvalidPayload(Exception):
    """A request the API refuses with 400 invalid_payload; the message is the error's details."""


@dataclass(frozen=True)
class Condition:
    field: str
    operator: str
    operand: Any  # epoch ms for date conditions, a tuple of texts otherwise

    def holds(self, row: dict) -> bool:
        value = row.get(self.field)
        if self.operator in DATE_CONDITIONS:
            moment = value_ms(value)
            if moment is None:
                return False
            return moment > self.operand if self.operator == "$after" else moment < self.operand
        if self.operator in NUMBER_CONDITIONS:
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            return is_number and NUMBER_CONDITIONS[self.operator](value, self.operand)
        text = cell_text(value)
        if self.operator in ("$is", "$in"):
            return text in self.operand
        return text not in self.operand


@dataclass(frozen=True)
class RowFilter:
    junction: str = "and"
    conditions: tuple[Condition, ...] = ()

    def accepts(self, row: dict) -> bool:
        if not self.conditions:
            return True
        results = (condition.holds(row) for condition in self.conditions)
        return all(results) if self.junction == "and" else any(results)

    def bounds(self, primary_field: str) -> tuple[int | None, int | None]:
        """The strict (after, before) the primary field must lie in, when the junction makes it certain."""
        if self.junction != "and":
            return None, None
        afters = [c.operand for c in self.conditions if c.field == primary_field and c.operator == "$after"]
        befores = [c.operand for c in self.conditions if c.field == primary_field and c.operator == "$before"]
        return (max(afters) if afters else None), (min(befores) if befores else None)


def _single_operand(operand: Any, where: str) -> Any:
    """Docs' examples wrap condition values in one-element lists; the published schema does not."""
    if isinstance(operand, list):
        if len(operand) != 1:
            raise InvalidPayload(f"{where}: expected one value, got {len(operand)}")
        return operand[0]
    return operand


def _instant_operand(operand: Any, where: str) -> int:
    value = _single_operand(operand, where)
    try:
        if not isinstance(value, str):
            raise ValueError
        return to_ms(parse_instant(value))
    except ValueError:
        raise InvalidPayload(f"{where}: {value!r} is not an ISO 8601 date-time") from None


def _number_operand(operand: Any, where: str) -> float:
    value = _single_operand(operand, where)
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        return float(value)
    except ValueError:
        raise InvalidPayload(f"{where}: {value!r} is not a number") from None


def _text_operand(operator: str, operand: Any, where: str) -> tuple[str, ...]:
    values = (
        operand if isinstance(operand, list) and operator in ("$in", "$not_in") else [_single_operand(operand, where)]
    )
    if not all(isinstance(value, (str, int, float, bool)) for value in values):
        raise InvalidPayload(f"{where}: expected text values")
    return tuple(cell_text(value) for value in values)


def compile_filters(kind: KindSpec, filters: Any, filterable: Iterable[str]) -> RowFilter:
    """The `parameters.filters` of a request as a row predicate; refuses what it cannot honour."""
    if filters is None:
        return RowFilter()
    if not isinstance(filters, dict):
        raise InvalidPayload("parameters.filters: must be an object")
    junction = str(filters.get("junction") or "and").lower()
    if junction not in ("and", "or"):
        raise InvalidPayload(f"parameters.filters.junction: {filters.get('junction')!r} is not one of and, or")
    filterable = set(filterable)
    conditions: list[Condition] = []
    for name, clause in filters.items():
        if name != "junction":
            conditions += _clause_conditions(kind, name, clause, filterable)
    return RowFilter(junction, tuple(conditions))


def _clause_conditions(kind: KindSpec, name: str, clause: Any, filterable: set[str]) -> list[Condition]:
    where = f"parameters.filters.{name}"
    if not isinstance(clause, dict) or not isinstance(clause.get("conditions"), dict):
        raise InvalidPayload(f'{where}: expected {{"conditions": {{...}}}}')
    row_field = kind.date_filters.get(name) or (name if name in filterable else None)
    if row_field is None:
        raise InvalidPayload(f"{where}: filtering {kind.name} exports on {name!r} is not emulated by the sandbox")
    conditions = []
    for operator, operand in clause["conditions"].items():
        at = f"{where}.conditions.{operator}"
        if operator in DATE_CONDITIONS:
            if name not in kind.date_filters:
                raise InvalidPayload(f"{at}: {name!r} is not a date filter of {kind.name} exports")
            conditions.append(Condition(row_field, operator, _instant_operand(operand, at)))
        elif operator in TEXT_CONDITIONS:
            conditions.append(Condition(row_field, operator, _text_operand(operator, operand, at)))
        elif operator in NUMBER_CONDITIONS and name not in kind.date_filters:
            conditions.append(Condition(row_field, operator, _number_operand(operand, at)))
        else:
            supported = (
                f"{', '.join(DATE_CONDITIONS)} on date fields; {', '.join((*TEXT_CONDITIONS, *NUMBER_CONDITIONS))} "
                "on the others"
            )
            raise InvalidPayload(f"{at}: condition not emulated by the sandbox (supported: {supported})")
    return conditions


def compile_sort(kind: KindSpec, order: Any) -> tuple[str, bool]:
    """(row field, descending) of an `order` parameter; the type's own timeline when absent."""
    if not order:
        return kind.primary_field, False
    name = str(order)
    descending = name.startswith("-")
    name = name.lstrip("-")
    return kind.date_filters.get(name, name), descending


# ------------------------------------------------------------------ export jobs


@dataclass
class ExportJob:
    """One export: what it selects, when it is ready, how it ends, and its cached file sizes."""

    id: str
    kind: KindSpec
    sources: tuple[RowSource, ...]
    added_counts: tuple[int, ...]
    fields: tuple[str, ...]
    row_filter: RowFilter
    sort: tuple[str, bool]
    parameters: dict
    created_at: dt.datetime
    created_clock: float
    latency_seconds: float
    outcome: str  # DONE, ERROR, or STUCK (never finishes)
    content_fault: str | None
    # The file's format is fixed when the export is created: downloading again gives the same bytes.
    bom: bool = True
    line_ending: str = "\r\n"
    sizes: dict[str, int] = field(default_factory=dict)

    def status(self, now: float) -> str:
        elapsed = now - self.created_clock
        if elapsed < self.latency_seconds / 2:
            return "SCHEDULED"
        if elapsed < self.latency_seconds or self.outcome == "STUCK":
            return "IN_PROGRESS"
        return self.outcome


def _flag_target(items: Iterable[T], target: int) -> Iterator[tuple[T, bool]]:
    """Each item and whether it is the target-th (1-based), or the last when there are fewer."""
    iterator = iter(items)
    current: Any = next(iterator, _END)
    position = 1
    while current is not _END:
        following = next(iterator, _END)
        yield current, position == target or (following is _END and position < target)
        current, position = following, position + 1


def _cut_inside_quote(lines: Iterable[bytes]) -> Iterator[bytes]:
    """The file up to just inside a quoted field of a data row (the third, or a later one with quotes)."""
    last = b""
    for number, line in enumerate(lines):
        quote = line.find(b'"')
        if number >= FAULT_ROW_NUMBER and quote >= 0:
            yield line[: quote + 1] + line[quote + 1 : quote + 4].split(b'"')[0]
            return
        yield line
        last = line
    # No quoted field to cut: open one that never closes.
    yield b'"' + last[:8].replace(b'"', b"")


def _slowly(chunks: Iterable[bytes], seconds: float) -> Iterator[bytes]:
    """Each chunk after a pause: a slow file host, or a very large file."""
    for chunk in chunks:
        time.sleep(seconds)
        yield chunk


def _reset_after(chunks: Iterable[bytes], limit: int) -> Iterator[bytes]:
    """Send `limit` bytes, then drop the connection (werkzeug treats ConnectionError as a dropped client)."""
    sent = 0
    for chunk in chunks:
        if sent + len(chunk) >= limit:
            yield chunk[: limit - sent]
            break
        yield chunk
        sent += len(chunk)
    raise ConnectionResetError("sandbox fault download_reset: connection closed mid-body")


# ----------------------------------------------------------- what seeds vary


@dataclass(frozen=True)
class UnpublishedShape:
    """One plausible reality for what Voucherify leaves open (see the module docstring's table)."""

    retry_after: bool  # 429s also carry Retry-After (whole seconds)
    rate_limit_type: bool  # 429s carry X-Rate-Limit-Type
    retry_milliseconds: bool  # X-Rate-Limit-Retry as "1733480000.250" instead of "1733480001"
    result_extras: bool  # a DONE export's `result` also has `file_name` and `expires_at`
    bom: bool  # files start with a UTF-8 BOM
    line_ending: str  # "\r\n" or "\n"
    content_length: bool  # downloads declare Content-Length (else chunked transfer)


SEED_SHAPES = {
    7: UnpublishedShape(False, True, False, False, True, "\r\n", True),
    11: UnpublishedShape(True, False, True, True, False, "\n", False),
    23: UnpublishedShape(False, False, False, True, True, "\n", True),
    42: UnpublishedShape(True, True, True, False, False, "\r\n", False),
}


def shape_for(seed: int) -> UnpublishedShape:
    """The table's shape for the suite's seeds; any other seed draws each choice from its hash."""
    if seed in SEED_SHAPES:
        return SEED_SHAPES[seed]
    dice = Dice(seed, "unpublished shape")
    retry_after, rate_limit_type, milliseconds, extras, bom, crlf, length = (dice.randrange(2) == 1 for _ in range(7))
    return UnpublishedShape(retry_after, rate_limit_type, milliseconds, extras, bom, "\r\n" if crlf else "\n", length)


# ------------------------------------------------------------------ rate limits

#: The limit headers describe when no per-minute limit is set: no test comes near it.
UNMETERED_REQUESTS_PER_WINDOW = 1_000_000
#: GET /v1/exports query parameters (list-exports: limit, page, order).
LIST_EXPORTS_PARAMETERS = frozenset({"limit", "page", "order"})


@dataclass(frozen=True)
class Plan:
    """A plan's limits (NOTES.md, guides/limits): calls per window of `window_seconds`, and per cycle."""

    requests_per_window: int
    window_seconds: float
    requests_per_cycle: int | None


#: NOTES.md: Business 100/minute and 100,000 per billing cycle; Organization 2,000/minute and
#: 300,000; a Sandbox project 100/hour (no cycle quota documented).
PLANS = {
    "business": Plan(100, 60.0, 100_000),
    "organization": Plan(2_000, 60.0, 300_000),
    "sandbox": Plan(100, 3600.0, None),
}
#: The plan of every emulator started in this process unless its constructor names one (for the
#: sandbox CLI, which passes no plan): business, organization or sandbox.
PLAN_VARIABLE = "TAP_SANDBOX_VOUCHERIFY_PLAN"


def plan_named(name: str | None) -> Plan | None:
    if not name:
        return None
    try:
        return PLANS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown Voucherify plan {name!r}: one of {', '.join(PLANS)}") from None


#: The Business plan's billing-cycle quota (NOTES.md), reported when the quota_exhausted fault
#: spends a quota that was not configured.
PLAN_REQUESTS_PER_CYCLE = 100_000


@dataclass(frozen=True)
class Admission:
    """The limiter's answer to one request, and what the X-Rate-Limit-* headers say about it."""

    allowed: bool
    limit: int
    remaining: int
    retry_at: float  # Unix time at which the next request may be made
    limit_type: str = "api_calls"


def next_cycle_start(now: float) -> float:
    """The first instant of next month (UTC): when a billing-cycle quota resets here."""
    today = dt.datetime.fromtimestamp(now, UTC)
    year, month = (today.year + 1, 1) if today.month == 12 else (today.year, today.month + 1)
    return dt.datetime(year, month, 1, tzinfo=UTC).timestamp()


class RateMeter:
    """Counts API calls in fixed windows (aligned to multiples of the window in Unix time) and in
    the billing cycle; a block (a 429 fault) holds every call off until it ends, as the docs say
    exceeding a limit blocks the API until it resets. Refused calls count toward nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._window = -1
        self._used_in_window = 0
        self._used_in_cycle = 0
        self._cycle_spent = False
        self._block: Admission | None = None
        self.refused = 0

    def view(self, now: float, limit: int, window_seconds: float) -> Admission:
        """The current budget, counting nothing (answers that are not admitted calls)."""
        with self._lock:
            used = self._used_in_window if self._window == self._window_of(now, window_seconds) else 0
        remaining = max(0, limit - used)
        retry_at = now if remaining else self._window_end(now, window_seconds)
        return Admission(True, limit, remaining, retry_at)

    def take(self, now: float, limit: int, window_seconds: float, cycle_limit: int | None) -> Admission:
        with self._lock:
            if self._block is not None and now < self._block.retry_at:
                return self._refuse(self._block)
            window = self._window_of(now, window_seconds)
            if window != self._window:
                self._window, self._used_in_window = window, 0
            if self._cycle_spent or (cycle_limit is not None and self._used_in_cycle >= cycle_limit):
                quota = cycle_limit if cycle_limit is not None else PLAN_REQUESTS_PER_CYCLE
                return self._refuse(Admission(False, quota, 0, next_cycle_start(now), "api_calls_cycle"))
            if self._used_in_window >= limit:
                return self._refuse(Admission(False, limit, 0, self._window_end(now, window_seconds)))
            self._used_in_window += 1
            self._used_in_cycle += 1
            remaining = limit - self._used_in_window
        return Admission(True, limit, remaining, now if remaining else self._window_end(now, window_seconds))

    def blocked(self, now: float) -> bool:
        with self._lock:
            return self._block is not None and now < self._block.retry_at

    def block(self, until: float, limit: int) -> Admission:
        """Refuse every call until `until` (the rate_limit fault): the 429 that starts the block."""
        with self._lock:
            self._block = Admission(False, limit, 0, until)
            return self._refuse(self._block)

    def spend_cycle(self) -> None:
        """The billing-cycle quota is used up until the cycle resets (the quota_exhausted fault)."""
        with self._lock:
            self._cycle_spent = True

    def reset_cycle(self) -> None:
        with self._lock:
            self._cycle_spent, self._used_in_cycle = False, 0

    def _refuse(self, admission: Admission) -> Admission:
        self.refused += 1
        return admission

    @staticmethod
    def _window_of(now: float, window_seconds: float) -> int:
        return math.floor(now / window_seconds)

    @classmethod
    def _window_end(cls, now: float, window_seconds: float) -> float:
        return (cls._window_of(now, window_seconds) + 1) * window_seconds


def unix_time_text(moment: float, milliseconds: bool) -> str:
    """X-Rate-Limit-Retry: a moment still ahead is rounded up (never invites a call too early)."""
    if milliseconds:
        return f"{math.ceil(moment * 1000) / 1000:.3f}"
    return str(math.ceil(moment) if moment > time.time() else math.floor(moment))


# -------------------------------------------------------------------- emulator


class VoucherifyEmulator(Emulator):
    """Voucherify's export API and download host (see the module docstring)."""

    name = "voucherify"
    fault_matrix = FaultMatrixProfile(
        api_host="voucherify-api",
        file_host="voucherify-download",
        streams=("voucherify_redemptions", "voucherify_customers"),
        keys={"voucherify_redemptions": ("id",), "voucherify_customers": ("id",)},
        replication_keys={"voucherify_redemptions": "date", "voucherify_customers": "updated_at"},
        create_pattern=r"/export",
        retry_header_wait=0.6,  # X-Rate-Limit-Retry is the fault's value, a Unix time that far ahead
        rate_limit_fault_value=0.6,
        bad_row=3,
        export_read=r"/v1/exports/({id})$",
        export_id=r"exp_\w+",
        vanished_export_id="exp_vanishedVanishedVanish",
    )

    def __init__(
        self,
        ctx: SandboxContext,
        *,
        seed: int = 7,
        rows_per_type: int | None = None,
        requests_per_minute: int | None = None,
        rate_window_seconds: float | None = None,
        requests_per_cycle: int | None = None,
        plan: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.seed = seed
        self.rows_per_type = rows_per_type
        self.app_id = str(uuid.uuid4())
        self.app_token = str(uuid.uuid4())
        self.download_token_ttl_seconds: float = 900
        self.rate_limit_fault_retry_seconds: float = 1.0
        #: A plan's limit per window (None: unmetered) and the window; tests shorten the minute.
        self.requests_per_minute: int | None = None
        self.rate_window_seconds = 60.0
        #: The billing-cycle quota (None: none); the quota_exhausted fault spends it at once.
        self.requests_per_cycle: int | None = None
        self.use_plan(plan if plan is not None else os.environ.get(PLAN_VARIABLE))
        # A limit given on its own wins over the plan's.
        self.requests_per_minute = requests_per_minute or self.requests_per_minute
        self.rate_window_seconds = rate_window_seconds or self.rate_window_seconds
        self.requests_per_cycle = requests_per_cycle or self.requests_per_cycle
        self.meter = RateMeter()
        self._set_shape(shape_for(seed))
        self.data = SyntheticData(seed, rows_per_type)
        self.validator = RepairedSpecValidator()
        self._signer = UrlSigner()
        self._lock = threading.Lock()
        self._jobs: dict[str, ExportJob] = {}
        self._export_counter = 0
        self._server_errors = 0
        self._deleted_campaigns: set[str] = set()
        self.api_host = Host("voucherify-api", ctx.log)
        self.download_host = Host("voucherify-download", ctx.log)
        self.hosts = [self.api_host, self.download_host]
        self._route()

    # -- knobs
    def _set_shape(self, shape: UnpublishedShape) -> None:
        """The seed's answers to what the docs leave open, as attributes tests read (and may set)."""
        self.sends_retry_after = shape.retry_after
        self.sends_rate_limit_type = shape.rate_limit_type
        self.retry_with_milliseconds = shape.retry_milliseconds
        self.result_extra_fields = shape.result_extras
        self.file_bom = shape.bom
        self.file_line_ending = shape.line_ending
        self.sends_content_length = shape.content_length

    @property
    def faults(self):
        return self.ctx.faults

    @property
    def rate_limited(self) -> int:
        """API calls answered 429 so far."""
        return self.meter.refused

    def use_plan(self, name: str | None) -> None:
        """The limits of a plan NOTES.md names (`business`, `organization`, `sandbox`); None: unchanged."""
        limits = plan_named(name)
        if limits is not None:
            self.requests_per_minute = limits.requests_per_window
            self.rate_window_seconds = limits.window_seconds
            self.requests_per_cycle = limits.requests_per_cycle

    def reset_cycle(self) -> None:
        """A new billing cycle: the spent quota (requests_per_cycle or quota_exhausted) is back."""
        self.meter.reset_cycle()

    # -- what the tap and tests use
    def tap_config(self) -> dict[str, Any]:
        return {
            "voucherify_app_id": self.app_id,
            "voucherify_app_token": self.app_token,
            "voucherify_api_url": self.api_host.base_url,
            "voucherify_order_metadata_fields": list(ORDER_METADATA_FIELDS),
        }

    def campaign_ids(self, campaign_type: str | None = None) -> list[str]:
        """Ids of the campaigns the API lists (deleted ones left out)."""
        return [c.id for c in self._live_campaigns() if campaign_type in (None, c.campaign_type)]

    def add_campaigns(self, count: int, campaign_type: str = "GIFT_VOUCHERS") -> list[str]:
        """`count` more campaigns with transactions (load tests): listed, exportable, in expected_records."""
        data = self.data
        rows = DEFAULT_ROW_COUNTS["voucher_transactions"] if data.rows_per_type is None else data.rows_per_type
        with self._lock:
            first = len(data.campaigns)
            added = tuple(
                Campaign(
                    "camp_" + token(24, self.seed, "campaign", position),
                    f"Load campaign {position}",
                    campaign_type,
                    position,
                    dt.datetime(2023, 12, 1, 9, 30, tzinfo=UTC),
                )
                for position in range(first, first + count)
            )
            for campaign in added:
                data._add_source(f"voucher_transactions:{campaign.id}", "voucher_transactions", rows, campaign)
            data.campaigns = (*data.campaigns, *added)
        return [campaign.id for campaign in added]

    def delete_campaign(self, campaign_id: str) -> None:
        """Remove a campaign: it leaves the list and exports of its transactions answer 404."""
        with self._lock:
            self._deleted_campaigns.add(campaign_id)

    def expected_records(
        self, stream_name: str, partition: dict | None = None, start: Any = None, end: Any = None
    ) -> list[dict]:
        """Rows of a tap stream with start <= replication key < end, typed and keyed as the tap emits them."""
        stream = STREAMS[stream_name]
        to_record = self._recorder(stream.fields(), KINDS[stream.kind])
        return [to_record(row) for row in self._stream_rows(stream, partition, start, end)]

    def raw_rows(
        self, stream_name: str, partition: dict | None = None, start: Any = None, end: Any = None
    ) -> list[dict[str, str]]:
        """The rows `expected_records` gives, as the cell text the CSV holds ('' for empty), keyed
        like the tap's records: comparisons that depend on no guess about types."""
        stream = STREAMS[stream_name]
        kind = KINDS[stream.kind]
        keyed = [(record_key(name), field_getter(name, kind)) for name in stream.fields()]
        rows = self._stream_rows(stream, partition, start, end)
        return [{key: cell_text(get(row)) for key, get in keyed} for row in rows]

    def _stream_rows(self, stream: StreamSpec, partition: dict | None, start: Any, end: Any) -> Iterator[dict]:
        kind = KINDS[stream.kind]
        after = before = None
        if stream.replication_key is not None:
            after = None if start is None else to_ms(parse_instant(start)) - 1
            before = None if end is None else to_ms(parse_instant(end))
        sources = self._stream_sources(stream, partition)
        added = tuple(len(s.added) for s in sources)
        return self._select_rows(kind, sources, added, RowFilter(), (kind.primary_field, False), after, before)

    def add_rows(self, stream_name: str, count: int, start: Any, end: Any, partition: dict | None = None) -> list[dict]:
        """Add `count` rows evenly spread over [start, end) on the stream's timeline; returns their records."""
        stream = STREAMS[stream_name]
        if not stream.per_campaign:
            source = self.data.sources[stream.kind]
        elif partition:
            source = self.data.transaction_source(self._campaign_by_id(partition["campaign_id"]))
        else:
            raise ValueError(f"{stream_name} needs a partition: {{'campaign_id': ...}}")
        start_ms, end_ms = to_ms(parse_instant(start)), to_ms(parse_instant(end))
        kind = KINDS[stream.kind]
        with self._lock:
            first_index = source.base_count + len(source.added)
            refs = [(start_ms + (end_ms - start_ms) * k // count, first_index + k) for k in range(count)]
            source.added = [*source.added, *refs]  # a new list: exports reading the old one are unaffected
        to_record = self._recorder(stream.fields(), kind)
        return [to_record(self.data.build(source, index, ms)) for ms, index in refs]

    # -- routing
    def _route(self) -> None:
        api = self.api_host
        api.route("/v1/campaigns", ["GET"], self._guarded(self._list_campaigns))
        api.route("/v1/orders/export", ["POST"], self._guarded(self._create_order_export))
        api.route(
            "/v1/campaigns/<campaign_ref>/transactions/export",
            ["POST"],
            self._guarded(self._create_campaign_transactions_export),
        )
        api.route(
            "/v1/loyalties/<campaign_ref>/transactions/export",
            ["POST"],
            self._guarded(self._create_loyalty_transactions_export),
        )
        api.route("/v1/exports", ["POST"], self._guarded(self._create_export))
        api.route("/v1/exports", ["GET"], self._guarded(self._list_exports))
        api.route("/v1/exports/<export_id>", ["GET"], self._guarded(self._get_export))
        api.route("/v1/exports/<export_id>", ["DELETE"], self._guarded(self._delete_export))
        self.download_host.route("/v1/exports/<export_id>", ["GET"], self._download)

    def _guarded(self, handler: Callable[..., Response]) -> Callable[..., Response]:
        """An API handler behind credentials, the server_error fault and the rate limits."""

        def guarded(request: Request, **values: Any) -> Response:
            refusal = self._refuse_unauthorized(request)
            if refusal is None and self.faults.fire("server_error"):
                refusal = self._server_error()
            if refusal is not None:
                return self._with_rate_headers(refusal, self._budget_view())
            admission = self._admit()
            if not admission.allowed:
                return self._too_many_requests(admission)
            try:
                response = handler(request, **values)
            except InvalidPayload as exc:
                response = self._error(400, "invalid_payload", "Invalid payload", str(exc))
            return self._with_rate_headers(response, admission)

        guarded.__qualname__ = handler.__qualname__
        return guarded

    # -- rate limits
    def _window_limit(self) -> int:
        return UNMETERED_REQUESTS_PER_WINDOW if self.requests_per_minute is None else self.requests_per_minute

    def _budget_view(self) -> Admission:
        return self.meter.view(time.time(), self._window_limit(), self.rate_window_seconds)

    def _admit(self) -> Admission:
        """Count the call, or refuse it: an ongoing block, then the faults, then the cycle and window."""
        now = time.time()
        # Calls during a block are refused without taking a fault's shot.
        if not self.meter.blocked(now):
            if self.faults.fire("quota_exhausted"):
                self.meter.spend_cycle()
            elif self.faults.fire("rate_limit"):
                seconds = float(self.faults.value("rate_limit", self.rate_limit_fault_retry_seconds))
                return self.meter.block(now + seconds, self._window_limit())
        return self.meter.take(now, self._window_limit(), self.rate_window_seconds, self.requests_per_cycle)

    def _with_rate_headers(self, response: Response, admission: Admission) -> Response:
        """guides/limits: every answer carries the limit, what is left, and when the next call may come."""
        if response.mimetype == "application/json":  # not the gateway's HTML pages (502, 503)
            response.headers["X-Rate-Limit-Limit"] = str(admission.limit)
            response.headers["X-Rate-Limit-Remaining"] = str(admission.remaining)
            response.headers["X-Rate-Limit-Retry"] = unix_time_text(admission.retry_at, self.retry_with_milliseconds)
        return response

    # -- refusals
    @staticmethod
    def _error(
        status: int, key: str, message: str, details: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> Response:
        body = {"code": status, "key": key, "message": message, "details": details, "request_id": request_id(), **extra}
        return json_response(body, status, headers)

    def _refuse_unauthorized(self, request: Request) -> Response | None:
        app_id = request.headers.get("X-App-Id", "")
        app_token = request.headers.get("X-App-Token", "")
        if hmac.compare_digest(app_id.encode(), self.app_id.encode()) and hmac.compare_digest(
            app_token.encode(), self.app_token.encode()
        ):
            return None
        return self._error(401, "unauthorized", "Unauthorized", "Missing or invalid X-App-Id / X-App-Token headers")

    def _server_error(self) -> Response:
        with self._lock:
            status = SERVER_ERROR_STATUSES[self._server_errors % len(SERVER_ERROR_STATUSES)]
            self._server_errors += 1
        if status == 500:
            return self._error(500, "internal_server_error", "Internal Server Error", "Unexpected error, please retry")
        title = "502 Bad Gateway" if status == 502 else "503 Service Temporarily Unavailable"
        return Response(
            f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>",
            status=status,
            mimetype="text/html",
        )

    def _too_many_requests(self, admission: Admission) -> Response:
        """429 as guides/limits documents it; the seed decides the optional headers."""
        headers = {}
        if self.sends_rate_limit_type:
            headers["X-Rate-Limit-Type"] = admission.limit_type
        if self.sends_retry_after:
            # From the moment X-Rate-Limit-Retry states (rounded up), so neither header invites a call
            # earlier than the other.
            retry_at = float(unix_time_text(admission.retry_at, self.retry_with_milliseconds))
            headers["Retry-After"] = str(max(1, math.ceil(retry_at - time.time())))
        if admission.limit_type == "api_calls_cycle":
            details = f"The limit of {admission.limit} API calls in this billing cycle has been reached"
        else:
            details = f"The limit of {admission.limit} API calls per window has been reached"
        response = self._error(429, "too_many_requests", "Too many requests", details, headers)
        return self._with_rate_headers(response, admission)

    def _not_found(self, resource_type: str, resource_id: str) -> Response:
        return self._error(
            404,
            "not_found",
            "Resource not found",
            f"Cannot find {resource_type} with id {resource_id}",
            resource_id=resource_id,
            resource_type=resource_type,
        )

    # -- campaigns
    def _live_campaigns(self) -> list[Campaign]:
        with self._lock:
            deleted = set(self._deleted_campaigns)
        return [campaign for campaign in self.data.campaigns if campaign.id not in deleted]

    def _campaign_by_id(self, campaign_id: str) -> Campaign:
        for campaign in self.data.campaigns:
            if campaign.id == campaign_id:
                return campaign
        raise KeyError(f"unknown campaign {campaign_id!r}")

    def _find_campaign(self, reference: str) -> Campaign | None:
        """A live campaign by id or by name (the docs allow either in the path)."""
        return next((c for c in self._live_campaigns() if reference in (c.id, c.name)), None)

    def _list_campaigns(self, request: Request) -> Response:
        limit, page = _paging(request)
        campaign_type = request.args.get("campaign_type")
        known_types = spec_enum_property("CampaignBase", "campaign_type")
        if campaign_type is not None and campaign_type not in known_types:
            raise InvalidPayload(f"campaign_type: {campaign_type!r} is not one of {', '.join(known_types)}")
        campaigns = [c for c in self._live_campaigns() if campaign_type in (None, c.campaign_type)]
        shown = campaigns[(page - 1) * limit : page * limit]
        return json_response(
            {
                "object": "list",
                "data_ref": "campaigns",
                "campaigns": [c.as_json() for c in shown],
                "total": len(campaigns),
            }
        )

    # -- creating exports
    def _create_order_export(self, request: Request) -> Response:
        body = _json_body(request)
        stripped = _without_metadata_fields(body)
        self._check(self.validator.errors("/v1/orders/export", "post", stripped))
        return self._create(KINDS["order"], (self.data.sources["order"],), body.get("parameters") or {})

    def _create_campaign_transactions_export(self, request: Request, campaign_ref: str) -> Response:
        # Any campaign type: a discount campaign has no transactions, so its file is header-only.
        return self._create_transactions_export(
            request, campaign_ref, "/v1/campaigns/{campaignId}/transactions/export", None
        )

    def _create_loyalty_transactions_export(self, request: Request, campaign_ref: str) -> Response:
        return self._create_transactions_export(
            request, campaign_ref, "/v1/loyalties/{campaignId}/transactions/export", ("LOYALTY_PROGRAM",)
        )

    def _create_transactions_export(
        self, request: Request, campaign_ref: str, openapi_path: str, campaign_types: tuple[str, ...] | None
    ) -> Response:
        campaign = self._find_campaign(campaign_ref)
        if campaign is None or (campaign_types is not None and campaign.campaign_type not in campaign_types):
            return self._not_found("campaign", campaign_ref)
        body = _json_body(request)
        self._check(self.validator.errors(openapi_path, "post", body))
        parameters = dict(body.get("parameters") or {})
        if "order" not in parameters and body.get("order"):
            parameters["order"] = body["order"]
        echoed = {
            **parameters,
            "filters": {**(parameters.get("filters") or {}), "campaign_id": {"conditions": {"$in": [campaign.id]}}},
        }
        return self._create(
            KINDS["voucher_transactions"],
            (self.data.transaction_source(campaign),),
            parameters,
            echoed,
            campaign_transaction_fields(),
        )

    def _create_export(self, request: Request) -> Response:
        body = _json_body(request)
        exported_object = body.get("exported_object")
        stripped = _without_metadata_fields(body) if exported_object == "order" else body
        errors = self.validator.errors("/v1/exports", "post", stripped)
        if errors:
            errors = self._branch_errors(exported_object, stripped) or errors
        self._check(errors)
        kind = KINDS[str(exported_object)]  # valid: the schema allows only these names
        if kind.name == "voucher_transactions":
            sources = tuple(self.data.transaction_source(c) for c in self._live_campaigns() if c.has_transactions)
        else:
            sources = (self.data.sources[kind.name],)
        return self._create(kind, sources, body.get("parameters") or {})

    def _branch_errors(self, exported_object: Any, body: dict) -> list[str]:
        """Errors against the oneOf branch that `exported_object` names: they say which field is wrong."""
        if exported_object not in KINDS:
            choices = ", ".join(KINDS)
            if exported_object is None:
                return [f"exported_object: is required, one of {choices}"]
            return [f"exported_object: {exported_object!r} is not one of {choices}"]
        spec = repaired_spec()
        schema = {
            "$ref": f"#/components/schemas/{KINDS[exported_object].branch_schema}",
            "components": spec["components"],
        }
        validator = jsonschema.Draft202012Validator(schema)
        return [
            f"{'/'.join(map(str, error.absolute_path)) or '(body)'}: {error.message}"
            for error in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))
        ]

    @staticmethod
    def _check(errors: list[str]) -> None:
        if errors:
            raise InvalidPayload("; ".join(errors))

    def _create(
        self,
        kind: KindSpec,
        sources: tuple[RowSource, ...],
        parameters: dict,
        echoed: dict | None = None,
        filterable: Iterable[str] | None = None,
    ) -> Response:
        """Compile the request's fields, filters and order into a job, decide its fate, answer SCHEDULED."""
        fields = tuple(parameters.get("fields") or kind.default_fields)
        row_filter = compile_filters(kind, parameters.get("filters"), filterable or kind.fields)
        sort = compile_sort(kind, parameters.get("order") or None)
        with self._lock:
            self._export_counter += 1
            job = ExportJob(
                id="exp_" + token(24, self.seed, "export", self._export_counter, time.time_ns()),
                kind=kind,
                sources=sources,
                added_counts=tuple(len(s.added) for s in sources),
                fields=fields,
                row_filter=row_filter,
                sort=sort,
                parameters=echoed or parameters,
                created_at=dt.datetime.now(UTC),
                created_clock=time.monotonic(),
                latency_seconds=float(self.faults.value("export_latency", self.ctx.export_latency_seconds)),
                outcome=self._decide_outcome(),
                content_fault=self._decide_content_fault(),
                bom=self.file_bom,
                line_ending=self.file_line_ending,
            )
            self._jobs[job.id] = job
        return json_response(self._export_json(job))

    def _decide_outcome(self) -> str:
        if self.faults.fire("export_error"):
            return "ERROR"
        if self.faults.fire("export_stuck"):
            return "STUCK"
        return "DONE"

    def _decide_content_fault(self) -> str | None:
        return next((name for name in CONTENT_FAULTS if self.faults.fire(name)), None)

    # -- reading exports
    def _job(self, export_id: str) -> ExportJob | None:
        with self._lock:
            return self._jobs.get(export_id)

    def _export_json(self, job: ExportJob) -> dict:
        status = job.status(time.monotonic())
        return {
            "id": job.id,
            "object": "export",
            "created_at": iso_ms(job.created_at),
            "status": status,
            "channel": "API",
            "exported_object": job.kind.name,
            "parameters": job.parameters,
            "result": self._result(job) if status == "DONE" else None,
            "user_id": None,
        }

    def _result(self, job: ExportJob) -> dict:
        """`result` of a DONE export: the documented `url`, and on some seeds fields nobody documents."""
        url, expires = self._file_url(job)
        if not self.result_extra_fields:
            return {"url": url}
        expiry = dt.datetime.fromtimestamp(expires, UTC)
        return {"url": url, "file_name": f"{job.kind.name}-{job.id}.csv", "expires_at": iso_ms(expiry)}

    def _file_url(self, job: ExportJob) -> tuple[str, int]:
        """A fresh download URL and its expiry: `token=<expiry>.<nonce>.<signature>`, signing the
        file path, nonce and expiry.

        The nonce makes every token new, even two issued in the same second. The expiry has
        one-second resolution (it is already past when the url_expired fault fires). The
        foreign_download_host fault writes another host (its value, a base URL) in front of the path.
        """
        expires = int(time.time() + self.download_token_ttl_seconds)
        if self.faults.fire("url_expired"):
            expires = int(time.time()) - 1
        nonce = secrets.token_hex(8)
        path = f"/v1/exports/{job.id}"
        signature = self._signer.sign(_signed_path(path, nonce), expires)
        base = self.download_host.base_url
        if self.faults.fire("foreign_download_host"):
            base = str(self.faults.value("foreign_download_host", FOREIGN_DOWNLOAD_BASE)).rstrip("/")
        return f"{base}{path}?token={expires}.{nonce}.{signature}", expires

    def _get_export(self, request: Request, export_id: str) -> Response:
        job = self._job(export_id)
        if job is None:
            return self._not_found("export", export_id)
        return json_response(self._export_json(job))

    def _delete_export(self, request: Request, export_id: str) -> Response:
        with self._lock:
            job = self._jobs.pop(export_id, None)
        if job is None:
            return self._not_found("export", export_id)
        return Response(status=204)

    def _list_exports(self, request: Request) -> Response:
        """list-exports: only the documented `limit`, `page` and `order`; anything else answers 400,
        so a client cannot come to depend on a filter the vendor does not publish."""
        unknown = sorted(set(request.args) - LIST_EXPORTS_PARAMETERS)
        if unknown:
            raise InvalidPayload(f"{', '.join(unknown)}: not a parameter of GET /v1/exports (limit, page, order)")
        limit, page = _paging(request)
        order = request.args.get("order") or "-created_at"
        if order not in spec_enum("ParameterOrderListExports"):
            raise InvalidPayload(f"order: {order!r} is not one of {', '.join(spec_enum('ParameterOrderListExports'))}")
        with self._lock:
            jobs = list(self._jobs.values())
        now = time.monotonic()
        key = (lambda job: job.created_clock) if order.endswith("created_at") else (lambda job: job.status(now))
        jobs.sort(key=key, reverse=order.startswith("-"))
        shown = jobs[(page - 1) * limit : page * limit]
        return json_response(
            {
                "object": "list",
                "data_ref": "exports",
                "exports": [self._export_json(job) for job in shown],
                "total": len(jobs),
            }
        )

    # -- the download host
    def _download(self, request: Request, export_id: str) -> Response:
        refusal = self._refuse_unauthorized(request)
        if refusal is not None:
            return refusal
        expires, _, rest = (request.args.get("token") or "").partition(".")
        nonce, _, signature = rest.partition(".")
        if self._signer.check(_signed_path(f"/v1/exports/{export_id}", nonce), expires, signature) != "ok":
            return self._error(403, "forbidden", "Forbidden", "The download token is invalid or has expired")
        job = self._job(export_id)
        if job is None:
            return self._not_found("export", export_id)
        if self.faults.fire("download_redirect"):
            base = str(self.faults.value("download_redirect", FOREIGN_DOWNLOAD_BASE)).rstrip("/")
            return Response(status=302, headers={"Location": f"{base}/v1/exports/{export_id}.csv"})
        return self._file_response(job)

    def _file_response(self, job: ExportJob) -> Response:
        """The CSV, streamed; transport faults change what is sent, never what the export holds.

        Seeds without Content-Length send the body chunked (werkzeug does so for HTTP/1.1 when no
        length is declared); download_short always declares one, since the fault is that lie.
        """
        headers = {"Content-Disposition": f'attachment; filename="{job.kind.name}-{job.id}.csv"'}
        declared = self.sends_content_length
        if self.faults.fire("download_reset"):
            size = self._file_size(job, "whole")
            body: Iterable[bytes] = _reset_after(self._file_chunks(job, "whole"), size // 2)
        elif self.faults.fire("download_short"):
            whole = self._file_size(job, "whole")
            size, declared = whole + max(64, whole // 10), True
            body = self._file_chunks(job, "whole")
        elif self.faults.fire("download_cut_quote"):
            body = self._file_chunks(job, "cut_quote")
            size = self._file_size(job, "cut_quote") if declared else 0
        else:
            body = self._file_chunks(job, "whole")
            size = self._file_size(job, "whole") if declared else 0
        if self.faults.fire("download_slow"):
            body = _slowly(body, float(self.faults.value("download_slow", 0.2)))
        if declared:
            headers["Content-Length"] = str(size)
        return Response(body, status=200, headers=headers, mimetype="text/plain", direct_passthrough=True)

    def _file_size(self, job: ExportJob, variant: str) -> int:
        """Bytes of the file, counted by generating it once (cached: the export never changes)."""
        with self._lock:
            cached = job.sizes.get(variant)
        if cached is None:
            cached = sum(len(chunk) for chunk in self._file_chunks(job, variant))
            with self._lock:
                job.sizes[variant] = cached
        return cached

    def _file_chunks(self, job: ExportJob, variant: str) -> Iterator[bytes]:
        lines = self._file_lines(job)
        if variant == "cut_quote":
            lines = _cut_inside_quote(lines)
        return chunked(lines)

    def _file_lines(self, job: ExportJob) -> Iterator[bytes]:
        """The export file line by line, with the export's content fault applied."""
        fault = job.content_fault
        if fault == "empty_file":
            return
        writer = LineWriter(job.line_ending)
        labels = [header_label(name) for name in job.fields]
        extra = fault == "new_column"
        yield (BOM if job.bom else b"") + writer.line([*labels, NEW_COLUMN_LABEL] if extra else labels).encode()
        if fault == "header_only":
            return
        for number, (cells, damaged) in enumerate(_flag_target(self._job_cells(job), FAULT_ROW_NUMBER)):
            if extra:
                cells.append(NEW_COLUMN_VALUES[number % len(NEW_COLUMN_VALUES)])
            if damaged and fault == "misfit_cell":
                cells = _with_misfit_cell(cells)
            line = writer.line(cells).encode()
            yield _damage(line, fault, job.line_ending) if damaged else line

    def _job_cells(self, job: ExportJob) -> Iterator[list[str]]:
        after, before = job.row_filter.bounds(job.kind.primary_field)
        rows = self._select_rows(job.kind, job.sources, job.added_counts, job.row_filter, job.sort, after, before)
        getters = [field_getter(name, job.kind) for name in job.fields]
        for row in rows:
            yield [CELL_FORMATS[type(value)](value) for value in (get(row) for get in getters)]

    # -- selecting rows
    def _select_rows(
        self,
        kind: KindSpec,
        sources: tuple[RowSource, ...],
        added_counts: tuple[int, ...],
        row_filter: RowFilter,
        sort: tuple[str, bool],
        after: int | None,
        before: int | None,
    ) -> Iterator[dict]:
        """Rows of the sources inside (after, before) that pass the filter, in the requested order."""
        sort_field, descending = sort
        on_timeline = sort_field == kind.primary_field
        refs = self._merged_refs(sources, added_counts, after, before, descending and on_timeline)
        if on_timeline:
            for ref in refs:
                row = self._build(sources, ref)
                if row_filter.accepts(row):
                    yield row
            return
        # Another sort field: keep one small key per row, then build the rows again in order.
        keyed = []
        for position, ref in enumerate(refs):
            row = self._build(sources, ref)
            if row_filter.accepts(row):
                value = row.get(sort_field)
                keyed.append(((value is None, value if value is not None else 0), position, ref))
        keyed.sort(key=lambda item: item[0], reverse=descending)
        for _, _, ref in keyed:
            yield self._build(sources, ref)

    @staticmethod
    def _merged_refs(
        sources: tuple[RowSource, ...],
        added_counts: tuple[int, ...],
        after: int | None,
        before: int | None,
        descending: bool,
    ) -> Iterator[tuple[int, int, int]]:
        """(ms, source position, index) of every candidate row, merged in time order across sources."""

        def tagged(position: int) -> Iterator[tuple[int, int, int]]:
            refs = sources[position].refs(after, before, added_counts[position], descending)
            return ((ms, position, index) for ms, index in refs)

        return heapq.merge(*(tagged(position) for position in range(len(sources))), reverse=descending)

    def _build(self, sources: tuple[RowSource, ...], ref: tuple[int, int, int]) -> dict:
        ms, position, index = ref
        return self.data.build(sources[position], index, ms)

    def _stream_sources(self, stream: StreamSpec, partition: dict | None) -> tuple[RowSource, ...]:
        if not stream.per_campaign:
            return (self.data.sources[stream.kind],)
        live = {campaign.id: campaign for campaign in self._live_campaigns() if campaign.has_transactions}
        if partition:
            campaign = self._campaign_by_id(partition["campaign_id"])
            # A deleted campaign's transactions can no longer be exported: nothing is expected of it.
            return (self.data.transaction_source(campaign),) if campaign.id in live else ()
        return tuple(self.data.transaction_source(campaign) for campaign in live.values())

    @staticmethod
    def _recorder(fields: Iterable[str], kind: KindSpec) -> Callable[[dict], dict]:
        """Row -> the tap's record: snake_case keys of the requested fields, typed values."""
        keyed = [(record_key(name), field_getter(name, kind)) for name in fields]
        return lambda row: {key: record_value(get(row)) for key, get in keyed}


# ------------------------------------------------------------------- helpers


def _signed_path(path: str, nonce: str) -> str:
    return f"{path}\n{nonce}"


def _with_misfit_cell(cells: list[str]) -> list[str]:
    """The row with its first integer cell (ids are never digits only) replaced by MISFIT_CELL."""
    index = next((i for i, cell in enumerate(cells) if cell.isdigit()), None)
    return cells if index is None else [*cells[:index], MISFIT_CELL, *cells[index + 1 :]]


def _damage(line: bytes, fault: str | None, line_ending: str) -> bytes:
    """One data row broken the way a row-level fault says."""
    if fault == "malformed_row":
        return line.rstrip(b"\r\n") + b',"unexpected, extra field"' + line_ending.encode()
    if fault == "bad_utf8":
        at = 1 if line.startswith(b'"') else 0
        return line[:at] + b"\xff\xfe" + line[at:]
    return line


def _json_body(request: Request) -> dict:
    """The request's JSON object; an empty body counts as `{}` (the docs allow "No request body")."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidPayload("Request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidPayload("(body): must be a JSON object")
    return body


METADATA_FIELD = re.compile(r"^metadata\.[^.\s]+$")


def _without_metadata_fields(body: dict) -> dict:
    """The body without `metadata.<name>` fields, which the order enum omits but the docs use."""
    parameters = body.get("parameters")
    if not isinstance(parameters, dict) or not isinstance(parameters.get("fields"), list):
        return body
    kept = [name for name in parameters["fields"] if not (isinstance(name, str) and METADATA_FIELD.match(name))]
    return {**body, "parameters": {**parameters, "fields": kept}}


def _paging(request: Request) -> tuple[int, int]:
    """`limit` (1-100, default 10) and `page` (from 1), as Voucherify's list endpoints take them."""
    try:
        limit = int(request.args.get("limit", 10))
        page = int(request.args.get("page", 1))
    except ValueError:
        raise InvalidPayload("limit and page must be integers") from None
    if not 1 <= limit <= 100:
        raise InvalidPayload(f"limit: {limit} is not between 1 and 100")
    if page < 1:
        raise InvalidPayload(f"page: {page} is less than 1")
    return limit, page


@cache
def spec_enum_property(schema_name: str, property_name: str) -> tuple[str, ...]:
    schema = load_spec(SPEC_FILE)["components"]["schemas"][schema_name]["properties"][property_name]
    return tuple(value for value in schema["enum"] if value is not None)

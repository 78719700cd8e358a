"""Emulation of the Intelligems External API (beta, `/v25-10-beta`) experience exports, and its S3 host.

What is emulated, from the vendor's published OpenAPI (`specs/intelligems-exports.openapi.json`), its
doc page "07 Get Experience Export" and NOTES.md ("Intelligems External API"):

- Auth: header `intelligems-access-token`; a missing or wrong token answers 401 `{"error": "Unauthorized"}`.
- `GET /v25-10-beta/experiences-list?page=&limit=&status=&category=&module=` answers
  `{experiencesList, page, limit, total, totalPages}`; items carry every field the spec marks required
  (list shape: `hasSchedule` and `history`, reduced variations). `GET /v25-10-beta/experiences/{id}`
  answers `{"experience": {...}}` in the detail shape (no `hasSchedule`/`history`; custom metrics,
  integrations, key metrics, shipping definitions; full variations). Every `*Ts` is Unix milliseconds.
- `POST /v25-10-beta/analytics/experience/{id}/export` is synchronous: the answer comes after the
  export latency and holds a presigned S3 URL valid `url_ttl_seconds` (900), or `url: null`,
  `expiresIn: 0`, "Export timed out, please retry" (fault `null_url`). The range defaults to the
  experience's lifetime (start through end/pause or now) and explicit `startTs`/`endTs` are clamped
  to it. Rows are in the file when `start <= created_at < end`. Every body the spec's schema allows
  is accepted (the spec publishes no formal request examples; the description's values are tested).
- Rate limits (NOTES.md: "token bucket; headers x-ratelimit-limit, x-ratelimit-remaining,
  x-ratelimit-reset (epoch milliseconds). Export burst 20"; "list/detail/resource/timeseries burst
  50, refill 25 every 30 s"): two token buckets per token, one for the export endpoint (burst 20) and
  one for every other call (burst 50, 25 tokens per 30 s). All three headers, with those lower-case
  names, are on every API answer, refused ones included (401, 400, 404, 429, 500; an unknown path
  answers 404 through the same checks); `x-ratelimit-limit` is the bucket's burst and the reset is
  a 13-digit epoch-milliseconds time.
- The S3 host serves `/<bucket>/exports/<experienceId>/<exportType>-<n>.csv?X-Amz-...` (SigV4
  query-string auth in shape; the signature is the sandbox's HMAC over path, credential and expiry).

Realities: what the vendor does not publish, varied per seed (`emulator.reality`, a `Reality`).
NOTES.md, "What nobody publishes": Intelligems publishes no CSV columns, so every column, type and
key the tap uses is a guess. Each seed draws one plausible reality from a hash of the seed; the
tap must sync every one of them exactly:

- `id_format`: how every identifier column is written: `integer` ("5501000000005", the
  original), `zero_padded` ("00001000000005"), `prefixed` ("ord_2C4B58YVZC"), `alphanumeric`
  ("2C4B58YVZC") or `uuid`. It applies to order ids, line item ids, order numbers (`order_name`,
  "#" and the number), visitor ids, SKUs and discount codes, and one order's id is the same text in
  all three export types (a line item's `order_id` is its order's `order_id` cell). Ids the API
  publishes keep their published shape in every reality: variation ids are the experience's
  variation UUIDs, product and variant ids are Shopify's numeric strings (the spec's
  `onlyProductIds`: "Shopify product IDs (numeric strings)").
- `columns`: each export type's columns in a seeded order. The header names them, so order carries
  no meaning.
- `extra_columns`: one to three columns per type that the tap does not know (invented, e.g.
  `utm_source`, `vendor_name`, `refunded_amount` with numeric-looking text like "007.10").
- `missing_columns`: up to two guessed columns per type left out on some seeds, only from
  `OPTIONAL_COLUMNS`: never a row's identity (its key, the parent `order_id`, `created_at`, which
  the windows filter on), no date, no column messy mode changes.
- `header_style`: how labels are spelled: `snake` ("order_number", the original), `title`
  ("Order Number", "Order ID"), `upper` ("ORDER NUMBER"), `sentence` with a trailing space ("Order
  number "), or `mixed` (each column its own of those). The tap keys a column by the lower
  snake_case of its label (records/columns.py `header_key`), so record keys never change.
- Answers the docs leave open: whether a 429 also carries `Retry-After` (whole seconds; the spec
  declares no 429 answer and NOTES.md names only the x-ratelimit-* headers), whether
  `x-ratelimit-reset` is when the bucket is full again (`bucket_full`) or when its next token comes
  (`next_token`), and the 429 body (`{"error": ...}` or API-Gateway-style `{"message": ...}`).

The suite's seeds (tests read this list):

- seed 7: ids prefixed, headers mixed; 429 without Retry-After, reset = next_token, body {"message":
  "Too Many Requests"}; orders +utm_source +utm_medium -device_type -source_channel; order_line_items
  +fulfillment_status +vendor_name; order_reconciliation +financial_status +refunded_amount -order_name
  -difference.
- seed 11: ids alphanumeric, headers title; 429 with Retry-After, reset = bucket_full, body {"error":
  "Too Many Requests"}; orders +utm_source +utm_medium +browser; order_line_items +variant_options;
  order_reconciliation +financial_status.
- seed 23: ids zero_padded, headers upper; 429 with Retry-After, reset = bucket_full, body {"error":
  "Too Many Requests"}; orders +utm_medium +browser -variation_name; order_line_items +product_type
  -currency; order_reconciliation +financial_status +refunded_amount +attribution_window.
- seed 42: ids uuid, headers sentence; 429 without Retry-After, reset = next_token, body {"message":
  "Too Many Requests"}; orders +utm_medium +browser -device_type -source_channel; order_line_items
  +variant_options -variation_name; order_reconciliation +refunded_amount -order_name -variation_name.

(`+` an extra column, `-` a missing one; every seed also shuffles the column order.)

Experiment results (`intelligems-analytics.openapi.json`, the vendor's published OpenAPI):
`POST /v25-10-beta/analytics/resource/{id}` (view `overview`) and
`POST /v25-10-beta/analytics/experience/{id}/timeseries` answer JSON computed by `ResultsAnalytics`
from the same orders the exports hold (analytics lag included) and a seeded daily traffic, so the
overview's totals are the sum of the timeseries' days. Bodies are validated against the published
request schemas (plus 10-digit `startTs`/`endTs` and the description's `view`/`audience` rules); both
sit behind auth, faults and the list/detail bucket (NOTES.md: "list/detail/resource/timeseries burst
50"); ranges default to and are clamped to the lifetime (the timeseries description); a never-started
experience answers 400 as exports do. `results_calls` records each answered call (body, clamped range).
What the spec leaves open is `emulator.results_reality` (a `ResultsReality` per seed): counts as bare
numbers or `{value}` objects; whether the store has COGS (profit metrics null otherwise); which
optional overview fields are absent (`variations`, `experienceId`, `experienceName`, `impact`,
`downsample`) and whether `cogsConfigured`/`cogsCoveragePct` are sent; whether a statistic that cannot
be computed is null or absent; the time zone days are cut in (UTC, UTC-5, UTC+9; the spec only gives
`dt`'s format); and one catalogue metric beyond the documented list. Suite seeds: 7 bare counts, no
COGS, UTC, no `impact`; 11 `{value}` counts, COGS, UTC+9, no `variations`/`experienceId`/`impact`;
23 bare counts, COGS, UTC-5, no `variations`, unknown statistics absent; 42 `{value}` counts, no COGS,
UTC-5, every optional field sent.

What the tests compare with:

- `expected_records(...)`: the records typed as the tap emits them: identifiers as the text the file
  has, extra columns as text (None when empty), a missing column absent from the dicts.
- `raw_rows(stream_name, partition=None, start=None, end=None)`: the same rows as the files write
  them: each cell's text ('' when empty), keyed by record key, plus `experience_id` (the tap adds it
  from the partition; the file has no such column).
- Messy cells (`messy_cells=True`, constructor keyword or attribute; read when an export is created,
  so a file never changes; `raw_rows` follows the attribute): files that break the tap's type
  guesses, each kind of mess in every 4th row, each kind on other rows (never only the first row):
  "N/A" in a number column (orders `tax`, line items `price`, reconciliation `intelligems_total`);
  "yes"/"no" instead of true/false (`is_new_visitor`, `is_test_product`, `included_in_analysis`);
  text that is not JSON in the JSON column (line items `properties`); a date-time as "01/15/2024
  10:30 AM" (reconciliation `analytics_synced_at`, never `created_at`); and one guessed column
  under another label (`country_code` -> "Ship To Country", `variant_title` -> "Variant Name",
  `exclusion_reason` -> "Reason Excluded"). Orders and line items have no second date-time column
  and orders no JSON column, so those kinds of mess are where the columns are. `expected_records`
  raises NotImplementedError in this mode: compare with `raw_rows`.

Design choices where the vendor docs are silent (each one is a guess made explicit):

- Error bodies follow the published 400 shape `{"errors": [...], "properties": {...}}`, which is
  zod's `treeifyError` output: problems of a field sit under `properties.<field>.errors`, array
  elements under `items`. Body problems come from the published schema (SpecValidator); the spec
  types `startTs`/`endTs` only as strings, the doc says "10-digit epoch seconds", so other strings
  are refused too. A `startTs` after `endTs` is refused (400); a window that clamping empties (for
  example a start after the experience ended) is not an error: the file is header-only.
- Exporting an experience that never started answers **400** (`errors: ["Experience ... has not
  started ..."]`): the request is well-formed but there is no lifetime to export.
- 404 bodies are `{"error": "Not Found", "message": ...}`; 500/502/503 (fault `server_error`, in that
  order) are `{"error": "Internal Server Error"}`, then API-Gateway style `{"message": ...}`.
- Rate limits: auth is checked before the bucket verdict, but every request, refused or not, takes
  a token. The export bucket's refill is not published: it refills fast (50 a second, knob
  `export_rate_per_second`) so tests stay quick.
- The list is ordered newest `createdAtTs` first (the dashboard's order); `limit` is not capped.
- `filters` are validated and recorded in `exports[...]` but do not narrow the synthetic rows, so the
  tap's output stays comparable with `expected_records`.
- Files (besides the reality above) start with a UTF-8 BOM, use LF line endings, ISO-8601 UTC
  timestamps with `Z`, `true`/`false`, money with two decimals, JSON in `properties`, and empty
  cells for unknown values. There is no `experience_id` column (a file is per experience; the tap
  adds it from the partition). Rows are in `created_at` order.
- `rows_per_type` is the number of *orders* per experience: `orders` and `order_reconciliation`
  have one row per order, `order_line_items` 1-3 rows per order (the order's `items_count`).
  Default: 40 orders per experience with data. Rows are a pure function of (seed, experience,
  order index), spread over the experience's data span (its seeded lifetime within
  2024-01-01..2024-03-01), so a file is never held in memory.
- `add_rows` adds rows to one export type only: each added row is a new order with exactly one line
  item, so `count` rows appear in that stream. `partition=None` means the oldest running experience.
- Analytics lag (`analytics_lag_seconds`): rows whose `created_at` is newer than `now - lag` at export
  time are not in the file yet (nor in `expected_records`).
- Content faults (`malformed_row`, `bad_utf8`, `empty_file`, `header_only`, `new_column`,
  `download_cut_quote`) are decided when the export is created, like an S3 object's content:
  downloading the same URL again gives the same bad file, a new export gives a good one. Transport
  faults (`download_reset`, `download_short`) are decided per download, so a retry can succeed.
  `new_column` adds a column no reality has (`utm_campaign`, `vendor`, `payment_gateway`).
- Content-Length is exact and computed by rendering the file once without keeping it (then cached
  per file): S3 always sends a length, so the body is never chunked. `Range: bytes=` is honoured.
- The S3 host refuses (400 `InvalidArgument`, "Only one auth mechanism allowed") any `Authorization`
  header, as S3 does with presigned URLs, and also an `intelligems-access-token` header: real S3
  would ignore that one, but here it means the tap leaked the API credential, which tests must see.
  The offending header's value is never echoed back.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import datetime as dt
import hashlib
import heapq
import io
import json
import math
import re
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from typing import Any
from urllib.parse import urlencode
from xml.sax.saxutils import escape as xml_escape

import jsonschema
from werkzeug.wrappers import Request, Response

from commerce_sandbox.core import (
    Emulator,
    FaultMatrixProfile,
    Host,
    RateDecision,
    SandboxContext,
    SpecValidator,
    TokenBucket,
    UrlSigner,
    as_utc,
    byte_slice,
    inside_quotes_cut,
    json_response,
    record_value,
    whole_second,
    with_transport_faults,
)
from commerce_sandbox.core import record_instant as iso_record

UTC = dt.timezone.utc
CENT = Decimal("0.01")
SPEC_FILE = "intelligems-exports.openapi.json"
PREFIX = "/v25-10-beta"
LIST_SPEC_PATH = f"{PREFIX}/experiences-list"
DETAIL_SPEC_PATH = f"{PREFIX}/experiences/{{experienceId}}"
EXPORT_SPEC_PATH = f"{PREFIX}/analytics/experience/{{experienceId}}/export"
ANALYTICS_SPEC_FILE = "intelligems-analytics.openapi.json"
RESOURCE_SPEC_PATH = f"{PREFIX}/analytics/resource/{{experienceId}}"
TIMESERIES_SPEC_PATH = f"{PREFIX}/analytics/experience/{{experienceId}}/timeseries"

DATA_START = dt.datetime(2024, 1, 1, tzinfo=UTC)
DATA_END = dt.datetime(2024, 3, 1, tzinfo=UTC)
DEFAULT_ORDERS_PER_EXPERIENCE = 40
EXPORT_TYPES = ("orders", "order_line_items", "order_reconciliation")
STREAM_PREFIX = "intelligems_"
EXPERIENCES_STREAM = "intelligems_experiences"
BUCKET = "ig-analytics-exports-us-east-1"
S3_REGION = "us-east-1"

UTF8_BOM = b"\xef\xbb\xbf"
CHUNK_BYTES = 64 * 1024
LONG_NOTE_INDEX = 7  # the order (per awkward experience) whose note is ~100 KB
LONG_NOTE_CHARS = 100_000
TEN_DIGITS = re.compile(r"^\d{10}$")
RANGE_HEADER = re.compile(r"^bytes=(\d*)-(\d*)$")
BAD_UTF8_MARKER = "\x1fBADUTF8\x1f"
# Rate limits (NOTES.md): export burst 20; list/detail burst 50, refill 25 every 30 s. The export
# bucket's refill is not published: a fast one keeps tests quick (a knob, `export_rate_per_second`).
EXPORT_BURST = 20
EXPORT_REFILL_PER_SECOND = 50.0
API_BURST = 50
API_REFILL_PER_SECOND = 25 / 30
TIMESERIES_METRICS = (
    "conversion_rate",
    "net_revenue_per_visitor",
    "gross_profit_per_visitor",
    "aov",
    "n_visitors",
    "n_orders",
    "net_revenue",
)
ANY_METHOD = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
CONTENT_FAULTS = ("empty_file", "header_only", "malformed_row", "bad_utf8", "new_column", "download_cut_quote")


# ------------------------------------------------------------------------- time


def to_ms(moment: dt.datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def from_ms(ms: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=UTC)


def iso_z(moment: dt.datetime) -> str:
    """How the CSV files write instants: second precision, UTC, `Z`."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return moment.replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def money(value: Decimal | str | int) -> Decimal:
    return Decimal(value).quantize(CENT, rounding=ROUND_HALF_UP)


@cache
def listed_price(text: str) -> Decimal:
    return money(text)


# ------------------------------------------------------------------------- dice


class Dice:
    """Deterministic choices drawn from a hash of its parts: the same parts give the same answers.

    Rows are built from `Dice(seed, experience_id, order_index)`, which is what lets a file of a
    million rows be rendered twice (length, then body) without being stored.
    """

    def __init__(self, *parts: object) -> None:
        self._material = "\x1f".join(map(str, parts)).encode()
        self._block_number = 0
        self._block = b""
        self._used = 0

    def _refill(self) -> None:
        self._block = hashlib.blake2b(self._material + struct.pack(">I", self._block_number), digest_size=64).digest()
        self._block_number += 1
        self._used = 0

    def _take(self, count: int) -> bytes:
        if self._used + count > len(self._block):
            self._refill()
        self._used += count
        return self._block[self._used - count : self._used]

    def _byte(self) -> int:
        if self._used >= len(self._block):
            self._refill()
        self._used += 1
        return self._block[self._used - 1]

    def fraction(self) -> float:
        return int.from_bytes(self._take(4), "big") / 2**32

    def integer(self, low: int, high: int) -> int:
        """A small whole number; one byte each (synthetic data tolerates the slight modulo bias)."""
        return low + self._byte() % (high - low + 1)

    def choice(self, options: tuple | list) -> Any:
        return options[self._byte() % len(options)]

    def chance(self, probability: float) -> bool:
        return self._byte() < probability * 256

    def uuid4(self) -> str:
        return str(uuid.UUID(bytes=self._take(16), version=4))


# ------------------------------------------------------------------ identifiers

ID_FORMATS = ("integer", "zero_padded", "prefixed", "alphanumeric", "uuid")
ID_SPACE = 36**10
ID_MULTIPLIER = 25_214_903_917  # coprime with 36, so n -> (n * M + salt) mod 36**10 is a bijection
BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class IdFamily:
    """How one kind of identifier is spelled in each format; its numbers `n` are unique in the family."""

    integer_base: int  # integer: base + n, the sandbox's original spelling
    width: int  # zero_padded: n with leading zeros to this width
    prefix: str  # prefixed: this prefix and ten letters and digits


ID_FAMILIES = {
    "order": IdFamily(5_500_000_000_000, 14, "ord_"),
    "line_item": IdFamily(13_000_000_000_000, 16, "li_"),
    "order_number": IdFamily(1001, 12, "EU-"),
    "visitor": IdFamily(10**12, 16, "vis_"),
    "sku": IdFamily(0, 10, "SKU-"),
    "discount_code": IdFamily(100_000, 8, "PROMO-"),
}


def base36(number: int, width: int = 10) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 36)
        digits.append(BASE36[digit])
    return "".join(reversed(digits))


class IdFormat:
    """Spells identifier number `n` of a family in one format, the same way every time.

    Prefixed and alphanumeric ids are a seeded bijection of `n`, so they look random yet never
    collide; UUIDs are a hash of (seed, family, n).
    """

    def __init__(self, seed: int, name: str) -> None:
        if name not in ID_FORMATS:
            raise ValueError(f"unknown id format {name!r}; known: {', '.join(ID_FORMATS)}")
        self.seed = seed
        self.name = name
        self._salts = {
            family: int.from_bytes(Dice(seed, "id-salt", family)._take(8), "big") % ID_SPACE for family in ID_FAMILIES
        }

    def __call__(self, family: str, number: int) -> str:
        spelling = ID_FAMILIES[family]
        if self.name == "integer":
            return str(spelling.integer_base + number)
        if self.name == "zero_padded":
            return f"{number:0{spelling.width}d}"
        if self.name == "uuid":
            digest = hashlib.blake2b(f"{self.seed}|{family}|{number}".encode(), digest_size=16).digest()
            return str(uuid.UUID(bytes=digest, version=4))
        scrambled = base36((number * ID_MULTIPLIER + self._salts[family]) % ID_SPACE)
        return spelling.prefix + scrambled if self.name == "prefixed" else scrambled


# ------------------------------------------------------------------ experiences


@dataclass(frozen=True)
class Variation:
    id: str
    name: str
    is_control: bool
    order: int
    percentage: float


@dataclass(frozen=True)
class LifecycleAction:
    id: str
    action: str  # start | pause | end | reset
    at: dt.datetime


@dataclass
class Experience:
    """One experience. `data_span` is fixed at creation so later status changes never move rows."""

    id: str
    ordinal: int
    name: str
    type: str
    description: str | None
    status: str
    created_at: dt.datetime
    last_update: dt.datetime
    started_at: dt.datetime | None
    paused_at: dt.datetime | None
    ended_at: dt.datetime | None
    variations: list[Variation]
    actions: list[LifecycleAction]
    data_span: tuple[dt.datetime, dt.datetime] | None
    order_count: int
    awkward: bool

    def lifetime(self, now: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
        """The range exports are clamped to: start through end/pause or now; None if never started."""
        if self.started_at is None:
            return None
        if self.status == "ended" and self.ended_at:
            return self.started_at, self.ended_at
        if self.status == "paused" and self.paused_at:
            return self.started_at, self.paused_at
        return self.started_at, max(now, self.started_at)


@dataclass(frozen=True)
class SeededExperience:
    name: str
    type: str
    description: str | None
    status: str
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    stopped_at: dt.datetime | None = None  # ended or paused at, by status


def _at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


SEEDED_EXPERIENCES = (
    SeededExperience(
        "Free shipping threshold, $50 vs. $75",
        "shipping",
        "Ended after two weeks: threshold test.",
        "ended",
        _at("2023-12-28T16:20:00"),
        _at("2024-01-03T09:00:00"),
        _at("2024-01-15T12:00:00"),
    ),
    SeededExperience(
        'Price test "Premium" tier, +10%',
        "pricing",
        "Paused while the catalogue is repriced.",
        "paused",
        _at("2024-01-05T11:00:00"),
        _at("2024-01-10T00:00:00"),
        _at("2024-02-12T18:30:00"),
    ),
    SeededExperience(
        'Homepage hero: "Été" collection, crème brûlée',
        "content/onsiteEdits",
        None,
        "started",
        _at("2023-12-20T08:15:00"),
        _at("2024-01-01T00:00:00"),
    ),
    SeededExperience(
        'Checkout upsell, "Add a gift note" block',
        "checkoutBlock",
        "Upsell block at checkout.",
        "started",
        _at("2024-01-18T10:00:00"),
        _at("2024-01-20T15:45:00"),
    ),
    SeededExperience(
        "抹茶 bundle — Größe & Preis (EU)",
        "pricing",
        "Bundle pricing, EU stores; ünïcödé.",
        "started",
        _at("2024-02-01T07:30:00"),
        _at("2024-02-05T08:00:00"),
    ),
    SeededExperience(
        'Draft: cart drawer, "sticky" CTA', "content/onsiteEdits", None, "pending", _at("2024-02-25T13:05:00")
    ),
)

MODULE_OF_TYPE = {
    "pricing": "pricing",
    "shipping": "shipping",
    "checkoutBlock": "checkout",
    "postPurchase": "postPurchase",
    "onsiteUpsell": "merchandising",
}
TEST_TYPE_FLAGS = (
    "hasTestPricing",
    "hasTestShipping",
    "hasTestCampaign",
    "hasTestContent",
    "hasTestContentUrl",
    "hasTestContentAdvanced",
    "hasTestContentOnsite",
    "hasTestContentTemplate",
    "hasTestContentTheme",
    "hasTestOnsiteInjections",
    "hasTestCheckoutBlocks",
    "hasTestPostPurchase",
    "hasTestOnsiteUpsell",
)
FLAGS_OF_TYPE = {
    "pricing": ("hasTestPricing",),
    "shipping": ("hasTestShipping",),
    "content/onsiteEdits": ("hasTestContent", "hasTestContentOnsite"),
    "checkoutBlock": ("hasTestCheckoutBlocks",),
}
HISTORY_ACTION = {
    "start": "startExperience",
    "pause": "pauseExperience",
    "end": "endExperience",
    "reset": "resetExperience",
}


def module_of(experience_type: str) -> str:
    return "content" if experience_type.startswith("content/") else MODULE_OF_TYPE.get(experience_type, "content")


class ExperienceJson:
    """The vendor's JSON shapes of an experience: list item, detail, and the tap's record."""

    def __init__(self, seed: int, organization_id: str) -> None:
        self.seed = seed
        self.organization_id = organization_id

    def common(self, exp: Experience) -> dict[str, Any]:
        return {
            "id": exp.id,
            "name": exp.name,
            "description": exp.description,
            "organizationId": self.organization_id,
            "category": "experiment",
            "type": exp.type,
            "status": exp.status,
            "isPreview": exp.status == "pending",
            "requiresLink": False,
            "linkBaseUrl": None,
            "previewPath": "/",
            "productVariantCount": 4 if exp.type == "pricing" else 0,
            "createdAtTs": to_ms(exp.created_at),
            "lastUpdateTs": to_ms(exp.last_update),
            "startedAtTs": to_ms(exp.started_at),
            "pausedAtTs": to_ms(exp.paused_at),
            "endedAtTs": to_ms(exp.ended_at),
            "archivedAtTs": None,
            "isDeleted": False,
            "isExternal": False,
            "audience": None,
            "currency": {"code": "USD", "symbol": "$"},
            "testTypes": {flag: flag in FLAGS_OF_TYPE.get(exp.type, ()) for flag in TEST_TYPE_FLAGS},
            "experiencePageTargeting": [],
            "experienceProductTargeting": [],
            "experienceAnalysis": {"analyticsViewType": "test_orders_only"},
        }

    def list_item(self, exp: Experience) -> dict[str, Any]:
        return {
            **self.common(exp),
            "hasSchedule": False,
            "experienceActions": [self._action(exp, action) for action in exp.actions],
            "history": [self._history(exp, action) for action in exp.actions],
            "variations": [self._variation(exp, variation) for variation in exp.variations],
        }

    def detail(self, exp: Experience, with_change_log: bool = False) -> dict[str, Any]:
        detail = {
            **self.common(exp),
            "experienceActions": [
                {**self._action(exp, action), "performedBy": "merchandising@example.com"} for action in exp.actions
            ],
            "variations": [
                {**self._variation(exp, variation), "onsiteEdits": [], "redirects": []} for variation in exp.variations
            ],
            "experienceCustomMetrics": [],
            "experienceIntegrations": [],
            "experienceKeyMetrics": [],
            "shippingTestMethodDefinitions": [],
            "shippingCarrierProvider": "intelligems",
        }
        if with_change_log:
            detail["changeLog"] = []
        return detail

    @staticmethod
    def record(list_item: dict[str, Any]) -> dict[str, Any]:
        """The tap's record: top-level keys in snake_case, `*Ts` millis as ISO strings named without `_ts`.

        Nested objects are kept as the API sends them (camelCase keys, millisecond numbers).
        """
        record: dict[str, Any] = {}
        for key, value in list_item.items():
            if key.endswith("Ts"):
                record[snake_case(key[:-2])] = None if value is None else iso_record(from_ms(value))
            else:
                record[snake_case(key)] = value
        return record

    @staticmethod
    def _action(exp: Experience, action: LifecycleAction) -> dict[str, Any]:
        return {"id": action.id, "experienceId": exp.id, "action": action.action, "actionTs": to_ms(action.at)}

    def _history(self, exp: Experience, action: LifecycleAction) -> dict[str, Any]:
        return {
            "id": Dice(self.seed, "history", action.id).uuid4(),
            "action": HISTORY_ACTION[action.action],
            "createdAtTs": to_ms(action.at),
            "lastUpdateTs": to_ms(action.at),
            "experienceId": exp.id,
            "source": "internal",
            "userId": Dice(self.seed, "user").uuid4(),
            "user": None,
        }

    @staticmethod
    def _variation(exp: Experience, variation: Variation) -> dict[str, Any]:
        return {
            "id": variation.id,
            "experienceId": exp.id,
            "name": variation.name,
            "percentage": variation.percentage,
            "isControl": variation.is_control,
            "order": variation.order,
            "functionSyncError": False,
        }


def snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


# -------------------------------------------------------------------- the orders


@dataclass(frozen=True)
class Product:
    product_id: str
    title: str
    variants: tuple[tuple[str, str, str], ...]  # (variant_id, variant_title, price)
    in_experiment: bool


PRODUCTS = (
    Product(
        "8012345670001",
        "Crème Brûlée Candle, 8 oz",
        (("45012345670011", "Vanilla", "24.00"), ("45012345670012", "Café au lait", "26.50")),
        True,
    ),
    Product(
        "8012345670002",
        'Matcha Latte Kit "Ceremonial" — 抹茶',
        (("45012345670021", "30 g", "18.00"), ("45012345670022", "100 g", "42.00")),
        True,
    ),
    Product(
        "8012345670003",
        "Smörgåsbord Serving Board",
        (("45012345670031", "Small", "35.00"), ("45012345670032", 'Large, walnut 18"', "59.00")),
        True,
    ),
    Product("8012345670004", "Ζεστό Τσάι Sampler", (("45012345670041", "Default Title", "15.00"),), False),
    Product(
        "8012345670005",
        "Plain Tee",
        (("45012345670051", "S", "20.00"), ("45012345670052", "M", "20.00"), ("45012345670053", "L", "22.00")),
        False,
    ),
    Product(
        "8012345670006", "Gift Card", (("45012345670061", "$25", "25.00"), ("45012345670062", "$50", "50.00")), False
    ),
)
PRICE_TEST_UPLIFT = Decimal("1.10")  # the non-control variation of a pricing test charges 10% more
WELCOME_DISCOUNT = Decimal("0.10")
ZERO = Decimal("0.00")
COUNTRIES = ("US", "US", "US", "US", "CA", "GB", "DE", "FR", "JP", None)
CURRENCY_OF_COUNTRY = {"CA": "CAD", "GB": "GBP", "DE": "EUR", "FR": "EUR"}
TAX_RATE_OF_COUNTRY = {
    country: Decimal(rate)
    for country, rate in {"US": "0.08", "CA": "0.13", "GB": "0.20", "DE": "0.19", "FR": "0.20", "JP": "0.10"}.items()
}
CHANNELS = ("Direct", "Organic Search", "Paid Social", "Email", "SMS", "Referral")
LANDING_PAGES = (
    "/",
    "/products/creme-brulee-candle",
    "/collections/été-2024",
    '/products/matcha-latte-kit?utm_source=ig,email&utm_campaign="spring"',
)
SHORT_NOTES = ('Leave at the back door, please.\nRing "twice".', "Cadeau — merci!", "Gift for 祖母, no invoice")
GIFT_PROPERTIES = (
    {"gift_message": 'Happy birthday,\nlove "Mum" ♥'},
    {"engraving": "J. & K., 2024"},
    {"_ig_variation": "B", "bundle": ["matcha", "whisk"]},
)
EXCLUSION_REASONS = (
    "Visitor assigned to multiple variations",
    "Refunded before analysis, full amount",
    'Currency mismatch (CAD ≠ USD), "fx" missing',
    "Order placed outside test targeting",
)


def long_note() -> str:
    """A ~100 KB order note with commas, quotes, newlines and non-ASCII: the field that breaks readers."""
    sentence = 'Gift wrap, please — "fragile"; ünïcödé ✓ 包装\n'
    return (sentence * (LONG_NOTE_CHARS // len(sentence) + 1))[:LONG_NOTE_CHARS]


LONG_NOTE = long_note()


@dataclass(frozen=True, slots=True)
class LineItem:
    line_item_id: str
    number: int  # 1, 2, 3 within its order
    product: Product
    variant_id: str
    variant_title: str
    quantity: int
    price: Decimal
    compare_at_price: Decimal | None
    discount: Decimal
    line_total: Decimal
    properties: dict | None
    sku: str | None  # gift cards have none


@dataclass(frozen=True, slots=True)
class Order:
    """One synthetic order; every export type renders its rows from it. Money is in `currency`."""

    index: int  # the order's slot in its experience
    order_id: str
    order_name: str  # "#" and the order number
    created_at: dt.datetime
    variation: Variation
    visitor_id: str
    device_type: str
    is_new_visitor: bool
    country_code: str | None
    currency: str
    source_channel: str
    landing_page: str
    items: tuple[LineItem, ...]
    subtotal: Decimal
    discount: Decimal | None  # None: no discount code, an empty cell
    discount_code: str | None
    shipping: Decimal
    tax: Decimal | None  # None: unknown country, so no tax computed
    revenue: Decimal  # subtotal - discount + shipping, before tax: what Intelligems analyses
    note: str | None
    excluded_reason: str | None
    synced_after_minutes: int

    @property
    def intelligems_total(self) -> Decimal | None:
        return None if self.excluded_reason else self.revenue


@dataclass(frozen=True)
class OrderSlot:
    """Where an order sits: its experience-wide index, its time, and whether it has a single item."""

    index: int
    created_at: dt.datetime
    single_item: bool = False


class OrderFactory:
    """Builds an order from (seed, experience, slot): a pure function, so rows are never stored."""

    def __init__(self, seed: int, ids: IdFormat) -> None:
        self.seed = seed
        self.ids = ids

    def order(self, exp: Experience, slot: OrderSlot) -> Order:
        dice = Dice(self.seed, "order", exp.id, slot.index)
        variation = dice.choice(exp.variations)
        serial = exp.ordinal * 10**9 + slot.index
        code_number = dice.choice((10, None, None, None))
        discount_code = None if code_number is None else self.ids("discount_code", code_number)
        item_count = 1 if slot.single_item else dice.integer(1, 3)
        items = tuple(
            self._line_item(exp, variation, serial, number, discount_code, dice) for number in range(1, item_count + 1)
        )
        subtotal = money(sum(item.price * item.quantity for item in items))
        discount = money(sum(item.discount for item in items)) if discount_code else None
        shipping = listed_price(dice.choice(("0.00", "4.95", "9.95")))
        country_code = dice.choice(COUNTRIES)
        tax_rate = TAX_RATE_OF_COUNTRY.get(country_code or "")
        return Order(
            index=slot.index,
            order_id=self.ids("order", serial),
            order_name="#" + self.ids("order_number", serial),
            created_at=slot.created_at,
            variation=variation,
            visitor_id=self.ids("visitor", uuid.UUID(dice.uuid4()).int % 10**12),
            device_type="mobile" if dice.chance(0.6) else "desktop",
            is_new_visitor=dice.chance(0.55),
            country_code=country_code,
            currency=CURRENCY_OF_COUNTRY.get(country_code or "", "USD"),
            source_channel=dice.choice(CHANNELS),
            landing_page=dice.choice(LANDING_PAGES),
            items=items,
            subtotal=subtotal,
            discount=discount,
            discount_code=discount_code,
            shipping=shipping,
            tax=None if tax_rate is None else money((subtotal - (discount or ZERO)) * tax_rate),
            revenue=subtotal - (discount or ZERO) + shipping,
            note=self._note(exp, slot, dice),
            excluded_reason=dice.choice(EXCLUSION_REASONS) if dice.chance(0.12) else None,
            synced_after_minutes=dice.integer(1, 120),
        )

    @staticmethod
    def _note(exp: Experience, slot: OrderSlot, dice: Dice) -> str | None:
        if exp.awkward and slot.index == LONG_NOTE_INDEX:
            return LONG_NOTE
        return dice.choice(SHORT_NOTES) if dice.chance(0.25) else None

    def _line_item(
        self, exp: Experience, variation: Variation, serial: int, number: int, discount_code: str | None, dice: Dice
    ) -> LineItem:
        product = dice.choice(PRODUCTS)
        variant_id, variant_title, list_price = dice.choice(product.variants)
        repriced = exp.type == "pricing" and product.in_experiment and not variation.is_control
        price = money(listed_price(list_price) * PRICE_TEST_UPLIFT) if repriced else listed_price(list_price)
        quantity = dice.integer(1, 3)
        discount = money(price * quantity * WELCOME_DISCOUNT) if discount_code else ZERO
        return LineItem(
            line_item_id=self.ids("line_item", serial * 10 + number),
            number=number,
            product=product,
            variant_id=variant_id,
            variant_title=variant_title,
            quantity=quantity,
            price=price,
            compare_at_price=listed_price(list_price) if repriced else None,
            discount=discount,
            line_total=price * quantity - discount,
            properties=dice.choice(GIFT_PROPERTIES) if dice.chance(0.2) else None,
            sku=None if product.title == "Gift Card" else self.ids("sku", int(variant_id) % 10**6),
        )


# ------------------------------------------------------------------ export tables


@dataclass(frozen=True)
class CsvColumn:
    """One column the tap guessed: its record key, its kind and how a row gives its typed value."""

    key: str
    kind: str  # string | integer | number | boolean | datetime | json
    value: Callable[[Any], Any]


@dataclass(frozen=True)
class ExportTable:
    """One export type: its guessed columns, the extra column of fault `new_column`, and rows per order.

    `position(row)` numbers a row within its experience (order index, plus the item number for line
    items): messy cells and extra columns' values are chosen from it, so they never depend on the window.
    """

    export_type: str
    columns: tuple[CsvColumn, ...]
    new_column: CsvColumn
    new_column_after: str
    rows_of: Callable[[Order], Iterable[Any]]
    position: Callable[[Any], int]


def _order_columns() -> tuple[CsvColumn, ...]:
    return (
        CsvColumn("order_id", "string", lambda o: o.order_id),
        CsvColumn("order_name", "string", lambda o: o.order_name),
        CsvColumn("created_at", "datetime", lambda o: o.created_at),
        CsvColumn("variation_id", "string", lambda o: o.variation.id),
        CsvColumn("variation_name", "string", lambda o: o.variation.name),
        CsvColumn("is_control", "boolean", lambda o: o.variation.is_control),
        CsvColumn("visitor_id", "string", lambda o: o.visitor_id),
        CsvColumn("device_type", "string", lambda o: o.device_type),
        CsvColumn("is_new_visitor", "boolean", lambda o: o.is_new_visitor),
        CsvColumn("country_code", "string", lambda o: o.country_code),
        CsvColumn("source_channel", "string", lambda o: o.source_channel),
        CsvColumn("landing_page", "string", lambda o: o.landing_page),
        CsvColumn("currency", "string", lambda o: o.currency),
        CsvColumn("subtotal", "number", lambda o: o.subtotal),
        CsvColumn("discount", "number", lambda o: o.discount),
        CsvColumn("discount_code", "string", lambda o: o.discount_code),
        CsvColumn("shipping", "number", lambda o: o.shipping),
        CsvColumn("tax", "number", lambda o: o.tax),
        CsvColumn("revenue", "number", lambda o: o.revenue),
        CsvColumn("items_count", "integer", lambda o: len(o.items)),
        CsvColumn("note", "string", lambda o: o.note),
    )


def _line_item_columns() -> tuple[CsvColumn, ...]:
    # A line item row is the pair (order, item).
    return (
        CsvColumn("line_item_id", "string", lambda r: r[1].line_item_id),
        CsvColumn("order_id", "string", lambda r: r[0].order_id),
        CsvColumn("created_at", "datetime", lambda r: r[0].created_at),
        CsvColumn("variation_id", "string", lambda r: r[0].variation.id),
        CsvColumn("variation_name", "string", lambda r: r[0].variation.name),
        CsvColumn("product_id", "string", lambda r: r[1].product.product_id),
        CsvColumn("product_title", "string", lambda r: r[1].product.title),
        CsvColumn("variant_id", "string", lambda r: r[1].variant_id),
        CsvColumn("variant_title", "string", lambda r: r[1].variant_title),
        CsvColumn("sku", "string", lambda r: r[1].sku),
        CsvColumn("quantity", "integer", lambda r: r[1].quantity),
        CsvColumn("price", "number", lambda r: r[1].price),
        CsvColumn("compare_at_price", "number", lambda r: r[1].compare_at_price),
        CsvColumn("discount", "number", lambda r: r[1].discount),
        CsvColumn("line_total", "number", lambda r: r[1].line_total),
        CsvColumn("currency", "string", lambda r: r[0].currency),
        CsvColumn("is_test_product", "boolean", lambda r: r[1].product.in_experiment),
        CsvColumn("properties", "json", lambda r: r[1].properties),
    )


def _reconciliation_columns() -> tuple[CsvColumn, ...]:
    return (
        CsvColumn("order_id", "string", lambda o: o.order_id),
        CsvColumn("order_name", "string", lambda o: o.order_name),
        CsvColumn("created_at", "datetime", lambda o: o.created_at),
        CsvColumn("variation_id", "string", lambda o: o.variation.id),
        CsvColumn("variation_name", "string", lambda o: o.variation.name),
        CsvColumn("currency", "string", lambda o: o.currency),
        CsvColumn("shopify_total", "number", lambda o: o.revenue),
        CsvColumn("intelligems_total", "number", lambda o: o.intelligems_total),
        CsvColumn("difference", "number", lambda o: money(o.revenue - (o.intelligems_total or 0))),
        CsvColumn("included_in_analysis", "boolean", lambda o: o.excluded_reason is None),
        CsvColumn("exclusion_reason", "string", lambda o: o.excluded_reason),
        CsvColumn(
            "analytics_synced_at", "datetime", lambda o: o.created_at + dt.timedelta(minutes=o.synced_after_minutes)
        ),
    )


EXPORT_TABLES: dict[str, ExportTable] = {
    "orders": ExportTable(
        "orders",
        _order_columns(),
        CsvColumn("utm_campaign", "string", lambda o: "spring_sale, v2"),
        "source_channel",
        lambda order: (order,),
        lambda order: order.index,
    ),
    "order_line_items": ExportTable(
        "order_line_items",
        _line_item_columns(),
        CsvColumn("vendor", "string", lambda r: "Maison Été"),
        "product_title",
        lambda order: ((order, item) for item in order.items),
        lambda row: row[0].index + row[1].number,
    ),
    "order_reconciliation": ExportTable(
        "order_reconciliation",
        _reconciliation_columns(),
        CsvColumn("payment_gateway", "string", lambda o: "shopify_payments"),
        "currency",
        lambda order: (order,),
        lambda order: order.index,
    ),
}


def _json_cell(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# How the export writes a typed value of each column kind; None is always an empty cell.
CELL_WRITERS: dict[str, Callable[[Any], str]] = {
    "string": str,
    "integer": str,
    "number": str,  # Decimals already carry two places
    "boolean": lambda value: "true" if value else "false",
    "datetime": iso_z,
    "json": _json_cell,
}


def cell_of(column: CsvColumn) -> Callable[[Any], str]:
    """How the export writes a guessed column's value (None is an empty cell)."""
    write = CELL_WRITERS[column.kind]

    def cell(row: Any) -> str:
        value = column.value(row)
        return "" if value is None else write(value)

    return cell


# --------------------------------------------------------------------- realities

# The realities are drawn from a hash of (seed, salt). This salt was picked so that the suite's seeds
# (7, 11, 23, 42) between them cover every id format but the original integers, every header style
# but snake_case, both readings of x-ratelimit-reset and both 429 bodies, with and without Retry-After.
REALITY_SALT = "reality-11501"
HEADER_STYLES = ("snake", "title", "upper", "sentence", "mixed")
SINGLE_STYLES = HEADER_STYLES[:-1]
ACRONYMS = {"id": "ID", "utm": "UTM", "sku": "SKU", "url": "URL"}
RESET_MEANINGS = ("bucket_full", "next_token")
TOO_MANY_REQUESTS_BODIES = ({"error": "Too Many Requests"}, {"message": "Too Many Requests"})

#: Columns a file may have that the tap does not know, with the cells they hold (invented: the
#: vendor publishes no columns). None of them is the `new_column` fault's column.
EXTRA_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "orders": {
        "utm_source": ("google", "facebook", "klaviyo", "", "tiktok"),
        "utm_medium": ("cpc", "email", "social", ""),
        "browser": ("Chrome 120", "Safari 17.2", "Firefox 121", ""),
        "customer_tags": ("vip, wholesale", "", "newsletter", 'b2b "net 30"'),
    },
    "order_line_items": {
        "product_type": ("Candles", "Tea", "Home", ""),
        "variant_options": ("Size: M / Color: Blue", "Default Title", ""),
        "fulfillment_status": ("fulfilled", "unfulfilled", "partial"),
        "vendor_name": ("Maison Été", "Tea & Co.", ""),
    },
    "order_reconciliation": {
        "financial_status": ("paid", "refunded", "partially_refunded"),
        "refunded_amount": ("0.00", "12.50", "", "007.10"),
        "order_source": ("web", "pos", "shopify_draft_order"),
        "attribution_window": ("24h", "7d", ""),
    },
}
#: Guessed columns a seed may leave out: never a row's identity (its key, `created_at`, the parent
#: `order_id`), a date, a column messy mode changes, nor `note`/`landing_page` (the long and quoted
#: fields that test readers).
OPTIONAL_COLUMNS = {
    "orders": ("device_type", "source_channel", "variation_name", "discount_code"),
    "order_line_items": ("sku", "compare_at_price", "variation_name", "currency"),
    "order_reconciliation": ("order_name", "variation_name", "currency", "difference"),
}


def spelled(key: str, style: str) -> str:
    """A header label in one style; `header_key` of it is `key` again (lower snake_case of the label)."""
    words = key.split("_")
    if style == "title":
        return " ".join(ACRONYMS.get(word, word.capitalize()) for word in words)
    if style == "upper":
        return " ".join(words).upper()
    if style == "sentence":
        return " ".join(words).capitalize() + " "  # the trailing space some exporters leave
    return key


def _sample(dice: Dice, options: tuple[str, ...], count: int) -> tuple[str, ...]:
    """`count` of `options`, kept in their order."""
    ranked = sorted(options, key=lambda _: dice.fraction())
    chosen = set(ranked[:count])
    return tuple(option for option in options if option in chosen)


@dataclass(frozen=True)
class Reality:
    """What the vendor leaves unpublished, as one seed has it (see the module docstring).

    `columns[export_type]` is the file's record keys in file order: the guessed columns that are
    present, and the extra ones, shuffled.
    """

    seed: int
    id_format: str
    header_style: str
    columns: dict[str, tuple[str, ...]]
    extra_columns: dict[str, tuple[str, ...]]
    missing_columns: dict[str, tuple[str, ...]]
    retry_after: bool  # a 429 also carries Retry-After (whole seconds)
    reset_means: str  # x-ratelimit-reset: when the bucket is full again, or when its next token comes
    too_many_requests: dict[str, str]  # the 429 body

    @classmethod
    def of_seed(cls, seed: int) -> Reality:
        dice = Dice(seed, REALITY_SALT)
        id_format, header_style = dice.choice(ID_FORMATS), dice.choice(HEADER_STYLES)
        columns, extras, missing = {}, {}, {}
        for export_type, table in EXPORT_TABLES.items():
            extras[export_type] = _sample(dice, tuple(EXTRA_COLUMNS[export_type]), dice.integer(1, 3))
            missing[export_type] = _sample(dice, OPTIONAL_COLUMNS[export_type], dice.integer(0, 2))
            present = [column.key for column in table.columns if column.key not in missing[export_type]]
            columns[export_type] = tuple(sorted([*present, *extras[export_type]], key=lambda _: dice.fraction()))
        return cls(
            seed=seed,
            id_format=id_format,
            header_style=header_style,
            columns=columns,
            extra_columns=extras,
            missing_columns=missing,
            retry_after=dice.chance(0.5),
            reset_means=dice.choice(RESET_MEANINGS),
            too_many_requests=dice.choice(TOO_MANY_REQUESTS_BODIES),
        )

    def without_extra_columns(self) -> Reality:
        """This reality with only guessed columns: for suites that compare records with the discovery
        catalog (the SDK's standard tests), which an unknown column would fail by design."""
        columns = {
            export_type: tuple(key for key in keys if key not in self.extra_columns[export_type])
            for export_type, keys in self.columns.items()
        }
        return dataclasses.replace(
            self, columns=columns, extra_columns={export_type: () for export_type in self.extra_columns}
        )

    def label(self, key: str) -> str:
        """How this seed's files spell the header of the column with record key `key`."""
        style = self.header_style
        if style == "mixed":
            style = Dice(self.seed, "spelling", key).choice(SINGLE_STYLES)
        return spelled(key, style)


# ------------------------------------------------------------------ messy cells

MESSY_EVERY = 4  # each kind of mess is in every 4th row, each kind on other rows
MESSY_NUMBER = "N/A"
MESSY_JSON = "gift wrap: yes, ribbon {red}"
MESSY_DATETIME_FORMAT = "%m/%d/%Y %I:%M %p"  # "01/15/2024 10:30 AM"


@dataclass(frozen=True)
class Mess:
    """What messy-cells mode does to one export type's files (a kind the type lacks is None)."""

    number: str  # "N/A" in some rows
    boolean: str  # "yes"/"no" in some rows
    json: str | None  # text that is not JSON in some rows
    datetime: str | None  # another date-time format in some rows; never `created_at`
    renamed: tuple[str, str]  # (guessed key, the key of the label the file has instead)


MESSES = {
    "orders": Mess("tax", "is_new_visitor", None, None, ("country_code", "ship_to_country")),
    "order_line_items": Mess("price", "is_test_product", "properties", None, ("variant_title", "variant_name")),
    "order_reconciliation": Mess(
        "intelligems_total",
        "included_in_analysis",
        None,
        "analytics_synced_at",
        ("exclusion_reason", "reason_excluded"),
    ),
}


def _messy_cell(column: CsvColumn, mess: Mess) -> Callable[[Any], str] | None:
    """The messy writer of a column, if messy mode changes it: returns the text for the messy rows."""
    key = column.key
    if key == mess.number:
        return lambda value: MESSY_NUMBER
    if key == mess.boolean:
        return lambda value: "" if value is None else ("yes" if value else "no")
    if key == mess.json:
        return lambda value: MESSY_JSON
    if key == mess.datetime:
        return lambda value: "" if value is None else value.strftime(MESSY_DATETIME_FORMAT)
    return None


def _messy_shift(column: CsvColumn, mess: Mess) -> int:
    """Which rows (position % MESSY_EVERY) hold this column's mess: other rows for each kind."""
    return {mess.number: 1, mess.boolean: 2}.get(column.key, 3)


@dataclass(frozen=True)
class FileColumn:
    """One column of a file as written: record key, header label, a row's cell and its typed value."""

    key: str
    label: str
    cell: Callable[[Any], str]
    typed: Callable[[Any], Any]


def _sometimes_messy(table: ExportTable, column: CsvColumn, mess: Mess) -> Callable[[Any], str]:
    """A column's cells with its mess in every MESSY_EVERY-th row; as usual elsewhere."""
    plain, messy_text = cell_of(column), _messy_cell(column, mess)
    if messy_text is None:
        return plain
    shift, position, value = _messy_shift(column, mess), table.position, column.value

    def cell(row: Any) -> str:
        return messy_text(value(row)) if position(row) % MESSY_EVERY == shift else plain(row)

    return cell


def guessed_column(reality: Reality, table: ExportTable, column: CsvColumn, messy: bool) -> FileColumn:
    key, cell = column.key, cell_of(column)
    if messy:
        mess = MESSES[table.export_type]
        cell = _sometimes_messy(table, column, mess)
        key = mess.renamed[1] if key == mess.renamed[0] else key
    return FileColumn(key, reality.label(key), cell, lambda row: record_value(column.value(row)))


def extra_column(reality: Reality, table: ExportTable, key: str) -> FileColumn:
    values = EXTRA_COLUMNS[table.export_type][key]
    offset = Dice(reality.seed, "extra", key).integer(0, 255)
    position = table.position

    def cell(row: Any) -> str:
        return values[(position(row) * 7 + offset) % len(values)]

    return FileColumn(key, reality.label(key), cell, lambda row: cell(row) or None)


def file_columns(reality: Reality, table: ExportTable, *, messy: bool, new_column: bool) -> tuple[FileColumn, ...]:
    """The columns of one export type's files, in file order, as this reality writes them."""
    guessed = {column.key: column for column in table.columns}
    columns = [
        guessed_column(reality, table, guessed[key], messy) if key in guessed else extra_column(reality, table, key)
        for key in reality.columns[table.export_type]
    ]
    if new_column:
        added = guessed_column(reality, table, table.new_column, messy=False)
        keys = [column.key for column in columns]
        at = keys.index(table.new_column_after) + 1 if table.new_column_after in keys else len(columns)
        columns.insert(at, added)
    return tuple(columns)


# ------------------------------------------------------------------------ slots


@dataclass(frozen=True)
class AddedBatch:
    """Rows added by `add_rows`: `count` single-item orders evenly spread over [start, end)."""

    export_type: str
    first_index: int
    count: int
    start: dt.datetime
    end: dt.datetime

    def slot(self, offset: int) -> OrderSlot:
        step = (self.end - self.start) / self.count
        return OrderSlot(self.first_index + offset, whole_second(self.start + step * (offset + 0.5)), True)


def _slots_in(
    count: int, slot_at: Callable[[int], OrderSlot], start: dt.datetime, end: dt.datetime
) -> Iterator[OrderSlot]:
    """Slots with `start <= created_at < end`, found by bisection: slot times never decrease."""
    first = bisect.bisect_left(range(count), start, key=lambda i: slot_at(i).created_at)
    for index in range(first, count):
        slot = slot_at(index)
        if slot.created_at >= end:
            return
        yield slot


class SlotPlan:
    """Where every order of an experience sits in time: the seeded ones and the added batches."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def base_slot(self, exp: Experience, index: int) -> OrderSlot:
        assert exp.data_span is not None
        span_start, span_end = exp.data_span
        width = (span_end - span_start) / exp.order_count
        jitter = 0.05 + 0.9 * Dice(self.seed, "slot", exp.id, index).fraction()
        return OrderSlot(index, whole_second(span_start + width * (index + jitter)))

    def slots(
        self, exp: Experience, batches: list[AddedBatch], start: dt.datetime, end: dt.datetime
    ) -> Iterator[OrderSlot]:
        """The experience's slots in [start, end), in time order (base and added rows merged)."""
        sources: list[Iterator[OrderSlot]] = []
        if exp.data_span is not None and exp.order_count > 0:
            sources.append(_slots_in(exp.order_count, lambda i: self.base_slot(exp, i), start, end))
        sources += [_slots_in(batch.count, batch.slot, start, end) for batch in batches]
        return heapq.merge(*sources, key=lambda slot: slot.created_at)


# ------------------------------------------------------------------------ files


@dataclass(frozen=True)
class ExportFile:
    """An export's S3 object: what it holds is fixed when the export is created."""

    key: str
    experience: Experience
    table: ExportTable
    columns: tuple[FileColumn, ...]  # as the file writes them, the fault's new column included
    start: dt.datetime
    end: dt.datetime
    visible_before: dt.datetime
    batches: tuple[AddedBatch, ...]
    content_faults: frozenset[str]
    created_at: dt.datetime


@dataclass(frozen=True)
class ExportCall:
    """One answered export request, for tests: what was asked and the clamped range served."""

    experience_id: str
    export_type: str
    requested_start: dt.datetime | None
    requested_end: dt.datetime | None
    start: dt.datetime
    end: dt.datetime
    filters: dict | None
    url: str | None
    at: float


class CsvRenderer:
    """Renders an ExportFile as byte chunks, with its content faults, from the row generators."""

    def __init__(self, orders: OrderFactory, plan: SlotPlan) -> None:
        self.orders = orders
        self.plan = plan

    def rows(self, export: ExportFile) -> Iterator[Any]:
        for slot in self.plan.slots(export.experience, list(export.batches), export.start, export.end):
            if slot.created_at >= export.visible_before:
                continue
            yield from export.table.rows_of(self.orders.order(export.experience, slot))

    def chunks(self, export: ExportFile) -> Iterator[bytes]:
        faults = export.content_faults
        if "empty_file" in faults:
            return
        columns = export.columns
        writer = CsvLineWriter()
        pending = bytearray(UTF8_BOM + writer.line([column.label for column in columns]))
        cut = False
        if "header_only" not in faults:
            for number, row in enumerate(self.rows(export), start=1):
                line, cut = self._faulty_line(writer, [column.cell(row) for column in columns], number, faults)
                pending += line
                if cut:
                    break
                if len(pending) >= CHUNK_BYTES:
                    yield bytes(pending)
                    pending.clear()
            if "download_cut_quote" in faults and not cut:
                pending += b'"5500'  # no row had a quoted field: the cut falls in a last, unfinished row
        yield bytes(pending)

    @staticmethod
    def _faulty_line(
        writer: CsvLineWriter, cells: list[str], number: int, faults: frozenset[str]
    ) -> tuple[bytes, bool]:
        """The row as the faulty exporter wrote it, and whether the file stops inside it."""
        if not faults:
            return writer.line(cells), False
        first_row = number == 1
        if "malformed_row" in faults and first_row:
            cells = [*cells, "unexpected, extra field"]
        if "bad_utf8" in faults and first_row:
            cells = [cells[0], cells[1] + BAD_UTF8_MARKER, *cells[2:]]
        line = writer.line(cells).replace(BAD_UTF8_MARKER.encode(), b" caf\xe9")  # Latin-1 "cafe" in a UTF-8 file
        if "download_cut_quote" in faults:
            opening = line.find(b'"')  # the first quote of a CSV line always opens a quoted field
            if opening >= 0:
                return line[: inside_quotes_cut(line, opening)], True
        return line, False


class CsvLineWriter:
    """One CSV line at a time (LF endings, minimal quoting), reusing one buffer."""

    def __init__(self) -> None:
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, lineterminator="\n")

    def line(self, cells: list[str]) -> bytes:
        self._buffer.seek(0)
        self._buffer.truncate()
        self._writer.writerow(cells)
        return self._buffer.getvalue().encode("utf-8")


# --------------------------------------------------------------------- helpers


def error_tree(problems: list[tuple[list[str], str]]) -> dict[str, Any]:
    """Problems (field path, message) in the vendor's 400 shape: zod's `treeifyError` tree."""
    tree: dict[str, Any] = {"errors": [], "properties": {}}
    for path, message in problems:
        node = tree
        for part in path:
            if part.isdigit():
                items = node.setdefault("items", [])
                while len(items) <= int(part):
                    items.append({"errors": []})
                node = items[int(part)]
            else:
                node = node.setdefault("properties", {}).setdefault(part, {"errors": []})
        node["errors"].append(message)
    return tree


REQUIRED_MESSAGE = re.compile(r"^'([^']+)' is a required property$")


def spec_problems(messages: list[str]) -> list[tuple[list[str], str]]:
    """SpecValidator's "a/b: message" strings as (path, message); a missing field is its own path."""
    problems = []
    for text in messages:
        where, _, message = text.partition(": ")
        path = [] if where == "(body)" else where.split("/")
        missing = REQUIRED_MESSAGE.match(message)
        if missing:
            path = [*path, missing.group(1)]
        problems.append((path, message))
    return problems


def s3_error(status: int, code: str, message: str, **details: str) -> Response:
    """An S3 error document, as S3 answers presigned-URL problems."""
    request_id = uuid.uuid4().hex[:16].upper()
    extra = "".join(f"<{name}>{xml_escape(str(value))}</{name}>" for name, value in details.items())
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{xml_escape(message)}'
        f"</Message>{extra}<RequestId>{request_id}</RequestId><HostId>sandbox/{request_id}</HostId></Error>"
    )
    return Response(body, status=status, mimetype="application/xml", headers={"x-amz-request-id": request_id})


# -------------------------------------------------------------------- results

#: What the timeseries `dt` looks like per granularity (the operation's description).
DT_FORMATS = {"hour": "%Y-%m-%d %H:%M:%S", "day": "%Y-%m-%d %H:%M:%S", "week": "%Y-%m-%d", "month": "%Y-%m-%d"}
#: The timeseries defaults (its request schema's `default`s).
DEFAULT_TIMESERIES_METRICS = ("conversion_rate", "net_revenue_per_visitor", "gross_profit_per_visitor")
PROFIT_SHARE = Decimal("0.4")  # gross profit per revenue, when the seed's store has COGS
VISITORS_PER_ORDER = 3  # each order brings this many visitors on top of a day's base traffic
#: Optional top-level fields of the overview answer a seed may leave out (the spec requires the others).
OVERVIEW_OPTIONAL = ("variations", "experienceId", "experienceName", "impact", "downsample")
#: Catalogue metrics beyond the documented list ("additional metric keys may be present"), one per seed.
EXTRA_CATALOGUE_METRICS = ("newsletter_signup_rate", "bundle_attach_rate", "quiz_completion_rate")
# Picked so the suite's seeds between them cover both readings of every field and every bucket zone.
RESULTS_REALITY_SALT = "results-reality-0"
BUCKET_OFFSETS_HOURS = (0, -5, 9)  # UTC, a US store, a Japanese store: the API does not say its zone


@dataclass(frozen=True)
class ResultsReality:
    """What the analytics spec leaves open about results, as one seed has it (see the module docstring)."""

    counts_as_objects: bool  # n_visitors, n_orders, net_revenue: `{"value": n}` or a bare number
    cogs_configured: bool  # profit metrics are numbers, or null (cogsConfigured false)
    overview_omits: tuple[str, ...]  # optional top-level overview fields left out
    cogs_fields: bool  # cogsConfigured/cogsCoveragePct on the overview (the spec: "only present when ...")
    absent_when_unknown: bool  # a statistic that cannot be computed is left out, rather than null
    bucket_offset_hours: int  # the time zone the analytics store cuts its days in
    extra_metric: str

    @classmethod
    def of_seed(cls, seed: int) -> ResultsReality:
        dice = Dice(seed, RESULTS_REALITY_SALT)
        return cls(
            counts_as_objects=dice.chance(0.5),
            cogs_configured=dice.chance(0.5),
            overview_omits=_sample(dice, OVERVIEW_OPTIONAL, dice.integer(0, 3)),
            cogs_fields=dice.chance(0.5),
            absent_when_unknown=dice.chance(0.5),
            bucket_offset_hours=dice.choice(BUCKET_OFFSETS_HOURS),
            extra_metric=dice.choice(EXTRA_CATALOGUE_METRICS),
        )


@dataclass
class Tally:
    """One variation's totals over a bucket (or a lifetime)."""

    visitors: int = 0
    orders: int = 0
    revenue: Decimal = ZERO
    carts: int = 0

    def add(self, other: Tally) -> None:
        self.visitors += other.visitors
        self.orders += other.orders
        self.revenue += other.revenue
        self.carts += other.carts


@dataclass(frozen=True)
class ResultsCall:
    """One answered results request, for tests: which endpoint, the body and the clamped range served."""

    endpoint: str  # resource | timeseries
    experience_id: str
    body: dict
    start: dt.datetime
    end: dt.datetime


def _ratio(numerator: Decimal | int, denominator: Decimal | int) -> float | None:
    return float(Decimal(numerator) / Decimal(denominator)) if denominator else None


def _normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


class ResultsAnalytics:
    """Experiment results computed from the experience's orders and a seeded daily traffic, so the
    overview, the timeseries and the export files tell one story.

    A variation's visitors on a day are a seeded base (40-90) while the experience has data, scaled by
    the share of the day the range covers, plus VISITORS_PER_ORDER per order; its orders and revenue are
    the orders the exports hold (analytics lag applies). Days are cut in the seed's time zone.
    """

    def __init__(self, emulator: IntelligemsEmulator) -> None:
        self.emulator = emulator

    def _offset(self) -> dt.timedelta:
        return dt.timedelta(hours=self.emulator.results_reality.bucket_offset_hours)

    def bucket_start(self, moment: dt.datetime, granularity: str) -> dt.datetime:
        """The UTC start of the bucket holding `moment`, buckets cut in the seed's zone."""
        local = (moment + self._offset()).replace(minute=0, second=0, microsecond=0)
        if granularity != "hour":
            local = local.replace(hour=0)
        if granularity == "week":
            local -= dt.timedelta(days=local.weekday())
        if granularity == "month":
            local = local.replace(day=1)
        return local - self._offset()

    def next_bucket(self, start: dt.datetime, granularity: str) -> dt.datetime:
        if granularity == "month":
            local = start + self._offset()
            year, month = (local.year + local.month // 12, local.month % 12 + 1)
            return local.replace(year=year, month=month) - self._offset()
        return (
            start
            + {"hour": dt.timedelta(hours=1), "day": dt.timedelta(days=1), "week": dt.timedelta(weeks=1)}[granularity]
        )

    def buckets(
        self, exp: Experience, start: dt.datetime, end: dt.datetime, granularity: str
    ) -> list[tuple[dt.datetime, dict[str, Tally]]]:
        """(bucket start, tally per variation id) of every bucket of [start, end) that saw a visitor."""
        orders = self._orders_by_bucket(exp, start, end, granularity)
        found = []
        bucket = self.bucket_start(start, granularity)
        while bucket < end:
            following = self.next_bucket(bucket, granularity)
            tallies = {
                variation.id: self._tally(exp, variation, max(bucket, start), min(following, end), orders, bucket)
                for variation in exp.variations
            }
            if any(tally.visitors for tally in tallies.values()):
                found.append((bucket, tallies))
            bucket = following
        return found

    def _orders_by_bucket(
        self, exp: Experience, start: dt.datetime, end: dt.datetime, granularity: str
    ) -> dict[tuple[dt.datetime, str], list[Order]]:
        emulator = self.emulator
        visible_before = min(end, emulator.now() - dt.timedelta(seconds=emulator.analytics_lag_seconds))
        with emulator._lock:
            batches = [batch for batch in emulator._batches.get(exp.id, []) if batch.export_type == "orders"]
        found: dict[tuple[dt.datetime, str], list[Order]] = {}
        for slot in emulator._plan.slots(exp, batches, start, visible_before):
            order = emulator._orders.order(exp, slot)
            found.setdefault((self.bucket_start(order.created_at, granularity), order.variation.id), []).append(order)
        return found

    def _tally(
        self,
        exp: Experience,
        variation: Variation,
        start: dt.datetime,
        end: dt.datetime,
        orders: dict[tuple[dt.datetime, str], list[Order]],
        bucket: dt.datetime,
    ) -> Tally:
        placed = orders.get((bucket, variation.id), [])
        return Tally(
            visitors=self._base_visitors(exp, variation, start, end) + VISITORS_PER_ORDER * len(placed),
            orders=len(placed),
            revenue=sum((order.revenue for order in placed), ZERO),
            carts=2 * len(placed),
        )

    def _base_visitors(self, exp: Experience, variation: Variation, start: dt.datetime, end: dt.datetime) -> int:
        """Seeded daily traffic while the experience has data, by the share of each UTC day covered."""
        if exp.data_span is None:
            return 0
        start, end = max(start, exp.data_span[0]), min(end, exp.data_span[1])
        visitors = 0.0
        day = start.replace(hour=0, minute=0, second=0, microsecond=0)
        while day < end:
            covered = (min(end, day + dt.timedelta(days=1)) - max(start, day)).total_seconds() / 86400
            base = Dice(self.emulator.seed, "visitors", exp.id, variation.id, day.date()).integer(40, 90)
            visitors += base * max(0.0, covered)
            day += dt.timedelta(days=1)
        return round(visitors)

    # ---------------------------------------------------------------- answers

    def timeseries(self, exp: Experience, window: tuple[dt.datetime, dt.datetime], body: dict) -> dict[str, Any]:
        granularity, mode = body.get("granularity", "day"), body.get("mode", "cumulative")
        metrics = body.get("metrics") or list(DEFAULT_TIMESERIES_METRICS)
        cogs = self.emulator.results_reality.cogs_configured
        segments: dict[str, dict[str, list]] = {variation.name: {"data": []} for variation in exp.variations}
        running = {variation.id: Tally() for variation in exp.variations}
        for bucket, tallies in self.buckets(exp, window[0], window[1], granularity):
            label = (bucket + self._offset()).strftime(DT_FORMATS[granularity])
            for variation in exp.variations:
                tally = tallies[variation.id]
                if mode == "cumulative":
                    running[variation.id].add(tally)
                    tally = dataclasses.replace(running[variation.id])
                point = {"dt": label, **{name: series_value(name, tally, cogs) for name in metrics}}
                segments[variation.name]["data"].append(point)
        answer: dict[str, Any] = {
            "currency": "USD",
            "granularity": granularity,
            "mode": mode,
            "experienceId": exp.id,
            "experienceName": exp.name,
            "variations": [{"id": v.id, "name": v.name, "isControl": v.is_control} for v in exp.variations],
            "segments": segments,
        }
        if "gross_profit_per_visitor" in metrics:  # "Only present when the request includes a profit metric"
            answer["cogsConfigured"] = cogs
            answer["cogsCoveragePct"] = 1.0 if cogs else 0.0
        return answer

    def totals(self, exp: Experience, window: tuple[dt.datetime, dt.datetime]) -> dict[str, Tally]:
        """Per variation over the window: the sum of its day buckets, so overview and timeseries agree."""
        found = {variation.id: Tally() for variation in exp.variations}
        for _, tallies in self.buckets(exp, window[0], window[1], "day"):
            for variation_id, tally in tallies.items():
                found[variation_id].add(tally)
        return found

    def overview(self, exp: Experience, window: tuple[dt.datetime, dt.datetime]) -> dict[str, Any]:
        reality = self.emulator.results_reality
        totals = self.totals(exp, window)
        control = next(v for v in exp.variations if v.is_control)
        answer: dict[str, Any] = {
            "datasetId": "variation_overview",
            "latestRunTs": to_ms(whole_second(self.emulator.now())),
            "metrics": [self._metric_row(exp, v, totals, control, reality) for v in exp.variations],
            "audienceOrder": [],
            "histogram": [],
            "kde": [],
            "cdf": [],
            "variations": [
                {**ExperienceJson._variation(exp, v), "onsiteEdits": [], "functionSyncError": False}
                for v in exp.variations
            ],
            "experienceId": exp.id,
            "experienceName": exp.name,
            "downsample": {"from": "HOUR", "to": "DAY"},
            "impact": {"est_monthly_revenue_increase": self._impact(exp, totals, control, window)},
        }
        if reality.cogs_fields:
            answer["cogsConfigured"] = reality.cogs_configured
            answer["cogsCoveragePct"] = 1.0 if reality.cogs_configured else 0.0
        for name in reality.overview_omits:
            answer.pop(name, None)
        return answer

    def _metric_row(
        self,
        exp: Experience,
        variation: Variation,
        totals: dict[str, Tally],
        control: Variation,
        reality: ResultsReality,
    ) -> dict[str, Any]:
        tally, base = totals[variation.id], totals[control.id]
        row: dict[str, Any] = {"variation_id": variation.id}
        for name in ("n_visitors", "n_orders", "net_revenue"):
            value = series_value(name, tally, True)
            row[name] = {"value": value} if reality.counts_as_objects else value
        rates = {
            "conversion_rate": (tally.orders, tally.visitors, base.orders, base.visitors),
            "add_to_cart_rate": (tally.carts, tally.visitors, base.carts, base.visitors),
            reality.extra_metric: (tally.orders, 2 * tally.visitors, base.orders, 2 * base.visitors),
        }
        for name, (hits, trials, control_hits, control_trials) in rates.items():
            row[name] = self._statistic(variation, hits, trials, control_hits, control_trials, reality)
        for name in ("net_revenue_per_visitor", "gross_profit_per_visitor", "net_revenue_per_order"):
            value, control_value = (
                series_value(name, tally, reality.cogs_configured),
                series_value(name, base, reality.cogs_configured),
            )
            row[name] = self._mean_statistic(variation, value, control_value, reality)
        return row

    @staticmethod
    def _statistic(
        variation: Variation, hits: int, trials: int, control_hits: int, control_trials: int, reality: ResultsReality
    ) -> dict[str, Any]:
        """A rate with its 95% interval, p2bb/p2bc against control (normal approximation), and uplift."""
        rate, control_rate = _ratio(hits, trials), _ratio(control_hits, control_trials)
        if rate is None:
            return _stat_object({"value": None}, reality)
        error = math.sqrt(rate * (1 - rate) / trials) if trials else 0.0
        stats: dict[str, Any] = {
            "value": rate,
            "ci_low": max(0.0, rate - 1.96 * error),
            "ci_high": rate + 1.96 * error,
            "plus_minus": 1.96 * error,
        }
        if control_rate is None or variation.is_control:
            stats["p2bb"] = None if control_rate is None else 0.5
            return _stat_object(stats, reality)
        control_error = math.sqrt(control_rate * (1 - control_rate) / control_trials)
        spread = math.hypot(error, control_error)
        beat = _normal_cdf((rate - control_rate) / spread) if spread else 0.5
        stats.update(p2bb=beat, p2bc=beat)
        if control_rate:
            lift, lift_error = rate / control_rate - 1, spread / control_rate
            stats["uplift"] = {
                "value": lift,
                "ci_low": lift - 1.96 * lift_error,
                "ci_high": lift + 1.96 * lift_error,
                "plus_minus": 1.96 * lift_error,
            }
        return _stat_object(stats, reality)

    @staticmethod
    def _mean_statistic(
        variation: Variation, value: float | None, control_value: float | None, reality: ResultsReality
    ) -> dict[str, Any]:
        """A per-visitor or per-order mean: value and uplift; the interval needs order-level variance,
        which the sandbox does not model, so it is unknown (null or absent, per seed)."""
        stats: dict[str, Any] = {"value": value, "ci_low": None, "ci_high": None, "plus_minus": None, "p2bb": None}
        if not variation.is_control and value is not None and control_value:
            stats["p2bc"] = None
            stats["uplift"] = {"value": value / control_value - 1}
        return _stat_object(stats, reality)

    @staticmethod
    def _impact(
        exp: Experience, totals: dict[str, Tally], control: Variation, window: tuple[dt.datetime, dt.datetime]
    ) -> float | None:
        """The spec's formula: round((treatment_rpv - control_rpv) * total_visitors * (30 / test_days))."""
        days = (window[1] - window[0]).total_seconds() / 86400
        control_rpv = series_value("net_revenue_per_visitor", totals[control.id], True)
        others = [series_value("net_revenue_per_visitor", totals[v.id], True) for v in exp.variations if v != control]
        rpvs = [rpv for rpv in others if rpv is not None]
        if control_rpv is None or not rpvs or days <= 0:
            return None
        visitors = sum(tally.visitors for tally in totals.values())
        return float(round((max(rpvs) - control_rpv) * visitors * (30 / days)))


def series_value(metric: str, tally: Tally, cogs: bool) -> float | None:
    """A timeseries metric (the request schema's enum) of one tally; null where it cannot be computed."""
    if metric == "n_visitors":
        return float(tally.visitors)
    if metric == "n_orders":
        return float(tally.orders)
    if metric == "net_revenue":
        return float(tally.revenue)
    if metric == "conversion_rate":
        return _ratio(tally.orders, tally.visitors)
    if metric == "net_revenue_per_visitor":
        return _ratio(tally.revenue, tally.visitors)
    if metric == "gross_profit_per_visitor":
        return _ratio(tally.revenue * PROFIT_SHARE, tally.visitors) if cogs else None
    if metric in ("aov", "net_revenue_per_order"):
        return _ratio(tally.revenue, tally.orders)
    raise ValueError(f"unknown metric {metric!r}")


def _stat_object(stats: dict[str, Any], reality: ResultsReality) -> dict[str, Any]:
    """A statistic as this seed writes unknowns: null, or left out (the fields are "all optional")."""
    if reality.absent_when_unknown:
        return {name: value for name, value in stats.items() if value is not None or name == "value"}
    return stats


# -------------------------------------------------------------------- emulator


class IntelligemsEmulator(Emulator):
    """The Intelligems External API (host `intelligems-api`) and its S3 export bucket (host `intelligems-s3`).

    Knobs, public attributes that tests may change at any time: `api_token`, `url_ttl_seconds` (900),
    `export_rate_per_second` (50) and `export_burst` (20), `api_rate_per_second` (25/30) and
    `api_burst` (50), `analytics_lag_seconds` (0), `clock` (a `time.time`-like "now"), `messy_cells`
    (False; read when an export is created). `reality` is the seed's `Reality`; it may be replaced
    by `reality.without_extra_columns()` (the id format stays the seed's).
    What happened: `export_count`, `exports` (ExportCall list: requested and clamped ranges, filters,
    URL), `exports_for(experience_id)`, `downloads` (file bodies served).
    Data: `experiences()`, `experience(id)`, `experience_ids(status)`, `add_experiences(n)`,
    `set_status(id, status, at)`, `add_rows(...)`, `expected_records(...)`, `raw_rows(...)`.
    """

    name = "intelligems"
    fault_matrix = FaultMatrixProfile(
        api_host="intelligems-api",
        file_host="intelligems-s3",
        streams=("intelligems_orders", "intelligems_order_reconciliation"),
        keys={
            "intelligems_orders": ("experience_id", "order_id"),
            "intelligems_order_reconciliation": ("experience_id", "order_id"),
        },
        replication_keys={"intelligems_orders": "created_at", "intelligems_order_reconciliation": "created_at"},
        create_pattern=r"/export$",
        retry_header_wait=1.0,  # the fault's x-ratelimit-reset, a second ahead
        rate_limit_fault_value=None,
        bad_row=1,
        settings=(("intelligems_reread_hours", 0),),
        partition_setting="intelligems_experience_ids",
        content_faults=("download_cut_quote",),  # the S3 object itself ends inside a quoted field
    )

    def every_expected_record(self, stream_name: str) -> list[dict]:
        if stream_name == EXPERIENCES_STREAM:
            return self.expected_records(stream_name)
        started = [e.id for e in self.experiences() if e.started_at is not None]
        return [row for e in started for row in self.expected_records(stream_name, partition={"experience_id": e})]

    def matrix_partition(self) -> dict | None:
        """The running experience that starts with the data period: its lifetime spans every window."""
        started = [e for e in self.experiences() if e.started_at is not None and e.status == "started"]
        return {"experience_id": min(started, key=lambda e: e.started_at).id}

    def __init__(
        self, ctx: SandboxContext, *, seed: int = 7, rows_per_type: int | None = None, messy_cells: bool = False
    ) -> None:
        self.ctx = ctx
        self.seed = seed
        self.reality = Reality.of_seed(seed)
        #: Files that differ from the tap's type guesses (module docstring); read when an export is created.
        self.messy_cells = messy_cells
        self.orders_per_experience = DEFAULT_ORDERS_PER_EXPERIENCE if rows_per_type is None else rows_per_type
        self.api_token = f"igat_sandbox_{Dice(seed, 'token').uuid4().replace('-', '')}"
        self.access_key_id = "ASIA" + Dice(seed, "access-key").uuid4().replace("-", "")[:16].upper()
        self.url_ttl_seconds = 900
        self.analytics_lag_seconds = 0.0
        self.clock: Callable[[], float] = time.time
        self._export_bucket = TokenBucket(EXPORT_REFILL_PER_SECOND, EXPORT_BURST)
        self._api_bucket = TokenBucket(API_REFILL_PER_SECOND, API_BURST)
        self.export_count = 0
        self.exports: list[ExportCall] = []
        self.downloads = 0
        #: What the seed leaves open about experiment results (module docstring).
        self.results_reality = ResultsReality.of_seed(seed)
        self.results_calls: list[ResultsCall] = []

        self._lock = threading.Lock()
        self._experiences: dict[str, Experience] = {}
        self._batches: dict[str, list[AddedBatch]] = {}
        self._added_orders: dict[str, int] = {}
        self._files: dict[str, ExportFile] = {}
        self._file_sequence = 0
        self._file_lengths: dict[str, int] = {}
        self._server_errors = 0
        self._validator = SpecValidator(SPEC_FILE)
        self._analytics_validator = SpecValidator(ANALYTICS_SPEC_FILE)
        self._results = ResultsAnalytics(self)
        self._signer = UrlSigner()  # per emulator: a URL from another emulator or run never verifies here
        self._json = ExperienceJson(seed, Dice(seed, "organization").uuid4())
        self._orders = OrderFactory(seed, IdFormat(seed, self.reality.id_format))
        self._plan = SlotPlan(seed)
        self._renderer = CsvRenderer(self._orders, self._plan)
        self._uuid_pattern = re.compile(
            self._validator.spec["paths"][EXPORT_SPEC_PATH]["post"]["parameters"][0]["schema"]["pattern"]
        )

        for seeded in SEEDED_EXPERIENCES:
            self._add_experience(seeded, awkward=True)

        self.api = Host("intelligems-api", ctx.log)
        self.api.route(f"{PREFIX}/experiences-list", ["GET"], self._list_experiences)
        self.api.route(f"{PREFIX}/experiences/<experience_id>", ["GET"], self._get_experience)
        self.api.route(f"{PREFIX}/analytics/experience/<experience_id>/export", ["POST"], self._export)
        self.api.route(f"{PREFIX}/analytics/resource/<experience_id>", ["POST"], self._resource)
        self.api.route(f"{PREFIX}/analytics/experience/<experience_id>/timeseries", ["POST"], self._timeseries)
        self.api.route("/<path:unknown>", ANY_METHOD, self._unknown_path)
        self.s3 = Host("intelligems-s3", ctx.log)
        self.s3.route("/<path:key>", ["GET"], self._download)

    # ------------------------------------------------------------- knobs

    @property
    def hosts(self) -> list[Host]:
        return [self.api, self.s3]

    @property
    def export_rate_per_second(self) -> float:
        return self._export_bucket.rate

    @export_rate_per_second.setter
    def export_rate_per_second(self, rate: float) -> None:
        self._export_bucket = TokenBucket(rate, self._export_bucket.burst)

    @property
    def export_burst(self) -> int:
        return self._export_bucket.burst

    @export_burst.setter
    def export_burst(self, burst: int) -> None:
        self._export_bucket = TokenBucket(self._export_bucket.rate, burst)

    @property
    def api_rate_per_second(self) -> float:
        return self._api_bucket.rate

    @api_rate_per_second.setter
    def api_rate_per_second(self, rate: float) -> None:
        self._api_bucket = TokenBucket(rate, self._api_bucket.burst)

    @property
    def api_burst(self) -> int:
        return self._api_bucket.burst

    @api_burst.setter
    def api_burst(self, burst: int) -> None:
        self._api_bucket = TokenBucket(self._api_bucket.rate, burst)

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), tz=UTC)

    def tap_config(self) -> dict[str, Any]:
        return {"intelligems_api_url": self.api.base_url, "intelligems_api_token": self.api_token}

    # ------------------------------------------------------- experiences

    def experiences(self) -> list[Experience]:
        """Every experience, in the list endpoint's order (newest created first)."""
        with self._lock:
            found = list(self._experiences.values())
        return sorted(found, key=lambda exp: (-exp.created_at.timestamp(), exp.id))

    def experience(self, experience_id: str) -> Experience:
        return self._experiences[experience_id.lower()]

    def experience_ids(self, status: str | None = None) -> list[str]:
        return [exp.id for exp in self.experiences() if status is None or exp.status == status]

    def add_experiences(self, count: int) -> list[str]:
        """`count` more running experiences (for load tests), each with its own seeded orders."""
        ids = []
        for _ in range(count):
            number = len(self._experiences) + 1
            started = DATA_START + dt.timedelta(days=(number * 3) % 28, minutes=number)
            seeded = SeededExperience(
                f'Load test #{number}: "bulk", ünïcode',
                "content/onsiteEdits",
                None,
                "started",
                started - dt.timedelta(days=2),
                started,
            )
            ids.append(self._add_experience(seeded, awkward=False).id)
        return ids

    def set_status(self, experience_id: str, status: str, at: dt.datetime | str | None = None) -> None:
        """Move an experience through its lifecycle: pending -> started -> paused/ended (or reset to pending)."""
        moment = as_utc(at) or self.now()
        with self._lock:
            exp = self._experiences[experience_id.lower()]
            if status == "started":
                exp.started_at = exp.started_at or moment
                exp.paused_at = exp.ended_at = None
            elif status == "paused":
                exp.paused_at = moment
            elif status == "ended":
                exp.ended_at, exp.paused_at = moment, None
            elif status == "pending":
                exp.started_at = exp.paused_at = exp.ended_at = None
            else:
                raise ValueError(f"unknown status {status!r}; use started, paused, ended or pending")
            action = {"started": "start", "paused": "pause", "ended": "end", "pending": "reset"}[status]
            action_id = Dice(self.seed, "action", exp.id, len(exp.actions)).uuid4()
            exp.actions.append(LifecycleAction(action_id, action, moment))
            exp.status = status
            exp.last_update = moment

    def _add_experience(self, seeded: SeededExperience, *, awkward: bool) -> Experience:
        with self._lock:
            ordinal = len(self._experiences) + 1
            dice = Dice(self.seed, "experience", ordinal)
            experience_id = dice.uuid4()
            variations = [
                Variation(dice.uuid4(), "Control", True, 0, 50.0),
                Variation(dice.uuid4(), self._variant_name(seeded), False, 1, 50.0),
            ]
            exp = Experience(
                id=experience_id,
                ordinal=ordinal,
                name=seeded.name,
                type=seeded.type,
                description=seeded.description,
                status=seeded.status,
                created_at=seeded.created_at,
                last_update=seeded.stopped_at or seeded.started_at or seeded.created_at,
                started_at=seeded.started_at,
                paused_at=seeded.stopped_at if seeded.status == "paused" else None,
                ended_at=seeded.stopped_at if seeded.status == "ended" else None,
                variations=variations,
                actions=self._seeded_actions(dice, seeded),
                data_span=self._data_span(seeded),
                order_count=self.orders_per_experience if seeded.started_at else 0,
                awkward=awkward,
            )
            self._experiences[exp.id] = exp
            return exp

    @staticmethod
    def _variant_name(seeded: SeededExperience) -> str:
        names = {"pricing": 'Variant B — "+10%", rounded to .99', "shipping": "Variant B: free over $75, 2-3 days"}
        return names.get(seeded.type, 'Variant B, "new copy"')

    @staticmethod
    def _seeded_actions(dice: Dice, seeded: SeededExperience) -> list[LifecycleAction]:
        actions = []
        if seeded.started_at:
            actions.append(LifecycleAction(dice.uuid4(), "start", seeded.started_at))
        if seeded.stopped_at:
            stop = "end" if seeded.status == "ended" else "pause"
            actions.append(LifecycleAction(dice.uuid4(), stop, seeded.stopped_at))
        return actions

    @staticmethod
    def _data_span(seeded: SeededExperience) -> tuple[dt.datetime, dt.datetime] | None:
        if seeded.started_at is None:
            return None
        start = max(seeded.started_at, DATA_START)
        end = min(seeded.stopped_at or DATA_END, DATA_END)
        return (start, end) if start < end else None

    # -------------------------------------------------------------- rows

    def add_rows(
        self,
        stream_name: str,
        count: int,
        start: dt.datetime | str,
        end: dt.datetime | str,
        partition: dict | None = None,
    ) -> None:
        """`count` new rows of one export type between two datetimes (each a single-item order)."""
        export_type = self._export_type(stream_name)
        exp = self._partition_experience(partition)
        start_at, end_at = as_utc(start), as_utc(end)
        if start_at is None or end_at is None or start_at >= end_at or count < 1:
            raise ValueError("add_rows needs count >= 1 and start < end")
        with self._lock:
            # Added orders continue the experience's index space, so their ids never repeat.
            added_so_far = self._added_orders.get(exp.id, 0)
            self._added_orders[exp.id] = added_so_far + count
            batch = AddedBatch(export_type, exp.order_count + added_so_far, count, start_at, end_at)
            self._batches.setdefault(exp.id, []).append(batch)

    def expected_records(
        self,
        stream_name: str,
        partition: dict | None = None,
        start: dt.datetime | str | None = None,
        end: dt.datetime | str | None = None,
    ) -> list[dict]:
        """The records the tap must emit, as exports can deliver them now (lifetime clamp, analytics lag).

        Export streams filter `start <= created_at < end`; `intelligems_experiences` is a full table
        (start/end ignored) in the list endpoint's order. Identifiers are the text the file has, extra
        columns are text (None when empty), and a column this seed leaves out is not in the dicts.
        With `messy_cells` on there is no typed truth to give: use `raw_rows`.
        """
        if stream_name == EXPERIENCES_STREAM:
            return [ExperienceJson.record(self._json.list_item(exp)) for exp in self.experiences()]
        if self.messy_cells:
            raise NotImplementedError("messy cells have no typed form: compare with raw_rows()")
        return [
            {**{column.key: column.typed(row) for column in columns}, "experience_id": exp.id}
            for exp, columns, row in self._file_rows(stream_name, partition, start, end, messy=False)
        ]

    def raw_rows(
        self,
        stream_name: str,
        partition: dict | None = None,
        start: dt.datetime | str | None = None,
        end: dt.datetime | str | None = None,
    ) -> list[dict[str, str]]:
        """The rows of `expected_records` as the files write them: each cell's text ('' when empty), by
        record key (lower snake_case of its label), messy cells included; plus `experience_id`, which
        the tap adds from the partition (the file has no such column)."""
        return [
            {**{column.key: column.cell(row) for column in columns}, "experience_id": exp.id}
            for exp, columns, row in self._file_rows(stream_name, partition, start, end, messy=self.messy_cells)
        ]

    def _file_rows(
        self,
        stream_name: str,
        partition: dict | None,
        start: dt.datetime | str | None,
        end: dt.datetime | str | None,
        *,
        messy: bool,
    ) -> Iterator[tuple[Experience, tuple[FileColumn, ...], Any]]:
        """(experience, file columns, row) of every row an export of [start, end) would hold now."""
        export_type = self._export_type(stream_name)
        chosen = [self._partition_experience(partition)] if partition else self.experiences()
        for exp in chosen:
            window = self._clamped_window(exp, as_utc(start), as_utc(end))
            if window is None:
                continue
            export = self._export_file("", exp, export_type, window, frozenset(), messy=messy)
            for row in self._renderer.rows(export):
                yield exp, export.columns, row

    @staticmethod
    def _export_type(stream_name: str) -> str:
        export_type = stream_name.removeprefix(STREAM_PREFIX)
        if export_type not in EXPORT_TABLES:
            known = ", ".join(STREAM_PREFIX + name for name in EXPORT_TYPES)
            raise ValueError(f"no export stream {stream_name!r}; known: {known}")
        return export_type

    def _partition_experience(self, partition: dict | None) -> Experience:
        if partition:
            return self.experience(str(partition["experience_id"]))
        running = [exp for exp in self.experiences() if exp.status == "started" and exp.started_at]
        if not running:
            raise ValueError("no running experience: pass partition={'experience_id': ...}")
        return min(running, key=lambda exp: exp.started_at or DATA_END)

    def _clamped_window(
        self, exp: Experience, start: dt.datetime | None, end: dt.datetime | None
    ) -> tuple[dt.datetime, dt.datetime] | None:
        """The documented clamp: [start, end) within the experience's lifetime; None if never started."""
        lifetime = exp.lifetime(self.now())
        if lifetime is None:
            return None
        clamped_start = max(start or lifetime[0], lifetime[0])
        clamped_end = min(end or lifetime[1], lifetime[1])
        return clamped_start, max(clamped_start, clamped_end)

    def _export_file(
        self,
        key: str,
        exp: Experience,
        export_type: str,
        window: tuple[dt.datetime, dt.datetime],
        content_faults: frozenset[str],
        *,
        messy: bool,
    ) -> ExportFile:
        now = self.now()
        with self._lock:
            batches = tuple(batch for batch in self._batches.get(exp.id, []) if batch.export_type == export_type)
        table = EXPORT_TABLES[export_type]
        return ExportFile(
            key,
            exp,
            table,
            file_columns(self.reality, table, messy=messy, new_column="new_column" in content_faults),
            window[0],
            window[1],
            now - dt.timedelta(seconds=self.analytics_lag_seconds),
            batches,
            content_faults,
            now,
        )

    # --------------------------------------------------------- API calls

    def _guarded(self, request: Request, bucket: TokenBucket, answer: Callable[[], Response]) -> Response:
        """Auth, rate limit and API faults around one call; rate headers on every answer."""
        token = request.headers.get("intelligems-access-token")
        decision = bucket.take(token or "anonymous")
        if token != self.api_token:
            response = json_response({"error": "Unauthorized"}, 401)
        elif not decision.allowed:
            response = self._too_many_requests(decision)
        elif self.ctx.faults.fire("rate_limit"):
            decision = RateDecision(False, decision.limit, 0, 1.0, time.time() + 1.0)
            response = self._too_many_requests(decision)
        elif self.ctx.faults.fire("server_error"):
            response = self._server_error()
        else:
            response = answer()
        response.headers["x-ratelimit-limit"] = str(decision.limit)
        response.headers["x-ratelimit-remaining"] = str(decision.remaining)
        response.headers["x-ratelimit-reset"] = str(int(self._reset_at(bucket, decision) * 1000))
        return response

    def _too_many_requests(self, decision: RateDecision) -> Response:
        response = json_response(self.reality.too_many_requests, 429)
        if self.reality.retry_after:
            response.headers["Retry-After"] = str(max(1, math.ceil(decision.retry_after_seconds)))
        return response

    def _reset_at(self, bucket: TokenBucket, decision: RateDecision) -> float:
        """x-ratelimit-reset in epoch seconds, as this seed reads "reset": bucket full, or next token."""
        if self.reality.reset_means == "bucket_full":
            return decision.reset_at_epoch
        now = time.time()
        if not decision.allowed:
            return now + decision.retry_after_seconds
        missing_tokens = max(0.0, decision.reset_at_epoch - now) * bucket.rate
        return now + (missing_tokens % 1.0) / bucket.rate

    def _unknown_path(self, request: Request, unknown: str) -> Response:
        """Any other path: 404, still behind auth and the rate headers, like the API's other answers."""
        return self._guarded(
            request, self._api_bucket, lambda: json_response({"error": "Not Found", "message": "Not Found"}, 404)
        )

    def _server_error(self) -> Response:
        with self._lock:
            self._server_errors += 1
            turn = (self._server_errors - 1) % 3
        return [
            json_response({"error": "Internal Server Error"}, 500),
            json_response({"message": "Internal server error"}, 502),
            json_response({"message": "Service Unavailable"}, 503),
        ][turn]

    def _list_experiences(self, request: Request) -> Response:
        return self._guarded(request, self._api_bucket, lambda: self._list_answer(request))

    def _list_answer(self, request: Request) -> Response:
        params, problems = self._query_params(request, LIST_SPEC_PATH)
        if problems:
            return json_response(error_tree(problems), 400)
        page, limit = int(params.get("page", 1)), int(params.get("limit", 20))
        matching = [
            exp
            for exp in self.experiences()
            if params.get("status") in (None, exp.status)
            and params.get("category") in (None, "experiment")
            and params.get("module") in (None, module_of(exp.type))
        ]
        chosen = matching[(page - 1) * limit : page * limit]
        return json_response(
            {
                "experiencesList": [self._json.list_item(exp) for exp in chosen],
                "page": page,
                "limit": limit,
                "total": len(matching),
                "totalPages": math.ceil(len(matching) / limit),
            }
        )

    def _query_params(self, request: Request, spec_path: str) -> tuple[dict[str, Any], list[tuple[list[str], str]]]:
        """Query parameters checked against the operation's published parameter schemas."""
        values: dict[str, Any] = {}
        problems: list[tuple[list[str], str]] = []
        for parameter in self._validator.spec["paths"][spec_path]["get"]["parameters"]:
            name, schema = parameter["name"], parameter["schema"]
            if parameter["in"] != "query" or name not in request.args:
                continue
            raw = request.args[name]
            value = self._coerce_query(raw, schema.get("type"))
            error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
            if error is not None:
                problems.append(([name], f"{raw!r}: {error.message}"))
            else:
                values[name] = value
        return values, problems

    @staticmethod
    def _coerce_query(raw: str, kind: str | None) -> Any:
        if kind == "integer" and re.fullmatch(r"-?\d+", raw):
            return int(raw)
        if kind == "boolean" and raw in ("true", "false"):
            return raw == "true"
        return raw

    def _get_experience(self, request: Request, experience_id: str) -> Response:
        return self._guarded(request, self._api_bucket, lambda: self._detail_answer(request, experience_id))

    def _detail_answer(self, request: Request, experience_id: str) -> Response:
        params, problems = self._query_params(request, DETAIL_SPEC_PATH)
        if not self._uuid_pattern.match(experience_id):
            problems.append((["experienceId"], "Invalid UUID"))
        if problems:
            return json_response(error_tree(problems), 400)
        exp = self._experiences.get(experience_id.lower())
        if exp is None:
            return self._not_found(experience_id)
        return json_response({"experience": self._json.detail(exp, params.get("includeChangeLog", False))})

    @staticmethod
    def _not_found(experience_id: str) -> Response:
        return json_response({"error": "Not Found", "message": f"Experience {experience_id} not found"}, 404)

    # ------------------------------------------------------------ export

    def _export(self, request: Request, experience_id: str) -> Response:
        return self._guarded(request, self._export_bucket, lambda: self._export_answer(request, experience_id))

    def _export_answer(self, request: Request, experience_id: str) -> Response:
        body = request.get_json(silent=True)
        problems = self._export_problems(experience_id, body)
        if problems:
            return json_response(error_tree(problems), 400)
        exp = self._experiences.get(experience_id.lower())
        if exp is None:
            return self._not_found(experience_id)
        body = body or {}
        requested_start, requested_end = self._epoch(body.get("startTs")), self._epoch(body.get("endTs"))
        window = self._clamped_window(exp, requested_start, requested_end)
        if window is None:
            message = f"Experience {exp.id} has not started; there is no data to export"
            return json_response({"errors": [message], "properties": {}}, 400)
        time.sleep(float(self.ctx.faults.value("export_latency", self.ctx.export_latency_seconds)))
        url = None if self.ctx.faults.fire("null_url") else self._issue_file(exp, body["exportType"], window)
        self._record_export(
            ExportCall(
                exp.id,
                body["exportType"],
                requested_start,
                requested_end,
                window[0],
                window[1],
                body.get("filters"),
                url,
                time.time(),
            )
        )
        return json_response(
            {
                "exportType": body["exportType"],
                "experienceId": exp.id,
                "experienceName": exp.name,
                "url": url,
                "expiresIn": self.url_ttl_seconds if url else 0,
                "format": "csv",
                "message": "Export ready" if url else "Export timed out, please retry",
            }
        )

    def _export_problems(self, experience_id: str, body: Any) -> list[tuple[list[str], str]]:
        problems: list[tuple[list[str], str]] = []
        if not self._uuid_pattern.match(experience_id):
            problems.append((["experienceId"], "Invalid UUID"))
        if body is None:
            return [*problems, ([], "Request body must be a JSON object with exportType")]
        problems += spec_problems(self._validator.errors(EXPORT_SPEC_PATH, "post", body))
        if isinstance(body, dict):
            for name in ("startTs", "endTs"):
                value = body.get(name)
                if isinstance(value, str) and not TEN_DIGITS.match(value):
                    problems.append(([name], f"{value!r} is not a 10-digit Unix epoch timestamp in seconds"))
            if not problems and body.get("startTs") and body.get("endTs") and body["startTs"] > body["endTs"]:
                problems.append((["startTs"], "startTs must not be after endTs"))
        return problems

    @staticmethod
    def _epoch(value: str | None) -> dt.datetime | None:
        return None if value is None else dt.datetime.fromtimestamp(int(value), tz=UTC)

    def _record_export(self, call: ExportCall) -> None:
        with self._lock:
            self.export_count += 1
            self.exports.append(call)

    def exports_for(self, experience_id: str) -> list[ExportCall]:
        with self._lock:
            return [call for call in self.exports if call.experience_id == experience_id]

    def _issue_file(self, exp: Experience, export_type: str, window: tuple[dt.datetime, dt.datetime]) -> str:
        with self._lock:
            self._file_sequence += 1
            key = f"/{BUCKET}/exports/{exp.id}/{export_type}-{self._file_sequence}.csv"
        content_faults = frozenset(name for name in CONTENT_FAULTS if self.ctx.faults.fire(name))
        export = self._export_file(key, exp, export_type, window, content_faults, messy=self.messy_cells)
        with self._lock:
            self._files[key] = export
        issued = time.time()
        if self.ctx.faults.fire("url_expired"):
            issued -= self.url_ttl_seconds + 1
        return f"{self.s3.base_url}{key}?{self._presign(key, issued)}"

    # ----------------------------------------------------------- results

    def _resource(self, request: Request, experience_id: str) -> Response:
        # NOTES.md: "list/detail/resource/timeseries burst 50": the bucket of the other calls, not exports'.
        return self._guarded(
            request, self._api_bucket, lambda: self._results_answer(request, experience_id, "resource")
        )

    def _timeseries(self, request: Request, experience_id: str) -> Response:
        return self._guarded(
            request, self._api_bucket, lambda: self._results_answer(request, experience_id, "timeseries")
        )

    def _results_answer(self, request: Request, experience_id: str, endpoint: str) -> Response:
        body = request.get_json(silent=True)
        spec_path = RESOURCE_SPEC_PATH if endpoint == "resource" else TIMESERIES_SPEC_PATH
        problems = self._results_problems(experience_id, body, spec_path)
        if problems:
            return json_response(error_tree(problems), 400)
        exp = self._experiences.get(experience_id.lower())
        if exp is None:
            return self._not_found(experience_id)
        body = body if isinstance(body, dict) else {}
        window = self._clamped_window(exp, self._epoch(body.get("startTs")), self._epoch(body.get("endTs")))
        if window is None:
            message = f"Experience {exp.id} has not started; there are no results"
            return json_response({"errors": [message], "properties": {}}, 400)
        with self._lock:
            self.results_calls.append(ResultsCall(endpoint, exp.id, body, window[0], window[1]))
        if endpoint == "resource":
            return json_response(self._results.overview(exp, window))
        return json_response(self._results.timeseries(exp, window, body))

    def _results_problems(self, experience_id: str, body: Any, spec_path: str) -> list[tuple[list[str], str]]:
        """The published request schema, the 10-digit epoch strings, and the description's view rules."""
        problems: list[tuple[list[str], str]] = []
        if not self._uuid_pattern.match(experience_id):
            problems.append((["experienceId"], "Invalid UUID"))
        problems += spec_problems(self._analytics_validator.errors(spec_path, "post", {} if body is None else body))
        if not isinstance(body, dict):
            return problems
        for name in ("startTs", "endTs"):
            value = body.get(name)
            if isinstance(value, str) and not TEN_DIGITS.match(value):
                problems.append(([name], f"{value!r} is not a 10-digit Unix epoch timestamp in seconds"))
        if not problems and body.get("startTs") and body.get("endTs") and body["startTs"] > body["endTs"]:
            problems.append((["startTs"], "startTs must not be after endTs"))
        view = body.get("view", "overview")
        if spec_path == RESOURCE_SPEC_PATH and view == "overview" and "audience" in body:
            problems.append((["audience"], "audience is not allowed when view is overview"))
        if spec_path == RESOURCE_SPEC_PATH and view == "audience" and "audience" not in body:
            problems.append((["audience"], "audience is required when view is audience"))
        return problems

    def results_calls_for(self, experience_id: str, endpoint: str | None = None) -> list[ResultsCall]:
        with self._lock:
            return [
                call
                for call in self.results_calls
                if call.experience_id == experience_id and endpoint in (None, call.endpoint)
            ]

    def expected_daily_results(
        self, experience_id: str, start: dt.datetime | str | None = None, end: dt.datetime | str | None = None
    ) -> list[dict[str, Any]]:
        """Day buckets of [start, end) as the tap's daily stream types them: {variation_id, date, metrics...}."""
        exp = self.experience(experience_id)
        window = self._clamped_window(exp, as_utc(start), as_utc(end))
        if window is None:
            return []
        answer = self._results.timeseries(
            exp, window, {"granularity": "day", "mode": "noncumulative", "metrics": list(TIMESERIES_METRICS)}
        )
        ids = {variation.name: variation.id for variation in exp.variations}
        return [
            {"variation_id": ids[name], "date": point["dt"][:10], **{k: v for k, v in point.items() if k != "dt"}}
            for name, segment in answer["segments"].items()
            for point in segment["data"]
        ]

    def expected_overview_totals(self, experience_id: str) -> dict[str, Tally]:
        """Per variation id: the lifetime totals the overview reports (visitors, orders, revenue)."""
        exp = self.experience(experience_id)
        window = self._clamped_window(exp, None, None)
        return {} if window is None else self._results.totals(exp, window)

    # ---------------------------------------------------------------- S3

    def _presign(self, key: str, issued: float) -> str:
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(issued))
        credential = f"{self.access_key_id}/{amz_date[:8]}/{S3_REGION}/s3/aws4_request"
        expires_at = int(issued) + self.url_ttl_seconds
        return urlencode(
            {
                "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
                "X-Amz-Credential": credential,
                "X-Amz-Date": amz_date,
                "X-Amz-Expires": str(self.url_ttl_seconds),
                "X-Amz-SignedHeaders": "host",
                "X-Amz-Signature": self._signer.sign(f"{key}|{credential}", expires_at),
            }
        )

    def _download(self, request: Request, key: str) -> Response:
        refusal = self._s3_auth_refusal(request)
        if refusal is not None:
            return refusal
        export = self._files.get(request.path)
        if export is None:
            return s3_error(404, "NoSuchKey", "The specified key does not exist.", Key=key)
        length = self._file_length(export)
        byte_range = self._byte_range(request.headers.get("Range"), length)
        if byte_range is None:
            return s3_error(
                416,
                "InvalidRange",
                "The requested range is not satisfiable",
                RangeRequested=request.headers.get("Range", ""),
                ActualObjectSize=str(length),
            )
        return self._file_response(request, export, length, byte_range)

    def _s3_auth_refusal(self, request: Request) -> Response | None:
        """S3's checks of a presigned GET, in S3's order: one auth mechanism, parameters, signature, expiry."""
        for header in ("Authorization", "intelligems-access-token"):
            if header in request.headers:
                return s3_error(
                    400,
                    "InvalidArgument",
                    "Only one auth mechanism allowed; only the X-Amz-Algorithm "
                    "query parameter, Signature query string parameter or the Authorization header "
                    "should be specified",
                    ArgumentName=header,
                )
        names = (
            "X-Amz-Algorithm",
            "X-Amz-Credential",
            "X-Amz-Date",
            "X-Amz-Expires",
            "X-Amz-SignedHeaders",
            "X-Amz-Signature",
        )
        present = [name for name in names if name in request.args]
        if not present:
            return s3_error(403, "AccessDenied", "Access Denied")
        if len(present) < len(names) or not request.args["X-Amz-Expires"].isdigit():
            return s3_error(
                400,
                "AuthorizationQueryParametersError",
                "Query-string authentication version 4 "
                "requires the X-Amz-Algorithm, X-Amz-Credential, X-Amz-Signature, X-Amz-Date, "
                "X-Amz-SignedHeaders, and X-Amz-Expires parameters.",
            )
        return self._signature_refusal(request)

    def _signature_refusal(self, request: Request) -> Response | None:
        args = request.args
        try:
            issued = dt.datetime.strptime(args["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            return s3_error(403, "SignatureDoesNotMatch", "X-Amz-Date must be in the ISO8601 Long Format")
        expires_at = int(issued.timestamp()) + int(args["X-Amz-Expires"])
        signed = f"{request.path}|{args['X-Amz-Credential']}"
        verdict = self._signer.check(signed, str(expires_at), args["X-Amz-Signature"])
        if verdict == "invalid":
            return s3_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the "
                "signature you provided. Check your key and signing method.",
                AWSAccessKeyId=self.access_key_id,
            )
        if verdict == "expired":
            return s3_error(
                403,
                "AccessDenied",
                "Request has expired",
                **{
                    "X-Amz-Expires": args["X-Amz-Expires"],
                    "Expires": iso_z(dt.datetime.fromtimestamp(expires_at, tz=UTC)),
                    "ServerTime": iso_z(dt.datetime.now(tz=UTC)),
                },
            )
        return None

    def _file_length(self, export: ExportFile) -> int:
        """The object's size: rendered once without keeping the bytes, then remembered."""
        with self._lock:
            known = self._file_lengths.get(export.key)
        if known is None:
            known = sum(len(chunk) for chunk in self._renderer.chunks(export))
            with self._lock:
                self._file_lengths[export.key] = known
        return known

    @staticmethod
    def _byte_range(header: str | None, length: int) -> tuple[int, int] | None:
        """[start, stop) asked by a `Range: bytes=` header (whole object without one); None if unsatisfiable."""
        if not header:
            return 0, length
        match = RANGE_HEADER.match(header.strip())
        if not match or match.groups() == ("", ""):
            return 0, length  # S3 ignores a Range header it cannot parse
        first, last = match.groups()
        if first == "":
            return max(0, length - int(last)), length
        start = int(first)
        stop = length if last == "" else min(length, int(last) + 1)
        return (start, stop) if start < length else None

    def _file_response(
        self, request: Request, export: ExportFile, length: int, byte_range: tuple[int, int]
    ) -> Response:
        start, stop = byte_range
        size = stop - start
        partial = (start, stop) != (0, length)
        headers = {
            "Content-Length": str(size),
            "ETag": f'"{hashlib.md5(export.key.encode()).hexdigest()}"',
            "Last-Modified": export.created_at.strftime("%a, %d %b %Y %H:%M:%S GMT"),
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'attachment; filename="{export.key.rsplit("/", 1)[-1]}"',
            "x-amz-request-id": uuid.uuid4().hex[:16].upper(),
        }
        if partial:
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{length}"
        body = byte_slice(self._renderer.chunks(export), start, stop)
        if request.method == "GET":
            body = with_transport_faults(self.ctx.faults, body, size, request.environ)
            with self._lock:
                self.downloads += 1
        return Response(
            body, status=206 if partial else 200, headers=headers, mimetype="text/csv", direct_passthrough=True
        )

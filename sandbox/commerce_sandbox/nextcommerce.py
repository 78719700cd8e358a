"""Emulation of the Next Commerce (29next) Admin API exports, and the separate host serving the files.

What is emulated, from the vendor's published OpenAPI (`nextcommerce-exports.openapi.json`) and the
"API Exports" guide:

- Paths under `/api/admin` on the API host (the tap's `nextcommerce_api_url` is `<api>/api/admin`):
  `POST exports/` `{type, date_from, date_to}` -> 201 Export `{id, created_at, type, status:
  "pending", date_from, date_to, url}` (`url` is the export's own API URL); `GET exports/{id}/`;
  `GET exports/{id}/download/` -> `{url}`; `GET exports/?type=&date_created_from=&date_created_to=
  &cursor=` -> `{next, previous, results}`; `GET exports/types/` -> `{types: [{code, name}]}`.
- Auth: `Authorization: Bearer <token>`; anything else answers 401. Header `X-29next-API-Version`
  is required (the spec marks it `required`) and must be `2024-04-01`; otherwise 400.
- Status goes `pending` -> `available` once the export latency has passed. There is no failed
  status (the spec's enum has only those two), so fault `export_stuck` keeps an export pending.
- Rate limit: 4 requests/second per access token (token bucket, burst 4); over it, 429 with
  `Retry-After: 1`, exactly the published sample.
- Row cap: exports hold at most `row_cap` objects (100,000; NOTES.md, changelog 2025-08-06: "Users
  attempting to export more will see a warning"). Whether an over-cap export is truncated or refused
  is not documented, so the sandbox does either (`row_cap_behavior`, see "Over the cap" below).
- Exports use the store's timezone: CSV timestamps are naive wall-clock times in `store_timezone`.

Design choices where the vendor docs are silent (each one is a guess made explicit):

- The API is a Django REST Framework app (its cursor pagination and schema style say so), so its
  errors use DRF shapes: `{"detail": "..."}` for 401/404/429/500 and request-level problems, and
  `{"<field>": ["..."], "non_field_errors": [...]}` for body problems. Checks run in DRF's order:
  API version, then authentication, then throttling; unknown paths answer 404 before any of them.
  Fault `server_error` comes from in front of the app, so it answers before any check: 500 (DRF
  JSON), then 502 and 503 (load-balancer HTML), cycling.
- The create body is validated against the published `CreateExport` schema; `format: date-time`
  (which JSON Schema does not enforce) is checked as DRF does: what `datetime.fromisoformat`
  accepts; a naive value means the store's timezone (DRF with `USE_TZ`). `date_from` after
  `date_to` is refused (400, `non_field_errors`). JSON, form-urlencoded and multipart bodies are
  accepted (the spec lists all three); any other media type answers 415.
- Window semantics: a row is in an export when `date_from <= its date <= date_to`, BOTH inclusive,
  as the guide's example `date_to: ...T23:59:59Z` implies; data timestamps have whole seconds.
  Rows are in date order (ties by id). Exports echo `date_from`/`date_to`/`created_at` in UTC with
  `Z`, as the guide's examples do.
- `GET exports/{id}/download/` before the export is available answers **400** `{"detail": ...}`:
  DRF has no 409 exception and views report a request that cannot be served in the object's current
  state as a validation error (400). Each call issues a fresh URL valid `download_url_ttl_seconds`
  (300 s); fault `url_expired` makes the next one already expired.
- The export list is ordered newest first (by id, which follows `created_at`); its cursor is DRF's:
  base64 of `p=<position>` (`r=1&` for the previous page); a cursor that does not decode answers
  404 `{"detail": "Invalid cursor"}` as DRF does. `date_created_from`/`_to` are calendar dates in the
  store's timezone, both inclusive; bad values answer 400 in django-filter's wording.
- The file host serves `/media/<store>/export_csv/<type>-<id>-<created>.csv?expires=<epoch>&signature=
  <hmac>`: 403 (plain text) when the signature does not match the path and expiry or the URL has
  expired. It refuses (400) any request that carries an `Authorization` header: signed URLs must be
  fetched without API credentials, and here a leaked token is something tests must see.
- CSV format: UTF-8 without BOM (no evidence of one), CRLF line endings (Python's csv writer, as a
  Django app writes), minimal quoting, a header row spelled as the seed's reality says. Money is a
  decimal string with two places ("12.50"), quantities integers, booleans `True`/`False`, JSON
  cells (`Metadata`, `Tags`, ...) written by `json.dumps` with non-ASCII kept, empty cells for
  unknown values, timestamps `YYYY-MM-DD HH:MM:SS` in the store's timezone. The data period
  (2024-01-01..2024-03-01) has no DST transition in America/Chicago (DST starts 2024-03-10), so
  every naive timestamp is unambiguous.
- Columns are not published (NOTES.md: "What nobody publishes"); each type has 8-20 invented ones
  (see `TABLES`), a unique id column and a date column the window filters on. Line-item types carry
  their own line id and the parent's id, and are dated by the parent's date. Record keys are the
  header labels in lower snake_case (the tap's `records/columns.py: header_key`). Which of these
  columns a file has, in which order, how its header spells them and how ids look is the seed's
  reality (below): no guess of the tap confirms itself.
- Schema drift: `order_list` files whose window reaches 2024-02-01T00:00:00Z carry an extra column
  "Metadata Sales Channel" (the store enabled that metadata field that day). Rows dated before it
  have an empty cell there; rows on/after it always have a value. A file covering only earlier dates
  lacks the column. `expected_records` gives the key only for rows dated on/after the drift instant,
  so a record of an earlier row read from a file that has the column carries `None` for it.
- Data: `rows_per_type` (default 150) is the number of objects of each non-line type over the data
  period. Line-item types hold 1, 2, 3, 1, 2, 3, ... lines per parent (about twice as many rows), and
  the parent rows' totals and "Lines Count" agree with those lines. Every row is a pure function of
  (seed, type, index): windows are found by bisection and files are streamed, never held in memory.
  Awkward parts in the default data: quoted commas (addresses, product titles), embedded newlines
  and quotes (notes), a ~100 KB note (order index 7), non-ASCII names, empty cells, CRLF endings.
- `add_rows` adds rows to one export type only (added parents have no line rows; added lines each
  get a new parent that is not in the parent export), evenly spread over `[start, end)`.
- Content faults (`malformed_row`, `bad_utf8`, `empty_file`, `header_only`, `new_column`) and
  `export_stuck`/`export_latency` are decided when an export is created, like a stored file: every
  download of that export gives the same bad file, a new export a good one. Transport faults
  (`download_reset`, `download_short`, `download_cut_quote`) are decided per download, so a retry can
  succeed. `malformed_row` adds a field to the first data row and `bad_utf8` puts a Latin-1 byte in
  its first text cell (an export without rows is unaffected); `new_column` appends "Metadata
  Affiliate Code"; `download_cut_quote` stops the body a few bytes into the first quoted data field
  (Content-Length matches the cut body); `download_short` sends 90% of the declared length, then
  the connection closes; `download_reset` sends half, then resets the connection (RST).
- Ids that point at other types (a transaction's "Order Number", a return line's "Order Line ID")
  are plausible ids written in the reality's format, not guaranteed to exist; line items and their
  parents are consistent, and so are customer ids across types.
- Content-Length is always sent and exact: the file is rendered once without being kept to count its
  bytes (cached per export); the body is then streamed from the row generator, never chunked.

Per-seed realities (what the vendor does not publish, varied so that no guess confirms itself).
`Reality.of_seed(seed)` (exposed as `emulator.reality`) draws, deterministically from the seed:

- `id_format`, applied to every identifier column (every "... ID", "Order Number", "Line Number",
  "SKU"): `plain` ("100042"), `zero_padded` to 9 digits ("000100042"), `prefixed` ("ord_7GQ2K9": a
  prefix per id space and 6 base-36 characters), `hex` ("A3124B88", sometimes all digits) or `uuid`.
  An id is a pure function of (seed, id space, number): a line item's parent id, a transaction's
  order number and an order's customer id are written exactly as those objects' own id cells.
  `expected_records` gives identifiers as this text (the tap declares them text).
- column order: each type's columns shuffled (the header names them, so order must not matter).
  The drift column and the `new_column` fault's column come last, as columns added later do.
- `extra_columns`: columns the tap does not know, from the vendor's changelog (NOTES.md): "GCLID"
  (2025-08-20) and "Cancellation Date" (2025-09-19) on `order_list`, "First Purchase Date" and
  "Last Purchase Date" (2025-10-16, together) on `customer_list`. Which type carries them is a
  guess. Present in every file of a reality that has them; `expected_records` gives their cell text
  (timestamps naive, as written), None when empty.
- `missing_per_type` optional columns of each type left out (`missing_columns` names them): never
  an identifier, the window's date, a boolean/JSON/date-time column, the column messy mode renames,
  a column carrying the awkward cells above, or a type's last numeric column. Absent from records.
- `header_style`: `title` ("Order Number"), `snake` ("order_number"), `upper` ("ORDER NUMBER"),
  `sentence` ("Order number ", trailing space included) or `mixed` (each label its own way). Every
  spelling has the same lower snake_case key.
- `row_cap_behavior`: `truncate` or `refuse` (see "Over the cap").

The suite's seeds (`REALITY_SALT` is chosen so they differ; seed 7 is the default):

| seed | id_format | header_style | extra_columns | missing_per_type | row_cap_behavior |
|---|---|---|---|---|---|
| 7 | hex | snake | GCLID, First/Last Purchase Date | 1 | refuse |
| 11 | uuid | mixed | First/Last Purchase Date | 0 | truncate |
| 23 | zero_padded | sentence | GCLID | 1 | refuse |
| 42 | prefixed | upper | Cancellation Date, First/Last Purchase Date | 2 | truncate |

Messy cells (`messy_cells=True`, a constructor keyword and attribute read when an export is created):
files that differ from the tap's type guesses the way real ones do, so a consumer can prove nothing
is lost. In each type, where it has such a column (`Reality.messy_targets`): "N/A" in its first
money/number column (rows with index % 4 == 1); its first date-time column other than the window's
date written "01/15/2024 10:30 AM" (index % 3 == 2); "yes"/"no" in its first boolean column (odd
indexes; the others keep "True"/"False"); its first JSON column as legacy non-JSON text such as
"{utm_source=google, ab_variant=B}" (index % 4 == 3); and one guessed column under another label
(`MESSY_RENAMES`, e.g. "Shipping Country" -> "Ship To Country", so its record key changes). Row
indexes are per type, so damaged cells are spread over every file, rarely in its first row.
`expected_records` raises NotImplementedError in this mode; compare with `raw_rows`.

`raw_rows(stream, partition, start, end)`: the rows of `expected_records` (same filter, same keys:
the late column only for rows dated after it, missing columns absent, renamed columns under their
other key) as the cell text the files hold, '' for empty, messy cells included.

Over the cap (`row_cap_behavior`; per seed, or forced by the constructor keyword / attribute):

- `truncate`: the file keeps the first `row_cap` rows in date order, and says nothing.
- `refuse`: `POST exports/` for a window holding more than `row_cap` rows (counted without building
  them) answers 400 `{"non_field_errors": ["Exports are limited to 100000 objects; this export has
  123456. Narrow the date range."]}`. A guess: the changelog's "will see a warning" reads like a
  message to the user, and a DRF serializer refusing the whole body answers 400 with
  `non_field_errors`. A window holding exactly `row_cap` rows is exported.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import csv
import datetime as dt
import hashlib
import heapq
import io
import itertools
import json
import re
import struct
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from urllib.parse import parse_qs, urlencode
from zoneinfo import ZoneInfo

from werkzeug.wrappers import Request, Response

from commerce_sandbox.core import (
    Emulator,
    FaultMatrixProfile,
    Host,
    SandboxContext,
    SpecValidator,
    TokenBucket,
    UrlSigner,
    as_utc,
    chunked,
    inside_quotes_cut,
    json_response,
    record_value,
    whole_second,
    with_transport_faults,
)

UTC = dt.timezone.utc
SPEC_FILE = "nextcommerce-exports.openapi.json"
API_PREFIX = "/api/admin"
API_VERSION = "2024-04-01"
VERSION_HEADER = "X-29next-API-Version"
STREAM_PREFIX = "nextcommerce_"

DATA_START = dt.datetime(2024, 1, 1, tzinfo=UTC)
DATA_END = dt.datetime(2024, 3, 1, tzinfo=UTC)
DEFAULT_ROWS_PER_TYPE = 150
DRIFT_AT = dt.datetime(2024, 2, 1, tzinfo=UTC)
LINES_PATTERN = (1, 2, 3)  # lines per parent, repeating: parent p has LINES_PATTERN[p % 3] lines
LONG_NOTE_INDEX = 7
LONG_NOTE_CHARS = 100_000
CHUNK_BYTES = 64 * 1024
BAD_UTF8_MARKER = "\x1fBADUTF8\x1f"
CONTENT_FAULTS = ("malformed_row", "bad_utf8", "empty_file", "header_only", "new_column")
DATETIME_FORMAT_HELP = (
    "Datetime has wrong format. Use one of these formats instead: YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z]."
)

STRING, INTEGER, NUMBER, BOOLEAN, DATETIME, JSON = "string", "integer", "number", "boolean", "datetime", "json"
ID = "id"  # an identifier: text written by the reality's IdFormat, emitted by the tap exactly as written


# ------------------------------------------------------------------------- time


def api_time(moment: dt.datetime) -> str:
    """How the API writes instants: UTC with `Z` (microseconds only when there are some)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def money(value: Decimal | str | int) -> Decimal:
    return Decimal(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def store_zone(name: str) -> dt.tzinfo:
    return UTC if name.upper() == "UTC" else ZoneInfo(name)


# ------------------------------------------------------------------------- dice


class Dice:
    """Deterministic choices drawn from a hash of its parts: the same parts give the same answers."""

    def __init__(self, *parts: object) -> None:
        self._material = "\x1f".join(map(str, parts)).encode()
        self._pool = b""
        self._refills = 0

    def _take(self, count: int) -> bytes:
        while len(self._pool) < count:
            self._pool += hashlib.blake2b(self._material + struct.pack(">I", self._refills), digest_size=64).digest()
            self._refills += 1
        taken, self._pool = self._pool[:count], self._pool[count:]
        return taken

    def fraction(self) -> float:
        return int.from_bytes(self._take(7), "big") / 2**56

    def integer(self, low: int, high: int) -> int:
        return low + int.from_bytes(self._take(6), "big") % (high - low + 1)

    def choice(self, options: tuple | list) -> Any:
        return options[self.integer(0, len(options) - 1)]

    def chance(self, probability: float) -> bool:
        return self.fraction() < probability

    def hex(self, length: int) -> str:
        return self._take((length + 1) // 2).hex()[:length]


# ------------------------------------------------------------------ vocabulary

FIRST_NAMES = (
    "Olivia",
    "José",
    "Zoë",
    "François",
    "Łukasz",
    "Søren",
    "Ngozi",
    "Hiroshi",
    "Anaïs",
    "Mateo",
    "Priya",
    "Siobhán",
    "Björn",
    "Chloé",
    "Aaliyah",
    "美咲",
    "Seán",
    "Emma",
)
LAST_NAMES = (
    "Smith",
    "Núñez",
    "O'Brien",
    "Müller",
    "Nguyễn",
    "García",
    "Kowalski",
    "渡辺",
    "Ørsted",
    "Dubois",
    "Okafor",
    "Johansson",
    "Patel",
    "Rossi",
    "van der Berg",
    "Brown",
)
STREETS = (
    "742 Evergreen Terrace",
    "1600 Amphitheatre Pkwy",
    "221B Baker Street",
    "12 Rue de la Paix",
    "4 Privet Drive",
    "350 Fifth Avenue",
    "88 Chemin de la Côte-des-Neiges",
)
UNITS = (None, None, "Apt 4", "Suite 210", "Unit 7B")
CITIES = (
    ("Springfield", "IL", "62704", "US"),
    ("Austin", "TX", "78701", "US"),
    ("Chicago", "IL", "60601", "US"),
    ("Toronto", "ON", "M5V 2T6", "CA"),
    ("Montréal", "QC", "H2X 1Y4", "CA"),
    ("London", None, "NW1 6XE", "GB"),
    ("Paris", None, "75002", "FR"),
)
CURRENCY_OF_COUNTRY = {"US": "USD", "CA": "CAD", "GB": "GBP", "FR": "EUR"}
TAX_RATE_OF_COUNTRY = {"US": Decimal("0.0825"), "CA": Decimal("0.13"), "GB": Decimal("0.20"), "FR": Decimal("0.20")}
LANGUAGES = ("en", "en", "en", "fr", "es", "de")


@dataclass(frozen=True)
class Product:
    id: int  # also the number of its SKU: SKUs are identifiers written in the reality's id format
    title: str
    price: Decimal  # tax included, as the store displays it


PRODUCTS = (
    Product(101, "Crème Brûlée Candle", Decimal("24.00")),
    Product(102, "Café Mug, 12 oz", Decimal("14.50")),
    Product(103, "Bonsai 盆栽 Starter Kit", Decimal("39.99")),
    Product(104, 'Sticker "Hello" Pack', Decimal("4.99")),
    Product(105, "Linen Tote", Decimal("19.00")),
    Product(106, "Espresso Beans 1 kg", Decimal("31.25")),
    Product(107, "Gift Card", Decimal("25.00")),
)
ORDER_STATUSES = ("open", "completed", "completed", "completed", "partially_fulfilled", "canceled")
PAYMENT_METHODS = ("card", "card", "card", "paypal", "apple_pay", "google_pay", "klarna")
GATEWAYS = ("Stripe", "Braintree", "NMI", "PayPal", "Adyen")
SALES_CHANNELS = ("storefront", "checkout_funnel", "admin", "api", "upsell")
UTM_SOURCES = ("google", "facebook", "tiktok", "newsletter", "direct")
NOTES = (
    "Leave at the back door, please.\nRing twice.",
    'Gift for "Nana" - no invoice, please',
    "Livraison après 18h",
    "Call before delivery:\n+1 (555) 010-7788",
)
TAGS = ("vip", "wholesale", "newsletter", "returning", "influencer")
DISPUTE_REASONS = ("fraudulent", "product_not_received", "duplicate", "subscription_canceled", "credit_not_processed")
DISPUTE_STATUSES = ("needs_response", "under_review", "won", "lost")
SUBSCRIPTION_STATUSES = ("active", "active", "active", "paused", "canceled")
INTERVALS = ("day", "week", "month", "month", "month")
CANCEL_REASONS = ("Too expensive", "Have too much product, will resubscribe", "Moving abroad")
RETURN_STATUSES = ("requested", "approved", "received", "refunded", "rejected")
RETURN_REASONS = ("Wrong size", "Damaged in transit, box crushed", "Changed my mind", "Not as described")
CONDITIONS = ("unopened", "used", "damaged")
FULFILLMENT_STATUSES = ("pending", "shipped", "shipped", "delivered", "cancelled")
LOCATIONS = ("Main Warehouse", "Entrepôt Montréal", "Lager Köln")
CARRIERS = ("UPS", "USPS", "DHL Express", "Canada Post")
LINE_FULFILLMENT_STATUSES = ("unfulfilled", "fulfilled", "fulfilled", "partially_fulfilled")
TRANSACTION_TYPES = ("sale", "sale", "authorization", "capture", "refund")
TRANSACTION_STATUSES = ("succeeded", "succeeded", "succeeded", "failed", "pending")
DECLINES = ("Card declined: insufficient funds", "Card declined: do not honor", "3DS authentication failed")


def long_note() -> str:
    """The ~100 KB note one order carries (quotes and commas inside, so the field is quoted and escaped)."""
    sentence = 'Customer wrote: "please double-check the engraving, spelling, and the gift wrap." '
    return (sentence * (LONG_NOTE_CHARS // len(sentence) + 1))[:LONG_NOTE_CHARS].rstrip()


LONG_NOTE = long_note()


def ascii_slug(text: str) -> str:
    """An email-safe ASCII version of a name ("Zoë" -> "zoe", "渡辺" -> "")."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "", folded.lower())


def snake_case(label: str) -> str:
    """A header label as the tap's record key: runs of non-alphanumerics become `_`, trimmed, lowered."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", label.strip()).strip("_").lower()


# ------------------------------------------------------------------- identifiers

ID_FORMATS = ("plain", "zero_padded", "prefixed", "hex", "uuid")
ZERO_PADDED_WIDTH = 9
BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Prefixes of `prefixed` ids, by id space (Stripe-style "ord_7GQ2K9").
ID_PREFIXES = {
    "order": "ord",
    "order_line": "li",
    "customer": "cus",
    "transaction": "txn",
    "dispute": "dp",
    "subscription": "sub",
    "subscription_line": "sli",
    "cart": "cart",
    "cart_line": "cli",
    "return": "ret",
    "return_line": "rli",
    "fulfillment": "ful",
    "fulfillment_line": "fli",
    "product": "prod",
    "sku": "sku",
    "line_number": "ln",
}


class IdFormat:
    """How one reality writes identifiers: `ids(space, number)` -> the cell text.

    A pure function of (seed, format, space, number), so a line item's parent id is written exactly
    as the parent's own id cell. `prefixed` and `hex` scramble the number with an affine bijection
    modulo base**width (never two numbers to one text below 2 billion); `uuid` hashes it (128 bits).
    """

    def __init__(self, seed: int, style: str) -> None:
        if style not in ID_FORMATS:
            raise ValueError(f"id format {style!r} is not one of {ID_FORMATS}")
        self.seed = seed
        self.style = style
        self._affine: dict[tuple[str, int], tuple[int, int]] = {}

    def __call__(self, space: str, number: int) -> str:
        if self.style == "plain":
            return str(number)
        if self.style == "zero_padded":
            return f"{number:0{ZERO_PADDED_WIDTH}d}"
        if self.style == "prefixed":
            return f"{ID_PREFIXES[space]}_{self._scrambled(space, number, 36, 6)}"
        if self.style == "hex":
            return self._scrambled(space, number, 16, 8)
        digest = hashlib.blake2b(f"{self.seed}\x1f{space}\x1f{number}".encode(), digest_size=16).digest()
        return str(uuid.UUID(bytes=digest, version=4))

    def _scrambled(self, space: str, number: int, base: int, width: int) -> str:
        multiplier, offset = self._affine_for(space, base)
        value = (multiplier * number + offset) % base**width
        digits = []
        for _ in range(width):
            value, digit = divmod(value, base)
            digits.append(BASE36[digit])
        return "".join(reversed(digits))

    def _affine_for(self, space: str, base: int) -> tuple[int, int]:
        """A multiplier coprime with the modulus (no factor 2 or 3 of 36 and 16) and an offset."""
        known = self._affine.get((space, base))
        if known is None:
            dice = Dice(self.seed, "ids", space)
            multiplier = dice.integer(10**6, 10**9) | 1
            while multiplier % 3 == 0:
                multiplier += 2
            known = self._affine[(space, base)] = (multiplier, dice.integer(0, 10**9))
        return known


# ------------------------------------------------------------------- row slots


def lines_of_parent(parent: int) -> int:
    return LINES_PATTERN[parent % len(LINES_PATTERN)]


def lines_before(parent: int) -> int:
    """How many base line rows belong to parents 0 .. parent-1."""
    cycles, rest = divmod(parent, len(LINES_PATTERN))
    return cycles * sum(LINES_PATTERN) + sum(LINES_PATTERN[:rest])


def line_position(line_index: int) -> tuple[int, int]:
    """The (parent, 1-based line number) of a base line row."""
    cycles, rest = divmod(line_index, sum(LINES_PATTERN))
    parent = cycles * len(LINES_PATTERN)
    for count in LINES_PATTERN:
        if rest < count:
            return parent, rest + 1
        rest -= count
        parent += 1
    raise AssertionError("unreachable: rest is always within one cycle")


@dataclass(frozen=True)
class Slot:
    """Where one row sits: its date, its own number in its type, and its parent (itself for parents)."""

    at: dt.datetime
    index: int
    parent: int
    line_number: int = 1
    lines_in_parent: int = 1


@dataclass(frozen=True)
class AddedBatch:
    """Rows added by `add_rows`: `count` rows evenly spread over [start, end)."""

    export_type: str
    first_index: int
    first_parent: int
    count: int
    start: dt.datetime
    end: dt.datetime
    is_line: bool

    def slot(self, offset: int) -> Slot:
        step = (self.end - self.start) / self.count
        parent = self.first_parent + offset
        lines = 1 if self.is_line else lines_of_parent(parent)
        return Slot(whole_second(self.start + step * (offset + 0.5)), self.first_index + offset, parent, 1, lines)


@dataclass(frozen=True)
class Span:
    """A date range: `start <= at` and `at <= end` (inclusive, exports) or `at < end` (records)."""

    start: dt.datetime | None
    end: dt.datetime | None
    end_inclusive: bool

    def past_end(self, at: dt.datetime) -> bool:
        if self.end is None:
            return False
        return at > self.end if self.end_inclusive else at >= self.end


def _slots_in(count: int, slot_at: Callable[[int], Slot], span: Span) -> Iterator[Slot]:
    """Slots of one source within the span, found by bisection: their dates never decrease."""
    first = 0 if span.start is None else bisect.bisect_left(range(count), span.start, key=lambda i: slot_at(i).at)
    for index in range(first, count):
        slot = slot_at(index)
        if span.past_end(slot.at):
            return
        yield slot


def _count_in(count: int, slot_at: Callable[[int], Slot], span: Span) -> int:
    """How many slots of one source fall within the span, by bisection on both ends."""
    first = 0 if span.start is None else bisect.bisect_left(range(count), span.start, key=lambda i: slot_at(i).at)
    if span.end is None:
        return count - first
    bisect_end = bisect.bisect_right if span.end_inclusive else bisect.bisect_left
    return max(0, bisect_end(range(count), span.end, key=lambda i: slot_at(i).at) - first)


class Timeline:
    """Where every base row of every export type sits in time; line rows take their parent's date."""

    def __init__(self, seed: int, rows_per_type: int) -> None:
        self.seed = seed
        self.rows_per_type = rows_per_type
        self._width = (DATA_END - DATA_START) / rows_per_type

    def parent_at(self, family: str, index: int) -> dt.datetime:
        jitter = 0.05 + 0.9 * Dice(self.seed, family, "at", index).fraction()
        return whole_second(DATA_START + self._width * (index + jitter))

    def base_count(self, table: ExportTable) -> int:
        return lines_before(self.rows_per_type) if table.parent_code else self.rows_per_type

    def base_slot(self, table: ExportTable, index: int) -> Slot:
        if table.parent_code is None:
            return Slot(self.parent_at(table.code, index), index, index, 1, lines_of_parent(index))
        parent, number = line_position(index)
        return Slot(self.parent_at(table.parent_code, parent), index, parent, number, lines_of_parent(parent))

    def count(self, table: ExportTable, batches: Iterable[AddedBatch], span: Span) -> int:
        """How many rows of a type fall within the span, without building them."""
        total = _count_in(self.base_count(table), lambda i: self.base_slot(table, i), span)
        return total + sum(_count_in(batch.count, batch.slot, span) for batch in batches)

    def slots(self, table: ExportTable, batches: Iterable[AddedBatch], span: Span) -> Iterator[Slot]:
        """Every row of a type within the span, in date order (base rows and added batches merged)."""
        sources = [_slots_in(self.base_count(table), lambda i: self.base_slot(table, i), span)]
        sources += [_slots_in(batch.count, batch.slot, span) for batch in batches]
        return heapq.merge(*sources, key=lambda slot: slot.at)


# ---------------------------------------------------------------- row contents


@dataclass(frozen=True)
class Customer:
    id: int
    first_name: str
    last_name: str
    email: str
    phone: str | None
    address: str
    country: str


@dataclass(frozen=True)
class Line:
    product: Product
    quantity: int

    @property
    def total(self) -> Decimal:
        return money(self.product.price * self.quantity)


@dataclass(frozen=True)
class Profile:
    """Who a parent object (order, cart, ...) belongs to, shared by its row and its line rows."""

    customer: Customer
    currency: str
    tax_rate: Decimal

    def tax_in(self, amount: Decimal) -> Decimal:
        return money(amount * self.tax_rate / (1 + self.tax_rate))


Row = dict[str, Any]

ORDER_BASE, ORDER_LINE_BASE, CUSTOMER_BASE, TRANSACTION_BASE, DISPUTE_BASE = 100_001, 1_000_001, 5_001, 800_001, 3_001
SUBSCRIPTION_BASE, SUBSCRIPTION_LINE_BASE, CART_BASE, CART_LINE_BASE = 20_001, 40_001, 60_001, 90_001
RETURN_BASE, RETURN_LINE_BASE, FULFILLMENT_BASE, FULFILLMENT_LINE_BASE = 7_001, 11_001, 150_001, 250_001


class RowFactory:
    """Builds each export type's row (label -> typed value) from (seed, type, slot) alone."""

    def __init__(self, seed: int, store: str, customers: int, ids: IdFormat) -> None:
        self.seed = seed
        self.store = store
        self.customers = customers
        self.ids = ids
        #: Rows changed after they were made (`NextCommerceEmulator.change_row`): (type, index) -> labels.
        self.changes: dict[tuple[str, int], dict[str, Any]] = {}

    # ---------------------------------------------------------- shared parts

    def customer(self, index: int) -> Customer:
        dice = Dice(self.seed, "customer", index)
        first, last = dice.choice(FIRST_NAMES), dice.choice(LAST_NAMES)
        street, unit = dice.choice(STREETS), dice.choice(UNITS)
        city, region, postal, country = dice.choice(CITIES)
        locality = f"{region} {postal}" if region else postal
        address = ", ".join(part for part in (street, unit, city, locality, country) if part)
        local = ".".join(part for part in (ascii_slug(first), ascii_slug(last)) if part) or "customer"
        phone = f"+1 555 01{dice.integer(0, 99):02d} {dice.integer(0, 9999):04d}" if dice.chance(0.7) else None
        return Customer(
            CUSTOMER_BASE + index, first, last, f"{local}{CUSTOMER_BASE + index}@example.com", phone, address, country
        )

    def profile(self, family: str, parent: int) -> Profile:
        dice = Dice(self.seed, family, "profile", parent)
        customer = self.customer(dice.integer(0, self.customers - 1))
        return Profile(customer, CURRENCY_OF_COUNTRY[customer.country], TAX_RATE_OF_COUNTRY[customer.country])

    def line(self, family: str, parent: int, number: int) -> Line:
        dice = Dice(self.seed, family, "line", parent, number)
        return Line(dice.choice(PRODUCTS), dice.integer(1, 4))

    def lines(self, family: str, slot: Slot) -> list[Line]:
        return [self.line(family, slot.parent, number) for number in range(1, slot.lines_in_parent + 1)]

    def note(self, family: str, slot: Slot, dice: Dice, probability: float) -> str | None:
        if family == "order_list" and slot.index == LONG_NOTE_INDEX:
            return LONG_NOTE
        return dice.choice(NOTES) if dice.chance(probability) else None

    def _line_product(self, line: Line) -> Row:
        return {
            "Product ID": self.ids("product", line.product.id),
            "Product Title": line.product.title,
            "SKU": self.ids("sku", line.product.id),
            "Quantity": line.quantity,
        }

    # ---------------------------------------------------------------- orders

    def order_list(self, slot: Slot) -> Row:
        dice = Dice(self.seed, "order_list", "row", slot.parent)
        profile = self.profile("order_list", slot.parent)
        customer = profile.customer
        subtotal = money(sum(line.total for line in self.lines("order_list", slot)))
        shipping = money(dice.choice(("0.00", "4.99", "9.99")))
        discount = money(subtotal * dice.choice((Decimal(0), Decimal(0), Decimal("0.10"))))
        total = subtotal + shipping - discount
        status = dice.choice(ORDER_STATUSES)
        return {
            "Order Number": self.ids("order", ORDER_BASE + slot.parent),
            "Date Created": slot.at,
            "Status": status,
            "Customer ID": self.ids("customer", customer.id),
            "Customer Email": customer.email,
            "Customer Name": f"{customer.first_name} {customer.last_name}",
            "Currency": profile.currency,
            "Lines Count": slot.lines_in_parent,
            "Subtotal Incl Tax": subtotal,
            "Shipping Incl Tax": shipping,
            "Total Discounts": discount,
            "Total Tax": profile.tax_in(total),
            "Total Incl Tax": total,
            "Payment Method": dice.choice(PAYMENT_METHODS),
            "Shipping Address": customer.address,
            "Shipping Country": customer.country,
            "Is Test": dice.chance(0.05),
            "Notes": self.note("order_list", slot, dice, 0.25),
            "Metadata": {"utm_source": dice.choice(UTM_SOURCES), "ab_variant": dice.choice(("A", "B"))}
            if dice.chance(0.6)
            else None,
            "Metadata Sales Channel": dice.choice(SALES_CHANNELS) if slot.at >= DRIFT_AT else None,
            **self._order_changelog_cells(slot, status),
        }

    def _order_changelog_cells(self, slot: Slot, status: str) -> Row:
        """Values of the order columns the changelog added (GCLID 2025-08-20, cancellation date 2025-09-19)."""
        dice = Dice(self.seed, "order_list", "changelog", slot.parent)
        gclid = f"Cj0KCQiA{dice.hex(24)}" if dice.chance(0.4) else None
        canceled = slot.at + dt.timedelta(minutes=dice.integer(5, 4_000)) if status == "canceled" else None
        return {"GCLID": gclid, "Cancellation Date": canceled}

    def order_line_items(self, slot: Slot) -> Row:
        dice = Dice(self.seed, "order_line_items", "row", slot.index)
        line = self.line("order_list", slot.parent, slot.line_number)
        profile = self.profile("order_list", slot.parent)
        return {
            "Line ID": self.ids("order_line", ORDER_LINE_BASE + slot.index),
            "Order Number": self.ids("order", ORDER_BASE + slot.parent),
            "Order Date Created": slot.at,
            "Line Number": self.ids("line_number", slot.line_number),
            **self._line_product(line),
            "Unit Price Incl Tax": line.product.price,
            "Total Incl Tax": line.total,
            "Tax Amount": profile.tax_in(line.total),
            "Is Subscription": dice.chance(0.2),
            "Fulfillment Status": dice.choice(LINE_FULFILLMENT_STATUSES),
            "Attributes": {"Engraving": 'J. & K., "2024"'} if dice.chance(0.15) else None,
        }

    # ------------------------------------------------------------- customers

    def customer_list(self, slot: Slot) -> Row:
        dice = Dice(self.seed, "customer_list", "row", slot.index)
        customer = self.customer(slot.index)
        orders = dice.integer(0, 12)
        return {
            "Customer ID": self.ids("customer", customer.id),
            "Date Joined": slot.at,
            "Email": customer.email,
            "First Name": customer.first_name,
            "Last Name": customer.last_name,
            "Phone": customer.phone,
            "Accepts Marketing": dice.chance(0.55),
            "Language": dice.choice(LANGUAGES),
            "Orders Count": orders,
            "Total Spent": money(Decimal(dice.integer(0, 40_000)) / 100 * orders),
            "Default Address": customer.address,
            "Tags": sorted({dice.choice(TAGS) for _ in range(dice.integer(0, 3))}),
            "Metadata": {"loyalty_tier": dice.choice(("bronze", "silver", "gold"))} if dice.chance(0.4) else None,
            "Last Login": slot.at + dt.timedelta(seconds=dice.integer(60, 20 * 86_400)) if dice.chance(0.7) else None,
            **self._customer_changelog_cells(slot, orders),
        }

    def _customer_changelog_cells(self, slot: Slot, orders: int) -> Row:
        """Values of the customer columns the changelog added 2025-10-16 (first/last purchase dates)."""
        dice = Dice(self.seed, "customer_list", "changelog", slot.index)
        first = slot.at + dt.timedelta(minutes=dice.integer(1, 3 * 1_440)) if orders else None
        last = first + dt.timedelta(days=dice.integer(1, 40)) if first and orders > 1 else first
        return {"First Purchase Date": first, "Last Purchase Date": last}

    # ---------------------------------------------------- payments, disputes

    def transaction_list(self, slot: Slot) -> Row:
        dice = Dice(self.seed, "transaction_list", "row", slot.index)
        status = dice.choice(TRANSACTION_STATUSES)
        method = dice.choice(PAYMENT_METHODS)
        country = dice.choice(CITIES)[3]
        return {
            "Transaction ID": self.ids("transaction", TRANSACTION_BASE + slot.index),
            "Date Created": slot.at,
            "Order Number": self.ids("order", ORDER_BASE + dice.integer(0, self.customers - 1)),
            "Type": dice.choice(TRANSACTION_TYPES),
            "Status": status,
            "Amount": money(Decimal(dice.integer(499, 25_000)) / 100),
            "Currency": CURRENCY_OF_COUNTRY[country],
            "Gateway": dice.choice(GATEWAYS),
            "Payment Method": method,
            "Card Last4": f"{dice.integer(0, 9999):04d}" if method == "card" else None,
            "Reference": f"ch_{dice.hex(24)}",
            "Is Test": dice.chance(0.05),
            "Error Message": dice.choice(DECLINES) if status == "failed" else None,
            "Response Data": {
                "avs": dice.choice(("Y", "N", "Z")),
                "cvv": dice.choice(("M", "N")),
                "processor_code": f"{dice.integer(0, 99):02d}",
            },
        }

    def dispute_list(self, slot: Slot) -> Row:
        dice = Dice(self.seed, "dispute_list", "row", slot.index)
        customer = self.customer(dice.integer(0, self.customers - 1))
        return {
            "Dispute ID": self.ids("dispute", DISPUTE_BASE + slot.index),
            "Date Created": slot.at,
            "Transaction ID": self.ids("transaction", TRANSACTION_BASE + dice.integer(0, self.customers - 1)),
            "Order Number": self.ids("order", ORDER_BASE + dice.integer(0, self.customers - 1)),
            "Status": dice.choice(DISPUTE_STATUSES),
            "Reason": dice.choice(DISPUTE_REASONS),
            "Amount": money(Decimal(dice.integer(499, 25_000)) / 100),
            "Currency": CURRENCY_OF_COUNTRY[customer.country],
            "Evidence Due By": slot.at + dt.timedelta(days=dice.integer(7, 14)),
            "Gateway": dice.choice(GATEWAYS),
            "Customer Email": customer.email,
            "Notes": self.note("dispute_list", slot, dice, 0.3),
        }

    # --------------------------------------------------------- subscriptions

    def subscription_list(self, slot: Slot) -> Row:
        dice = Dice(self.seed, "subscription_list", "row", slot.parent)
        profile = self.profile("subscription_list", slot.parent)
        status, interval, count = dice.choice(SUBSCRIPTION_STATUSES), dice.choice(INTERVALS), dice.integer(1, 3)
        days = {"day": 1, "week": 7, "month": 30}[interval] * count
        return {
            "Subscription ID": self.ids("subscription", SUBSCRIPTION_BASE + slot.parent),
            "Date Created": slot.at,
            "Status": status,
            "Customer ID": self.ids("customer", profile.customer.id),
            "Customer Email": profile.customer.email,
            "Interval": interval,
            "Interval Count": count,
            "Next Renewal Date": None if status == "canceled" else slot.at + dt.timedelta(days=days),
            "Lines Count": slot.lines_in_parent,
            "Total Incl Tax": money(sum(line.total for line in self.lines("subscription_list", slot))),
            "Currency": profile.currency,
            "Shipping Address": profile.customer.address,
            "Cancel Reason": dice.choice(CANCEL_REASONS) if status == "canceled" else None,
            "Metadata": {"plan": f"{interval}ly-{count}", "source": dice.choice(UTM_SOURCES)},
        }

    def subscription_line_items(self, slot: Slot) -> Row:
        dice = Dice(self.seed, "subscription_line_items", "row", slot.index)
        line = self.line("subscription_list", slot.parent, slot.line_number)
        return {
            "Subscription Line ID": self.ids("subscription_line", SUBSCRIPTION_LINE_BASE + slot.index),
            "Subscription ID": self.ids("subscription", SUBSCRIPTION_BASE + slot.parent),
            "Subscription Date Created": slot.at,
            **self._line_product(line),
            "Unit Price Incl Tax": line.product.price,
            "Total Incl Tax": line.total,
            "Is Trial": dice.chance(0.1),
        }

    # ------------------------------------------------------------ open carts

    def open_cart_list(self, slot: Slot) -> Row:
        dice = Dice(self.seed, "open_cart_list", "row", slot.parent)
        profile = self.profile("open_cart_list", slot.parent)
        known = dice.chance(0.7)  # anonymous carts have no customer yet
        subtotal = money(sum(line.total for line in self.lines("open_cart_list", slot)))
        voucher = f"SAVE{dice.integer(5, 30)}" if dice.chance(0.2) else None
        return {
            "Cart ID": self.ids("cart", CART_BASE + slot.parent),
            "Date Created": slot.at,
            "Customer Email": profile.customer.email if known else None,
            "Customer Name": f"{profile.customer.first_name} {profile.customer.last_name}" if known else None,
            "Currency": profile.currency,
            "Lines Count": slot.lines_in_parent,
            "Subtotal Incl Tax": subtotal,
            "Total Incl Tax": money(subtotal * (Decimal("0.9") if voucher else 1)),
            "Voucher Code": voucher,
            "Checkout URL": f"https://{self.store}.29next.store/checkout/{dice.hex(16)}/",
            "Is Abandoned": dice.chance(0.6),
            "Attribution": {"utm_source": dice.choice(UTM_SOURCES), "utm_campaign": "spring, 2024"}
            if dice.chance(0.5)
            else None,
        }

    def open_cart_line_items(self, slot: Slot) -> Row:
        line = self.line("open_cart_list", slot.parent, slot.line_number)
        return {
            "Cart Line ID": self.ids("cart_line", CART_LINE_BASE + slot.index),
            "Cart ID": self.ids("cart", CART_BASE + slot.parent),
            "Cart Date Created": slot.at,
            **self._line_product(line),
            "Unit Price Incl Tax": line.product.price,
            "Total Incl Tax": line.total,
        }

    # --------------------------------------------------------------- returns

    def return_list(self, slot: Slot) -> Row:
        dice = Dice(self.seed, "return_list", "row", slot.parent)
        profile = self.profile("return_list", slot.parent)
        refund = money(sum(line.total for line in self.lines("return_list", slot)))
        return {
            "Return ID": self.ids("return", RETURN_BASE + slot.parent),
            "Date Created": slot.at,
            "Order Number": self.ids("order", ORDER_BASE + dice.integer(0, self.customers - 1)),
            "Status": dice.choice(RETURN_STATUSES),
            "Reason": dice.choice(RETURN_REASONS),
            "Customer Email": profile.customer.email,
            "Lines Count": slot.lines_in_parent,
            "Refund Amount": refund,
            "Currency": profile.currency,
            "Restock": dice.chance(0.5),
            "Return Tracking Number": f"1Z{dice.hex(16).upper()}" if dice.chance(0.6) else None,
            "Customer Note": self.note("return_list", slot, dice, 0.3),
        }

    def return_line_items(self, slot: Slot) -> Row:
        dice = Dice(self.seed, "return_line_items", "row", slot.index)
        line = self.line("return_list", slot.parent, slot.line_number)
        return {
            "Return Line ID": self.ids("return_line", RETURN_LINE_BASE + slot.index),
            "Return ID": self.ids("return", RETURN_BASE + slot.parent),
            "Return Date Created": slot.at,
            "Order Line ID": self.ids("order_line", ORDER_LINE_BASE + dice.integer(0, 2 * self.customers)),
            "Product Title": line.product.title,
            "SKU": self.ids("sku", line.product.id),
            "Quantity": line.quantity,
            "Refund Amount": line.total,
            "Condition": dice.choice(CONDITIONS),
        }

    # ---------------------------------------------------------- fulfillments

    def fulfillment_list(self, slot: Slot) -> Row:
        dice = Dice(self.seed, "fulfillment_list", "row", slot.parent)
        profile = self.profile("fulfillment_list", slot.parent)
        status = dice.choice(FULFILLMENT_STATUSES)
        shipped = status in ("shipped", "delivered")
        tracking = f"{dice.integer(10**11, 10**12 - 1)}" if shipped else None
        return {
            "Fulfillment ID": self.ids("fulfillment", FULFILLMENT_BASE + slot.parent),
            "Date Created": slot.at,
            "Order Number": self.ids("order", ORDER_BASE + dice.integer(0, self.customers - 1)),
            "Status": status,
            "Location Name": dice.choice(LOCATIONS),
            "Carrier": dice.choice(CARRIERS) if shipped else None,
            "Tracking Number": tracking,
            "Tracking URL": f"https://track.example.com/?tracking={tracking}&lang=en" if tracking else None,
            "Shipped At": slot.at + dt.timedelta(seconds=dice.integer(600, 3 * 86_400)) if shipped else None,
            "Lines Count": slot.lines_in_parent,
            "Shipping Address": profile.customer.address,
            "Notify Customer": dice.chance(0.8),
        }

    def fulfillment_line_items(self, slot: Slot) -> Row:
        dice = Dice(self.seed, "fulfillment_line_items", "row", slot.index)
        line = self.line("fulfillment_list", slot.parent, slot.line_number)
        return {
            "Fulfillment Line ID": self.ids("fulfillment_line", FULFILLMENT_LINE_BASE + slot.index),
            "Fulfillment ID": self.ids("fulfillment", FULFILLMENT_BASE + slot.parent),
            "Fulfillment Date Created": slot.at,
            "Order Line ID": self.ids("order_line", ORDER_LINE_BASE + dice.integer(0, 2 * self.customers)),
            "Product Title": line.product.title,
            "SKU": self.ids("sku", line.product.id),
            "Quantity": line.quantity,
            "Lot Number": f"LOT-{dice.integer(1000, 9999)}-{dice.choice(('A', 'B'))}" if dice.chance(0.5) else None,
        }

    def new_column_value(self, export_type: str, slot: Slot) -> str | None:
        """The value of the column fault `new_column` adds (a metadata field the store just enabled)."""
        dice = Dice(self.seed, export_type, "affiliate", slot.index)
        return f"AFF-{dice.integer(100, 999)}" if dice.chance(0.5) else None


# ------------------------------------------------------------------- the tables


@dataclass(frozen=True)
class Column:
    """One CSV column as the emulator's rows name it: its canonical label and the kind of its values."""

    label: str
    kind: str

    @property
    def key(self) -> str:
        return snake_case(self.label)


@dataclass(frozen=True)
class ExportTable:
    """One export type: its columns, id and date columns, parent type, and how its rows are built.

    `late_column` appears only in files whose window reaches `late_since` (schema drift).
    `changelog_columns` are the columns the vendor's changelog added to this type; a reality
    (`Reality.extra_columns`) says which of them its files carry.
    """

    code: str
    name: str
    id_label: str
    date_label: str
    columns: tuple[Column, ...]
    build: Callable[[RowFactory, Slot], Row]
    parent_code: str | None = None
    parent_id_label: str | None = None
    late_column: Column | None = None
    late_since: dt.datetime | None = None
    changelog_columns: tuple[Column, ...] = ()

    @property
    def stream_name(self) -> str:
        return STREAM_PREFIX + self.code

    def row(self, factory: RowFactory, slot: Slot) -> Row:
        """The row as it is now: as made, with any later change (a refund, a new status)."""
        row = self.build(factory, slot)
        row.update(factory.changes.get((self.code, slot.index), {}))
        return row

    def has_late_column(self, at: dt.datetime | None) -> bool:
        """Whether a file whose window reaches `at` (or a row dated `at`) has the late column."""
        return self.late_column is not None and self.late_since is not None and at is not None and at >= self.late_since


NEW_COLUMN = Column("Metadata Affiliate Code", STRING)


def _columns(*pairs: tuple[str, str]) -> tuple[Column, ...]:
    return tuple(Column(label, kind) for label, kind in pairs)


def _line_table(
    code: str,
    name: str,
    parent_code: str,
    line_id: str,
    parent_id: str,
    date_label: str,
    build: Callable[[RowFactory, Slot], Row],
    rest: tuple[tuple[str, str], ...],
) -> ExportTable:
    columns = _columns((line_id, ID), (parent_id, ID), (date_label, DATETIME), *rest)
    return ExportTable(code, name, line_id, date_label, columns, build, parent_code, parent_id)


_PRODUCT_COLUMNS = (("Product ID", ID), ("Product Title", STRING), ("SKU", ID), ("Quantity", INTEGER))

TABLES: dict[str, ExportTable] = {
    table.code: table
    for table in (
        ExportTable(
            "order_list",
            "Orders",
            "Order Number",
            "Date Created",
            _columns(
                ("Order Number", ID),
                ("Date Created", DATETIME),
                ("Status", STRING),
                ("Customer ID", ID),
                ("Customer Email", STRING),
                ("Customer Name", STRING),
                ("Currency", STRING),
                ("Lines Count", INTEGER),
                ("Subtotal Incl Tax", NUMBER),
                ("Shipping Incl Tax", NUMBER),
                ("Total Discounts", NUMBER),
                ("Total Tax", NUMBER),
                ("Total Incl Tax", NUMBER),
                ("Payment Method", STRING),
                ("Shipping Address", STRING),
                ("Shipping Country", STRING),
                ("Is Test", BOOLEAN),
                ("Notes", STRING),
                ("Metadata", JSON),
            ),
            RowFactory.order_list,
            late_column=Column("Metadata Sales Channel", STRING),
            late_since=DRIFT_AT,
            changelog_columns=_columns(("GCLID", STRING), ("Cancellation Date", STRING)),
        ),
        _line_table(
            "order_line_items",
            "Order Line Items",
            "order_list",
            "Line ID",
            "Order Number",
            "Order Date Created",
            RowFactory.order_line_items,
            (
                ("Line Number", ID),
                *_PRODUCT_COLUMNS,
                ("Unit Price Incl Tax", NUMBER),
                ("Total Incl Tax", NUMBER),
                ("Tax Amount", NUMBER),
                ("Is Subscription", BOOLEAN),
                ("Fulfillment Status", STRING),
                ("Attributes", JSON),
            ),
        ),
        ExportTable(
            "customer_list",
            "Customers",
            "Customer ID",
            "Date Joined",
            _columns(
                ("Customer ID", ID),
                ("Date Joined", DATETIME),
                ("Email", STRING),
                ("First Name", STRING),
                ("Last Name", STRING),
                ("Phone", STRING),
                ("Accepts Marketing", BOOLEAN),
                ("Language", STRING),
                ("Orders Count", INTEGER),
                ("Total Spent", NUMBER),
                ("Default Address", STRING),
                ("Tags", JSON),
                ("Metadata", JSON),
                ("Last Login", DATETIME),
            ),
            RowFactory.customer_list,
            changelog_columns=_columns(("First Purchase Date", STRING), ("Last Purchase Date", STRING)),
        ),
        ExportTable(
            "transaction_list",
            "Transactions",
            "Transaction ID",
            "Date Created",
            _columns(
                ("Transaction ID", ID),
                ("Date Created", DATETIME),
                ("Order Number", ID),
                ("Type", STRING),
                ("Status", STRING),
                ("Amount", NUMBER),
                ("Currency", STRING),
                ("Gateway", STRING),
                ("Payment Method", STRING),
                ("Card Last4", STRING),
                ("Reference", STRING),
                ("Is Test", BOOLEAN),
                ("Error Message", STRING),
                ("Response Data", JSON),
            ),
            RowFactory.transaction_list,
        ),
        ExportTable(
            "dispute_list",
            "Disputes",
            "Dispute ID",
            "Date Created",
            _columns(
                ("Dispute ID", ID),
                ("Date Created", DATETIME),
                ("Transaction ID", ID),
                ("Order Number", ID),
                ("Status", STRING),
                ("Reason", STRING),
                ("Amount", NUMBER),
                ("Currency", STRING),
                ("Evidence Due By", DATETIME),
                ("Gateway", STRING),
                ("Customer Email", STRING),
                ("Notes", STRING),
            ),
            RowFactory.dispute_list,
        ),
        ExportTable(
            "subscription_list",
            "Subscriptions",
            "Subscription ID",
            "Date Created",
            _columns(
                ("Subscription ID", ID),
                ("Date Created", DATETIME),
                ("Status", STRING),
                ("Customer ID", ID),
                ("Customer Email", STRING),
                ("Interval", STRING),
                ("Interval Count", INTEGER),
                ("Next Renewal Date", DATETIME),
                ("Lines Count", INTEGER),
                ("Total Incl Tax", NUMBER),
                ("Currency", STRING),
                ("Shipping Address", STRING),
                ("Cancel Reason", STRING),
                ("Metadata", JSON),
            ),
            RowFactory.subscription_list,
        ),
        _line_table(
            "subscription_line_items",
            "Subscription Line Items",
            "subscription_list",
            "Subscription Line ID",
            "Subscription ID",
            "Subscription Date Created",
            RowFactory.subscription_line_items,
            (*_PRODUCT_COLUMNS, ("Unit Price Incl Tax", NUMBER), ("Total Incl Tax", NUMBER), ("Is Trial", BOOLEAN)),
        ),
        ExportTable(
            "open_cart_list",
            "Open Carts",
            "Cart ID",
            "Date Created",
            _columns(
                ("Cart ID", ID),
                ("Date Created", DATETIME),
                ("Customer Email", STRING),
                ("Customer Name", STRING),
                ("Currency", STRING),
                ("Lines Count", INTEGER),
                ("Subtotal Incl Tax", NUMBER),
                ("Total Incl Tax", NUMBER),
                ("Voucher Code", STRING),
                ("Checkout URL", STRING),
                ("Is Abandoned", BOOLEAN),
                ("Attribution", JSON),
            ),
            RowFactory.open_cart_list,
        ),
        _line_table(
            "open_cart_line_items",
            "Open Cart Line Items",
            "open_cart_list",
            "Cart Line ID",
            "Cart ID",
            "Cart Date Created",
            RowFactory.open_cart_line_items,
            (*_PRODUCT_COLUMNS, ("Unit Price Incl Tax", NUMBER), ("Total Incl Tax", NUMBER)),
        ),
        ExportTable(
            "return_list",
            "Returns",
            "Return ID",
            "Date Created",
            _columns(
                ("Return ID", ID),
                ("Date Created", DATETIME),
                ("Order Number", ID),
                ("Status", STRING),
                ("Reason", STRING),
                ("Customer Email", STRING),
                ("Lines Count", INTEGER),
                ("Refund Amount", NUMBER),
                ("Currency", STRING),
                ("Restock", BOOLEAN),
                ("Return Tracking Number", STRING),
                ("Customer Note", STRING),
            ),
            RowFactory.return_list,
        ),
        _line_table(
            "return_line_items",
            "Return Line Items",
            "return_list",
            "Return Line ID",
            "Return ID",
            "Return Date Created",
            RowFactory.return_line_items,
            (
                ("Order Line ID", ID),
                ("Product Title", STRING),
                ("SKU", ID),
                ("Quantity", INTEGER),
                ("Refund Amount", NUMBER),
                ("Condition", STRING),
            ),
        ),
        ExportTable(
            "fulfillment_list",
            "Fulfillments",
            "Fulfillment ID",
            "Date Created",
            _columns(
                ("Fulfillment ID", ID),
                ("Date Created", DATETIME),
                ("Order Number", ID),
                ("Status", STRING),
                ("Location Name", STRING),
                ("Carrier", STRING),
                ("Tracking Number", STRING),
                ("Tracking URL", STRING),
                ("Shipped At", DATETIME),
                ("Lines Count", INTEGER),
                ("Shipping Address", STRING),
                ("Notify Customer", BOOLEAN),
            ),
            RowFactory.fulfillment_list,
        ),
        _line_table(
            "fulfillment_line_items",
            "Fulfillment Line Items",
            "fulfillment_list",
            "Fulfillment Line ID",
            "Fulfillment ID",
            "Fulfillment Date Created",
            RowFactory.fulfillment_line_items,
            (
                ("Order Line ID", ID),
                ("Product Title", STRING),
                ("SKU", ID),
                ("Quantity", INTEGER),
                ("Lot Number", STRING),
            ),
        ),
    )
}


# ------------------------------------------------------------------- realities

HEADER_STYLES = ("title", "snake", "upper", "sentence", "mixed")
ROW_CAP_BEHAVIORS = ("truncate", "refuse")
#: Names the draw of realities; picked among a few thousand so that the suite's seeds (7, 11, 23, 42)
#: get four different id formats, header styles and sets of extra columns, and both row-cap behaviours
#: (the table in the module docstring). Changing it gives every seed another reality.
REALITY_SALT = "reality-535"
#: Changelog columns that arrived together (NOTES.md); a reality carries a group whole or not at all.
CHANGELOG_GROUPS = (("GCLID",), ("Cancellation Date",), ("First Purchase Date", "Last Purchase Date"))
#: Columns that carry the awkward cells the suite relies on (a 100 KB note, quoted commas and newlines,
#: non-ASCII names): never left out.
AWKWARD_LABELS = frozenset(
    {"Notes", "Shipping Address", "Default Address", "Product Title", "Customer Name", "First Name", "Last Name"}
)
#: The one guessed column of each type that messy-cells mode names otherwise: (label, other label).
MESSY_RENAMES = {
    "order_list": ("Shipping Country", "Ship To Country"),
    "order_line_items": ("Fulfillment Status", "Fulfilment Status"),
    "customer_list": ("Language", "Preferred Language"),
    "transaction_list": ("Gateway", "Payment Gateway"),
    "dispute_list": ("Reason", "Dispute Reason"),
    "subscription_list": ("Interval", "Billing Interval"),
    "subscription_line_items": ("Product Title", "Product Name"),
    "open_cart_list": ("Checkout URL", "Recovery URL"),
    "open_cart_line_items": ("Product Title", "Product Name"),
    "return_list": ("Reason", "Return Reason"),
    "return_line_items": ("Condition", "Item Condition"),
    "fulfillment_list": ("Location Name", "Warehouse"),
    "fulfillment_line_items": ("Lot Number", "Batch Number"),
}
NOT_A_NUMBER, OTHER_DATETIME_FORMAT, YES_NO, NOT_JSON = "not_a_number", "other_datetime_format", "yes_no", "not_json"
OTHER_DATETIME_PATTERN = "%m/%d/%Y %I:%M %p"


def spell(label: str, style: str) -> str:
    """A header label in one of HEADER_STYLES; every spelling has the same lower snake_case key."""
    if style == "snake":
        return snake_case(label)
    if style == "upper":
        return label.upper()
    if style == "sentence":
        return label[:1].upper() + label[1:].lower() + " "
    return label


def shuffled(items: Iterable[Any], dice: Dice) -> list[Any]:
    """Fisher-Yates with the dice: the same dice give the same order."""
    order = list(items)
    for last in range(len(order) - 1, 0, -1):
        other = dice.integer(0, last)
        order[last], order[other] = order[other], order[last]
    return order


def left_out(seed: int, table: ExportTable, count: int) -> tuple[str, ...]:
    """Up to `count` optional columns a reality leaves out of a type's files.

    Never an identifier, the date the window filters on, a boolean/JSON/date-time column, the
    column messy-cells mode renames, a column carrying awkward cells, nor the type's last numeric
    column (messy-cells mode needs one of each kind to damage).
    """
    protected = {table.date_label, MESSY_RENAMES[table.code][0], *AWKWARD_LABELS}
    candidates = [c for c in table.columns if c.kind in (STRING, NUMBER, INTEGER) and c.label not in protected]
    numeric = sum(c.kind in (NUMBER, INTEGER) for c in table.columns)
    dropped: list[str] = []
    for column in shuffled(candidates, Dice(seed, "missing", table.code)):
        if len(dropped) == count:
            break
        if column.kind != STRING:
            if numeric == 1:
                continue
            numeric -= 1
        dropped.append(column.label)
    return tuple(dropped)


@dataclass(frozen=True)
class FileColumn:
    """A column as one reality's files write it: the emulator's column and the header text for it."""

    column: Column
    header: str

    @property
    def key(self) -> str:
        """The tap's record key: lower snake_case of the header (records/columns.py: header_key)."""
        return snake_case(self.header)


@dataclass(frozen=True)
class Reality:
    """What the vendor does not publish, as one seed has it (see the module docstring)."""

    seed: int
    id_format: str
    header_style: str
    #: Labels of the changelog columns this reality's files carry.
    extra_columns: tuple[str, ...]
    missing_per_type: int
    #: (type code, label) of every column left out of that type's files.
    missing_columns: tuple[tuple[str, str], ...]
    row_cap_behavior: str

    @classmethod
    def of_seed(cls, seed: int) -> Reality:
        dice = Dice(seed, REALITY_SALT)
        id_format = dice.choice(ID_FORMATS)
        header_style = dice.choice(HEADER_STYLES)
        groups = [group for group in CHANGELOG_GROUPS if dice.chance(0.5)] or [dice.choice(CHANGELOG_GROUPS)]
        missing_per_type = dice.integer(0, 2)
        behavior = dice.choice(ROW_CAP_BEHAVIORS)
        missing = tuple(
            (code, label) for code, table in TABLES.items() for label in left_out(seed, table, missing_per_type)
        )
        extras = tuple(label for group in groups for label in group)
        return cls(seed, id_format, header_style, extras, missing_per_type, missing, behavior)

    def spelled(self, label: str) -> str:
        """The header text of a label; `mixed` spells each label its own way (the same in every type)."""
        style = self.header_style
        if style == "mixed":
            style = Dice(self.seed, "header", label).choice(HEADER_STYLES[:-1])
        return spell(label, style)

    def base_columns(self, table: ExportTable, *, messy: bool) -> tuple[FileColumn, ...]:
        """A type's columns in this reality's file order, without the late column and fault columns."""
        missing = {label for code, label in self.missing_columns if code == table.code}
        extras = [column for column in table.changelog_columns if column.label in self.extra_columns]
        present = [column for column in (*table.columns, *extras) if column.label not in missing]
        renamed, other_label = MESSY_RENAMES[table.code] if messy else ("", "")
        return tuple(
            FileColumn(column, self.spelled(other_label if column.label == renamed else column.label))
            for column in shuffled(present, Dice(self.seed, "column order", table.code))
        )

    def file_columns(
        self, table: ExportTable, reaches: dt.datetime | None, *, messy: bool, with_new_column: bool = False
    ) -> tuple[FileColumn, ...]:
        """The columns of a file whose window reaches `reaches`: the late column and fault column come last,
        as columns added to an export do."""
        columns = self.base_columns(table, messy=messy)
        if table.late_column is not None and table.has_late_column(reaches):
            columns += (FileColumn(table.late_column, self.spelled(table.late_column.label)),)
        if with_new_column:
            columns += (FileColumn(NEW_COLUMN, self.spelled(NEW_COLUMN.label)),)
        return columns

    def messy_targets(self, table: ExportTable) -> dict[str, str]:
        """Label -> what messy-cells mode does to it: the first present column of each kind it damages."""
        present = [fc.column for fc in self.base_columns(table, messy=False)]
        ordered = [column for column in table.columns if column in present]
        wanted = (
            (NOT_A_NUMBER, lambda c: c.kind == NUMBER),
            (NOT_A_NUMBER, lambda c: c.kind == INTEGER),
            (OTHER_DATETIME_FORMAT, lambda c: c.kind == DATETIME and c.label != table.date_label),
            (YES_NO, lambda c: c.kind == BOOLEAN),
            (NOT_JSON, lambda c: c.kind == JSON),
        )
        targets: dict[str, str] = {}
        for mess, fits in wanted:
            column = next((c for c in ordered if fits(c)), None)
            if column is not None and mess not in targets.values():
                targets[column.label] = mess
        return targets


# ------------------------------------------------------------------- CSV values


def csv_cell(value: Any, zone: dt.tzinfo) -> str:
    """A typed value as the export writes it (timestamps naive, in the store's timezone)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, dt.datetime):
        return value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def messy_cell(mess: str | None, index: int, value: Any, cell: str, zone: dt.tzinfo) -> str:
    """A cell as messy-cells mode writes it. Rows are chosen by their index with a different period per
    mess, so damaged cells are spread over every file and rarely all in its first row."""
    if mess == NOT_A_NUMBER and index % 4 == 1:
        return "N/A"
    if mess == OTHER_DATETIME_FORMAT and index % 3 == 2 and isinstance(value, dt.datetime):
        return value.astimezone(zone).strftime(OTHER_DATETIME_PATTERN)
    if mess == YES_NO and index % 2 == 1 and isinstance(value, bool):
        return "yes" if value else "no"
    if mess == NOT_JSON and index % 4 == 3:
        return not_json(value)
    return cell


def not_json(value: Any) -> str:
    """A JSON cell's value as a legacy exporter writes it (`{utm_source=google, ab_variant=B}`, `[vip,
    wholesale]`, `n/a`): words without quotes, so never valid JSON."""
    if isinstance(value, dict) and value:
        return "{" + ", ".join(f"{key}={item}" for key, item in value.items()) + "}"
    if isinstance(value, list) and value:
        return "[" + ", ".join(map(str, value)) + "]"
    return "n/a"


def expected_value(column: Column, value: Any, zone: dt.tzinfo) -> Any:
    """A typed value as the tap emits it: text columns (identifiers, columns the tap does not know)
    exactly as the cell is written, empty as None; other kinds typed."""
    if column.kind in (STRING, ID):
        return csv_cell(value, zone) or None
    return record_value(value)


# ------------------------------------------------------------------------ files


@dataclass(frozen=True)
class ExportFile:
    """What an export's CSV holds; fixed when the export is created, like a stored file."""

    name: str
    table: ExportTable
    span: Span
    batches: tuple[AddedBatch, ...]
    row_cap: int
    columns: tuple[FileColumn, ...]
    content_faults: frozenset[str]
    #: Label -> mess of messy-cells mode (empty when the mode was off as the export was created).
    messes: tuple[tuple[str, str], ...] = ()


@dataclass
class Export:
    """One export job as the API tracks it. `ready_at` is None for a stuck export."""

    id: int
    type: str
    created_at: dt.datetime
    date_from: dt.datetime
    date_to: dt.datetime
    ready_at: float | None
    file: ExportFile

    def status(self, now: float) -> str:
        return "available" if self.ready_at is not None and now >= self.ready_at else "pending"


class CsvRenderer:
    """Renders an ExportFile as bytes, streamed from the row generators, with its content faults."""

    def __init__(self, factory: RowFactory, timeline: Timeline, zone: dt.tzinfo) -> None:
        self.factory = factory
        self.timeline = timeline
        self.zone = zone

    def rows(self, file: ExportFile) -> Iterator[tuple[Slot, Row]]:
        slots = self.timeline.slots(file.table, file.batches, file.span)
        for slot in itertools.islice(slots, file.row_cap):
            yield slot, file.table.row(self.factory, slot)

    def cells(
        self, table: ExportTable, columns: Iterable[FileColumn], slot: Slot, row: Row, messes: dict[str, str]
    ) -> list[str]:
        """One row's cells as a file of these columns writes them (also `raw_rows`' source)."""
        cells = []
        for file_column in columns:
            column = file_column.column
            if column is NEW_COLUMN:
                cells.append(csv_cell(self.factory.new_column_value(table.code, slot), self.zone))
                continue
            value = row[column.label]
            cells.append(messy_cell(messes.get(column.label), slot.index, value, csv_cell(value, self.zone), self.zone))
        return cells

    def lines(self, file: ExportFile) -> Iterator[bytes]:
        """The file line by line (a line may hold embedded newlines inside quoted fields)."""
        faults = file.content_faults
        if "empty_file" in faults:
            return
        yield self._line([column.header for column in file.columns])
        if "header_only" in faults:
            return
        messes = dict(file.messes)
        for number, (slot, row) in enumerate(self.rows(file), start=1):
            yield self._faulty_line(self.cells(file.table, file.columns, slot, row, messes), number == 1, file)

    def chunks(self, file: ExportFile) -> Iterator[bytes]:
        return chunked(self.lines(file))

    def cut_inside_quote(self, file: ExportFile) -> Iterator[bytes]:
        """The file as a broken transfer leaves it: it stops inside the first quoted data field.

        A file with no quoted data field (header only, or no cell that needs quotes) gets a dangling
        opening quote after its last line instead; an empty file stays empty.
        """
        line = b""
        for number, line in enumerate(self.lines(file)):
            opening = line.find(b'"')
            if number > 0 and opening >= 0:
                yield line[: inside_quotes_cut(line, opening)]
                return
            yield line
        if line:
            yield b'"Unterminated'

    def _faulty_line(self, cells: list[str], first_row: bool, file: ExportFile) -> bytes:
        faults = file.content_faults
        if first_row and "malformed_row" in faults:
            cells = [*cells, "unexpected, extra field"]
        if first_row and "bad_utf8" in faults:
            target = next(i for i, column in enumerate(file.columns) if column.column.kind == STRING)
            cells = [*cells[:target], cells[target] + BAD_UTF8_MARKER, *cells[target + 1 :]]
        line = self._line(cells)
        return line.replace(BAD_UTF8_MARKER.encode(), b" caf\xe9") if first_row else line  # Latin-1 "cafe"

    @staticmethod
    def _line(cells: list[str]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\r\n").writerow(cells)
        return buffer.getvalue().encode("utf-8")


# ------------------------------------------------------------------- API errors


def detail(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    """DRF's error body for request-level problems."""
    return json_response({"detail": message}, status, headers)


def plain(message: str, status: int) -> Response:
    return Response(message + "\n", status=status, mimetype="text/plain")


REQUIRED_MESSAGE = re.compile(r"^'([^']+)' is a required property$")


def field_errors(messages: list[str], body: Any) -> dict[str, list[str]]:
    """SpecValidator's "field: message" strings in DRF's 400 shape `{field: [messages]}`."""
    errors: dict[str, list[str]] = {}
    for text in messages:
        where, _, message = text.partition(": ")
        missing = REQUIRED_MESSAGE.match(message)
        if missing:
            field, message = missing.group(1), "This field is required."
        elif where == "(body)":
            field = "non_field_errors"
            if not isinstance(body, dict):
                message = f"Invalid data. Expected a dictionary, but got {type(body).__name__}."
        else:
            field = where.split("/")[0]
        errors.setdefault(field, []).append(message)
    return errors


def parse_api_datetime(text: str, zone: dt.tzinfo) -> dt.datetime | None:
    """An ISO-8601 date-time as DRF reads it (naive means the store's timezone); None if unreadable."""
    try:
        # Python 3.10's fromisoformat does not read a trailing "Z".
        moment = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return None
    return (moment.replace(tzinfo=zone) if moment.tzinfo is None else moment).astimezone(UTC)


def encode_cursor(position: int, reverse: bool) -> str:
    text = f"r=1&p={position}" if reverse else f"p={position}"
    return base64.b64encode(text.encode("ascii")).decode("ascii")


def decode_cursor(cursor: str) -> tuple[int, bool] | None:
    """A DRF cursor as (position, reverse); None when it does not decode."""
    try:
        fields = parse_qs(base64.b64decode(cursor.encode("ascii"), validate=True).decode("ascii"), strict_parsing=True)
        return int(fields["p"][0]), fields.get("r", ["0"])[0] == "1"
    except (binascii.Error, UnicodeError, ValueError, KeyError):
        return None


# -------------------------------------------------------------------- emulator


class NextCommerceEmulator(Emulator):
    """The Next Commerce Admin API exports and their file host, on two hosts.

    Public knobs (change them on the instance at any time): `api_token`, `api_version`,
    `rate_per_second` and `rate_burst` (4 and 4), `page_size` (20), `row_cap` (100,000),
    `row_cap_behavior` ("truncate" or "refuse"; default: the reality's), `messy_cells` (False; read
    when an export is created), `download_url_ttl_seconds` (300). Counters for tests:
    `exports_created`, `download_urls_issued`, `downloads`, `rate_limited`. `reality` is what this
    seed makes of everything the vendor does not publish; `columns(export_type)` describes every
    column a type's files can have in it.
    """

    name = "nextcommerce"
    fault_matrix = FaultMatrixProfile(
        api_host="nextcommerce-api",
        file_host="nextcommerce-files",
        streams=("nextcommerce_dispute_list", "nextcommerce_return_list"),
        keys={"nextcommerce_dispute_list": ("dispute_id",), "nextcommerce_return_list": ("return_id",)},
        replication_keys={"nextcommerce_dispute_list": "date_created", "nextcommerce_return_list": "date_created"},
        create_pattern=r"/exports/?$",
        retry_header_wait=1.0,  # Retry-After: 1 (NOTES.md)
        rate_limit_fault_value=None,
        bad_row=1,
        # The matrix resumes from a bookmark and names the window that starts there: no re-read.
        settings=(("nextcommerce_reread_hours", 0), ("nextcommerce_requests_per_second", 50)),
        export_read=r"/exports/({id})/(?:download/)?$",
        export_id=r"\d+",
        vanished_export_id="987654",
    )

    def ready_for_matrix(self) -> None:
        """The documented 4 requests/second would make the matrix slow, not more thorough."""
        self.rate_per_second = self.rate_burst = 100

    def __init__(
        self,
        ctx: SandboxContext,
        *,
        seed: int = 7,
        rows_per_type: int | None = None,
        store: str = "sandbox",
        store_timezone: str = "America/Chicago",
        messy_cells: bool = False,
        row_cap_behavior: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.seed = seed
        self.reality = Reality.of_seed(seed)
        self.messy_cells = messy_cells
        self.row_cap_behavior = row_cap_behavior or self.reality.row_cap_behavior
        if self.row_cap_behavior not in ROW_CAP_BEHAVIORS:
            raise ValueError(f"row_cap_behavior must be one of {ROW_CAP_BEHAVIORS}, got {row_cap_behavior!r}")
        self.rows_per_type = rows_per_type or DEFAULT_ROWS_PER_TYPE
        self.store = store
        self.store_timezone = store_timezone
        self.api_token = f"nc_sandbox_{Dice(seed, 'token').hex(32)}"
        self.api_version = API_VERSION
        self.page_size = 20
        self.row_cap = 100_000
        self.download_url_ttl_seconds = 300
        self.exports_created = 0
        self.download_urls_issued = 0
        self.downloads = 0
        self._bucket = TokenBucket(4, 4)
        self._zone = store_zone(store_timezone)
        self._timeline = Timeline(seed, self.rows_per_type)
        self._factory = RowFactory(seed, store, self.rows_per_type, IdFormat(seed, self.reality.id_format))
        self._renderer = CsvRenderer(self._factory, self._timeline, self._zone)
        self._validator = SpecValidator(SPEC_FILE)
        self._signer = UrlSigner()
        self._lock = threading.Lock()
        self._exports: dict[int, Export] = {}
        self._files: dict[str, Export] = {}
        self._file_lengths: dict[int, int] = {}
        self._batches: dict[str, list[AddedBatch]] = {}
        self._next_parent = {code: self.rows_per_type for code in TABLES if TABLES[code].parent_code is None}
        self._next_line = {code: lines_before(self.rows_per_type) for code, t in TABLES.items() if t.parent_code}
        self._server_errors = 0
        self.api = Host("nextcommerce-api", ctx.log)
        self.files = Host("nextcommerce-files", ctx.log)
        self._routes()

    def _routes(self) -> None:
        self._api_route("/exports/", "GET", self._list_exports)
        self._api_route("/exports/", "POST", self._create_export)
        self._api_route("/exports/types/", "GET", self._export_types)
        self._api_route("/exports/<int:export_id>/", "GET", self._get_export)
        self._api_route("/exports/<int:export_id>/download/", "GET", self._download_url)
        self.files.route("/media/<store>/export_csv/<file_name>", ["GET"], self._serve_file)

    def _api_route(self, path: str, method: str, handler: Callable[..., Response]) -> None:
        """An Admin API route: every call passes the faults, version, auth and throttle checks first."""

        def guarded(request: Request, **path_values: Any) -> Response:
            return self._guarded(request, lambda: handler(request, **path_values))

        guarded.__qualname__ = handler.__qualname__  # Host names endpoints after the handler
        self.api.route(API_PREFIX + path, [method], guarded)

    # ------------------------------------------------------------ public API

    @property
    def hosts(self) -> list[Host]:
        return [self.api, self.files]

    @property
    def rate_per_second(self) -> float:
        return self._bucket.rate

    @rate_per_second.setter
    def rate_per_second(self, rate: float) -> None:
        self._bucket = TokenBucket(rate, max(1, round(rate)))

    @property
    def rate_burst(self) -> int:
        return self._bucket.burst

    @rate_burst.setter
    def rate_burst(self, burst: int) -> None:
        self._bucket = TokenBucket(self._bucket.rate, burst)

    @property
    def rate_limited(self) -> int:
        """How many requests the token bucket refused (faults not counted)."""
        return self._bucket.rejected

    def tap_config(self) -> dict[str, Any]:
        return {
            "nextcommerce_api_url": f"{self.api.base_url}{API_PREFIX}",
            "nextcommerce_api_token": self.api_token,
            "nextcommerce_store_timezone": self.store_timezone,
        }

    def columns(self, export_type: str) -> list[dict[str, Any]]:
        """Every column a type's files can have in this reality, in file order: header as written,
        record key, kind (identifiers and columns the tap does not know are text), and since when
        it appears (the late column)."""
        table = self._table(export_type)
        described = [self._describe(fc, None) for fc in self.reality.base_columns(table, messy=self.messy_cells)]
        late = self.reality.file_columns(table, table.late_since, messy=self.messy_cells)[len(described) :]
        return described + [self._describe(fc, table.late_since) for fc in late]

    @staticmethod
    def _describe(file_column: FileColumn, since: dt.datetime | None) -> dict[str, Any]:
        column = file_column.column
        kind = STRING if column.kind == ID else column.kind
        return {
            "label": file_column.header,
            "key": file_column.key,
            "kind": kind,
            "identifier": column.kind == ID,
            "since": since,
        }

    def expected_records(
        self,
        stream_name: str,
        partition: dict | None = None,
        start: dt.datetime | str | None = None,
        end: dt.datetime | str | None = None,
    ) -> list[dict]:
        """The canonical records of a stream with `start <= date < end`, in file order, typed as the tap emits them.

        No row cap applies (the tap must split windows to get them all). Identifiers and columns the
        tap does not know are text exactly as written; columns this reality leaves out are absent;
        the drift column of `order_list` is present only in records dated on/after it (see the
        module docstring). Messy-cells files are not typed the tap's way: compare with `raw_rows`.
        """
        if self.messy_cells:
            raise NotImplementedError("messy-cells files are compared as text: use raw_rows()")
        table = self._table(stream_name)
        return [
            {fc.key: expected_value(fc.column, row[fc.column.label], self._zone) for fc in columns}
            for slot, row, columns in self._rows_with_columns(table, partition, start, end)
        ]

    def raw_rows(
        self,
        stream_name: str,
        partition: dict | None = None,
        start: dt.datetime | str | None = None,
        end: dt.datetime | str | None = None,
    ) -> list[dict[str, str]]:
        """The rows of `expected_records` as the files write them: cell text exactly ('' when empty),
        keyed by record key (lower snake_case of the header), messy cells included when the mode is on."""
        table = self._table(stream_name)
        messes = self.reality.messy_targets(table) if self.messy_cells else {}
        return [
            dict(zip([fc.key for fc in columns], self._renderer.cells(table, columns, slot, row, messes)))
            for slot, row, columns in self._rows_with_columns(table, partition, start, end)
        ]

    def _rows_with_columns(
        self,
        table: ExportTable,
        partition: dict | None,
        start: dt.datetime | str | None,
        end: dt.datetime | str | None,
    ) -> Iterator[tuple[Slot, Row, tuple[FileColumn, ...]]]:
        """Each row within `[start, end)` in file order, with the columns its record has."""
        if partition:
            raise ValueError("Next Commerce streams have no partitions")
        span = Span(as_utc(start), as_utc(end), end_inclusive=False)
        with self._lock:
            batches = tuple(self._batches.get(table.code, []))
        layouts = {
            late: self.reality.file_columns(table, table.late_since if late else None, messy=self.messy_cells)
            for late in (False, True)
        }
        for slot in self._timeline.slots(table, batches, span):
            yield slot, table.row(self._factory, slot), layouts[table.has_late_column(slot.at)]

    def add_rows(
        self,
        stream_name: str,
        count: int,
        start: dt.datetime | str,
        end: dt.datetime | str,
        partition: dict | None = None,
    ) -> None:
        """`count` new rows of one export type, evenly spread over [start, end)."""
        if partition:
            raise ValueError("Next Commerce streams have no partitions")
        table = self._table(stream_name)
        start_at, end_at = as_utc(start), as_utc(end)
        if count < 1 or start_at is None or end_at is None or start_at >= end_at:
            raise ValueError("add_rows needs count >= 1 and start < end")
        family = table.parent_code or table.code
        with self._lock:
            first_parent = self._next_parent[family]
            self._next_parent[family] += count
            first_index = first_parent
            if table.parent_code:
                first_index = self._next_line[table.code]
                self._next_line[table.code] += count
            batch = AddedBatch(table.code, first_index, first_parent, count, start_at, end_at, bool(table.parent_code))
            self._batches.setdefault(table.code, []).append(batch)

    def change_row(self, stream_name: str, number: int, changes: dict[str, Any]) -> None:
        """Change the `number`-th row (0-based, in date order) of a type after it was made, keeping its
        date: what a refund or fulfillment does to an order. Values are typed as the type's rows are,
        keyed by column label (e.g. {"Status": "refunded"})."""
        table = self._table(stream_name)
        with self._lock:
            self._factory.changes.setdefault((table.code, number), {}).update(changes)

    def export_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._exports)

    @staticmethod
    def _table(name: str) -> ExportTable:
        code = name.removeprefix(STREAM_PREFIX)
        if code not in TABLES:
            raise ValueError(f"no Next Commerce export type {name!r}; known: {', '.join(TABLES)}")
        return TABLES[code]

    # -------------------------------------------------------- request guard

    def _guarded(self, request: Request, answer: Callable[[], Response]) -> Response:
        """Faults in front of the app, then DRF's order: version, authentication, throttling."""
        if self.ctx.faults.fire("server_error"):
            return self._server_error()
        refusal = self._version_refusal(request) or self._auth_refusal(request)
        if refusal is not None:
            return refusal
        if self.ctx.faults.fire("rate_limit") or not self._bucket.take(self.api_token).allowed:
            return detail("Request was throttled. Expected available in 1 second.", 429, {"Retry-After": "1"})
        return answer()

    def _server_error(self) -> Response:
        with self._lock:
            status = (500, 502, 503)[self._server_errors % 3]
            self._server_errors += 1
        if status == 500:
            return detail("A server error occurred.", 500)
        reason = {502: "Bad Gateway", 503: "Service Temporarily Unavailable"}[status]
        return Response(
            f"<html><head><title>{status} {reason}</title></head><body><center><h1>{status} {reason}"
            "</h1></center></body></html>\n",
            status=status,
            mimetype="text/html",
        )

    def _version_refusal(self, request: Request) -> Response | None:
        version = request.headers.get(VERSION_HEADER)
        if version is None:
            return detail(f"Missing required header {VERSION_HEADER}; send {VERSION_HEADER}: {self.api_version}.", 400)
        if version != self.api_version:
            return detail(
                f"Unsupported API version {version!r} in header {VERSION_HEADER}; "
                f"supported versions: {self.api_version}.",
                400,
            )
        return None

    def _auth_refusal(self, request: Request) -> Response | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="api"'}
        if scheme.lower() != "bearer" or not token.strip():
            return detail("Authentication credentials were not provided.", 401, challenge)
        if token.strip() != self.api_token:
            return detail("Invalid token.", 401, challenge)
        return None

    # --------------------------------------------------------- API handlers

    def _export_types(self, request: Request) -> Response:
        return json_response({"types": [{"code": table.code, "name": table.name} for table in TABLES.values()]})

    def _export(self, export_id: int) -> Export | None:
        with self._lock:
            return self._exports.get(export_id)

    def _get_export(self, request: Request, export_id: int) -> Response:
        export = self._export(export_id)
        if export is None:
            return detail("Not found.", 404)
        return json_response(self._export_json(export))

    def _create_export(self, request: Request) -> Response:
        body, refusal = self._request_body(request)
        if refusal is not None:
            return refusal
        errors = self._create_errors(body)
        if errors:
            return json_response(errors, 400)
        date_from = parse_api_datetime(body["date_from"], self._zone)
        date_to = parse_api_datetime(body["date_to"], self._zone)
        refusal = self._over_cap_refusal(body["type"], date_from, date_to)  # type: ignore[arg-type]
        if refusal is not None:
            return refusal
        export = self._new_export(body["type"], date_from, date_to)  # type: ignore[arg-type]
        return json_response(self._export_json(export), 201)

    def _over_cap_refusal(self, export_type: str, date_from: dt.datetime, date_to: dt.datetime) -> Response | None:
        """With `row_cap_behavior` "refuse": 400 for a window holding more than `row_cap` rows, in DRF's
        shape for a problem of the whole body (the guess is explained in the module docstring)."""
        if self.row_cap_behavior != "refuse":
            return None
        with self._lock:
            batches = tuple(self._batches.get(export_type, []))
        rows = self._timeline.count(TABLES[export_type], batches, Span(date_from, date_to, end_inclusive=True))
        if rows <= self.row_cap:
            return None
        message = f"Exports are limited to {self.row_cap} objects; this export has {rows}. Narrow the date range."
        return json_response({"non_field_errors": [message]}, 400)

    def _request_body(self, request: Request) -> tuple[Any, Response | None]:
        """The body as DRF's parsers read it: JSON, form or multipart; anything else is 415."""
        raw = request.get_data(cache=True)
        if request.mimetype == "application/x-www-form-urlencoded":
            return {key: values[-1] for key, values in parse_qs(raw.decode("utf-8", "replace")).items()}, None
        if request.mimetype == "multipart/form-data":
            return request.form.to_dict(), None
        if not raw:
            return {}, None
        if request.mimetype != "application/json":
            return None, detail(f'Unsupported media type "{request.mimetype}" in request.', 415)
        try:
            return json.loads(raw), None
        except ValueError as exc:
            return None, detail(f"JSON parse error - {exc}", 400)

    def _create_errors(self, body: Any) -> dict[str, list[str]]:
        """Problems of a create body: the published schema first, then date-time format and order."""
        errors = field_errors(self._validator.errors("/exports/", "post", body), body)
        if errors:
            return errors
        moments = {field: parse_api_datetime(body[field], self._zone) for field in ("date_from", "date_to")}
        for field, moment in moments.items():
            if moment is None:
                errors[field] = [DATETIME_FORMAT_HELP]
        if not errors and moments["date_from"] > moments["date_to"]:  # type: ignore[operator]
            errors["non_field_errors"] = ["date_from must be on or before date_to."]
        return errors

    def _new_export(self, export_type: str, date_from: dt.datetime, date_to: dt.datetime) -> Export:
        """Record a new export; its file's contents, faults and readiness are decided now."""
        table = TABLES[export_type]
        faults = self.ctx.faults
        content_faults = frozenset(name for name in CONTENT_FAULTS if faults.fire(name))
        latency = float(faults.value("export_latency", self.ctx.export_latency_seconds))
        stuck = faults.fire("export_stuck")
        created = dt.datetime.now(UTC)
        with self._lock:
            export_id = len(self._exports) + 1
            batches = tuple(self._batches.get(export_type, []))
            name = f"{export_type}-{export_id}-{created:%Y%m%d%H%M%S}.csv"
            messy = self.messy_cells
            columns = self.reality.file_columns(
                table, date_to, messy=messy, with_new_column="new_column" in content_faults
            )
            file = ExportFile(
                name,
                table,
                Span(date_from, date_to, end_inclusive=True),
                batches,
                self.row_cap,
                columns,
                content_faults,
                tuple(self.reality.messy_targets(table).items()) if messy else (),
            )
            export = Export(
                export_id,
                export_type,
                whole_second(created),
                date_from,
                date_to,
                None if stuck else time.time() + latency,
                file,
            )
            self._exports[export_id] = export
            self._files[self._file_path(name)] = export
            self.exports_created += 1
        return export

    def _export_json(self, export: Export) -> dict[str, Any]:
        return {
            "id": export.id,
            "created_at": api_time(export.created_at),
            "type": export.type,
            "status": export.status(time.time()),
            "date_from": api_time(export.date_from),
            "date_to": api_time(export.date_to),
            "url": f"{self.api.base_url}{API_PREFIX}/exports/{export.id}/",
        }

    def _download_url(self, request: Request, export_id: int) -> Response:
        export = self._export(export_id)
        if export is None:
            return detail("Not found.", 404)
        if export.status(time.time()) != "available":
            return detail(
                f"Export {export_id} is not available yet (status: pending); poll "
                f"GET exports/{export_id}/ until its status is available, then ask again.",
                400,
            )
        expires_at = int(time.time()) + self.download_url_ttl_seconds
        if self.ctx.faults.fire("url_expired"):
            expires_at = int(time.time()) - 1
        path = self._file_path(export.file.name)
        query = urlencode({"expires": expires_at, "signature": self._signer.sign(path, expires_at)})
        with self._lock:
            self.download_urls_issued += 1
        return json_response({"url": f"{self.files.base_url}{path}?{query}"})

    def _file_path(self, file_name: str) -> str:
        return f"/media/{self.store}/export_csv/{file_name}"

    # ----------------------------------------------------------- listing

    def _list_exports(self, request: Request) -> Response:
        errors = self._list_filter_errors(request)
        if errors:
            return json_response(errors, 400)
        cursor = None
        if request.args.get("cursor"):
            cursor = decode_cursor(request.args["cursor"])
            if cursor is None:
                return detail("Invalid cursor", 404)
        matching = sorted(self._matching_exports(request), key=lambda export: export.id, reverse=True)
        page, has_next, has_previous = self._page(matching, cursor)
        return json_response(
            {
                "next": self._page_url(request, encode_cursor(page[-1].id, False)) if has_next else None,
                "previous": self._page_url(request, encode_cursor(page[0].id, True)) if has_previous else None,
                "results": [self._export_json(export) for export in page],
            }
        )

    def _list_filter_errors(self, request: Request) -> dict[str, list[str]]:
        """Query filters checked in django-filter's words."""
        errors: dict[str, list[str]] = {}
        wanted_type = request.args.get("type")
        if wanted_type and wanted_type not in TABLES:
            errors["type"] = [f"Select a valid choice. {wanted_type} is not one of the available choices."]
        for name in ("date_created_from", "date_created_to"):
            value = request.args.get(name)
            if value and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                errors[name] = ["Enter a valid date."]
            elif value:
                try:
                    dt.date.fromisoformat(value)
                except ValueError:
                    errors[name] = ["Enter a valid date."]
        return errors

    def _matching_exports(self, request: Request) -> list[Export]:
        wanted_type = request.args.get("type")
        first = request.args.get("date_created_from")
        last = request.args.get("date_created_to")
        with self._lock:
            exports = list(self._exports.values())
        found = []
        for export in exports:
            created_day = export.created_at.astimezone(self._zone).date().isoformat()
            if wanted_type and export.type != wanted_type:
                continue
            if (first and created_day < first) or (last and created_day > last):
                continue
            found.append(export)
        return found

    def _page(self, newest_first: list[Export], cursor: tuple[int, bool] | None) -> tuple[list[Export], bool, bool]:
        """One page of a newest-first list at a DRF cursor, and whether exports exist after and before it.

        A forward cursor `p` starts just after position `p`; a reverse one (`r=1`) ends just before it.
        """
        size = max(1, self.page_size)
        if cursor is None:
            page = newest_first[:size]
        elif cursor[1]:
            page = [e for e in reversed(newest_first) if e.id > cursor[0]][:size][::-1]
        else:
            page = [e for e in newest_first if e.id < cursor[0]][:size]
        if not page:
            return page, False, False
        has_next = any(e.id < page[-1].id for e in newest_first)
        has_previous = any(e.id > page[0].id for e in newest_first)
        return page, has_next, has_previous

    @staticmethod
    def _page_url(request: Request, cursor: str) -> str:
        params = [(key, value) for key, value in request.args.items(multi=True) if key != "cursor"]
        return f"{request.base_url}?{urlencode([*params, ('cursor', cursor)])}"

    # ----------------------------------------------------------- file host

    def _serve_file(self, request: Request, store: str, file_name: str) -> Response:
        if "Authorization" in request.headers:
            return plain(
                "Requests to signed URLs must not carry API credentials: drop the Authorization header "
                "(the signature in the URL is the only authorization this host accepts).",
                400,
            )
        verdict = self._signer.check(request.path, request.args.get("expires"), request.args.get("signature"))
        if verdict == "invalid":
            return plain("Signature does not match this URL; request a new one from GET exports/{id}/download/.", 403)
        if verdict == "expired":
            return plain("This download URL has expired; request a new one from GET exports/{id}/download/.", 403)
        with self._lock:
            export = self._files.get(request.path)
        if export is None:
            return plain("No such file.", 404)
        return self._file_response(request, export)

    def _file_response(self, request: Request, export: Export) -> Response:
        file = export.file
        if request.method == "GET" and self.ctx.faults.fire("download_cut_quote"):
            length = sum(len(chunk) for chunk in self._renderer.cut_inside_quote(file))
            body: Iterator[bytes] = chunked(self._renderer.cut_inside_quote(file))
        else:
            length = self._file_length(export)
            body = self._renderer.chunks(file)
        if request.method == "GET":
            body = with_transport_faults(self.ctx.faults, body, length, request.environ)
            with self._lock:
                self.downloads += 1
        headers = {"Content-Length": str(length), "Content-Disposition": f'attachment; filename="{file.name}"'}
        return Response(body, status=200, headers=headers, mimetype="text/csv", direct_passthrough=True)

    def _file_length(self, export: Export) -> int:
        """The file's size: rendered once without keeping the bytes, then remembered."""
        with self._lock:
            known = self._file_lengths.get(export.id)
        if known is None:
            known = sum(len(chunk) for chunk in self._renderer.chunks(export.file))
            with self._lock:
                self._file_lengths[export.id] = known
        return known

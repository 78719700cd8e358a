"""Where a CSV cell becomes a typed value: column kinds, header keys, and the row reader.

Every source declares its known columns as `Column(key, kind)`; the kind says both the JSON Schema
type and how a cell is cast. A column the file has but the source does not know is kept as a string
(never dropped); the reader reports such columns before the first row so the stream can send an
updated SCHEMA first.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import compress
from operator import not_
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import msgspec

UTC = dt.timezone.utc

# Export files hold fields far longer than csv's 128 KiB default (notes, JSON blobs).
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

Caster = Callable[[str], Any]


class CsvFormatError(ValueError):
    """A file that cannot be read as the export it claims to be; says where and why."""


# ------------------------------------------------------------------- header keys

_NON_ALPHANUMERIC_RUN = re.compile(r"[^0-9a-zA-Z]+")
_SURROGATE = re.compile("[\udc80-\udcff]")


def header_key(label: str) -> str:
    """A header label or requested field as a record key: lower snake_case.

    "Source ID" -> "source_id"; "metadata.payment_mean" -> "metadata_payment_mean";
    "Total (incl. tax)" -> "total_incl_tax".
    """
    return _NON_ALPHANUMERIC_RUN.sub("_", label.strip()).strip("_").lower()


def record_keys(labels: list[str], requested_fields: list[str] | None = None) -> list[str]:
    """The record key of each column, in file order.

    Voucherify writes human labels in the order of the requested fields; where the counts agree
    the requested field names are the authority, otherwise each label is converted on its own.
    Blank or repeated labels get a positional suffix so no column is lost.
    """
    if requested_fields and len(requested_fields) == len(labels):
        keys = [header_key(field) for field in requested_fields]
    else:
        keys = [header_key(label) for label in labels]
    seen: dict[str, int] = {}
    unique = []
    for position, key in enumerate(keys, start=1):
        key = key or f"column_{position}"
        seen[key] = seen.get(key, 0) + 1
        unique.append(key if seen[key] == 1 else f"{key}_{seen[key]}")
    return unique


# ------------------------------------------------------------------ column kinds

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def _to_boolean(cell: str) -> bool:
    word = cell.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"not a boolean: {cell!r}")


def _to_integer(cell: str) -> int:
    try:
        return int(cell)
    except ValueError:
        exact = decimal.Decimal(cell)
        if exact != exact.to_integral_value():
            raise ValueError(f"not a whole number: {cell!r}") from None
        return int(exact)


def _to_number(cell: str) -> decimal.Decimal:
    # Decimal keeps money exact; the SDK's writers emit it as a JSON number.
    value = decimal.Decimal(cell.strip())
    if not value.is_finite():
        raise ValueError(f"not a finite number: {cell!r}")
    return value


_decode_json = msgspec.json.decode


def _to_json(cell: str) -> Any:
    try:
        return _decode_json(cell)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None


def _instant_caster(naive_zone: dt.tzinfo) -> Caster:
    """ISO-8601 text as a UTC ISO string; timestamps without an offset are in `naive_zone`."""
    parse = dt.datetime.fromisoformat

    def cast(cell: str) -> str:
        if cell[-1:] == "Z":
            # Already UTC (Voucherify, Intelligems): parsing validates it, the text is kept.
            text = cell[:-1] + "+00:00"
            parse(text)
            return text
        moment = parse(cell.strip().replace(" UTC", "+00:00").replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=naive_zone)
        return moment.astimezone(UTC).isoformat()

    return cast


def _epoch_millis_to_iso(cell: str) -> str:
    return dt.datetime.fromtimestamp(int(cell) / 1000, tz=UTC).isoformat()


@dataclass(frozen=True)
class Column:
    """A column a source knows: its record key, kind and a description for the catalog."""

    key: str
    kind: str = "string"
    description: str = ""

    def json_schema(self) -> dict:
        schema = dict(_KIND_SCHEMAS[self.kind])
        if self.description:
            schema["description"] = self.description
        return schema


def columns_from_spec(spec: str) -> tuple[Column, ...]:
    """Columns written compactly: "id amount:integer created_at:datetime" (no kind means string)."""
    columns = []
    for item in spec.split():
        key, _, kind = item.partition(":")
        columns.append(Column(key, kind or "string"))
    return tuple(columns)


_KIND_SCHEMAS: dict[str, dict] = {
    "string": {"type": ["string", "null"]},
    "integer": {"type": ["integer", "null"]},
    "number": {"type": ["number", "null"]},
    "boolean": {"type": ["boolean", "null"]},
    "datetime": {"type": ["string", "null"], "format": "date-time"},
    "epoch_ms": {"type": ["string", "null"], "format": "date-time"},
    "date": {"type": ["string", "null"], "format": "date"},
    "json": {"type": ["object", "array", "null"]},
}


def caster_for(kind: str, naive_zone: dt.tzinfo = UTC) -> Caster:
    """How a non-empty cell of this kind becomes its JSON value."""
    casters: dict[str, Caster] = {
        "string": str,
        "integer": int,  # whole numbers written like "2000.00" are retried by _lenient_cast
        "number": _to_number,
        "boolean": _to_boolean,
        "datetime": _instant_caster(naive_zone),
        "epoch_ms": _epoch_millis_to_iso,
        "date": lambda cell: dt.date.fromisoformat(cell.strip()[:10]).isoformat(),
        "json": _to_json,
    }
    return casters[kind]


def zone(name: str) -> dt.tzinfo:
    return UTC if name.upper() == "UTC" else ZoneInfo(name)


# --------------------------------------------------------------------- the reader


@dataclass
class CsvLayout:
    """A file's columns once its header is read: keys in order and the casters that go with them.

    `casters[i]` is None for text columns: their cells are kept as they are (empty means null).
    """

    keys: list[str]
    casters: list[Caster | None]
    unknown_keys: list[str]


class CsvRecordReader:
    """Turns an export file into typed records, naming the export and row in every error.

    `describe` names the stream and export id, for messages. Row numbers count data rows from 1
    (the header is row 0), which is what a user sees when opening the file in a spreadsheet.
    """

    def __init__(
        self,
        columns: dict[str, Column],
        *,
        describe: str,
        naive_zone: dt.tzinfo = UTC,
        requested_fields: list[str] | None = None,
    ) -> None:
        self.columns = columns
        self.describe = describe
        self.naive_zone = naive_zone
        self.requested_fields = requested_fields
        self.rows_read = 0

    def layout(self, header: list[str]) -> CsvLayout:
        keys = record_keys(header, self.requested_fields)
        unknown = [key for key in keys if key not in self.columns]
        kinds = [self.columns[key].kind if key in self.columns else "string" for key in keys]
        casters = [None if kind == "string" else caster_for(kind, self.naive_zone) for kind in kinds]
        return CsvLayout(keys, casters, unknown)

    def read(self, text: TextIO, on_layout: Callable[[CsvLayout], None] | None = None) -> Iterator[dict]:
        """Yield one record per data row. `on_layout` hears the columns before the first record."""
        rows = csv.reader(text, strict=True)
        try:
            header = next(rows, None)
            if header is None:
                return
            layout = self.layout(header)
            if on_layout:
                on_layout(layout)
            yield from self._records(rows, layout)
        except csv.Error as exc:
            raise CsvFormatError(f"{self.describe}: row {self.rows_read + 1} is not valid CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            row = self._row_with_bad_bytes(text) or self.rows_read + 1
            raise CsvFormatError(f"{self.describe}: row {row} holds bytes that are not UTF-8 ({exc.reason})") from None

    @staticmethod
    def _row_with_bad_bytes(text: TextIO) -> int | None:
        """The data row holding the bad bytes. Decoding fails a whole chunk ahead of the parser, so
        the count of rows read says little; on this error path the file is read again to find it."""
        raw = getattr(text, "buffer", None)
        if raw is None or not raw.seekable():
            return None
        raw.seek(0)
        lenient = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        for number, row in enumerate(csv.reader(lenient)):
            if any(_SURROGATE.search(cell) for cell in row):
                return number  # the header is row 0
        return None

    def _records(self, rows: Iterator[list[str]], layout: CsvLayout) -> Iterator[dict]:
        # The hot loop of the tap: the dict is built in C, then only typed or empty cells are
        # touched (most cells of an export are text).
        keys = layout.keys
        width = len(keys)
        typed = [(key, cast) for key, cast in zip(keys, layout.casters) if cast is not None]
        for row in rows:
            self.rows_read += 1
            if len(row) != width:
                if not any(row):
                    continue  # a blank line (some exporters end files with two newlines)
                raise CsvFormatError(
                    f"{self.describe}: row {self.rows_read} has {len(row)} fields but the header has {width}; "
                    "refusing to guess which values belong to which column"
                )
            record: dict[str, Any] = dict(zip(keys, row))
            if "" in row:
                for key in compress(keys, map(not_, row)):  # the keys of empty cells, found in C
                    record[key] = None
            for key, cast in typed:
                cell = record[key]
                if cell is not None:
                    try:
                        record[key] = cast(cell)
                    except (ValueError, decimal.InvalidOperation, OverflowError):
                        record[key] = self._lenient_cast(key, cast, cell)
            yield record

    def _lenient_cast(self, key: str, cast: Caster, cell: str) -> Any:
        """The slow path for a cell the fast cast refused: retry leniently, or say where it failed."""
        try:
            if cast is int:
                return _to_integer(cell.strip())
        except (ValueError, decimal.InvalidOperation):
            pass
        kind = self.columns[key].kind if key in self.columns else "string"
        raise CsvFormatError(
            f"{self.describe}: row {self.rows_read}, column {key!r}: {cell[:80]!r} is not a valid {kind}"
        )

"""Where a CSV cell becomes a typed value: column kinds, their casts and schemas, and header keys.

Every source declares its known columns as `Column(key, kind)`; the kind says both the JSON Schema
type and how a cell is cast. A column the file has but the source does not know is kept as a string
(never dropped). A kind is a promise the file may break: Next Commerce and Intelligems publish no
columns, so their kinds are guesses, and documented columns can turn out otherwise
(records/csv_reader.py reads such a column as text and reports it).
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import msgspec

UTC = dt.timezone.utc

# Export files hold fields far longer than csv's 128 KiB default (notes, JSON blobs).
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

Caster = Callable[[str], Any]


# ------------------------------------------------------------------- header keys

_NON_ALPHANUMERIC_RUN = re.compile(r"[^0-9a-zA-Z]+")
SURROGATE = re.compile("[\udc80-\udcff]")


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


def to_integer(cell: str) -> int:
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

#: How every typed record is spelled in JSON, in RECORD messages and BATCH files alike: Decimal as a
#: JSON number (exact), anything else msgspec lacks as its text.
RECORD_JSON = msgspec.json.Encoder(decimal_format="number", enc_hook=str)


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


#: Kinds whose cells are still converted once their column is text (see `_widened_caster`).
INSTANT_KINDS = frozenset({"datetime", "epoch_ms"})


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

"""The baseline: a plain Singer SDK tap reading the same orders CSV over HTTP.

    python benchmarks/baseline_tap.py --config CONFIG.json

What anyone would write first with the Meltano Singer SDK and the standard library: one
`singer_sdk.Stream` whose `get_records` streams the file from `url` (with `headers`), reads it
with `csv.DictReader` and casts each cell to its schema type (the SDK never parses strings: an
integer column left as "3861" would be written as a string). Default SDK settings: default message
writer, type conformance, metrics and bookmarks; incremental on `updated_at`, sorted, like the tap.

The schema is the one `tap-commerce-exports --discover` gives `voucherify_orders` with the
sandbox's settings (13 known columns + two metadata fields); run.py checks they agree.
"""

from __future__ import annotations

import csv
import decimal
import io
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import requests
from singer_sdk import Stream, Tap
from singer_sdk import typing as th

csv.field_size_limit(2**31 - 1)

ORDERS_SCHEMA = th.PropertiesList(
    th.Property("id", th.StringType),
    th.Property("source_id", th.StringType),
    th.Property("created_at", th.DateTimeType),
    th.Property("updated_at", th.DateTimeType),
    th.Property("status", th.StringType),
    th.Property("amount", th.IntegerType),
    th.Property("discount_amount", th.IntegerType),
    th.Property("items_discount_amount", th.IntegerType),
    th.Property("total_discount_amount", th.IntegerType),
    th.Property("total_amount", th.IntegerType),
    th.Property("customer_id", th.StringType),
    th.Property("referrer_id", th.StringType),
    th.Property("metadata", th.CustomType({"type": ["object", "array", "null"]})),
    th.Property("metadata_payment_mean", th.StringType),
    th.Property("metadata_channel", th.StringType),
).to_dict()


def _boolean(cell: str) -> bool:
    return cell.strip().lower() in ("true", "t", "yes", "1")


CASTS: dict[str, Callable[[str], Any]] = {
    "integer": int,
    "number": decimal.Decimal,
    "boolean": _boolean,
    "object": json.loads,
    "array": json.loads,
}


def cast_for(property_schema: dict) -> Callable[[str], Any] | None:
    """How a cell becomes the property's JSON type; None: it stays a string (strings, date-times)."""
    types = property_schema.get("type", "string")
    types = [types] if isinstance(types, str) else list(types)
    for name in types:
        if name in CASTS:
            return CASTS[name]
    return None


def snake_case(label: str) -> str:
    """A CSV header label as a property name: "Source ID" -> "source_id"."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", label).strip("_").lower()


class CsvOrdersStream(Stream):
    name = "voucherify_orders"
    primary_keys = ("id",)
    replication_key = "updated_at"
    is_sorted = True

    def get_records(self, context: dict | None) -> Iterable[dict]:
        properties = self.schema["properties"]
        with requests.get(
            self.config["url"], headers=self.config.get("headers") or {}, stream=True, timeout=(10, 300)
        ) as response:
            response.raise_for_status()
            response.raw.auto_close = False  # TextIOWrapper reads once more after the body's end
            text = io.TextIOWrapper(response.raw, encoding="utf-8-sig", newline="")
            reader = csv.DictReader(text)
            reader.fieldnames = [snake_case(label) for label in reader.fieldnames or []]
            typed = [(key, cast) for key in reader.fieldnames if (cast := cast_for(properties.get(key, {})))]
            strings = [key for key in reader.fieldnames if key not in dict(typed)]
            for row in reader:
                for key in strings:
                    if row[key] == "":
                        row[key] = None
                for key, cast in typed:
                    cell = row[key]
                    row[key] = cast(cell) if cell != "" else None
                yield row


class BaselineTap(Tap):
    name = "tap-baseline-csv"
    config_jsonschema = th.PropertiesList(
        th.Property("url", th.StringType, required=True),
        th.Property("headers", th.ObjectType(additional_properties=th.StringType)),
        th.Property("start_date", th.DateTimeType),
    ).to_dict()

    def discover_streams(self) -> list[Stream]:
        return [CsvOrdersStream(self, schema=ORDERS_SCHEMA)]


if __name__ == "__main__":
    BaselineTap.cli()

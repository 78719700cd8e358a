"""The RECORD fast path: write records straight to stdout when the SDK's per-record work is a no-op.

The SDK's path (selection walk, type conformance, stream-map transform, message object, simplejson,
a flush per message) costs far more than reading the CSV. Export records are already typed by
engine/csv_records.py, so when a stream has no stream maps, no flattening and every property
selected, that work changes nothing and the record can be encoded directly (msgspec). Anything
else takes the SDK's path; tests/test_fast_output.py proves both paths write the same messages.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

import msgspec
from singer_sdk.mapper import SameRecordTransform

_ENCODER = msgspec.json.Encoder(decimal_format="number", enc_hook=str)


def fast_path_allowed(stream: Any) -> bool:
    """True when the SDK would write each record exactly as the tap produced it."""
    if stream.config.get("flattening_enabled"):
        return False
    maps = stream.stream_maps
    if len(maps) != 1 or type(maps[0]) is not SameRecordTransform or maps[0].stream_alias != stream.name:
        return False
    return all(selected for breadcrumb, selected in stream.mask.items() if breadcrumb)


class FastRecordWriter:
    """Encodes RECORD messages of one stream; what surrounds the record is encoded once."""

    def __init__(self, stream_name: str, version: int | None, allowed_keys: set[str] | None) -> None:
        self.stream_name = stream_name
        # With an input catalog the SDK drops properties its schema lacks; so do we.
        self.allowed_keys = allowed_keys
        head: dict[str, Any] = {"type": "RECORD", "stream": stream_name}
        tail: dict[str, Any] = {"time_extracted": dt.datetime.now(dt.timezone.utc).isoformat()}
        if version is not None:
            tail = {"version": version, **tail}
        self._prefix = _ENCODER.encode(head).decode()[:-1] + ',"record":'
        self._suffix = "," + _ENCODER.encode(tail).decode()[1:] + "\n"

    def write(self, record: dict) -> None:
        if self.allowed_keys is not None and not self.allowed_keys.issuperset(record):
            record = {key: value for key, value in record.items() if key in self.allowed_keys}
        sys.stdout.write(self._prefix + _ENCODER.encode(record).decode() + self._suffix)

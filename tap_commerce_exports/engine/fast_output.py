"""The RECORD fast path: write records straight to stdout when the SDK's per-record work is a no-op.

The SDK's path (selection walk, type conformance, stream-map transform, message object, simplejson,
a flush per message) costs far more than reading the CSV. Export records are already typed by
engine/csv_records.py, so when a stream has no stream maps, no flattening and every property
selected, that work changes nothing and the record can be encoded directly (msgspec). Anything
else takes the SDK's path; tests/test_fast_output.py proves both paths write the same messages.
"""

from __future__ import annotations

import datetime as dt
import gzip
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec
from singer_sdk.batch import lazy_chunked_generator
from singer_sdk.mapper import SameRecordTransform

_ENCODER = msgspec.json.Encoder(decimal_format="number", enc_hook=str)
GZIP_LEVEL = 3  # most of level 9's size for a fraction of its time


def fast_path_allowed(stream: Any) -> bool:
    """True when the SDK would write each record exactly as the tap produced it."""
    if stream.config.get("flattening_enabled") or stream.get_batch_config(stream.config):
        return False
    if stream.ABORT_AT_RECORD_COUNT is not None:  # --test and dry runs count records one by one
        return False
    maps = stream.stream_maps
    if len(maps) != 1 or type(maps[0]) is not SameRecordTransform or maps[0].stream_alias != stream.name:
        return False
    return all(selected for breadcrumb, selected in stream.mask.items() if breadcrumb)


class FastRecordWriter:
    """Encodes one file's RECORD messages and writes them to stdout a chunk at a time.

    What surrounds the record is encoded once. `flush()` must run before any other message (the
    stream calls it at the end of each file, before the window's STATE).
    """

    CHUNK_RECORDS = 512

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
        self._lines: list[str] = []
        self.written = 0
        #: Called after each chunk reaches stdout: a safe point to stop (the tap's check_stop).
        self.after_chunk: Callable[[], None] = lambda: None

    def write(self, record: dict) -> None:
        if self.allowed_keys is not None and not self.allowed_keys.issuperset(record):
            record = {key: value for key, value in record.items() if key in self.allowed_keys}
        self._lines.append(self._prefix + _ENCODER.encode(record).decode() + self._suffix)
        if len(self._lines) >= self.CHUNK_RECORDS:
            self.flush()
            self.after_chunk()

    def flush(self) -> None:
        if self._lines:
            sys.stdout.write("".join(self._lines))
            self.written += len(self._lines)
            self._lines.clear()


class FastJsonlBatcher:
    """BATCH files of JSON lines, encoded with msgspec and gzipped a chunk at a time.

    The SDK's JSONL batcher serializes with simplejson and compresses record by record at gzip's
    slowest level; this writes the same files (one JSON record per line) several times faster.
    """

    def __init__(self, tap_name: str, stream_name: str, batch_config: Any) -> None:
        self.sync_id = f"{tap_name}--{stream_name}-{uuid.uuid4()}"
        self.batch_config = batch_config

    def get_batches(self, records: Iterable[dict]) -> Iterator[list[str]]:
        storage = self.batch_config.storage
        compress = self.batch_config.encoding.compression == "gzip"
        prefix = storage.prefix or ""
        suffix = ".json.gz" if compress else ".json"
        for number, chunk in enumerate(lazy_chunked_generator(records, self.batch_config.batch_size), start=1):
            filename = f"{prefix}{self.sync_id}-{number}{suffix}"
            with storage.open(filename, "wb") as raw:
                out = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL) if compress else raw
                buffer = bytearray()
                for record in chunk:
                    buffer += _ENCODER.encode(record)
                    buffer += b"\n"
                    if len(buffer) >= 1 << 20:
                        out.write(buffer)
                        buffer.clear()
                out.write(buffer)
                if compress:
                    out.close()
            yield [storage.get_url(filename)]

"""The RECORD fast path: write records straight to stdout when the SDK's per-record work is a no-op.

The SDK's path (selection walk, type conformance, stream-map transform, message object, simplejson,
a flush per message) costs far more than reading the CSV. Export records are already typed by
records/columns.py, so when a stream has no stream maps, no flattening and every property
selected, that work changes nothing and the record can be encoded directly (msgspec). Anything
else takes the SDK's path; tests/test_fast_output.py proves both paths write the same messages.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import stat
import sys
from collections.abc import Callable
from typing import Any

from singer_sdk.mapper import SameRecordTransform

from tap_commerce_exports.records.columns import RECORD_JSON
from tap_commerce_exports.records.csv_reader import RecordBuilder, dict_builder, struct_builder

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


def fast_path_allowed(stream: Any) -> bool:
    """True when the SDK would write each record exactly as the tap produced it."""
    if stream.config.get("flattening_enabled") or stream.get_batch_config(stream.config):
        return False
    if stream.counts_records_one_by_one:  # --test and dry runs count records one by one
        return False
    maps = stream.stream_maps
    if len(maps) != 1 or type(maps[0]) is not SameRecordTransform or maps[0].stream_alias != stream.name:
        return False
    return all(selected for breadcrumb, selected in stream.mask.items() if breadcrumb)


class FastRecordWriter:
    """Encodes a partition's RECORD messages a block at a time and writes them to stdout as bytes.

    What surrounds the record is encoded once; a block of records is encoded in one msgspec call
    and wrapped with C-level joins. Records of one file all have the same keys (the file's columns),
    so the catalog's allowed keys are checked once per block.
    """

    def __init__(self, stream_name: str, version: int | None, allowed_keys: set[str] | None) -> None:
        self.stream_name = stream_name
        # With an input catalog the SDK drops properties its schema lacks; so do we.
        self.allowed_keys = allowed_keys
        head: dict[str, Any] = {"type": "RECORD", "stream": stream_name}
        tail: dict[str, Any] = {"time_extracted": dt.datetime.now(dt.timezone.utc).isoformat()}
        if version is not None:
            tail = {"version": version, **tail}
        self._prefix = RECORD_JSON.encode(head)[:-1] + b',"record":'
        self._suffix = b"," + RECORD_JSON.encode(tail)[1:] + b"\n"
        self.written = 0
        #: Called after each block reaches stdout: a safe point to stop (the tap's check_stop).
        self.after_block: Callable[[], None] = lambda: None

    def record_builder(
        self, keys: list[str], constants: dict[str, Any], omit_if_null: frozenset[str] = frozenset()
    ) -> RecordBuilder:
        """Structs (cheaper to build and encode) for a file whose keys all reach the output; dicts,
        filtered here, when the catalog drops some of them."""
        allowed = self.allowed_keys
        if allowed is None or allowed.issuperset([*keys, *constants]):
            return struct_builder(keys, constants, omit_if_null)
        return dict_builder(keys, constants, omit_if_null)

    def write_block(self, records: list[Any]) -> None:
        if not records:
            return
        allowed = self.allowed_keys
        if allowed is not None and isinstance(records[0], dict) and not allowed.issuperset(records[0]):
            records = [{key: value for key, value in record.items() if key in allowed} for record in records]
        # JSON strings escape newlines, so the encoded block splits into exactly one line per record.
        lines = RECORD_JSON.encode_lines(records)[:-1].split(b"\n")
        _write_stdout(self._prefix + (self._suffix + self._prefix).join(lines) + self._suffix)
        self.written += len(records)
        self.after_block()


#: Pipe buffer asked for on stdout: Linux's default 64 KiB makes every block of records wait on
#: the reader several times; 1 MiB is the default ceiling (/proc/sys/fs/pipe-max-size) for anyone.
STDOUT_PIPE_BYTES = 1 << 20


def widen_stdout_pipe() -> None:
    """Ask for a larger pipe buffer when stdout is a pipe (Linux); anywhere else, nothing changes."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    try:
        fd = sys.stdout.fileno()
        if set_size is None or not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < STDOUT_PIPE_BYTES:
            fcntl.fcntl(fd, set_size, STDOUT_PIPE_BYTES)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # a smaller buffer is only slower


def _write_stdout(payload: bytes) -> None:
    """Bytes straight to stdout's buffer, after whatever the SDK wrote through the text layer."""
    stdout = sys.stdout
    buffer = getattr(stdout, "buffer", None)
    if buffer is None:  # stdout replaced by a text-only stream (tests capture it so)
        stdout.write(payload.decode())
        return
    stdout.flush()
    buffer.write(payload)
    buffer.flush()

"""The RECORD fast path: write records straight to stdout when the SDK's per-record work is a no-op.

The SDK's path (selection walk, type conformance, stream-map transform, message object, simplejson,
a flush per message) costs far more than reading the CSV. Export records are already typed by
engine/csv_records.py, so when a stream has no stream maps, no flattening and every property
selected, that work changes nothing and the record can be encoded directly (msgspec). Anything
else takes the SDK's path; tests/test_fast_output.py proves both paths write the same messages.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import stat
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec
from isal import igzip
from singer_sdk.mapper import SameRecordTransform

from tap_commerce_exports.engine.csv_records import RecordBuilder, dict_builder, struct_builder

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

_ENCODER = msgspec.json.Encoder(decimal_format="number", enc_hook=str)
GZIP_LEVEL = 1  # ISA-L's level 1: zlib level 3's size at ~5x its speed


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
        self._prefix = _ENCODER.encode(head)[:-1] + b',"record":'
        self._suffix = b"," + _ENCODER.encode(tail)[1:] + b"\n"
        self.written = 0
        #: Called after each block reaches stdout: a safe point to stop (the tap's check_stop).
        self.after_block: Callable[[], None] = lambda: None

    def record_builder(self, keys: list[str], constants: dict[str, Any]) -> RecordBuilder:
        """Structs (cheaper to build and encode) for a file whose keys all reach the output; dicts,
        filtered here, when the catalog drops some of them."""
        allowed = self.allowed_keys
        if allowed is None or allowed.issuperset([*keys, *constants]):
            return struct_builder(keys, constants)
        return dict_builder(keys, constants)

    def write_block(self, records: list[Any]) -> None:
        if not records:
            return
        allowed = self.allowed_keys
        if allowed is not None and isinstance(records[0], dict) and not allowed.issuperset(records[0]):
            records = [{key: value for key, value in record.items() if key in allowed} for record in records]
        # JSON strings escape newlines, so the encoded block splits into exactly one line per record.
        lines = _ENCODER.encode_lines(records)[:-1].split(b"\n")
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


class FastJsonlBatcher:
    """BATCH files of JSON lines: msgspec encodes a block of records per call, ISA-L gzips them.

    The SDK's JSONL batcher serializes with simplejson and compresses record by record with zlib
    at its slowest level. Here a block is encoded in one call and gzipped by python-isal on this
    thread (a compression thread lost more to the GIL hand-offs than it saved). The files are the
    same: one JSON record per line, `batch_size` records per file, gzip-readable by any target.
    """

    def __init__(
        self,
        tap_name: str,
        stream_name: str,
        batch_config: Any,
        *,
        before_announcing: Callable[[], None],
        announce_open_file_on: type[BaseException],
    ) -> None:
        self.sync_id = f"{tap_name}--{stream_name}-{uuid.uuid4()}"
        self.batch_config = batch_config
        #: Called when a file is complete, just before its manifest is handed on: every record given
        #: to the batcher so far is then in an announced file (the stream moves its bookmarks).
        self.before_announcing = before_announcing
        #: The stop raised between blocks: the file being written is then announced, not dropped.
        self.announce_open_file_on = announce_open_file_on
        self._file_count = 0

    def get_batches(self, blocks: Iterable[list[Any]]) -> Iterator[list[str]]:
        """One manifest (a list of one file URL) per `batch_size` records, as each file is complete."""
        size = self.batch_config.batch_size
        file: _BatchFile | None = None
        try:
            for block in _cut_at_file_boundaries(blocks, size):
                if file is None:
                    file = self._open_next()
                file.write(block)
                if file.records == size:
                    manifest, file = self._announce(file), None
                    yield manifest
            if file is not None:
                manifest, file = self._announce(file), None
                yield manifest
        except self.announce_open_file_on:
            # A stop comes between blocks, so the open file holds whole records: announce it rather
            # than export its rows again next run.
            if file is not None:
                manifest, file = self._announce(file), None
                yield manifest
            else:
                self.before_announcing()  # every record handed on is in an announced file already
            raise
        finally:
            if file is not None:  # the run failed mid-file: never announced, closed here
                file.abandon()

    def _announce(self, file: _BatchFile) -> list[str]:
        """Close the file and return its manifest, once the stream has moved its held bookmarks."""
        url = file.close()
        self.before_announcing()
        return [url]

    def _open_next(self) -> _BatchFile:
        self._file_count += 1
        storage = self.batch_config.storage
        compress = self.batch_config.encoding.compression == "gzip"
        filename = f"{storage.prefix or ''}{self.sync_id}-{self._file_count}{'.json.gz' if compress else '.json'}"
        return _BatchFile(storage, filename, compress)


class _BatchFile:
    """One batch file being written."""

    def __init__(self, storage: Any, filename: str, compress: bool) -> None:
        self.storage, self.filename = storage, filename
        self._closing = contextlib.ExitStack()
        out = self._closing.enter_context(storage.open(filename, "wb"))
        if compress:
            out = self._closing.enter_context(igzip.GzipFile(fileobj=out, mode="wb", compresslevel=GZIP_LEVEL))
        self._out = out
        self.records = 0

    def write(self, block: list[Any]) -> None:
        self._out.write(_ENCODER.encode_lines(block))
        self.records += len(block)

    def close(self) -> str:
        """Flush and close the file; its URL for the BATCH manifest."""
        self._closing.close()
        return str(self.storage.get_url(self.filename))

    def abandon(self) -> None:
        self._closing.close()


def _cut_at_file_boundaries(blocks: Iterable[list[Any]], size: int) -> Iterator[list[Any]]:
    """The same records, with a block boundary at every `size` records (where a file ends)."""
    room = size
    for block in blocks:
        while block:
            head, block = (block, []) if len(block) <= room else (block[:room], block[room:])
            yield head
            room -= len(head)
            if room == 0:
                room = size

"""The ways a stream's records leave the tap, one small class each, chosen once per stream sync.

RECORD messages:
- `SdkRecords`: records handed to the Singer SDK's loop (stream maps, flattening, partial selection);
- `FastRecords`: the same messages encoded and written here, when that loop would change nothing
  (fast_records.py says when).
BATCH messages:
- `JsonlBatches`: JSON-lines files written by this tap, a large export's by worker processes
  (parallel_batches.py) when there are any;
- the SDK's own batcher, for the encodings the tap does not write itself (stream.get_batches).

A stream gives a record path its blocks of records (`emit`) and a batch path its pieces (`batches`);
the stream keeps the bookmarks, which in BATCH mode wait for the file holding a window's last rows
(`before_announcing`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tap_commerce_exports.output.fast_records import FastRecordWriter
from tap_commerce_exports.output.jsonl_batches import FastJsonlBatcher, FilesLayout
from tap_commerce_exports.output.parallel_batches import BatchWorkerPool, SlicedBatchWriter
from tap_commerce_exports.records.csv_reader import BuilderFactory, CsvLayout, CsvRecordReader, dict_builder


class SdkRecords:
    """Dict records for the SDK's loop, which writes them (`emit` yields them)."""

    builder: BuilderFactory = staticmethod(dict_builder)  # type: ignore[assignment]

    def __init__(self, check_stop: Callable[[], None]) -> None:
        self.check_stop = check_stop
        self.written = 0  # the SDK counts the records it writes itself

    def emit(self, blocks: Iterable[list[Any]]) -> Iterator[dict]:
        for block in blocks:
            self.check_stop()
            yield from block

    def allow_keys(self, keys: Iterable[str]) -> None:
        """The SDK's loop reads the schema itself."""


class FastRecords:
    """Records encoded and written here, a block at a time (`emit` yields nothing)."""

    def __init__(self, writer: FastRecordWriter, check_stop: Callable[[], None]) -> None:
        self.writer = writer
        writer.after_block = check_stop
        self.builder: BuilderFactory = writer.record_builder

    @property
    def written(self) -> int:
        return self.writer.written

    def emit(self, blocks: Iterable[list[Any]]) -> Iterator[dict]:
        for block in blocks:
            self.writer.write_block(block)
        return
        yield  # a generator, like SdkRecords.emit

    def allow_keys(self, keys: Iterable[str]) -> None:
        """Columns a file brought mid-stream reach the output too."""
        if self.writer.allowed_keys is not None:
            self.writer.allowed_keys.update(keys)


RecordPath = SdkRecords | FastRecords


class JsonlBatches:
    """JSON-lines batch files, named `<prefix><tap>--<stream>-<uuid>-N`, announced in row order."""

    def __init__(
        self,
        layout: FilesLayout,
        before_announcing: Callable[[], None],
        stop_signal: type[BaseException],
        workers: BatchWorkerPool | None = None,
        logger: Any = None,
        check_stop: Callable[[], None] = lambda: None,
    ) -> None:
        self.batcher = FastJsonlBatcher(layout, before_announcing=before_announcing, announce_open_file_on=stop_signal)
        #: With worker processes, a large export's files are written a slice per worker.
        self.sliced = SlicedBatchWriter(workers, self.batcher, logger, check_stop) if workers is not None else None

    def pieces_of(self, path: str, reader: CsvRecordReader, on_layout: Callable[[CsvLayout], None]) -> Iterator[Any]:
        """One export file as pieces for the batcher: blocks of records, or files written by workers."""
        if self.sliced is not None:
            return self.sliced.pieces(path, reader, on_layout)
        return reader.read_file(path, on_layout)

    def batches(self, pieces: Iterable[Any]) -> Iterator[list[str]]:
        """One manifest per file, once the file is complete."""
        return self.batcher.get_batches(pieces)

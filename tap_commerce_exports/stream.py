"""Where windows move the bookmark: the Singer stream every export type is an instance of.

A stream asks its source's API for one export per window, reads each finished file in window
order and, only after the last row of a window has been written, moves the bookmark to the end of
that window and writes STATE. A run killed at any moment therefore resumes at the first window
whose rows were not all emitted: rows may be sent twice (targets dedupe on the primary key),
never lost.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from singer_sdk import metrics

from tap_commerce_exports.exports.in_flight import STATE_KEY as IN_FLIGHT_KEY
from tap_commerce_exports.exports.in_flight import exports_in_flight, remembered_exports, window_key
from tap_commerce_exports.exports.job import ExportApi, ExportRequest, ExportTooLarge, ReadyExport
from tap_commerce_exports.exports.runner import ExportRunner
from tap_commerce_exports.exports.scheduler import ExportQueue, ExportScheduler
from tap_commerce_exports.exports.windows import UTC, Window, export_range, parse_instant, plan_windows
from tap_commerce_exports.output.fast_records import FastRecordWriter, fast_path_allowed
from tap_commerce_exports.output.jsonl_batches import FilesLayout, WrittenFiles
from tap_commerce_exports.output.parallel_batches import BatchWorkerPool
from tap_commerce_exports.output.paths import FastRecords, JsonlBatches, RecordPath, SdkRecords
from tap_commerce_exports.records.columns import Column
from tap_commerce_exports.records.csv_reader import (
    BuilderFactory,
    CsvLayout,
    CsvRecordReader,
    Misfit,
    companion_key,
    dict_builder,
    struct_builder,
)
from tap_commerce_exports.sdk_adapter import SdkStream
from tap_commerce_exports.settings import SyncSettings, source_hours

UNKNOWN_COLUMN_SCHEMA = {"type": ["string", "null"], "description": "Column not known to the tap; kept as text."}
#: Stream state key: columns an earlier version of the tap loaded as text since a cell did not fit
#: their kind. They stay text, so a warehouse column never flips back to the narrower type.
TEXT_COLUMNS = "columns_loaded_as_text"
#: Stream state key: typed columns with a text companion (`<key>__text`) since a cell did not fit
#: their kind. The companion stays in the schema in later runs.
COMPANION_COLUMNS = "columns_with_text_companion"


class StopRequested(BaseException):
    """A signal asked the run to stop; raised at a safe point (between blocks of rows or while
    waiting), caught by the tap's sync_all."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class SyncCoordinator(Protocol):
    """What a stream asks of the tap that runs it: failures, stops and in-flight exports are tap-wide."""

    def check_stop(self) -> None:
        """Raise StopRequested if a signal asked the run to stop (a safe point to stop)."""

    def note_exports_in_flight(self) -> None:
        """Put exports started meanwhile, by any stream, into STATE (called while waiting)."""

    def record_failure(self, stream_name: str, context: dict | None, error: BaseException) -> None:
        """A partition failed: the run goes on and reports it at the end."""

    def batch_workers(self) -> BatchWorkerPool | None:
        """The worker processes that write large exports' batch files, if any."""


@dataclass
class SourceRuntime:
    """What a source's streams share: its API, the runner that drives it, and the tap's pool."""

    api: ExportApi
    runner: ExportRunner
    scheduler: ExportScheduler
    settings: SyncSettings
    naive_zone: dt.tzinfo = UTC


@dataclass
class StreamTotals:
    windows: int = 0
    exports: int = 0
    rows: int = 0
    bytes: int = 0
    polls: int = 0
    seconds: float = 0.0
    splits: int = 0
    #: When the stream's first exports were started, and when its last row was written.
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def wall_seconds(self) -> float:
        """Wall time, not the sum over exports: a stream's partitions wait in parallel."""
        return (self.finished or time.monotonic()) - self.started


class StreamRecordCounter(metrics.Counter):
    """The record_count of all a stream's partitions together. The SDK gives its counter each
    partition's context in turn, so the one count logged at the end carried the last partition's
    context, as if all the stream's records were that partition's."""

    def with_context(self, value: Any) -> None:
        """No partition's context: the count is the whole stream's."""


class ExportStream(SdkStream):
    """One export type of one API as a Singer stream. Subclasses only declare what differs."""

    #: The API's name for this export type.
    export_type: ClassVar[str]
    #: Columns the tap knows, with their kinds. Other columns in a file are kept as strings.
    known_columns: ClassVar[tuple[Column, ...]] = ()
    #: The context key of a partitioned stream (campaign_id, experience_id); None if not partitioned.
    partition_key: ClassVar[str | None] = None
    #: Fields to ask the API for, in order (APIs that take a field list).
    requested_fields: ClassVar[tuple[str, ...]] = ()
    #: Write RECORDs through output/fast_records.py when the SDK's per-record work is a no-op.
    fast_path_enabled: ClassVar[bool] = True
    #: The source's setting for hours re-read before the bookmark on every run, for rows that change
    #: after their window was exported (None: the source's windows already follow changes).
    reread_setting: ClassVar[str | None] = None
    #: What the API's date range filters on, in words, for the README.
    window_filters_on: ClassVar[str] = ""

    def __init__(self, tap: Any, runtime: SourceRuntime) -> None:
        self.runtime = runtime
        self._queues: dict[tuple, ExportQueue] = {}
        #: How records leave the tap (output/paths.py): chosen once per sync, set while one runs.
        self._fast_path: bool | None = None
        self._record_path: RecordPath | None = None
        self._batch_path: JsonlBatches | None = None
        #: BATCH mode: windows whose rows were all handed to the batcher, waiting for their file to be
        #: announced before their bookmark may pass them (None: bookmarks move at once).
        self._bookmarks_awaiting_file: list[tuple[dict | None, Window | None]] | None = None
        self.totals = StreamTotals()
        self._fingerprint_warned: set[str] = set()
        #: When this run's sync began: before any of its windows was planned or exported.
        self.sync_started_at: dt.datetime | None = None
        self._config = dict(tap.config)  # the schema depends on settings (Voucherify metadata fields)
        super().__init__(tap=tap, schema=self._build_schema(), name=self.name)

    @property
    def coordinator(self) -> SyncCoordinator:
        return self.tap  # type: ignore[no-any-return]

    # ------------------------------------------------------------- declarations

    def columns(self) -> list[Column]:
        """The known columns; a subclass may add some from settings (Voucherify metadata fields)."""
        return list(self.known_columns)

    def fields_to_request(self) -> tuple[str, ...]:
        return self.requested_fields

    def partition_values(self) -> list[str]:
        """Partition values for a partitioned stream; subclasses ask their API."""
        raise NotImplementedError(f"{self.name} is partitioned by {self.partition_key} but lists no partitions")

    def _build_schema(self) -> dict:
        properties = {column.key: column.json_schema() for column in self.columns()}
        return {"type": "object", "properties": properties}

    @property
    def partitions(self) -> list[dict] | None:
        if not self.partition_key:
            return None
        if not hasattr(self, "_partitions"):
            self._partitions = [{self.partition_key: value} for value in self.partition_values()]
        return self._partitions

    # ---------------------------------------------------------------- windows

    def bookmark(self, context: dict | None) -> dt.datetime | None:
        state = self.get_context_state(context)
        if self.replication_key and state.get("replication_key") == self.replication_key:
            value = state.get("replication_key_value")
            return parse_instant(value) if value else None
        return None

    def export_requests(self, context: dict | None) -> list[ExportRequest]:
        """This run's exports for one partition, in window order (reusing exports left in state)."""
        partition = dict(context or {})
        fields = self.fields_to_request()
        if not self.replication_key:
            windows: list[Window | None] = [None]
        else:
            span = self.export_span(context)
            windows = list(plan_windows(span, self.runtime.settings.export_window_days)) if span else []
        remembered = remembered_exports(self.get_context_state(context))
        return [
            ExportRequest(
                self.name,
                self.export_type,
                window,
                partition,
                fields,
                remembered_export_id=remembered.get(window_key(window)),
            )
            for window in windows
        ]

    def export_span(self, context: dict | None) -> Window | None:
        """The range due for this partition; subclasses may clamp it (an experience's lifetime)."""
        settings = self.runtime.settings
        return export_range(
            bookmark=self.bookmark(context),
            start_date=settings.start_date,
            end_date=settings.end_date,
            lookback_hours=max(settings.lookback_hours, self.hours_before_bookmark()),
            now=dt.datetime.now(UTC),
        )

    def hours_before_bookmark(self) -> float:
        """Hours each run starts before the bookmark, for rows that change after their window was read."""
        return self.reread_hours()

    def reread_hours(self) -> float:
        """Hours re-read before the bookmark on every run, by the source's setting (`reread_setting`)."""
        return source_hours(self.config, self.reread_setting)

    def _advance_bookmark(self, context: dict | None, window: Window | None) -> None:
        """Called once every row of `window` was handed on. Written as RECORD messages, they are out:
        the bookmark passes the window now. In BATCH mode the last of them may be in a file not yet
        announced (files span windows), so the move waits for that file (see get_batches)."""
        if self._bookmarks_awaiting_file is not None:
            self._bookmarks_awaiting_file.append((context, window))
            return
        self._move_bookmark(context, window)

    def _move_bookmarks_awaiting_file(self) -> None:
        """The file holding the rows of every waiting window is about to be announced."""
        waiting, self._bookmarks_awaiting_file = self._bookmarks_awaiting_file or [], []
        for context, window in waiting:
            self._move_bookmark(context, window)

    def bookmark_after(self, context: dict | None, window: Window) -> dt.datetime:
        """Where the bookmark goes once `window`'s rows are all emitted: its end, unless the API's
        data settles later (Intelligems)."""
        return window.end

    def _move_bookmark(self, context: dict | None, window: Window | None) -> None:
        if window is not None and self.replication_key:
            bookmark = self.bookmark_after(context, window)
            state = self.get_context_state(context)
            state["replication_key"] = self.replication_key
            state["replication_key_value"] = bookmark.isoformat()
        self._note_exports_in_flight(context, force_write=True)

    # -------------------------------------------------- exports remembered in state (exports/in_flight.py)

    def _note_exports_in_flight(self, context: dict | None, *, force_write: bool = False) -> None:
        """Write STATE when exports were started that a killed run should resume, not pay for again."""
        queue = self._queues.get(tuple(sorted((context or {}).items())))
        waiting = queue.requests() if queue is not None else []
        in_flight = exports_in_flight(self.runtime.runner, self.name, context, waiting)
        state = self.get_context_state(context)
        if in_flight == state.get(IN_FLIGHT_KEY, []) and not force_write:
            return
        # Always written, emptied rather than removed: Meltano merges a new state into the stored
        # one, so a key left out would bring back exports an earlier (killed) run had in flight.
        state[IN_FLIGHT_KEY] = in_flight
        self.mark_state_unflushed()
        if not self.get_batch_config(self.config):
            # In BATCH mode the SDK writes STATE after each BATCH message: a STATE written here
            # could name a window whose rows sit in a batch file not yet announced.
            self.write_state()

    def note_all_exports_in_flight(self) -> None:
        for key in list(self._queues):
            self._note_exports_in_flight(dict(key) or None)

    # ----------------------------------------------------------------- exports

    def start_exports(self) -> None:
        """Queue this stream's first exports now, so they run while earlier streams are read."""
        self.totals.started = time.monotonic()
        for context in self.partitions or [{}]:
            try:
                self._queue_for(context or None, lookahead=1)  # first windows of every partition first
            except Exception as exc:  # reported by get_records, which meets the same error per partition
                self.logger.debug("%s %s: exports not started early: %s", self.name, context, exc)
        for queue in list(self._queues.values()):
            queue.allow_lookahead(self.runtime.settings.lookahead)

    def cancel_exports(self) -> None:
        """The run ends early: exports not begun are dropped, files downloaded but never read removed."""
        for queue in list(self._queues.values()):
            queue.cancel()
        self._queues.clear()

    def first_export_settled(self) -> bool:
        """Whether syncing this stream now would start with rows, not a wait: its first partition's
        next export is ready or failed (or it has nothing to export)."""
        first = (self.partitions or [{}])[0] if self.partitions != [] else None
        if first is None:
            return True
        key = tuple(sorted(first.items()))
        queue = self._queues.get(key)
        return queue is None or queue.head_done

    def _queue_for(self, context: dict | None, lookahead: int | None = None) -> ExportQueue:
        key = tuple(sorted((context or {}).items()))
        if key not in self._queues:
            runtime = self.runtime
            self._queues[key] = ExportQueue(
                runtime.scheduler,
                runtime.runner.prepare,
                self.export_requests(context),
                lookahead=lookahead or runtime.settings.lookahead,
            )
        return self._queues[key]

    def get_records(self, context: Mapping[str, Any] | None) -> Iterable[dict]:
        """Records for the SDK's loop, or none when the fast path writes them itself (output/paths.py)."""
        path = self._record_path = self._new_record_path()
        blocks = self._record_blocks(context, path.builder)
        try:
            yield from path.emit(blocks)
        finally:
            blocks.close()  # a stop raised here still ends the window's export (files, queue)
            if path.written:  # the fast path's records bypass the SDK's loop, which counts the others
                self._record_counter.increment(path.written)
            self._record_path = None

    def _record_blocks(
        self, context: Mapping[str, Any] | None, builder: BuilderFactory = dict_builder
    ) -> Generator[Any, None, None]:
        """Rows window by window, a block at a time; the bookmark passes a window once the consumer
        asks for the block after its last. A failure ends this partition only: the tap reports it
        at the end. `builder` makes the records (csv_records.py): dicts unless only encoded."""
        context = dict(context) if context else None
        coordinator = self.coordinator
        queue: ExportQueue | None = None
        try:
            queue = self._queue_for(context)
            while queue:
                coordinator.check_stop()  # between windows: a safe point to stop
                try:
                    ready = queue.next_ready(while_waiting=coordinator.note_exports_in_flight)
                except ExportTooLarge as refused:
                    queue.push_front(self._split(refused.request, f"was refused as too large ({refused.detail})"))
                    continue
                if ready.at_row_cap:
                    ready.file.remove()
                    queue.push_front(
                        self._split(
                            ready.request,
                            f"export {ready.handle.export_id} hit the API's row cap ({ready.row_count} rows) "
                            "and may be truncated",
                        )
                    )
                    continue
                yield from self._blocks_of(ready, context, builder)
                self.runtime.runner.forget(ready.request)
                self._advance_bookmark(context, ready.request.window)
        except Exception as exc:
            coordinator.check_stop()  # an export given up because the run is stopping is no failure
            coordinator.record_failure(self.name, context, exc)
        finally:
            if queue is not None:
                queue.cancel()
            self._queues.pop(tuple(sorted((context or {}).items())), None)

    def _split(self, request: ExportRequest, why: str) -> list[ExportRequest]:
        """The window's two halves, to export instead of a window over the API's row cap."""
        window = request.window
        if window is None or window.seconds < 2:
            raise RuntimeError(
                f"{request.describe()}: {why}, and its window cannot be split further; rows would be lost"
            )
        self.totals.splits += 1
        halves = window.halves()
        self.logger.warning("%s: %s; exporting %s and %s separately", request.describe(), why, halves[0], halves[1])
        return [
            ExportRequest(request.stream_name, request.export_type, half, request.partition, request.fields)
            for half in halves
        ]

    def _blocks_of(self, ready: ReadyExport, context: dict | None, builder: BuilderFactory) -> Iterator[Any]:
        """The file's blocks of records; in BATCH mode with worker processes, a large file's
        batch files instead (WrittenFiles: parallel_batches.py)."""
        started = time.monotonic()
        try:
            reader = self._reader_for(ready, context, builder)
            if self._batch_path is not None:
                yield from self._batch_path.pieces_of(ready.file.path, reader, self._accept_layout)
            else:
                yield from reader.read_file(ready.file.path, self._accept_layout)
        finally:
            ready.file.remove()
        self._count(ready, reader.rows_read, time.monotonic() - started)
        self.logger.info(
            "%s: emitted %d rows (%d bytes) in %.1fs",
            reader.describe,
            reader.rows_read,
            ready.file.size_bytes,
            time.monotonic() - started,
        )

    def _reader_for(self, ready: ReadyExport, context: dict | None, builder: BuilderFactory) -> CsvRecordReader:
        describe = f"{ready.request.describe()} export {ready.handle.export_id}"
        return self.new_reader(
            self._columns_by_key(),
            describe=describe,
            naive_zone=self.runtime.naive_zone,
            requested_fields=list(ready.request.fields) or None,
            constants=dict(context or {}),
            builder=builder,
            text_columns=self._state_list(TEXT_COLUMNS),
            companion_columns=self._state_list(COMPANION_COLUMNS),
            unselected_columns=self._unselected_columns(),
            on_misfit=lambda misfit: self._on_misfit(misfit, describe),
            row_key_columns=self.primary_keys or (),
        )

    def new_reader(self, columns: dict[str, Column], **options: Any) -> CsvRecordReader:
        """The reader of this stream's files; a source may read more out of them (Voucherify metadata)."""
        return CsvRecordReader(columns, **options)

    # ------------------------------------------------------------- fast output

    def _new_record_path(self) -> RecordPath:
        if self._fast_path is None:
            self._fast_path = self.fast_path_enabled and fast_path_allowed(self)
            self.logger.debug("%s: RECORD fast path %s", self.name, "on" if self._fast_path else "off")
        if not self._fast_path:
            return SdkRecords(self.coordinator.check_stop)
        allowed = set(self.selected_schema["properties"]) if self.selected_schema is not None else None
        writer = FastRecordWriter(self.name, self.stream_version, allowed)
        return FastRecords(writer, self.coordinator.check_stop)

    def get_record_counter(self, **kwargs: Any) -> Any:
        """The SDK's record_count metric of the sync under way: the fast path, whose records bypass
        the SDK's loop, counts into it, so each stream logs one record_count."""
        counter = super().get_record_counter(**kwargs)
        self._record_counter = StreamRecordCounter(counter.metric, counter.tags, log_interval=counter.log_interval)
        return self._record_counter

    def get_batches(self, batch_config: Any, context: Mapping[str, Any] | None = None) -> Iterable[tuple]:
        """Batch files, with every bookmark move held until the file holding the window's last rows
        is announced (see _advance_bookmark)."""
        self._bookmarks_awaiting_file = []
        try:
            if batch_config.encoding.format == "jsonl":
                yield from self._jsonl_batches(batch_config, context)
            else:  # the SDK's batcher: a file holds every record read before its manifest
                for encoding, manifest in super().get_batches(batch_config, context):
                    self._move_bookmarks_awaiting_file()
                    yield encoding, manifest
            self._move_bookmarks_awaiting_file()  # windows without rows after the last file
        finally:
            # A failure drops the windows still waiting: their rows were in a file never announced.
            self._bookmarks_awaiting_file = None

    def _jsonl_batches(self, batch_config: Any, context: Mapping[str, Any] | None) -> Iterator[tuple]:
        storage = batch_config.storage
        layout = FilesLayout(
            storage,
            f"{storage.prefix or ''}{self.tap_name}--{self.name}-{uuid.uuid4()}",
            compress=batch_config.encoding.compression == "gzip",
            batch_size=batch_config.batch_size,
        )
        one_by_one = self.counts_records_one_by_one  # --test and dry runs count records one by one
        coordinator = self.coordinator
        path = self._batch_path = JsonlBatches(
            layout,
            before_announcing=self._move_bookmarks_awaiting_file,
            stop_signal=StopRequested,
            workers=None if one_by_one else coordinator.batch_workers(),
            logger=self.logger,
            check_stop=coordinator.check_stop,
        )
        if one_by_one:
            blocks: Iterable[Any] = ([record] for record in self.records_of_sdk_loop(context))
        else:
            blocks = self._batch_blocks(context)
        try:
            for manifest in path.batches(blocks):
                yield batch_config.encoding, manifest
        finally:
            self._batch_path = None

    def _batch_blocks(self, context: Mapping[str, Any] | None) -> Iterator[Any]:
        """What the SDK's `_sync_records(write_messages=False)` does for BATCH, a block at a time
        (or, for a large export with worker processes, its files: WrittenFiles).

        Its per-record steps are no-ops for export streams (no post_process, no child streams,
        bookmarks per window), so only the per-partition ones are kept: starting value, metrics and
        the final state of each partition, as the SDK does them.
        """
        coordinator = self.coordinator
        record_counter, timer = self.get_record_counter(), self.get_sync_timer()
        with record_counter, timer:
            for partition in ([context] if context is not None else self.partitions) or [{}]:
                record_counter.with_context(partition)
                timer.with_context(partition)
                current = dict(partition) if partition else None
                self.start_partition(current)
                blocks = self._record_blocks(current, struct_builder)  # BATCH records are only encoded
                try:
                    for piece in blocks:
                        if isinstance(piece, WrittenFiles):
                            # Already files: dropping them for a stop would lose them. The writer
                            # stops between slices itself (SlicedBatchWriter.while_waiting).
                            record_counter.increment(piece.records)
                        else:
                            coordinator.check_stop()
                            record_counter.increment(len(piece))
                        yield piece
                finally:
                    blocks.close()
                self.finalize_partition(current)
        if not context:
            self.finalize_stream()

    def _count(self, ready: ReadyExport, rows: int, seconds: float) -> None:
        totals = self.totals
        totals.windows += 1
        totals.exports += 1
        totals.rows += rows
        totals.bytes += ready.file.size_bytes
        totals.polls += ready.polls
        totals.seconds += seconds + ready.waited_seconds

    # ------------------------------------------------------------ schema drift

    def _columns_by_key(self) -> dict[str, Column]:
        known = {column.key: column for column in self.columns()}
        for key in self.schema["properties"]:
            known.setdefault(key, Column(key))
        return known

    def _accept_layout(self, layout: CsvLayout) -> None:
        """A file brought columns the schema lacks: keep them as strings and tell the target first."""
        self._warn_of_fingerprinted_keys(layout)
        new_keys = [key for key in layout.unknown_keys if key not in self.schema["properties"]]
        if not new_keys:
            return
        self.logger.warning(
            "%s: the export has columns the tap does not know: %s; keeping them as strings",
            self.name,
            ", ".join(new_keys),
        )
        self._change_properties({key: dict(UNKNOWN_COLUMN_SCHEMA) for key in new_keys})
        if self._record_path is not None:
            self._record_path.allow_keys(new_keys)

    def _warn_of_fingerprinted_keys(self, layout: CsvLayout) -> None:
        """Once per run and column: the file lacks a key column, so its records carry fingerprints."""
        missing = [key for key in layout.fingerprinted_keys if key not in self._fingerprint_warned]
        if missing:
            self._fingerprint_warned.update(missing)
            self.logger.warning(
                "%s: the export has no column %s (primary key %s); each record carries a fingerprint of its "
                "row there ('row-sha1:...') so every row loads and re-reads deduplicate. The file's columns: %s",
                self.name,
                ", ".join(repr(key) for key in missing),
                ", ".join(self.primary_keys or ()),
                ", ".join(layout.keys),
            )
        changed = {
            key: text_column_schema(self._columns_by_key().get(key, Column(key)).kind)
            for key in layout.fingerprinted_keys
            if self.schema["properties"].get(key, {}).get("type") != ["string", "null"]
        }
        if changed:
            self._change_properties(changed)

    def _change_properties(self, properties: dict[str, dict], *, write_schema: bool = True) -> None:
        """New or wider column schemas, in the stream's schema and in its selected one (the catalog's:
        a column left out there stays out); then the maps, and a SCHEMA message before the next record."""
        for key, property_schema in properties.items():
            self.schema["properties"][key] = dict(property_schema)
            if self.selected_schema is not None and self.selected_schema is not self.schema:
                selected = self.selected_schema["properties"]
                if key in selected or key not in self._known_keys():
                    selected[key] = dict(property_schema)
        self.schema_changed()
        if write_schema and self.selected:
            self.write_schema()

    def _known_keys(self) -> set[str]:
        return {column.key for column in self.columns()}

    # ------------------------------------------------------ cells that do not fit

    def _state_list(self, key: str) -> set[str]:
        return set(self.stream_state.get(key, []))

    def _unselected_columns(self) -> set[str]:
        return {key for key in self.schema["properties"] if not self.mask.get(("properties", key), True)}

    def _on_misfit(self, misfit: Misfit, describe: str) -> None:
        if misfit.key in (self.primary_keys or ()):
            self._load_key_column_as_text(misfit, describe)
        else:
            self._add_text_companion(misfit, describe)

    def _add_text_companion(self, misfit: Misfit, describe: str) -> None:
        """A cell did not fit its column's kind: such cells go to a text column beside it from now on,
        in later runs too. The typed column keeps its type, so no loader is asked to alter it."""
        if misfit.key in self._state_list(COMPANION_COLUMNS):
            return
        companion = companion_key(misfit.key)
        # The cell itself is customer data (an email, a code): its shape says enough to find it.
        self.logger.warning(
            "%s: column %r is not always %s: row %d holds a value that is not (%s); values like it load "
            "as text into column %r from now on (in later runs too), and %r is null on their rows",
            describe,
            misfit.key,
            KIND_IN_WORDS.get(misfit.kind, misfit.kind),
            misfit.row,
            cell_shape(misfit.cell),
            companion,
            misfit.key,
        )
        self.stream_state[COMPANION_COLUMNS] = sorted(self._state_list(COMPANION_COLUMNS) | {misfit.key})
        self._change_properties({companion: companion_schema(misfit.key, misfit.kind)})
        if self._record_path is not None:
            self._record_path.allow_keys([companion])

    def _load_key_column_as_text(self, misfit: Misfit, describe: str) -> None:
        """A key column cannot be null on a row, so it cannot shed a misfit to a companion: the column
        is text from now on, in later runs too (a loader that cannot alter a column type refuses it)."""
        if misfit.key in self._state_list(TEXT_COLUMNS):
            return
        self.logger.warning(
            "%s: key column %r is not always %s: row %d holds a value that is not (%s); loading the column "
            "as text from now on (in later runs too)",
            describe,
            misfit.key,
            KIND_IN_WORDS.get(misfit.kind, misfit.kind),
            misfit.row,
            cell_shape(misfit.cell),
        )
        self.stream_state[TEXT_COLUMNS] = sorted(self._state_list(TEXT_COLUMNS) | {misfit.key})
        self._change_properties({misfit.key: text_column_schema(misfit.kind)})

    def prepare_sync(self) -> None:
        """Before the sync: what earlier runs learnt of the files' cells is in the first SCHEMA."""
        self.sync_started_at = dt.datetime.now(UTC)
        kinds = self._columns_by_key()
        legacy_text = {
            key: text_column_schema(kinds[key].kind)
            for key in self._state_list(TEXT_COLUMNS)
            if key in kinds and kinds[key].kind != "string"
        }
        unselected = self._unselected_columns()
        companions = {
            companion_key(key): companion_schema(key, kinds[key].kind)
            for key in self._state_list(COMPANION_COLUMNS)
            if key in kinds and key not in unselected
        }
        if legacy_text or companions:
            self._change_properties(legacy_text | companions, write_schema=False)


def cell_shape(cell: str) -> str:
    """A cell described without its content: its length and the kinds of characters in it."""
    kinds = [
        name
        for name, present in (
            ("letters", any(c.isalpha() for c in cell)),
            ("digits", any(c.isdigit() for c in cell)),
            ("spaces", any(c.isspace() for c in cell)),
            ("punctuation", any(not c.isalnum() and not c.isspace() for c in cell)),
        )
        if present
    ]
    return f"{len(cell)} characters: {', '.join(kinds) or 'none'}"


#: Column kinds (records/columns.py) as the warnings and schema descriptions say them.
KIND_IN_WORDS = {
    "number": "a number",
    "integer": "an integer",
    "boolean": "a boolean",
    "datetime": "a date-time",
    "epoch_ms": "a time in epoch milliseconds",
    "date": "a date",
    "json": "JSON",
}


def companion_schema(key: str, kind: str) -> dict:
    return {
        "type": ["string", "null"],
        "description": f"The cells of {key!r} that are not {KIND_IN_WORDS.get(kind, kind)}, exactly as written "
        f"(null where {key!r} holds the value).",
    }


def text_column_schema(kind: str) -> dict:
    return {
        "type": ["string", "null"],
        "description": f"Guessed or documented as {KIND_IN_WORDS.get(kind, kind)}, but the files hold other "
        "values: loaded as text, each cell exactly as written.",
    }

"""BATCH files of a large export written by worker processes, a slice of whole rows each.

RECORD messages leave the tap as one ordered stream, so one thread parses their rows. BATCH output
is files: a row need only land in the right file, and the files be announced in row order. So a
large export file is cut into slices at row boundaries, each slice is parsed, typed, encoded and
gzipped into batch files by a worker process, and the tap announces the finished files in order.
On 2 vCPUs this writes 1,000,000 rows in 2.3-3.4 s instead of 4.3-4.5 s in one process.

A worker runs the same CsvRecordReader and FastJsonlBatcher as the tap's own process would, so the
files hold the same records; errors name the row in the whole file. Cuts assume RFC 4180 quoting;
a slice that shows a cut fell inside a quoted field sends the rest of the file back to the tap's
own process, so a file quoted otherwise is read as it would be without workers.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import functools
import gc
import io
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from tap_commerce_exports.output.collector import YOUNG_GENERATION_THRESHOLD
from tap_commerce_exports.output.jsonl_batches import (
    FastJsonlBatcher,
    FilesLayout,
    WorkerStorage,
    WrittenFiles,
    local_directory,
    remove_files,
    remove_files_of_slice,
)
from tap_commerce_exports.records.csv_reader import CsvFormatError, CsvLayout, CsvRecordReader, Misfit

#: Bounds of a slice. Below the lower one a worker's fixed costs show; the upper one bounds what a
#: worker holds at once (the slice's bytes and text).
MIN_SLICE_BYTES = 256 * 1024
MAX_SLICE_BYTES = 8 * 1024 * 1024
#: Of the rows a batch file may hold, the share a slice aims for: rows per byte vary along a file,
#: and a slice a little over `batch_size` rows would end in a file of a few rows.
SLICE_FILL = 0.9
#: How far into a file its header may end (beyond that, the file is read in the tap's process).
HEADER_SEARCH_BYTES = 1024 * 1024
#: Default ceiling of worker processes: each holds ~26 MB, and past a few the tap's own process,
#: announcing files in order, is the limit.
DEFAULT_MAX_WORKERS = 4
#: How often a wait for a slice checks whether the run is stopping.
WAIT_STEP_SECONDS = 0.2


def usable_cpus() -> int:
    """The CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota (a container's
    `--cpus` or a Kubernetes limit), which affinity does not show."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, or v1 cfs quota/period); None when unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as cpu_max:
            quota, period = cpu_max.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with (
            open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as quota_file,
            open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as period_file,
        ):
            quota_us, period_us = int(quota_file.read()), int(period_file.read())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ rows in bytes


def _last_row_end(chunk: bytes, quoted_at_start: bool) -> int:
    """The index just after the last newline of `chunk` that ends a row, or 0 if none does.

    A newline inside a quoted field does not end a row. In RFC 4180 CSV every quote character
    toggles "inside quotes" (an escaped quote is two, toggling twice), so the parity of the quotes
    before a newline tells which it is; counted backwards from the chunk's end, each quote is seen
    once. (A stray quote in an unquoted field breaks this; write_slice notices, see there.)
    """
    quoted = quoted_at_start ^ bool(chunk.count(b'"') & 1)  # at the end of the chunk
    end = len(chunk)
    while (newline := chunk.rfind(b"\n", 0, end)) >= 0:
        quoted ^= bool(chunk.count(b'"', newline, end) & 1)
        if not quoted:
            return newline + 1
        end = newline
    return 0


def row_aligned_slices(path: str, start: int, slice_bytes: int) -> Iterator[tuple[int, int | None]]:
    """(start, end) byte offsets of consecutive slices of whole rows, from `start` (where a row
    begins) to the end of the file, each about `slice_bytes` long. If no row ends for 4 x
    MAX_SLICE_BYTES (quotes this cannot follow), the last is (start, None): the rest of the file."""
    with open(path, "rb") as raw:
        raw.seek(start)
        offset, quoted = start, False  # the file offset of the next chunk, and the quote state there
        while chunk := raw.read(slice_bytes):
            cut = _last_row_end(chunk, quoted)
            if cut and offset + cut > start:
                yield start, offset + cut
                start = offset + cut
            elif offset + len(chunk) - start > 4 * MAX_SLICE_BYTES:
                yield start, None
                return
            quoted ^= bool(chunk.count(b'"') & 1)
            offset += len(chunk)
        if offset > start:
            yield start, offset


def read_header(path: str) -> tuple[list[str], int] | None:
    """The header's labels and the offset of the first data row; None when the header does not
    end within HEADER_SEARCH_BYTES, is not UTF-8, or is not one clean CSV row (the tap's own reader
    then reads the file)."""
    with open(path, "rb") as raw:
        head = raw.read(HEADER_SEARCH_BYTES)
    quoted, position = False, 0
    while (newline := head.find(b"\n", position)) >= 0:
        quoted ^= bool(head.count(b'"', position, newline) & 1)
        if not quoted:
            header = _one_row(head[: newline + 1])
            return (header, newline + 1) if header is not None else None
        position = newline + 1
    return None


def _one_row(line: bytes) -> list[str] | None:
    try:
        rows = list(csv.reader(io.StringIO(line.decode("utf-8-sig"), newline=""), strict=True))
    except (UnicodeDecodeError, csv.Error):
        return None
    return rows[0] if len(rows) == 1 else None


def slice_bytes_for(path: str, data_start: int, batch_size: int) -> int:
    """Slices of about SLICE_FILL x batch_size rows, judging row length by the file's first MiB."""
    with open(path, "rb") as raw:
        raw.seek(data_start)
        sample = raw.read(HEADER_SEARCH_BYTES)
    bytes_per_row = len(sample) / max(1, sample.count(b"\n"))
    return int(min(MAX_SLICE_BYTES, max(MIN_SLICE_BYTES, SLICE_FILL * batch_size * bytes_per_row)))


# -------------------------------------------------------------------- the worker


@dataclass(frozen=True)
class FilesSpec:
    """A FilesLayout as it crosses to a worker: the storage by its settings, not as an object."""

    local_dir: str | None  # where the tap's storage writes, when that is a local directory
    root: str
    params: dict[str, Any] = field(repr=False)  # may hold the storage's credentials
    compress: bool
    batch_size: int

    @classmethod
    def of(cls, layout: FilesLayout) -> FilesSpec:
        storage = layout.storage
        local_dir = local_directory(storage)
        return cls(
            str(local_dir) if local_dir else None,
            storage.root,
            dict(storage.params or {}),
            layout.compress,
            layout.batch_size,
        )

    def storage(self) -> WorkerStorage:
        return WorkerStorage(self.local_dir, self.root, self.params)


@dataclass(frozen=True)
class SliceJob:
    path: str
    start: int
    end: int
    header: list[str]
    reader: CsvRecordReader
    files: FilesSpec
    name_stem: str


@dataclass(frozen=True)
class SliceResult:
    filenames: list[str]  # complete files, in row order
    records: int  # in those files
    rows: int  # read, blank ones included: where the next slice's row numbers start
    error: CsvFormatError | None = None  # rows numbered from the slice's first
    #: The slice ended inside a quoted field: its cut was wrong (quoting that is not RFC 4180).
    cut_inside_a_field: bool = False
    #: Columns the slice read as text because a cell did not fit their kind (rows from the slice's first).
    misfits: tuple[Misfit, ...] = ()


def write_slice(job: SliceJob) -> SliceResult:
    """In a worker: the slice's rows into batch files. A broken row ends the slice the way it ends
    a file in the tap's process: the rows before it are in announced files, then the error."""
    with open(job.path, "rb") as raw:
        raw.seek(job.start)
        data = raw.read(job.end - job.start)
    reader = job.reader
    reader.rows_read = 0  # the tap's reader counts rows of the whole file; this copy, of the slice
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline="")
    storage = job.files.storage()
    layout = FilesLayout(storage, job.name_stem, job.files.compress, job.files.batch_size)
    batcher = FastJsonlBatcher(layout, announce_open_file_on=CsvFormatError)
    try:
        for _ in batcher.get_batches(reader.read_slice_blocks(text, job.header)):
            pass
    except CsvFormatError as error:
        if error.problem == " is not valid CSV: unexpected end of data":  # the csv module's words for it
            remove_files(storage, batcher.files_announced)
            return SliceResult([], 0, 0, cut_inside_a_field=True)
        misfits = tuple(reader.misfits.values())
        return SliceResult(batcher.files_announced, batcher.records_announced, reader.rows_read, error, misfits=misfits)
    except BaseException:
        remove_files(storage, batcher.files_announced)  # the tap will not learn of them
        raise
    misfits = tuple(reader.misfits.values())
    return SliceResult(batcher.files_announced, batcher.records_announced, reader.rows_read, misfits=misfits)


def _start_worker() -> None:
    # Ctrl-C reaches the whole process group; the tap decides how the run stops and shuts the pool
    # down. (SIGTERM is left as it is: it is how the pool ends workers when one of them dies.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD)  # see collector.py: rows hold no cycles
    threading.Thread(target=_exit_with_parent, daemon=True).start()


def _exit_with_parent() -> None:
    """A tap killed outright (SIGKILL, out of memory) cannot shut its pool down: leave with it."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)


_spawning = threading.Lock()


class _LeanSpawnProcess(multiprocessing.context.SpawnProcess):
    """A spawned worker that does not import the parent's __main__ again.

    Spawning imports the parent's main module (by its name when run with -m, else by its path) in
    the child, in case the task was defined there. For the tap that is the whole SDK: ~0.4 s and
    ~30 MB per worker, for tasks that live in this module and need none of it.
    """

    def start(self) -> None:
        with _spawning:  # __main__ is the process's: two threads spawning must not interleave
            main = sys.modules["__main__"]
            spec, script = main.__spec__, main.__dict__.pop("__file__", None)
            main.__spec__ = None
            try:
                super().start()
            finally:
                main.__spec__ = spec
                if script is not None:
                    main.__file__ = script


class _LeanSpawnContext(multiprocessing.context.SpawnContext):
    Process = _LeanSpawnProcess


# --------------------------------------------------------------------- the tap side


class BatchWorkerPool:
    """The tap's worker processes, started on first use and shared by every stream."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def submit(self, job: SliceJob) -> concurrent.futures.Future[SliceResult]:
        try:
            return self._running().submit(write_slice, job)
        except BrokenProcessPool:  # a worker died during an earlier export (which failed): start anew
            self.shutdown()
            return self._running().submit(write_slice, job)

    def _running(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.processes, mp_context=_LeanSpawnContext(), initializer=_start_worker
            )
        return self._executor

    def shutdown(self) -> None:
        """Slices not yet handed to a worker are dropped; those being written finish (their files
        are removed by whoever gave up on them)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


#: Slices handed to the workers, oldest first.
InFlight = collections.deque[tuple[SliceJob, concurrent.futures.Future[SliceResult]]]


class SlicedBatchWriter:
    """A stream's export files as pieces for its FastJsonlBatcher: blocks of records for a small
    file (read here, so they share files with the next export's rows), WrittenFiles for a large one.

    `while_waiting` is called while a slice is awaited: the tap's check_stop, which raises to stop.
    """

    def __init__(
        self,
        pool: BatchWorkerPool,
        batcher: FastJsonlBatcher,
        logger: logging.Logger,
        while_waiting: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.batcher = batcher
        self.logger = logger
        self.while_waiting = while_waiting
        self.storage = batcher.layout.storage
        self.files = FilesSpec.of(batcher.layout)

    def pieces(
        self, path: str, reader: CsvRecordReader, on_layout: Callable[[CsvLayout], None]
    ) -> Iterator[list[Any] | WrittenFiles]:
        found = read_header(path)
        if found is None:
            yield from reader.read_file(path, on_layout)
            return
        header, data_start = found
        slice_bytes = slice_bytes_for(path, data_start, self.files.batch_size)
        data_bytes = os.path.getsize(path) - data_start
        if data_bytes < 2 * slice_bytes:
            yield from reader.read_file(path, on_layout)
            return
        self.logger.info(
            "%s: writing batch files from %.1f MB of CSV in %d worker processes, slices of ~%.1f MB",
            reader.describe,
            data_bytes / 1e6,
            self.pool.processes,
            slice_bytes / 1e6,
        )
        on_layout(reader.layout(header))
        in_flight: InFlight = collections.deque()
        try:
            rest_from = yield from self._through_workers(path, header, data_start, slice_bytes, reader, in_flight)
        finally:
            self._give_up_on(in_flight)
        if rest_from is not None:
            yield from self._read_here(path, rest_from, header, reader)

    def _through_workers(
        self,
        path: str,
        header: list[str],
        data_start: int,
        slice_bytes: int,
        reader: CsvRecordReader,
        in_flight: InFlight,
    ) -> Generator[WrittenFiles, None, int | None]:
        """Slices go to the workers one more than they can take at once; files come back in order.
        Returns where the rest of the file is to be read in this process, if it is."""
        rest_from = None
        for start, end in row_aligned_slices(path, data_start, slice_bytes):
            if end is None:
                rest_from = start
                break
            job = SliceJob(path, start, end, header, reader, self.files, self.batcher.next_name_stem())
            in_flight.append((job, self.pool.submit(job)))
            if len(in_flight) > self.pool.processes:
                wrong_cut = yield from self._announce_oldest(in_flight, reader)
                if wrong_cut is not None:
                    return wrong_cut
        while in_flight:
            wrong_cut = yield from self._announce_oldest(in_flight, reader)
            if wrong_cut is not None:
                return wrong_cut
        return rest_from

    def _announce_oldest(
        self, in_flight: InFlight, reader: CsvRecordReader
    ) -> Generator[WrittenFiles, None, int | None]:
        """The oldest slice's files, counting its rows into `reader`; then its error, naming the row
        in the whole file. Returns the slice's start if it was cut inside a quoted field."""
        self.while_waiting()  # a safe point to stop: every slice taken so far is announced
        job, future = in_flight[0]
        result = self._wait(future, reader.describe)
        in_flight.popleft()
        if result.cut_inside_a_field:
            self.logger.warning(
                "%s: a slice ended inside a quoted field (quoting that is not RFC 4180, or a file cut short); "
                "reading the rest of the file in the tap's process",
                reader.describe,
            )
            return job.start
        rows_before = reader.rows_read
        reader.rows_read += result.rows
        # Before its files are announced: the stream widens those columns' schema first.
        reader.report_misfits(misfit.rows_later(rows_before) for misfit in result.misfits)
        if result.filenames:
            yield WrittenFiles(result.filenames, result.records)
        if result.error is not None:
            raise result.error.rows_later(rows_before)
        return None

    def _wait(self, future: concurrent.futures.Future[SliceResult], describe: str) -> SliceResult:
        while True:
            try:
                return future.result(timeout=WAIT_STEP_SECONDS)
            except concurrent.futures.TimeoutError:
                self.while_waiting()
            except BrokenProcessPool:
                self.while_waiting()  # killed with the run (a signal to the process group): stopping
                raise RuntimeError(
                    f"{describe}: a worker process writing its batch files died (out of memory?); "
                    "its window is exported again next run"
                ) from None

    def _give_up_on(self, in_flight: InFlight) -> None:
        """The file was left early (a stop, an error, a wrong cut): slices not begun are dropped, and
        the files of those being written removed once they are."""
        for job, future in in_flight:
            if not future.cancel():
                future.add_done_callback(functools.partial(self._remove_files_of, job))
        in_flight.clear()

    def _remove_files_of(self, job: SliceJob, future: concurrent.futures.Future[SliceResult]) -> None:
        if future.cancelled():
            return
        if future.exception() is None:
            remove_files(self.storage, future.result().filenames)
        else:  # the worker died: it could not say what it wrote
            remove_files_of_slice(self.storage, job.name_stem)

    @staticmethod
    def _read_here(path: str, start: int, header: list[str], reader: CsvRecordReader) -> Iterator[list[Any]]:
        """The rest of the file from `start`, in this process, its rows numbered on from rows_read."""
        with open(path, "rb") as raw:
            raw.seek(start)
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            yield from reader.read_slice_blocks(text, header)

"""Large exports in BATCH mode: cut into slices of whole rows, written by worker processes, with the
same records, files of at most batch_size records, errors naming the row, and nothing left running."""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from singer_sdk.helpers._batch import StorageTarget

from commerce_sandbox.server import Sandbox
from tap_commerce_exports.output import parallel_batches
from tap_commerce_exports.output.jsonl_batches import FastJsonlBatcher, FilesLayout, WorkerStorage, remove_files
from tap_commerce_exports.output.parallel_batches import (
    BatchWorkerPool,
    FilesSpec,
    SlicedBatchWriter,
    SliceJob,
    read_header,
    row_aligned_slices,
)
from tap_commerce_exports.records.columns import Column
from tap_commerce_exports.records.csv_reader import CsvFormatError, CsvRecordReader, Misfit, struct_builder
from tap_commerce_exports.stream import StopRequested
from tests.harness import catalog_selecting, drain, run_tap, start_tap_process, wait_for_log, wait_until

# ------------------------------------------------------------------ slicing bytes


def tricky_csv(rows: int) -> bytes:
    """Quoted fields holding newlines, CRLFs, commas and escaped quotes, in every position."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["id", "note", "amount"])
    for i in range(rows):
        note = ["plain", "two\nlines", 'quote " inside\r\nand "more"', '"\n"', "a,b\n\n", ""][i % 6]
        writer.writerow([f"r{i}", note, str(i)])
    return out.getvalue().encode()


@pytest.mark.parametrize("slice_bytes", [7, 64, 1000, 10**6])
def test_slices_cover_the_file_and_end_only_where_rows_end(tmp_path, slice_bytes):
    data = b"\xef\xbb\xbf" + tricky_csv(300)
    path = tmp_path / "f.csv"
    path.write_bytes(data)
    header, start = read_header(str(path))
    assert header == ["id", "note", "amount"]

    slices = list(row_aligned_slices(str(path), start, slice_bytes))
    assert slices[0][0] == start and slices[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))
    whole = list(csv.reader(io.StringIO(data[start:].decode(), newline="")))
    pieces = [row for a, b in slices for row in csv.reader(io.StringIO(data[a:b].decode(), newline=""))]
    assert pieces == whole and len(whole) == 300
    if slice_bytes == 1000:  # about len/slice_bytes slices, not one per row
        assert abs(len(slices) - len(data) / slice_bytes) <= 1


def test_a_file_without_a_final_newline_keeps_its_last_row(tmp_path):
    path = tmp_path / "f.csv"
    path.write_bytes(b'id,note\n1,"a\nb"\n2,last')
    _, start = read_header(str(path))
    slices = list(row_aligned_slices(str(path), start, 4))
    assert [path.read_bytes()[a:b] for a, b in slices] == [b'1,"a\nb"\n', b"2,last"]


def test_a_header_that_is_not_found_or_not_utf8_leaves_the_file_to_the_tap_process(tmp_path):
    path = tmp_path / "f.csv"
    path.write_bytes(b"id,note")  # no row end
    assert read_header(str(path)) is None
    path.write_bytes(b"id,n\xffote\n1,2\n")
    assert read_header(str(path)) is None
    path.write_bytes(b'"i\nd",note\n1,2\n')
    assert read_header(str(path)) == (["i\nd", "note"], 11)
    path.write_bytes(b"id,note\r1,a\r2,b\n3,c\n")  # more than one row before the first newline
    assert read_header(str(path)) is None


def test_the_default_worker_count_honours_a_cgroup_cpu_quota(monkeypatch):
    monkeypatch.setattr(parallel_batches, "_cgroup_cpu_quota", lambda: 0.5)
    assert parallel_batches.usable_cpus() == 1
    monkeypatch.setattr(parallel_batches, "_cgroup_cpu_quota", lambda: None)
    assert parallel_batches.usable_cpus() >= 1


@pytest.mark.parametrize("root", ["file://{tmp}/out", "file://{tmp}/with space", "{tmp}/plain path", "rel-dir"])
def test_a_worker_writes_where_the_sdk_storage_reads(tmp_path, monkeypatch, root):
    monkeypatch.chdir(tmp_path)
    sdk = StorageTarget(root=root.format(tmp=tmp_path), prefix="p-")
    worker_storage = FilesSpec.of(FilesLayout(sdk, "p-x", compress=True, batch_size=10)).storage()
    with worker_storage.open("p-x-1.json.gz", "wb") as out:
        out.write(b"{}\n")
    with sdk.open("p-x-1.json.gz", "rb") as written:
        assert written.read() == b"{}\n"
    remove_files(sdk, ["p-x-1.json.gz"])
    with pytest.raises(FileNotFoundError), sdk.open("p-x-1.json.gz", "rb"):
        pass


def test_a_local_file_appears_only_once_complete(tmp_path):
    storage = WorkerStorage(str(tmp_path), f"file://{tmp_path}", {})
    with pytest.raises(RuntimeError), storage.open("f.json", "wb") as out:
        out.write(b"half")
        assert os.listdir(tmp_path) != ["f.json"]
        raise RuntimeError("the write failed")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["the tap's storage", "a worker's storage"])
def test_a_file_the_run_failed_while_writing_never_lands(tmp_path, where):
    sdk = StorageTarget(root=f"file://{tmp_path}", prefix="p-")
    storage = sdk if where == "the tap's storage" else WorkerStorage(str(tmp_path), sdk.root, {})
    batcher = FastJsonlBatcher(FilesLayout(storage, "p-x", compress=True, batch_size=100))
    reader = CsvRecordReader(COLUMNS, describe="s export e", builder=struct_builder)

    def failing(blocks):
        yield from blocks
        raise RuntimeError("the export's storage broke")

    path = tmp_path / "f.csv"
    path.write_bytes(tricky_csv(30))
    with pytest.raises(RuntimeError, match="storage broke"):
        list(batcher.get_batches(failing(reader.read_file(str(path)))))
    assert sorted(os.listdir(tmp_path)) == ["f.csv"]  # no batch file, whole or half, under any name


def test_storage_settings_stay_out_of_reprs(tmp_path):
    sdk = StorageTarget(root=f"file://{tmp_path}", params={"secret": "s3-key-123"})
    spec = FilesSpec.of(FilesLayout(sdk, "p-x", compress=True, batch_size=10))
    job = SliceJob("f.csv", 0, 1, ["id"], CsvRecordReader(COLUMNS, describe="d"), spec, "p-x-1")
    assert "s3-key-123" not in repr(spec) and "s3-key-123" not in repr(job)


# --------------------------------------------------------- the writer, with workers


COLUMNS = {"id": Column("id"), "note": Column("note"), "amount": Column("amount", "integer")}


@pytest.fixture(scope="module")
def pool():
    workers = BatchWorkerPool(2)
    yield workers
    workers.shutdown()


@dataclass
class Written:
    rows: list[dict] = field(default_factory=list)  # in the files announced, in order
    files: list[str] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)  # what the batcher was given: list or WrittenFiles
    error: BaseException | None = None


def write_batches(
    path: Path, storage_dir: Path, batch_size: int, pool: BatchWorkerPool | None, stop_after=None, on_misfit=None
):
    """One export file through a batcher, in the tap's process (pool None) or with the workers."""
    storage = StorageTarget(root=f"file://{storage_dir}", prefix="t-")
    batcher = FastJsonlBatcher(
        FilesLayout(storage, "t-sync", compress=True, batch_size=batch_size), announce_open_file_on=StopRequested
    )
    reader = CsvRecordReader(COLUMNS, describe="s export e", builder=struct_builder, on_misfit=on_misfit)
    if pool is None:
        pieces = reader.read_blocks(open(path, encoding="utf-8-sig", newline=""))  # noqa: SIM115
    else:
        writer = SlicedBatchWriter(pool, batcher, logging.getLogger("test"))
        pieces = writer.pieces(str(path), reader, lambda layout: None)
    written = Written()

    def noting(items):
        for item in items:
            written.pieces.append(type(item).__name__)
            yield item
            if stop_after is not None and len(written.pieces) >= stop_after:
                raise StopRequested(signal.SIGTERM)  # as the tap's check_stop does between pieces

    try:
        for manifest in batcher.get_batches(noting(pieces)):
            for url in manifest:
                written.files.append(url)
                with gzip.open(url.removeprefix("file://")) as handle:
                    written.rows += [json.loads(line) for line in handle]
    except (CsvFormatError, StopRequested) as error:
        written.error = error
    finally:
        pieces.close()
    return written


def files_in(storage: Path) -> set[str]:
    return {f"file://{storage / name}" for name in os.listdir(storage)} if storage.exists() else set()


def test_workers_write_the_records_the_tap_process_writes(tmp_path, pool, monkeypatch):
    monkeypatch.setattr(parallel_batches, "MIN_SLICE_BYTES", 1024)
    path = tmp_path / "f.csv"
    path.write_bytes(tricky_csv(2000))
    alone = write_batches(path, tmp_path / "alone", 50, None)
    sliced = write_batches(path, tmp_path / "sliced", 50, pool)

    assert sliced.rows == alone.rows and len(alone.rows) == 2000
    assert set(sliced.pieces) == {"WrittenFiles"} and len(sliced.pieces) > 10
    assert all(re.search(r"t-sync-\d+-\d+\.json\.gz$", url) for url in sliced.files)
    sizes = []
    for url in sliced.files:
        with gzip.open(url.removeprefix("file://")) as handle:
            sizes.append(sum(1 for _ in handle))
    assert max(sizes) <= 50 and sum(sizes) == 2000
    assert sum(sizes) / len(sizes) > 30  # slices aim at 90% of batch_size rows: files are not tiny


def test_a_small_file_is_read_in_the_tap_process_and_shares_files(tmp_path, pool):
    path = tmp_path / "f.csv"
    path.write_bytes(tricky_csv(40))
    written = write_batches(path, tmp_path / "out", 1000, pool)
    assert len(written.rows) == 40 and set(written.pieces) == {"list"}


@pytest.mark.parametrize(
    "good, bad, message",
    [
        (b"r1777,", b"r1777,\xff", r"row 1778 holds bytes that are not UTF-8"),
        (b",1777\r\n", b",1777,extra\r\n", r"row 1778 has 4 fields but the header has 3"),
    ],
)
def test_a_broken_row_in_a_slice_is_named_by_its_row_in_the_whole_file(tmp_path, pool, monkeypatch, good, bad, message):
    """Row 1778 (id r1777) sits deep in a later slice: the worker counts from its slice's first row."""
    monkeypatch.setattr(parallel_batches, "MIN_SLICE_BYTES", 1024)
    path = tmp_path / "f.csv"
    data = tricky_csv(2000)
    assert data.count(good) == 1
    path.write_bytes(data.replace(good, bad))
    written = write_batches(path, tmp_path / "out", 50, pool)
    assert re.search(message, str(written.error)), written.error


def test_a_misfit_in_a_slice_is_reported_before_its_files_naming_its_row_in_the_whole_file(tmp_path, pool, monkeypatch):
    monkeypatch.setattr(parallel_batches, "MIN_SLICE_BYTES", 1024)
    path = tmp_path / "f.csv"
    path.write_bytes(tricky_csv(2000).replace(b",1777\r\n", b",17x7\r\n"))
    heard: list[Misfit] = []
    written = write_batches(path, tmp_path / "out", 50, pool, on_misfit=heard.append)
    assert written.error is None and len(written.rows) == 2000
    assert heard == [Misfit("amount", "integer", 1778, "17x7")]
    assert written.rows[1777]["amount__text"] == "17x7" and written.rows[1777]["amount"] is None
    assert written.rows[0]["amount"] == 0


def test_a_broken_row_ends_the_file_after_a_prefix_of_its_rows_and_leaves_no_stray_file(tmp_path, pool, monkeypatch):
    """Announced: rows before the broken one, in order (in the tap's process, up to the block before
    it; a slice is smaller than a block, so here at least as many). Slices the workers were still
    writing are removed once written, never announced."""
    monkeypatch.setattr(parallel_batches, "MIN_SLICE_BYTES", 1024)
    path = tmp_path / "f.csv"
    path.write_bytes(tricky_csv(2000).replace(b",1777\r\n", b",1777,extra\r\n"))
    alone = write_batches(path, tmp_path / "alone", 50, None)
    sliced = write_batches(path, tmp_path / "sliced", 50, pool)
    assert str(sliced.error) == str(alone.error) and "row 1778" in str(alone.error)
    ids = [r["id"] for r in sliced.rows]
    assert ids == [f"r{i}" for i in range(len(ids))] and len(alone.rows) <= len(ids) < 1778
    wait_until(lambda: files_in(tmp_path / "sliced") == set(sliced.files), "stray slice files to be removed")


def test_a_stop_between_pieces_announces_a_prefix_of_the_rows_and_leaves_no_stray_file(tmp_path, pool, monkeypatch):
    monkeypatch.setattr(parallel_batches, "MIN_SLICE_BYTES", 1024)
    path = tmp_path / "f.csv"
    path.write_bytes(tricky_csv(3000))
    stopped = write_batches(path, tmp_path / "out", 50, pool, stop_after=3)
    assert isinstance(stopped.error, StopRequested) and stopped.pieces == ["WrittenFiles"] * 3
    assert [r["id"] for r in stopped.rows] == [f"r{i}" for i in range(len(stopped.rows))] and stopped.rows
    wait_until(lambda: files_in(tmp_path / "out") == set(stopped.files), "stray slice files to be removed")
    again = write_batches(path, tmp_path / "again", 50, pool)  # the pool still works
    assert [r["id"] for r in again.rows] == [f"r{i}" for i in range(3000)]


@pytest.mark.parametrize("multiline_later", [True, False])
def test_a_stray_quote_in_an_unquoted_field_sends_the_rest_to_the_tap_process(
    tmp_path, pool, monkeypatch, multiline_later
):
    """27" Monitor: the csv module reads the quote as text, the slicer's parity flips. Either a slice
    then ends inside a quoted field (a later multi-line field), or no row end is found for long:
    both times the rest of the file is read in the tap's process, with the same rows as without."""
    monkeypatch.setattr(parallel_batches, "MIN_SLICE_BYTES", 1024)
    monkeypatch.setattr(parallel_batches, "MAX_SLICE_BYTES", 1024)
    lines = [b"id,note,amount\r\n"]
    for i in range(2000):
        note = b'27" Monitor' if i == 300 else (b'"two\nlines"' if multiline_later and i % 50 == 0 else b"plain")
        lines.append(b"r%d,%s,%d\r\n" % (i, note, i))
    path = tmp_path / "f.csv"
    path.write_bytes(b"".join(lines))
    alone = write_batches(path, tmp_path / "alone", 50, None)
    sliced = write_batches(path, tmp_path / "sliced", 50, pool)
    assert alone.error is None and sliced.error is None
    assert sliced.rows == alone.rows and len(alone.rows) == 2000
    assert {"WrittenFiles", "list"} <= set(sliced.pieces)  # slices first, then the tap's process


def test_a_file_cut_short_inside_a_quoted_field_fails_as_it_does_in_the_tap_process(tmp_path, pool, monkeypatch):
    monkeypatch.setattr(parallel_batches, "MIN_SLICE_BYTES", 1024)
    data = tricky_csv(2000)
    path = tmp_path / "f.csv"
    path.write_bytes(data[: data.rindex(b'"two\nlines"') + 4])  # ends inside "two
    alone = write_batches(path, tmp_path / "alone", 50, None)
    sliced = write_batches(path, tmp_path / "sliced", 50, pool)
    assert "unexpected end of data" in str(alone.error) and str(sliced.error) == str(alone.error)
    assert "row 2000" in str(alone.error)  # the last two-line note: r1999
    assert [r["id"] for r in sliced.rows] == [f"r{i}" for i in range(len(sliced.rows))]


def test_bad_bytes_after_a_stray_quote_are_named_by_their_row(tmp_path, pool, monkeypatch):
    """The rest of the file is read in the tap's process from an offset: its rows still count on."""
    monkeypatch.setattr(parallel_batches, "MIN_SLICE_BYTES", 1024)
    monkeypatch.setattr(parallel_batches, "MAX_SLICE_BYTES", 1024)
    lines = [b"id,note,amount\r\n"]
    for i in range(2000):
        note = {300: b'27" Monitor', 1500: b"caf\xe9"}.get(i, b"plain")
        lines.append(b"r%d,%s,%d\r\n" % (i, note, i))
    path = tmp_path / "f.csv"
    path.write_bytes(b"".join(lines))
    alone = write_batches(path, tmp_path / "alone", 50, None)
    sliced = write_batches(path, tmp_path / "sliced", 50, pool)
    assert "row 1501 holds bytes that are not UTF-8" in str(alone.error)
    assert str(sliced.error) == str(alone.error)


def test_a_pool_whose_worker_died_is_started_anew_for_the_next_export(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel_batches, "MIN_SLICE_BYTES", 1024)
    path = tmp_path / "f.csv"
    path.write_bytes(tricky_csv(2000))
    workers = BatchWorkerPool(2)
    try:
        assert len(write_batches(path, tmp_path / "first", 50, workers).rows) == 2000
        for process in list(workers._executor._processes.values()):  # type: ignore[union-attr]
            os.kill(process.pid, signal.SIGKILL)
        wait_until(lambda: workers._executor._broken, "the pool to notice its workers died")  # type: ignore[union-attr]
        again = write_batches(path, tmp_path / "again", 50, workers)
        assert [r["id"] for r in again.rows] == [f"r{i}" for i in range(2000)]
    finally:
        workers.shutdown()


@pytest.mark.parametrize("launch", ["script", "module"])
def test_workers_import_neither_the_sdk_nor_fsspec_whatever_the_tap_was_started_as(tmp_path, launch):
    """Spawning re-imports the parent's __main__ (by path, or by name under -m); the tap's imports
    the whole SDK. Workers skip it, and fsspec too for local storage: ~26 MB each instead of ~50."""
    (tmp_path / "parent_probe.py").write_text(
        "import tap_commerce_exports.tap  # what the tap's __main__ imports\n"
        "from tap_commerce_exports.output.parallel_batches import BatchWorkerPool\n"
        "if __name__ == '__main__':\n"
        "    pool = BatchWorkerPool(1)\n"
        "    names = ('singer_sdk', 'fsspec', 'parent_probe')\n"
        "    probe = f'sorted(m for m in {names} if m in __import__(\"sys\").modules)'\n"
        "    print(pool._running().submit(eval, probe).result(), flush=True)\n"
        "    pool.shutdown()\n"
    )
    command = [sys.executable, "parent_probe.py"] if launch == "script" else [sys.executable, "-m", "parent_probe"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(not Path("/proc").exists(), reason="looks for worker processes in /proc")
def test_workers_leave_when_the_tap_is_killed_outright(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(
        "import time\n"
        "from tap_commerce_exports.output.parallel_batches import BatchWorkerPool\n"
        "from tap_commerce_exports.records.columns import header_key\n"
        "pool = BatchWorkerPool(2)\n"
        "[f.result() for f in [pool._running().submit(header_key, 'A b') for _ in range(2)]]\n"
        "print(' '.join(str(pid) for pid in pool._executor._processes), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(workers) == 2 and all(Path(f"/proc/{pid}").exists() for pid in workers)
    parent.kill()
    parent.wait()
    wait_until(lambda: not any(_alive(pid) for pid in workers), "the workers to leave with the tap", timeout=10)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------- through the tap


def big_batch_config(storage: Path, **extra) -> dict:
    return {
        "batch_config": {
            "encoding": {"format": "jsonl", "compression": "gzip"},
            "storage": {"root": f"file://{storage}", "prefix": "b-"},
            "batch_size": 1000,
        },
        **extra,
    }


def batch_file_rows(messages: list[dict], stream: str) -> list[dict]:
    rows = []
    for message in messages:
        if message["type"] == "BATCH" and message["stream"] == stream:
            for url in message["manifest"]:
                with gzip.open(url.removeprefix("file://")) as handle:
                    rows += [json.loads(line) for line in handle]
    return rows


@pytest.fixture(scope="module")
def orders_sandbox():
    """10,000 orders in one window: a 2.3 MB file, cut into ~9 slices at batch_size 1000."""
    with Sandbox(("voucherify",), export_latency_seconds=0.2, rows_per_type=10_000) as sandbox:
        yield sandbox


def test_the_tap_writes_a_large_export_in_slices_with_the_same_rows_and_state(orders_sandbox, tmp_path):
    config = {**orders_sandbox.voucherify.tap_config(), "export_window_days": 400}
    alone = run_tap(
        {**config, **big_batch_config(tmp_path / "a", batch_worker_processes=1)}, streams={"voucherify_orders"}
    )
    sliced = run_tap(
        {**config, **big_batch_config(tmp_path / "s", batch_worker_processes=2)}, streams={"voucherify_orders"}
    )
    assert alone.error is None and sliced.error is None

    rows = batch_file_rows(sliced.messages, "voucherify_orders")
    assert rows == batch_file_rows(alone.messages, "voucherify_orders") and len(rows) == 10_000
    assert "in 2 worker processes" in sliced.log_text and "worker processes" not in alone.log_text
    assert sliced.final_state["bookmarks"] == alone.final_state["bookmarks"]
    assert sliced.final_state["bookmarks"]["voucherify_orders"]["replication_key_value"]


def worker_pids_of(pid: int) -> list[int]:
    """Spawned multiprocessing children name their parent on their command line."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if f"parent_pid={pid}".encode() in cmdline:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not Path("/proc").exists(), reason="looks for worker processes in /proc")
@pytest.mark.parametrize("moment", ["workers started", "first file announced"])
def test_sigterm_while_workers_write_ends_with_state_short_of_the_window_and_no_worker_left(
    orders_sandbox, tmp_path, moment
):
    config = {
        **orders_sandbox.voucherify.tap_config(),
        "export_window_days": 400,
        **big_batch_config(tmp_path, batch_worker_processes=2),
    }
    process = start_tap_process(config, catalog=catalog_selecting(config, {"voucherify_orders"}))
    stderr = Path(process.stderr_path)
    before: list[dict] = []
    if moment == "workers started":
        wait_for_log(stderr, "worker processes")  # slices are being handed to the workers
    else:
        while not before or before[-1]["type"] != "BATCH":
            line = process.stdout.readline()
            assert line, stderr.read_text()[-2000:]
            before.append(json.loads(line))
    process.send_signal(signal.SIGTERM)
    rest, _ = drain(process)
    stopped = before + rest
    assert process.returncode in (0, 128 + signal.SIGTERM), stderr.read_text()[-2000:]
    assert not worker_pids_of(process.pid)
    assert stopped[-1]["type"] == "STATE"
    announced = batch_file_rows(stopped, "voucherify_orders")
    announced_files = {url for m in stopped if m["type"] == "BATCH" for url in m["manifest"]}
    assert files_in(tmp_path) == announced_files  # no file of a slice the run gave up on
    bookmark = stopped[-1]["value"].get("bookmarks", {}).get("voucherify_orders", {})
    if process.returncode == 0:  # the run finished before the signal was heard
        assert len(announced) == 10_000
    else:  # the one window was not finished: its bookmark must not have moved
        assert "replication_key_value" not in bookmark
        assert len({r["id"] for r in announced}) == len(announced) < 10_000
        resumed = run_tap(config, state=stopped[-1]["value"], streams={"voucherify_orders"})
        assert resumed.error is None
        ids = {r["id"] for r in announced} | {r["id"] for r in batch_file_rows(resumed.messages, "voucherify_orders")}
        assert ids == {r["id"] for r in orders_sandbox.voucherify.expected_records("voucherify_orders")}


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="signals a process group")
def test_sigterm_to_the_whole_process_group_leaves_no_stray_file_and_no_worker(orders_sandbox, tmp_path):
    """As systemd, Airflow or `timeout` do: the workers are signalled too, and die mid-slice."""
    config = {
        **orders_sandbox.voucherify.tap_config(),
        "export_window_days": 400,
        **big_batch_config(tmp_path, batch_worker_processes=2),
    }
    catalog = catalog_selecting(config, {"voucherify_orders"})
    process = start_tap_process(config, catalog=catalog, own_process_group=True)
    stderr = Path(process.stderr_path)
    before = []
    while not before or before[-1]["type"] != "BATCH":  # the workers are busy with later slices
        line = process.stdout.readline()
        assert line, stderr.read_text()[-2000:]
        before.append(json.loads(line))
    os.killpg(process.pid, signal.SIGTERM)
    rest, _ = drain(process)
    stopped = before + rest
    assert process.returncode in (0, 128 + signal.SIGTERM), stderr.read_text()[-2000:]
    assert not worker_pids_of(process.pid)
    assert stopped[-1]["type"] == "STATE"
    announced_files = {url for m in stopped if m["type"] == "BATCH" for url in m["manifest"]}
    assert files_in(tmp_path) == announced_files

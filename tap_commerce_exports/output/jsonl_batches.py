"""BATCH files of JSON lines: how records become files, and the order in which files are announced.

The SDK's JSONL batcher serializes with simplejson and compresses record by record with zlib at its
slowest level. Here a block of records is encoded in one msgspec call and gzipped by python-isal.
The files are the same: one JSON record per line, at most `batch_size` records per file,
gzip-readable by any target. Large exports are written by worker processes (parallel_batches.py),
which use this module too; so it imports nothing of the SDK.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from isal import igzip

from tap_commerce_exports.records.columns import RECORD_JSON

GZIP_LEVEL = 1  # ISA-L's level 1: zlib level 3's size at ~5x its speed
#: Object stores: an object is written without any directory, and "making the directory" of a root
#: that is a bare bucket creates the bucket. Files there are written without mkdir, so a bucket that
#: does not exist fails the write instead of being created (storage_check.py finds it first).
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})

_logger = logging.getLogger(__name__)


class FileStorage(Protocol):
    """Where batch files go: the SDK's StorageTarget, or WorkerStorage in a worker process."""

    root: str
    params: dict[str, Any]

    def open(self, filename: str, mode: str = "rb") -> contextlib.AbstractContextManager[Any]: ...

    def get_url(self, filename: str) -> str: ...


class WorkerStorage:
    """Where a worker process writes batch files: the directory or bucket of the tap's storage.

    The worker does not import the SDK (~0.3 s and ~20 MB a worker) and, for a local directory, not
    fsspec either (~9 MB): it writes plain files under a temporary name and renames them when
    complete, as the SDK's fsspec transaction does. Other storage goes through UPath, as in the
    SDK. Files are reported back by name; the tap makes their URLs with the SDK's own get_url.
    """

    def __init__(self, local_dir: str | None, root: str, params: dict[str, Any]) -> None:
        self.root, self.params = root, params
        self.local_dir = Path(local_dir) if local_dir else None
        self._root_path = None if self.local_dir else _upath(root, params).resolve()

    def open(self, filename: str, mode: str = "rb") -> contextlib.AbstractContextManager[Any]:
        return self._open_local(filename, mode) if self.local_dir else self._open_remote(filename, mode)

    @contextlib.contextmanager
    def _open_local(self, filename: str, mode: str) -> Iterator[Any]:
        assert self.local_dir is not None
        final = self.local_dir / filename
        final.parent.mkdir(parents=True, exist_ok=True)  # a prefix may name a subdirectory
        handle, temporary = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.")
        try:
            with os.fdopen(handle, mode) as file:
                yield file
            os.replace(temporary, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def _open_remote(self, filename: str, mode: str) -> contextlib.AbstractContextManager[Any]:
        assert self._root_path is not None
        return _open_remote(self._root_path, filename, mode)

    def get_url(self, filename: str) -> str:
        if self.local_dir:
            return (self.local_dir / filename).as_uri()
        assert self._root_path is not None
        return str(self._root_path.joinpath(filename).as_uri())


@contextlib.contextmanager
def _open_remote(root_path: Any, filename: str, mode: str) -> Iterator[Any]:
    """A file under a remote root, complete once closed and discarded if its writing fails (fsspec's
    transaction: an S3 multipart upload is aborted). The SDK makes the root's directory first; on an
    object store that creates a missing bucket, so there it is not made: an object needs no directory."""
    fs = root_path.fs
    if root_path.protocol not in OBJECT_STORE_PROTOCOLS:
        root_path.mkdir(parents=True, exist_ok=True)
    with fs.transaction, fs.open(root_path / filename, mode) as file:
        yield file


def open_for_writing(storage: FileStorage, filename: str) -> contextlib.AbstractContextManager[Any]:
    """A new batch file: through the storage itself when it is local (or the worker's own), else
    without the SDK's mkdir of the root, which would create a bucket that does not exist."""
    if isinstance(storage, WorkerStorage) or local_directory(storage) is not None:
        return storage.open(filename, "wb")
    return _open_remote(_upath(storage.root, storage.params or {}).resolve(), filename, "wb")


def local_directory(storage: FileStorage) -> Path | None:
    """The directory a storage writes to when it is local, as the SDK resolves its root (a file://
    root is taken literally, %20 and all); None for remote storage."""
    if isinstance(storage, WorkerStorage):
        return storage.local_dir
    return local_directory_of(storage.root, storage.params or {})


def local_directory_of(root: str, params: dict[str, Any]) -> Path | None:
    path = _upath(root, params).resolve()
    return Path(os.fspath(path)) if path.protocol in ("", "file", "local") else None


def remove_files(storage: FileStorage, filenames: Iterable[str]) -> None:
    """Batch files that will never be announced (a slice the run gave up on, or failed to finish).
    Called while another error may be on its way: a file that cannot be removed is only logged."""
    filenames = list(filenames)
    if not filenames:
        return
    try:
        local_dir = local_directory(storage)
    except Exception as exc:
        _logger.warning("could not find batch files %s to remove them: %s", filenames, exc)
        return
    for filename in filenames:
        try:
            if local_dir is not None:
                (local_dir / filename).unlink()
            else:
                (_upath(storage.root, storage.params or {}).resolve() / filename).unlink()
        except FileNotFoundError:
            pass
        except Exception as exc:
            _logger.warning("could not remove batch file %s, which was never announced: %s", filename, exc)


def remove_files_of_slice(storage: FileStorage, name_stem: str) -> None:
    """Every file a worker may have left under a slice's name stem, complete or half-written: for a
    worker that died (a signal to the whole process group, the out-of-memory killer) without saying
    which files it wrote. Local storage only: remote storage is not listed for them."""
    local_dir = local_directory(storage)
    if local_dir is None:
        return
    stem = local_dir / name_stem
    if stem.parent.is_dir():
        found = [*stem.parent.glob(f"{stem.name}-*"), *stem.parent.glob(f".{stem.name}-*")]
        remove_files(storage, [str(path.relative_to(local_dir)) for path in found])


def _upath(url: str, params: dict[str, Any]) -> Any:
    """UPath, as the SDK's StorageTarget uses it; imported only for remote storage, since it
    imports fsspec (~9 MB in each worker process)."""
    from upath import UPath

    return UPath(url, **params)


@dataclass(frozen=True)
class FilesLayout:
    """What every batch file of a stream shares: where it goes, how it is named and compressed,
    and how many records it may hold."""

    storage: FileStorage
    name_stem: str  # prefix + sync id; files are named stem-N.json[.gz]
    compress: bool
    batch_size: int

    @property
    def extension(self) -> str:
        return ".json.gz" if self.compress else ".json"


@dataclass(frozen=True)
class WrittenFiles:
    """Batch files another process wrote, complete, in order: the batcher only announces them."""

    filenames: list[str]
    records: int


class FastJsonlBatcher:
    """Fills batch files from blocks of records and hands on one manifest per file, in order.

    Besides blocks of records it takes WrittenFiles: the file being filled is then announced first,
    so files are announced in the order of their rows.
    """

    def __init__(
        self,
        layout: FilesLayout,
        *,
        before_announcing: Callable[[], None] = lambda: None,
        announce_open_file_on: type[BaseException] | tuple[()] = (),
    ) -> None:
        self.layout = layout
        #: Called when a file is complete, just before its manifest is handed on: every record given
        #: to the batcher so far is then in an announced file (the stream moves its bookmarks).
        self.before_announcing = before_announcing
        #: The stop raised between blocks: the file being written is then announced, not dropped.
        self.announce_open_file_on = announce_open_file_on
        self._names_given = 0
        #: The files this batcher announced, by name, and the records in them (not WrittenFiles').
        self.files_announced: list[str] = []
        self.records_announced = 0

    def next_name_stem(self) -> str:
        """A name no other file of this batcher has: stem-N (a worker adds -1, -2 ...)."""
        self._names_given += 1
        return f"{self.layout.name_stem}-{self._names_given}"

    def get_batches(self, pieces: Iterable[list[Any] | WrittenFiles]) -> Iterator[list[str]]:
        """One manifest (a list of one file URL) per file, as each file is complete."""
        size = self.layout.batch_size
        file: BatchFile | None = None
        try:
            for piece in pieces:
                if isinstance(piece, WrittenFiles):
                    if file is not None:
                        manifest, file = self._announce(file), None
                        yield manifest
                    yield from self._announce_written(piece)
                    continue
                while piece:
                    if file is None:
                        file = BatchFile(self.layout, self.next_name_stem() + self.layout.extension)
                    room = size - file.records
                    head, piece = (piece, []) if len(piece) <= room else (piece[:room], piece[room:])
                    file.write(head)
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

    def _announce_written(self, written: WrittenFiles) -> Iterator[list[str]]:
        """Their manifests in order. A file counts as announced once its manifest is handed on;
        the rest are removed if a failure comes first, since no one else knows of them."""
        waiting = list(written.filenames)
        try:
            while waiting:
                url = self.layout.storage.get_url(waiting[0])
                self.before_announcing()
                waiting.pop(0)
                yield [url]
        finally:
            remove_files(self.layout.storage, waiting)

    def _announce(self, file: BatchFile) -> list[str]:
        """Close the file and return its manifest, once the stream has moved its held bookmarks."""
        url = file.close()
        self.files_announced.append(file.filename)
        self.records_announced += file.records
        self.before_announcing()
        return [url]


class BatchFile:
    """One batch file being written."""

    def __init__(self, layout: FilesLayout, filename: str) -> None:
        self.storage, self.filename = layout.storage, filename
        self._closing = contextlib.ExitStack()
        out = self._closing.enter_context(open_for_writing(layout.storage, filename))
        if layout.compress:
            out = self._closing.enter_context(igzip.GzipFile(fileobj=out, mode="wb", compresslevel=GZIP_LEVEL))
        self._out = out
        self.records = 0

    def write(self, block: list[Any]) -> None:
        self._out.write(RECORD_JSON.encode_lines(block))
        self.records += len(block)

    def close(self) -> str:
        """Flush and close the file; its URL for the BATCH manifest."""
        self._closing.close()
        return str(self.storage.get_url(self.filename))

    def abandon(self) -> None:
        """Close a file that will never be announced (the run failed while writing it) as a failed
        write, so local storage never shows it under its name; remove it from storage that does."""
        try:
            self._closing.__exit__(_Abandoned, _Abandoned(), None)
        except Exception as exc:
            _logger.warning("closing the abandoned batch file %s failed: %s", self.filename, exc)
        remove_files(self.storage, [self.filename])


class _Abandoned(Exception):
    """Tells a file's context managers that its writing failed."""

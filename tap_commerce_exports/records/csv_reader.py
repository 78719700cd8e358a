"""Where CSV rows become records: the reader, its misfits, and the builders of dicts and structs.

A cell that does not fit its column's kind never fails the file. The column keeps its kind, and the
cell goes, exactly as written, into a text column beside it (`<key>__text`, see `companion_key`): the
reader reports a `Misfit`, so the stream adds that column to its schema before the first record that
needs it. A warehouse column thus never changes type, which some loaders refuse (target-postgres
cannot alter a column) and others do by renaming the old column away (pipelinewise targets).
Columns an earlier version of the tap loaded as text (`text_columns`) are still read as text.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from typing import Any, TextIO

import msgspec

from tap_commerce_exports.records.columns import (
    INSTANT_KINDS,
    SURROGATE,
    UTC,
    Caster,
    Column,
    caster_for,
    record_keys,
    to_integer,
)


class CsvFormatError(ValueError):
    """A file that cannot be read as the export it claims to be; says where and why.

    `row` counts data rows from 1. A worker reading a slice of a file counts from its slice's first
    row; `rows_later` puts the error where it is in the whole file.
    """

    def __init__(self, describe: str, row: int, problem: str) -> None:
        super().__init__(f"{describe}: row {row}{problem}")
        self.describe, self.row, self.problem = describe, row, problem

    def rows_later(self, rows_before: int) -> CsvFormatError:
        return CsvFormatError(self.describe, self.row + rows_before, self.problem)

    def __reduce__(self) -> tuple:  # crosses from worker processes (parallel_batches.py)
        return (CsvFormatError, (self.describe, self.row, self.problem))


#: What a column's text companion is called: it holds the column's cells that do not fit its kind.
COMPANION_SUFFIX = "__text"


def companion_key(key: str) -> str:
    return key + COMPANION_SUFFIX


@dataclass(frozen=True)
class Misfit:
    """A cell that does not fit its column's kind: where it is and what it holds."""

    key: str
    kind: str
    row: int
    cell: str

    def rows_later(self, rows_before: int) -> Misfit:
        return Misfit(self.key, self.kind, self.row + rows_before, self.cell)


# --------------------------------------------------------------------- the reader

#: Rows cast together. Large enough that per-block costs vanish, small enough to stay in cache.
BLOCK_ROWS = 512


def _next_rows(rows: Iterator[list[str]], count: int) -> tuple[list[list[str]], Exception | None]:
    """Up to `count` rows, and the error that stopped the reading early, if any: rows before a
    broken row are still records (and counted), so the error names the broken row."""
    block: list[list[str]] = []
    try:
        block.extend(islice(rows, count))
    except (csv.Error, UnicodeDecodeError) as exc:
        return block, exc
    return block, None


RecordBuilder = Callable[[list[Sequence[Any]]], list[Any]]
#: Makes a file's RecordBuilder from its keys, the values every record carries, and the keys left out
#: of a record where their value is null (see `CsvRecordReader.layout`).
BuilderFactory = Callable[..., RecordBuilder]


def dict_builder(
    keys: list[str], constants: dict[str, Any], omit_if_null: frozenset[str] = frozenset()
) -> RecordBuilder:
    """Cast columns -> one dict per row, plus `constants` (a partition's keys) in every record."""

    def build(columns: list[Sequence[Any]]) -> list[Any]:
        records = list(map(dict, map(zip, repeat(keys), zip(*columns))))
        if constants:
            for record in records:
                record.update(constants)
        for key in omit_if_null:
            for record in records:
                if record[key] is None:
                    del record[key]
        return records

    return build


def struct_builder(
    keys: list[str], constants: dict[str, Any], omit_if_null: frozenset[str] = frozenset()
) -> RecordBuilder:
    """Cast columns -> one msgspec Struct per row: built in C from the columns and encoded to the
    same JSON object as the dict (keys in the same order), at a fraction of a dict's cost. For
    records only ever encoded (the RECORD fast path, BATCH files), never handed to the SDK."""
    if set(constants) & set(keys):
        return dict_builder(keys, constants, omit_if_null)  # a partition key that is also a column replaces it
    names = {f"f{i}": key for i, key in enumerate(keys)} | {f"c{i}": key for i, key in enumerate(constants)}
    # gc=False: values come from CSV cells and decoded JSON, which cannot refer back to the record,
    # so the collector need not track millions of short-lived records.
    if not omit_if_null:
        fields: list[Any] = [(f"f{i}", Any) for i in range(len(keys))]
        fields += [(f"c{i}", Any, value) for i, value in enumerate(constants.values())]
        record_type = msgspec.defstruct("ExportRecord", fields, rename=names, gc=False)
        return lambda columns: list(map(record_type, *columns))
    # msgspec leaves out a field equal to its default: None for the keys to omit, and for every other
    # field a default no value equals (UNSET), so only those are left out. Constants are passed too.
    fields = [(f"f{i}", Any, None if key in omit_if_null else msgspec.UNSET) for i, key in enumerate(keys)]
    fields += [(f"c{i}", Any, msgspec.UNSET) for i in range(len(constants))]
    record_type = msgspec.defstruct("ExportRecord", fields, rename=names, gc=False, omit_defaults=True)
    constant_columns = [repeat(value) for value in constants.values()]
    return lambda columns: list(map(record_type, *columns, *constant_columns))


@dataclass
class CsvLayout:
    """A file's columns once its header is read: keys in order and the casters that go with them.

    `casters[i]` is None for text columns: their cells are kept as they are (empty means null).
    """

    keys: list[str]
    casters: list[Caster | None]
    unknown_keys: list[str]
    build: RecordBuilder
    #: Key columns the file lacks: each record carries a fingerprint of its row there (see `row_key_columns`).
    fingerprinted_keys: list[str] = field(default_factory=list)
    #: Indexes of the typed columns with a text companion, in the order their companions were added.
    companions: list[int] = field(default_factory=list)

    @property
    def companion_keys(self) -> list[str]:
        return [companion_key(self.keys[index]) for index in self.companions]

    @property
    def record_keys(self) -> list[str]:
        """The keys of the columns `build` takes, in order: the file's, fingerprints, companions."""
        return self.keys + self.fingerprinted_keys + self.companion_keys


class CsvRecordReader:
    """Turns an export file into typed records, naming the export and row in every error.

    `describe` names the stream and export id, for messages. Row numbers count data rows from 1
    (the header is row 0), which is what a user sees when opening the file in a spreadsheet.
    """

    def __init__(
        self,
        columns: dict[str, Column],
        *,
        describe: str,
        naive_zone: dt.tzinfo = UTC,
        requested_fields: list[str] | None = None,
        constants: dict[str, Any] | None = None,
        builder: BuilderFactory = dict_builder,
        text_columns: Iterable[str] = (),
        companion_columns: Iterable[str] = (),
        unselected_columns: Iterable[str] = (),
        on_misfit: Callable[[Misfit], None] | None = None,
        row_key_columns: Sequence[str] = (),
    ) -> None:
        self.columns = columns
        self.describe = describe
        self.naive_zone = naive_zone
        self.requested_fields = requested_fields
        #: Values every record carries besides its columns (a partition's keys).
        self.constants = constants or {}
        #: How cast columns become records: dicts, or Structs for records that are only encoded.
        self.builder = builder
        #: Columns read as text whatever their kind: an earlier version of the tap widened them.
        self.text_columns = set(text_columns)
        #: Typed columns whose misfits go to a text companion: met in an earlier file or run.
        self.companion_columns = set(companion_columns)
        #: Columns the catalog leaves out: a misfit there leaves with its column (no companion).
        self.unselected_columns = frozenset(unselected_columns)
        #: Told of each column's first misfit, before the records of its block are built.
        self.on_misfit = on_misfit
        #: The first misfit of each column met while reading, by key.
        self.misfits: dict[str, Misfit] = {}
        #: Columns every record needs (the stream's primary key). A file without one of them (the key
        #: was a guess, or renamed) still loads: each record carries a fingerprint of its row there.
        self.row_key_columns = tuple(row_key_columns)
        #: How often each row fingerprint was met in this file (see `_fingerprints`).
        self._fingerprints_seen: dict[str, int] = {}
        self.rows_read = 0

    def __getstate__(self) -> dict[str, Any]:
        # Crosses to worker processes (parallel_batches.py); the callback stays with the stream,
        # which hears of a worker's misfits through report_misfits.
        return {**self.__dict__, "on_misfit": None}

    def report_misfits(self, misfits: Iterable[Misfit]) -> None:
        """Misfits found elsewhere (a worker's slice), as if found here."""
        for misfit in misfits:
            self._note_misfit(misfit)

    def layout(self, header: list[str]) -> CsvLayout:
        keys = record_keys(header, self.requested_fields)
        unknown = [key for key in keys if key not in self.columns]
        kinds = ["string" if key in self.text_columns else self._kind_of(key) for key in keys]
        casters = [
            self._widened_caster(key)
            if key in self.text_columns
            else None
            if kind == "string"
            else caster_for(kind, self.naive_zone)
            for key, kind in zip(keys, kinds)
        ]
        missing = [key for key in self.row_key_columns if key not in keys and key not in self.constants]
        companions = [
            index
            for index, key in enumerate(keys)
            if key in self.companion_columns and key not in self.text_columns and casters[index] is not None
        ]
        layout = CsvLayout(keys, casters, unknown, _unbuilt, missing, companions)
        layout.build = self.make_build(layout)
        return layout

    def make_build(self, layout: CsvLayout) -> RecordBuilder:
        """The RecordBuilder of `layout.record_keys`; made again when a column gains a companion."""
        # An empty JSON cell is left out of the record rather than sent as null: targets store a JSON
        # null as the JSON literal 'null', which `IS NULL` does not find.
        json_keys = self.json_keys(layout)
        if json_keys:
            return self.builder(layout.record_keys, self.constants, json_keys)
        return self.builder(layout.record_keys, self.constants)

    def json_keys(self, layout: CsvLayout) -> frozenset[str]:
        return frozenset(key for key in layout.keys if key not in self.text_columns and self._kind_of(key) == "json")

    def read(self, text: TextIO, on_layout: Callable[[CsvLayout], None] | None = None) -> Iterator[dict]:
        """Yield one record per data row. `on_layout` hears the columns before the first record."""
        for block in self.read_blocks(text, on_layout):
            yield from block

    def read_file(self, path: str, on_layout: Callable[[CsvLayout], None] | None = None) -> Iterator[list[Any]]:
        """read_blocks of the export file at `path`."""
        with open(path, encoding="utf-8-sig", newline="") as text:
            yield from self.read_blocks(text, on_layout)

    def read_blocks(self, text: TextIO, on_layout: Callable[[CsvLayout], None] | None = None) -> Iterator[list[Any]]:
        """The records of the file in file order, a block of up to BLOCK_ROWS rows at a time."""
        rows = csv.reader(text, strict=True)
        with self._naming_the_broken_row(text, first_row=0):
            header = next(rows, None)
            if header is None:
                return
            layout = self.layout(header)
            if on_layout:
                on_layout(layout)
            yield from self._blocks(rows, layout)

    def read_slice_blocks(self, text: TextIO, header: list[str]) -> Iterator[list[Any]]:
        """Like read_blocks, for whole rows cut from a file after its `header` (parallel_batches.py).
        Rows are numbered on from `rows_read`."""
        rows = csv.reader(text, strict=True)
        with self._naming_the_broken_row(text, first_row=self.rows_read + 1):
            yield from self._blocks(rows, self.layout(header))

    def _blocks(self, rows: Iterator[list[str]], layout: CsvLayout) -> Iterator[list[Any]]:
        while True:
            block, error = _next_rows(rows, BLOCK_ROWS)
            if block:
                yield self._block_records(block, layout)
            if error is not None:
                raise error
            if len(block) < BLOCK_ROWS:
                return

    @contextlib.contextmanager
    def _naming_the_broken_row(self, text: TextIO, first_row: int) -> Iterator[None]:
        """The csv module's and the decoder's errors, as errors naming the row; `first_row` is the
        number of the text's first row (0 when it is the header)."""
        raw = getattr(text, "buffer", None)
        text_start = raw.tell() if raw is not None and raw.seekable() else 0
        try:
            yield
        except csv.Error as exc:
            raise CsvFormatError(self.describe, self.rows_read + 1, f" is not valid CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            row = self._row_with_bad_bytes(text, text_start, first_row) or self.rows_read + 1
            raise CsvFormatError(self.describe, row, f" holds bytes that are not UTF-8 ({exc.reason})") from None

    @staticmethod
    def _row_with_bad_bytes(text: TextIO, text_start: int, first_row: int) -> int | None:
        """The data row holding the bad bytes. Decoding fails a whole chunk ahead of the parser, so
        the count of rows read says little; on this error path the text is read again to find it."""
        raw = getattr(text, "buffer", None)
        if raw is None or not raw.seekable():
            return None
        raw.seek(text_start)
        lenient = io.TextIOWrapper(raw, encoding=text.encoding, errors="surrogateescape", newline="")
        for number, row in enumerate(csv.reader(lenient), start=first_row):
            if any(SURROGATE.search(cell) for cell in row):
                return number
        return None

    def _block_records(self, block: list[list[str]], layout: CsvLayout) -> list[Any]:
        width = len(layout.keys)
        if all(map(width.__eq__, map(len, block))):
            records = self._cast_rows(block, layout, first_row=self.rows_read + 1)
            self.rows_read += len(block)
            return records
        return self._ragged_block_records(block, layout)

    def _cast_rows(self, block: list[list[str]], layout: CsvLayout, first_row: int) -> list[Any]:
        """The hot loop of the tap, done a column at a time: a cast mapped over a column runs in C,
        where a loop over cells would run in Python."""
        cells_by_column = list(zip(*block))
        columns = [self._cast_column(layout, index, cells, first_row) for index, cells in enumerate(cells_by_column)]
        if layout.fingerprinted_keys:
            columns += [self._fingerprints(block)] * len(layout.fingerprinted_keys)
        for index in layout.companions:
            cast = layout.casters[index]
            assert cast is not None  # only typed columns get a companion
            columns[index], misfits = self._split_column(cast, cells_by_column[index])
            columns.append(misfits)
        return layout.build(columns)

    def _cast_column(self, layout: CsvLayout, index: int, cells: tuple[str, ...], first_row: int) -> Sequence[Any]:
        cast = layout.casters[index]
        has_empty = "" in cells
        if cast is None:
            return [cell or None for cell in cells] if has_empty else cells
        if index in layout.companions:
            return cells  # split by _cast_rows
        try:
            return [cast(cell) if cell else None for cell in cells] if has_empty else list(map(cast, cells))
        except (ValueError, ArithmeticError, OSError):  # OSError: an epoch out of the platform's range
            pass
        # Some cell needs the lenient cast, or does not fit: cell by cell, to find which.
        key = layout.keys[index]
        try:
            return [self._cast_cell(cast, cell, row) for row, cell in enumerate(cells, start=first_row)]
        except _DoesNotFit as misfit:
            if key in self.unselected_columns:
                return [None] * len(cells)
            self._note_misfit(Misfit(key, self._kind_of(key), misfit.row, misfit.cell))
        if key in self.text_columns:
            # A key column cannot be null on a row, so it is widened to text in place instead.
            widened = layout.casters[index] = self._widened_caster(key)
            return [(widened(cell) if widened else cell) if cell else None for cell in cells]
        layout.companions.append(index)
        layout.build = self.make_build(layout)
        return cells  # split by _cast_rows

    def _split_column(self, cast: Caster, cells: Sequence[str]) -> tuple[list[Any], list[str | None]]:
        """A column with a text companion: the cells that fit, cast, and beside them the ones that do
        not, exactly as written."""
        typed: list[Any] = []
        misfits: list[str | None] = []
        for cell in cells:
            try:
                typed.append(self._cast_cell(cast, cell, 0))
                misfits.append(None)
            except _DoesNotFit:
                typed.append(None)
                misfits.append(cell)
        return typed, misfits

    def _widened_caster(self, key: str) -> Caster | None:
        """How a column an earlier version widened to text reads its cells. Instants that parse are
        still converted (the same UTC ISO text as before, not a store's local time); every other cell
        is kept as written."""
        kind = self._kind_of(key)
        if kind not in INSTANT_KINDS:
            return None
        cast = caster_for(kind, self.naive_zone)

        def as_text(cell: str) -> str:
            try:
                return str(cast(cell))
            except (ValueError, ArithmeticError, OSError):
                return cell

        return as_text

    def _cast_cell(self, cast: Caster, cell: str, row: int) -> Any:
        if not cell:
            return None
        try:
            return cast(cell)
        except (ValueError, ArithmeticError, OSError):
            return self._lenient_cast(cast, cell, row)

    def _fingerprints(self, block: list[list[str]]) -> list[str]:
        """Keys for rows whose file lacks its key column: the partition's values and the row's cells,
        and the count of earlier identical rows in the file, so equal rows stay apart."""
        seen = self._fingerprints_seen
        partition = "\x1e".join(f"{key}={value}" for key, value in sorted(self.constants.items()))
        keys = []
        for row in block:
            key = row_fingerprint([partition, *row])
            seen[key] = seen.get(key, 0) + 1
            keys.append(key if seen[key] == 1 else f"{key}-{seen[key]}")
        return keys

    def _note_misfit(self, misfit: Misfit) -> None:
        """The column has a text companion from now on, in this file and (through the stream) in
        later ones."""
        if misfit.key in self.misfits:
            return
        self.misfits[misfit.key] = misfit
        if misfit.key in self.row_key_columns:
            self.text_columns.add(misfit.key)
        else:
            self.companion_columns.add(misfit.key)
        if self.on_misfit is not None:
            self.on_misfit(misfit)

    def _kind_of(self, key: str) -> str:
        return self.columns[key].kind if key in self.columns else "string"

    def _ragged_block_records(self, block: list[list[str]], layout: CsvLayout) -> list[Any]:
        """Row by row: blank lines are skipped (some exporters end files with two); any other row of
        the wrong width is an error, since guessing which value belongs to which column corrupts data."""
        width = len(layout.keys)
        records: list[Any] = []
        for row in block:
            self.rows_read += 1
            if len(row) == width:
                records += self._cast_rows([row], layout, first_row=self.rows_read)
            elif any(row):
                raise CsvFormatError(
                    self.describe,
                    self.rows_read,
                    f" has {len(row)} fields but the header has {width}; "
                    "refusing to guess which values belong to which column",
                )
        return records

    @staticmethod
    def _lenient_cast(cast: Caster, cell: str, row: int) -> Any:
        """The slow path for a cell the fast cast refused: retry leniently, or say it does not fit."""
        try:
            if cast is int:
                return to_integer(cell.strip())
        except (ValueError, ArithmeticError):  # ArithmeticError: Decimal's errors, OverflowError ('inf')
            pass
        raise _DoesNotFit(row, cell)


class _DoesNotFit(Exception):
    def __init__(self, row: int, cell: str) -> None:
        self.row, self.cell = row, cell


def row_fingerprint(row: list[str]) -> str:
    """A key for a row whose file lacks its key column: the same row gets the same key on every read,
    so targets deduplicate re-read windows."""
    return "row-sha1:" + hashlib.sha1("\x1f".join(row).encode("utf-8", "surrogatepass")).hexdigest()


def _unbuilt(columns: list[Sequence[Any]]) -> list[Any]:
    raise AssertionError("a layout's build is made right after the layout")

"""CSV -> typed records: header keys, casts, awkward files, and errors that say where."""

import io
from zoneinfo import ZoneInfo

import msgspec
import pytest

from tap_commerce_exports.records.columns import Column, header_key, record_keys
from tap_commerce_exports.records.csv_reader import CsvFormatError, CsvRecordReader, Misfit, struct_builder

COLUMNS = {
    c.key: c
    for c in [
        Column("id"),
        Column("amount", "integer"),
        Column("price", "number"),
        Column("active", "boolean"),
        Column("created_at", "datetime"),
        Column("details", "json"),
        Column("born", "date"),
    ]
}


def read(text: str, **kwargs) -> list[dict]:
    reader = CsvRecordReader(COLUMNS, describe="test_stream export exp_1", **kwargs)
    return list(reader.read(io.StringIO(text, newline="")))


def test_header_labels_become_lower_snake_case_keys():
    assert header_key("Source ID") == "source_id"
    assert header_key("metadata.payment_mean") == "metadata_payment_mean"
    assert header_key("  Total (incl. tax) ") == "total_incl_tax"
    assert record_keys(["ID", "", "ID"]) == ["id", "column_2", "id_2"]


def test_requested_fields_name_the_columns_when_counts_agree():
    assert record_keys(["ID", "Payment Mean"], ["id", "metadata.payment_mean"]) == ["id", "metadata_payment_mean"]
    assert record_keys(["ID", "Extra", "More"], ["id", "x"]) == ["id", "extra", "more"]


def test_cells_are_cast_by_kind_and_empty_cells_are_null():
    text = (
        "id,amount,price,active,created_at,details,born\r\n"
        'a,7700,12.50,true,2024-01-05T13:22:10.123Z,"{""k"": [1, ""x,y""]}",2022-01-01\r\n'
        "b,,,,,,\r\n"
    )
    first, second = read(text)
    assert first == {
        "id": "a",
        "amount": 7700,
        "price": pytest.approx(12.5),
        "active": True,
        "created_at": "2024-01-05T13:22:10.123+00:00",
        "details": {"k": [1, "x,y"]},
        "born": "2022-01-01",
    }
    assert str(first["price"]) == "12.50"  # Decimal: money stays exact
    # An empty JSON cell is left out of its record: targets store a JSON null as the literal 'null'.
    assert second == {
        "id": "b",
        "amount": None,
        "price": None,
        "active": None,
        "created_at": None,
        "born": None,
    }


def test_naive_timestamps_are_read_in_the_given_zone_and_emitted_in_utc():
    (record,) = read("id,created_at\nx,2024-01-05 07:12:44\n", naive_zone=ZoneInfo("America/Chicago"))
    assert record["created_at"] == "2024-01-05T13:12:44+00:00"


def test_quoted_commas_embedded_newlines_and_long_fields_parse():
    long_text = "é" * 300_000
    text = f'id,details\r\n"a,1","{{""note"": ""line1\\nline2""}}"\r\nb,"{{""blob"": ""{long_text}""}}"\r\n'
    records = read(text)
    assert records[0]["id"] == "a,1"
    assert records[1]["details"]["blob"] == long_text


def test_unknown_columns_are_kept_as_strings_and_reported_before_the_first_row():
    layouts = []
    reader = CsvRecordReader(COLUMNS, describe="s export e")
    records = list(reader.read(io.StringIO("id,gift_note,amount\na,hello,5\n"), on_layout=layouts.append))
    assert layouts[0].unknown_keys == ["gift_note"]
    assert records == [{"id": "a", "gift_note": "hello", "amount": 5}]


def test_a_row_with_extra_fields_is_refused_naming_the_export_and_row():
    with pytest.raises(CsvFormatError, match=r"test_stream export exp_1: row 2 has 3 fields but the header has 2"):
        read("id,amount\na,1\nb,2,3\n")


def test_a_cell_that_does_not_fit_its_kind_goes_to_a_text_companion_and_says_where():
    heard: list[Misfit] = []
    records = read("id,amount,price\na,12,1.5\nb,12x,2\nc,,3\n", on_misfit=heard.append)
    # The column keeps its kind; the cell that does not fit is beside it, exactly as written.
    assert [r["amount"] for r in records] == [12, None, None]
    assert [r["amount__text"] for r in records] == [None, "12x", None]
    assert [r["price"] for r in records] == [pytest.approx(1.5), 2, 3]
    assert "price__text" not in records[0]
    assert heard == [Misfit("amount", "integer", 2, "12x")]


@pytest.mark.parametrize(
    "column, cell",
    [
        ("price", "N/A"),
        ("active", "maybe"),
        ("created_at", "01/15/2024 10:30 AM"),
        ("details", "not json"),
        ("born", "15.01.2022"),
        ("amount", "1.5"),
    ],
)
def test_every_kind_keeps_its_type_and_puts_the_misfit_beside_it(column, cell):
    heard: list[Misfit] = []
    header = "id,amount,price,active,created_at,details,born"
    good = 'a,1,2.5,true,2024-01-05T13:22:10Z,"{}",2022-01-01'
    row = dict(zip(header.split(","), ["b", "2", "3", "false", "2024-01-06T00:00:00Z", "[]", "2022-01-02"]))
    row[column] = cell
    second = ",".join(f'"{value}"' for value in row.values())
    records = read(f"{header}\n{good}\n{second}\n", on_misfit=heard.append)
    assert len(records) == 2
    assert records[1][f"{column}__text"] == cell and records[1].get(column) is None
    assert records[0][f"{column}__text"] is None and records[0][column] not in (None, "")
    assert [(m.key, m.row, m.cell) for m in heard] == [(column, 2, cell)]


def test_a_misfit_in_a_key_column_widens_it_in_place_so_no_key_is_null():
    heard: list[Misfit] = []
    text = "id,created_at,amount\na,2024-01-05T13:22:10Z,1\nb,01/02/2024 10:00,2\nc,02/02/2024 10:00,3\n"
    reader = CsvRecordReader(COLUMNS, describe="s", row_key_columns=("id", "created_at"), on_misfit=heard.append)
    records = list(reader.read(io.StringIO(text, newline="")))
    assert [r["created_at"] for r in records] == ["2024-01-05T13:22:10+00:00", "01/02/2024 10:00", "02/02/2024 10:00"]
    assert not [key for r in records for key in r if key.endswith("__text")]
    assert reader.text_columns == {"created_at"} and heard == [Misfit("created_at", "datetime", 2, "01/02/2024 10:00")]


def test_a_deselected_column_sheds_its_misfits_without_a_companion():
    heard: list[Misfit] = []
    reader = CsvRecordReader(COLUMNS, describe="s", unselected_columns={"amount"}, on_misfit=heard.append)
    records = list(reader.read(io.StringIO("id,amount\na,1\nb,N/A\n", newline="")))
    assert [sorted(r) for r in records] == [["amount", "id"], ["amount", "id"]] and not heard


@pytest.mark.parametrize(
    "column, kind, cell",
    [("amount", "integer", "inf"), ("amount", "integer", "-Infinity"), ("stamp", "epoch_ms", "99999999999999999999")],
)
def test_cells_out_of_range_are_misfits_not_errors(column, kind, cell):
    columns = {**COLUMNS, "stamp": Column("stamp", "epoch_ms")}
    reader = CsvRecordReader(columns, describe="s")
    records = list(reader.read(io.StringIO(f"id,{column}\na,{cell}\n", newline="")))
    assert records[0][f"{column}__text"] == cell and records[0][column] is None
    assert reader.misfits[column].kind == kind


def test_text_columns_of_earlier_versions_are_never_cast():
    records = read("id,amount,price\na,007,N/A\n", text_columns={"amount", "price"})
    assert records == [{"id": "a", "amount": "007", "price": "N/A"}]


def test_a_column_with_a_companion_from_an_earlier_run_splits_from_the_first_row():
    records = read("id,amount\na,7\nb,N/A\n", companion_columns={"amount"})
    assert records == [
        {"id": "a", "amount": 7, "amount__text": None},
        {"id": "b", "amount": None, "amount__text": "N/A"},
    ]


def test_a_misfit_in_a_later_block_adds_the_companion_from_that_block_on(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text(many_rows(lambda n: "ten" if n == 1030 else str(n)), newline="")
    heard: list[Misfit] = []
    reader = CsvRecordReader(COLUMNS, describe="s export e", on_misfit=heard.append)
    records = [record for block in reader.read_file(str(path)) for record in block]
    assert len(records) == MANY and heard == [Misfit("amount", "integer", 1030, "ten")]
    assert "amount__text" not in records[0] and records[0]["amount"] == 1  # the first blocks are as they were
    assert records[1029]["amount"] is None and records[1029]["amount__text"] == "ten"
    assert records[1030]["amount"] == 1031 and records[1030]["amount__text"] is None


def test_a_companion_and_structs_encode_like_dicts():
    text = "id,amount\na,1\nb,x\n"
    as_structs = CsvRecordReader(COLUMNS, describe="s", builder=struct_builder).read(io.StringIO(text, newline=""))
    assert [msgspec.to_builtins(r) for r in as_structs] == read(text)


def test_empty_and_header_only_files_have_no_rows():
    assert read("") == []
    assert read("id,amount\r\n") == []


def test_bytes_that_are_not_utf8_are_refused_naming_the_row():
    raw = io.BytesIO(b"id,amount\na,1\n\xff\xfe,2\n")
    reader = CsvRecordReader(COLUMNS, describe="s export e")
    with pytest.raises(CsvFormatError, match=r"s export e: row \d+ holds bytes that are not UTF-8"):
        list(reader.read(io.TextIOWrapper(raw, encoding="utf-8", newline="")))


# ------------------------------------------------------- blocks of rows, cast column-wise

MANY = 1300  # rows: the reader casts BLOCK_ROWS (512) at a time, so this spans three blocks


def many_rows(cell=lambda n: str(n)) -> str:
    lines = ["id,amount,created_at,details"]
    lines += [f'r{n},{cell(n)},2024-01-0{1 + n % 9}T00:00:00Z,"{{""n"": {n}}}"' for n in range(1, MANY + 1)]
    return "\n".join(lines) + "\n"


def test_rows_in_later_blocks_are_cast_and_named_by_their_own_row_number():
    records = read(many_rows(lambda n: "2000.00" if n == 700 else ("" if n % 97 == 0 else str(n))))
    assert len(records) == MANY
    assert records[699]["amount"] == 2000  # the lenient cast, in the second block
    assert records[96]["amount"] is None and records[98]["amount"] == 99
    assert records[-1] == {
        "id": f"r{MANY}",
        "amount": MANY,
        "created_at": "2024-01-05T00:00:00+00:00",
        "details": {"n": MANY},
    }

    heard: list[Misfit] = []
    records = read(many_rows(lambda n: "ten" if n == 1030 else str(n)), on_misfit=heard.append)
    assert heard == [Misfit("amount", "integer", 1030, "ten")]
    assert records[1023]["amount"] == 1024  # blocks before the misfit's were cast
    assert records[1024]["amount"] == 1025 and records[1029]["amount__text"] == "ten"  # typed, misfit beside


def test_broken_csv_in_a_later_block_names_its_row_after_the_rows_before_it():
    text = many_rows() + 'r9999,1,2024-01-01T00:00:00Z,"{}\n'  # an unterminated quote in row MANY + 1
    reader = CsvRecordReader(COLUMNS, describe="s export e")
    emitted = []
    with pytest.raises(CsvFormatError, match=rf"row {MANY + 1} is not valid CSV"):
        for record in reader.read(io.StringIO(text, newline="")):
            emitted.append(record)
    assert len(emitted) == MANY


def test_blank_lines_in_a_block_are_skipped_and_still_counted_as_rows():
    lines = many_rows().splitlines()
    lines.insert(600, "")
    reader = CsvRecordReader(COLUMNS, describe="s export e")
    records = list(reader.read(io.StringIO("\n".join(lines) + "\n", newline="")))
    assert len(records) == MANY and reader.rows_read == MANY + 1
    with pytest.raises(CsvFormatError, match=r"row 700 has 2 fields but the header has 4"):
        bad = many_rows().splitlines()
        bad[700] = "r700,1"
        read("\n".join(bad) + "\n")


@pytest.mark.parametrize("constants", [{}, {"campaign_id": "camp_1"}, {"id": "replaced"}])
def test_struct_records_encode_exactly_as_dict_records(constants):
    import msgspec

    from tap_commerce_exports.records.csv_reader import struct_builder

    text = many_rows(lambda n: "" if n % 5 == 0 else str(n))
    as_dicts = CsvRecordReader(COLUMNS, describe="s", constants=constants).read(io.StringIO(text, newline=""))
    as_structs = CsvRecordReader(COLUMNS, describe="s", constants=constants, builder=struct_builder).read(
        io.StringIO(text, newline="")
    )
    encoder = msgspec.json.Encoder(decimal_format="number")
    assert encoder.encode_lines(list(as_structs)) == encoder.encode_lines(list(as_dicts))


def test_a_file_without_its_key_column_gives_each_record_a_fingerprint_of_its_row():
    text = "Name,Amount\na,1\nb,2\na,1\n"
    records = read(text, row_key_columns=("id",))
    assert [r["name"] for r in records] == ["a", "b", "a"]
    assert all(r["id"].startswith("row-sha1:") for r in records)
    assert len({r["id"] for r in records}) == 3  # two equal rows stay apart (a count tells them apart)
    again = read(text, row_key_columns=("id",))
    assert [r["id"] for r in again] == [r["id"] for r in records]  # and a re-read gives the same keys
    other_partition = read(text, row_key_columns=("id",), constants={"campaign_id": "c2"})
    assert not {r["id"] for r in other_partition} & {r["id"] for r in records}
    assert read(text, row_key_columns=("id",), builder=struct_builder_as_dicts)[1]["id"] == records[1]["id"]


def struct_builder_as_dicts(keys, constants):
    build = struct_builder(keys, constants)
    return lambda columns: [msgspec.to_builtins(record) for record in build(columns)]


def test_a_date_time_column_with_misfits_still_converts_the_instants_that_parse():
    """Not a mix of UTC and a store's local time: cells that parse keep their conversion."""
    heard: list[Misfit] = []
    text = "id,created_at\na,2024-01-05 08:00:00\nb,01/15/2024 10:30 AM\n"
    records = read(text, naive_zone=ZoneInfo("America/Chicago"), on_misfit=heard.append)
    assert [r["created_at"] for r in records] == ["2024-01-05T14:00:00+00:00", None]
    assert [r["created_at__text"] for r in records] == [None, "01/15/2024 10:30 AM"]
    assert [m.key for m in heard] == ["created_at"]
    later = read(
        "id,created_at\nc,2024-02-01 00:00:00\n", naive_zone=ZoneInfo("America/Chicago"), text_columns={"created_at"}
    )
    assert later[0]["created_at"] == "2024-02-01T06:00:00+00:00"  # a text column of an earlier version

"""CSV -> typed records: header keys, casts, awkward files, and errors that say where."""

import io
from zoneinfo import ZoneInfo

import pytest

from tap_commerce_exports.engine.csv_records import Column, CsvFormatError, CsvRecordReader, header_key, record_keys

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
    assert second == {
        "id": "b",
        "amount": None,
        "price": None,
        "active": None,
        "created_at": None,
        "details": None,
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


def test_a_bad_value_names_the_row_and_column():
    with pytest.raises(CsvFormatError, match=r"row 1, column 'amount': '12x' is not a valid integer"):
        read("id,amount\na,12x\n")


def test_empty_and_header_only_files_have_no_rows():
    assert read("") == []
    assert read("id,amount\r\n") == []


def test_bytes_that_are_not_utf8_are_refused_naming_the_row():
    raw = io.BytesIO(b"id,amount\na,1\n\xff\xfe,2\n")
    reader = CsvRecordReader(COLUMNS, describe="s export e")
    with pytest.raises(CsvFormatError, match=r"s export e: row \d+ holds bytes that are not UTF-8"):
        list(reader.read(io.TextIOWrapper(raw, encoding="utf-8", newline="")))

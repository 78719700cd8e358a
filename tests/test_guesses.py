"""A guess never costs a row or a stream: files shaped otherwise than the tap's column guesses load whole.

Next Commerce and Intelligems publish no CSV columns, so the tap's kinds for them are guesses. The
sandbox's messy mode writes what real files may hold: "N/A" in a number column, another date format,
yes/no booleans, text in a JSON column and a renamed column. Every row must arrive. A column whose cells
do not fit its kind keeps its type; those cells go, exactly as written, to a text column beside it
(`<key>__text`), with a SCHEMA before the first record that needs it and one warning naming stream,
column and row. The companion stays in later runs, and no column ever changes type, so loaders that
cannot alter a column (target-postgres) load every row too.
"""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

import pytest

from tap_commerce_exports.records.columns import caster_for, to_integer
from tap_commerce_exports.sources import SOURCES
from tap_commerce_exports.tap import TapCommerceExports
from tests.harness import run_tap

TEXT = ["string", "null"]
UTC = dt.timezone.utc
COMPANION_STATE = "columns_with_text_companion"
STREAM_TYPES = {stream_type.name: stream_type for source in SOURCES for stream_type in source.stream_types}


def fits(kind: str, zone: dt.tzinfo, cell: str) -> bool:
    """Whether the tap's cast takes the cell (the lenient integer cast included)."""
    try:
        caster_for(kind, zone)(cell)
        return True
    except (ValueError, ArithmeticError):
        pass
    try:
        return kind == "integer" and to_integer(cell.strip()) is not None
    except (ValueError, ArithmeticError):
        return False


STREAMS = {
    "nextcommerce": ("nextcommerce_order_list", "nextcommerce_customer_list", "nextcommerce_transaction_list"),
    "intelligems": ("intelligems_order_line_items", "intelligems_order_reconciliation"),
}


@pytest.mark.parametrize("api", sorted(STREAMS))
def test_messy_files_arrive_whole_and_their_misfits_load_beside_their_typed_columns(api, every_seed, request):
    sandbox = request.getfixturevalue(f"{api}_sandbox")
    emulator = getattr(sandbox, api)
    emulator.messy_cells = True
    config = sandbox.tap_config()
    if api == "nextcommerce":
        emulator.rate_per_second = emulator.rate_burst = 100
        config["nextcommerce_requests_per_second"] = 50
    output = run_tap(config, streams=set(STREAMS[api]))
    assert output.error is None, output.error
    zone = ZoneInfo(config.get("nextcommerce_store_timezone") or "UTC") if api == "nextcommerce" else UTC

    for stream in STREAMS[api]:
        raw = emulator.raw_rows(stream)
        records = output.records(stream)
        assert len(records) == len(raw), stream
        schemas = output.schemas(stream)
        companions = {key.removesuffix("__text") for key in schemas[-1]["properties"] if key.endswith("__text")}
        assert companions, f"{stream}: the messy file put no cell beside its column"
        assert set(output.final_state["bookmarks"][stream][COMPANION_STATE]) == companions
        for key in companions:
            check_companion(output, stream, key, raw, records, zone)


def check_companion(output, stream: str, key: str, raw: list[dict], records: list[dict], zone: dt.tzinfo) -> None:
    """The typed column kept its type from the first SCHEMA on; each non-empty cell is in exactly one of
    the two columns; the companion holds cells that do not fit, exactly as written, and its SCHEMA came
    before the first record that needed it; one warning names the column and a row."""
    schemas = output.schemas(stream)
    typed = schemas[0]["properties"][key]
    assert (typed["type"] != TEXT or "format" in typed) and all(s["properties"][key] == typed for s in schemas)
    companion = f"{key}__text"
    kind = next(column.kind for column in STREAM_TYPES[stream].known_columns if column.key == key)
    beside = [r[companion] for r in records if r.get(companion) is not None]
    cells = [row.get(key, "") for row in raw if row.get(key)]
    assert beside and sum(r.get(key) is not None for r in records) + len(beside) == len(cells), (stream, key)
    assert all(not fits(kind, zone, cell) for cell in beside), (stream, key)
    assert sorted(beside) == sorted(cell for cell in cells if not fits(kind, zone, cell)), (stream, key)
    first_needed = next(
        i
        for i, m in enumerate(output.messages)
        if m["type"] == "RECORD" and m["stream"] == stream and m["record"].get(companion) is not None
    )
    schema_then = [
        m["schema"] for m in output.messages[:first_needed] if m["type"] == "SCHEMA" and m["stream"] == stream
    ][-1]
    assert schema_then["properties"][companion]["type"] == TEXT
    warnings = re.findall(rf"{stream}.*column '{key}' is not always [^:]+: row \d+ holds", output.log_text)
    assert len(warnings) == 1, (stream, key, len(warnings))


def test_a_companion_added_in_an_earlier_run_is_in_the_first_schema_on(nextcommerce_sandbox):
    """The warehouse table keeps its shape: the state remembers, whatever this run's files hold. A column
    an earlier version loaded as text stays text."""
    nextcommerce_sandbox.nextcommerce.rate_per_second = nextcommerce_sandbox.nextcommerce.rate_burst = 100
    state = {
        "bookmarks": {
            "nextcommerce_order_list": {COMPANION_STATE: ["total_incl_tax"], "columns_loaded_as_text": ["is_test"]}
        }
    }
    config = {**nextcommerce_sandbox.tap_config(), "nextcommerce_requests_per_second": 50}
    output = run_tap(config, state=state, streams={"nextcommerce_order_list"})
    assert output.error is None, output.error
    first = output.schemas("nextcommerce_order_list")[0]["properties"]
    assert first["total_incl_tax__text"]["type"] == TEXT and first["total_incl_tax"]["type"] != TEXT
    assert first["is_test"] == {**first["is_test"], "type": TEXT} and "format" not in first["is_test"]
    records = output.records("nextcommerce_order_list")
    raw = {row["order_number"]: row for row in nextcommerce_sandbox.nextcommerce.raw_rows("nextcommerce_order_list")}
    assert records and all(r["is_test"] == (raw[r["order_number"]]["is_test"] or None) for r in records)
    assert all(r["total_incl_tax__text"] is None for r in records)  # the files fit, this time
    bookmark = output.final_state["bookmarks"]["nextcommerce_order_list"]
    assert bookmark[COMPANION_STATE] == ["total_incl_tax"] and bookmark["columns_loaded_as_text"] == ["is_test"]


def test_a_documented_column_whose_file_turns_out_otherwise_loses_no_row(voucherify_sandbox):
    """Voucherify documents its columns (amounts are integer cents), yet a file may still hold another
    value: the row loads, the cell in the column's companion, and the column keeps its type."""
    voucherify_sandbox.faults.arm("misfit_cell", 1)
    output = run_tap(voucherify_sandbox.tap_config(), streams={"voucherify_orders"})
    assert output.error is None, output.error
    records = output.records("voucherify_orders")
    assert len(records) == len(voucherify_sandbox.voucherify.expected_records("voucherify_orders"))
    misfits = [(key, r) for r in records for key, value in r.items() if key.endswith("__text") and value == "N/A"]
    assert len(misfits) == 1, misfits
    companion, record = misfits[0]
    column = companion.removesuffix("__text")
    assert record[column] is None
    schemas = output.schemas("voucherify_orders")
    assert "integer" in schemas[0]["properties"][column]["type"]
    assert all(schema["properties"][column] == schemas[0]["properties"][column] for schema in schemas)
    assert schemas[-1]["properties"][companion]["type"] == TEXT
    assert output.final_state["bookmarks"]["voucherify_orders"][COMPANION_STATE] == [column]
    assert len(re.findall(rf"column '{column}' is not always an integer: row 3 holds", output.log_text)) == 1


def test_a_column_the_catalog_leaves_out_gets_no_companion_either(voucherify_sandbox):
    """A misfit in a deselected column leaves with its column: no `<key>__text` carries it back in."""
    voucherify_sandbox.faults.arm("misfit_cell", 1)
    tap_streams = TapCommerceExports(config={**voucherify_sandbox.tap_config(), "start_date": "2024-01-01T00:00:00Z"})
    properties = tap_streams.streams["voucherify_orders"].schema["properties"]
    integers = {key for key, prop in properties.items() if "integer" in prop.get("type", [])}
    config = voucherify_sandbox.tap_config()
    output = run_tap(config, streams={"voucherify_orders"}, deselected_columns={"voucherify_orders": integers})
    assert output.error is None, output.error
    records = output.records("voucherify_orders")
    assert len(records) == len(voucherify_sandbox.voucherify.expected_records("voucherify_orders"))
    assert not [key for record in records for key in record if key in integers or key.endswith("__text")]
    schemas = output.schemas("voucherify_orders")
    assert not [key for schema in schemas for key in schema["properties"] if "__text" in key]
    assert COMPANION_STATE not in output.final_state["bookmarks"]["voucherify_orders"]

"""A guess never costs a row or a stream: files shaped otherwise than the tap's column guesses load whole.

Next Commerce and Intelligems publish no CSV columns, so the tap's kinds for them are guesses. The
sandbox's messy mode writes what real files may hold: "N/A" in a number column, another date format,
yes/no booleans, text in a JSON column and a renamed column. Every row must arrive; a column whose cells
do not fit its kind is widened to text (each cell exactly as written) with a SCHEMA before its first
record and one warning naming stream, column and row, and it stays text in later runs.
"""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

import pytest

from tap_commerce_exports.records.columns import caster_for
from tests.harness import run_tap

TEXT = ["string", "null"]
UTC = dt.timezone.utc


def text_of(kind: str, zone: dt.tzinfo):
    """A cell as a widened column holds it: instants that parse converted to UTC text, the rest as written."""
    if kind not in ("datetime", "epoch_ms"):
        return lambda cell: cell
    cast = caster_for(kind, zone)

    def convert(cell: str) -> str:
        try:
            return cast(cell) if cell else cell
        except ValueError:
            return cell

    return convert


STREAMS = {
    "nextcommerce": ("nextcommerce_order_list", "nextcommerce_customer_list", "nextcommerce_transaction_list"),
    "intelligems": ("intelligems_order_line_items", "intelligems_order_reconciliation"),
}


@pytest.mark.parametrize("api", sorted(STREAMS))
def test_messy_files_arrive_whole_and_their_misfit_columns_turn_to_text_first(api, request):
    sandbox = request.getfixturevalue(f"{api}_sandbox")
    emulator = getattr(sandbox, api)
    emulator.messy_cells = True
    config = sandbox.tap_config()
    if api == "nextcommerce":
        emulator.rate_per_second = emulator.rate_burst = 100
        config["nextcommerce_requests_per_second"] = 50
    output = run_tap(config, streams=set(STREAMS[api]))
    assert output.error is None, output.error

    for stream in STREAMS[api]:
        raw = emulator.raw_rows(stream)
        records = output.records(stream)
        assert len(records) == len(raw), stream
        schemas = output.schemas(stream)
        first_record = next(i for i, m in enumerate(output.messages) if m["type"] == "RECORD" and m["stream"] == stream)
        schema_then = [
            m["schema"] for m in output.messages[:first_record] if m["type"] == "SCHEMA" and m["stream"] == stream
        ][-1]
        widened = {
            key
            for key, prop in schemas[-1]["properties"].items()
            if "Guessed or documented as" in prop.get("description", "")
        }
        described = {key: schemas[-1]["properties"][key]["description"] for key in widened}
        kinds = {key: re.search(r"as (\w+),", text).group(1) for key, text in described.items()}
        zone = ZoneInfo(config.get("nextcommerce_store_timezone") or "UTC") if api == "nextcommerce" else UTC
        assert widened, f"{stream}: the messy file widened no column"
        for key in widened:  # text before the first record, and the cells as written
            assert schema_then["properties"][key]["type"] == TEXT, (stream, key)
            as_text = text_of(kinds[key], zone)
            got = sorted(r.get(key) or "" for r in records)
            assert got == sorted(as_text(row.get(key, "")) for row in raw), (stream, key)
            warnings = re.findall(rf"{stream}.*column '{key}' is not always a \w+: row \d+ holds", output.log_text)
            assert len(warnings) == 1, (stream, key, len(warnings))
        assert set(output.final_state["bookmarks"][stream]["columns_loaded_as_text"]) == widened


def test_a_column_widened_in_an_earlier_run_is_text_from_the_first_schema_on(nextcommerce_sandbox):
    """The warehouse column never flips back: the state remembers, whatever this run's files hold."""
    nextcommerce_sandbox.nextcommerce.rate_per_second = nextcommerce_sandbox.nextcommerce.rate_burst = 100
    state = {"bookmarks": {"nextcommerce_order_list": {"columns_loaded_as_text": ["total_incl_tax", "is_test"]}}}
    config = {**nextcommerce_sandbox.tap_config(), "nextcommerce_requests_per_second": 50}
    output = run_tap(config, state=state, streams={"nextcommerce_order_list"})
    assert output.error is None, output.error
    first = output.schemas("nextcommerce_order_list")[0]["properties"]
    assert first["total_incl_tax"]["type"] == TEXT and first["is_test"]["type"] == TEXT
    records = output.records("nextcommerce_order_list")
    raw = {row["order_number"]: row for row in nextcommerce_sandbox.nextcommerce.raw_rows("nextcommerce_order_list")}
    assert records and all(r["total_incl_tax"] == (raw[r["order_number"]]["total_incl_tax"] or None) for r in records)
    assert set(output.final_state["bookmarks"]["nextcommerce_order_list"]["columns_loaded_as_text"]) == {
        "total_incl_tax",
        "is_test",
    }

"""The Intelligems emulator over real HTTP: auth, validation, lifecycle, exports, S3 URLs, limits, faults,
and the per-seed realities of what the vendor does not publish (id formats, columns, headers, 429s).

The `emulator` fixture runs the seed of the test (TAP_SANDBOX_SEED, rotated by tests/conftest.py), so
these tests assert behaviour that holds in every reality; tests about the realities themselves name
their seeds.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import textwrap
import threading
import time
from functools import cache
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import requests

from commerce_sandbox import intelligems as intelligems_module
from commerce_sandbox.core import SandboxContext
from commerce_sandbox.intelligems import (
    EXPORT_TABLES,
    EXTRA_COLUMNS,
    MESSES,
    OPTIONAL_COLUMNS,
    IntelligemsEmulator,
    Reality,
)
from commerce_sandbox.server import default_seed
from tap_commerce_exports.openapi import load_spec
from tap_commerce_exports.records.columns import header_key
from tests.harness import not_json

UTC = dt.timezone.utc
PREFIX = "/v25-10-beta"
BOM = b"\xef\xbb\xbf"
S3_URL = re.compile(
    r"^http://127\.0\.0\.1:\d+/[a-z0-9.-]+/exports/(?P<experience>[0-9a-f-]{36})/(?P<type>[a-z_]+)-(?P<n>\d+)\.csv"
    r"\?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=[^&]+&X-Amz-Date=\d{8}T\d{6}Z&X-Amz-Expires=900"
    r"&X-Amz-SignedHeaders=host&X-Amz-Signature=[0-9a-f]{64}$"
)


SUITE_SEEDS = (7, 11, 23, 42)
EXPORT_STREAMS = tuple(f"intelligems_{export_type}" for export_type in EXPORT_TABLES)


def started_emulator(seed: int | None = None, **options) -> IntelligemsEmulator:
    running = IntelligemsEmulator(
        SandboxContext(export_latency_seconds=0.05), seed=default_seed() if seed is None else seed, **options
    )
    for host in running.hosts:
        host.start()
    return running


def stop(running: IntelligemsEmulator) -> None:
    for host in running.hosts:
        # Host.stop() waits out serve_forever's 0.5 s poll; nothing needs that to finish before the next test.
        threading.Thread(target=host.stop, daemon=True).start()


@pytest.fixture
def emulator():
    running = started_emulator()
    yield running
    stop(running)


class Client:
    """A test's view of the API: the emulator's URL and token, and plain requests calls."""

    def __init__(self, emulator: IntelligemsEmulator) -> None:
        config = emulator.tap_config()
        self.base = config["intelligems_api_url"]
        self.headers = {"intelligems-access-token": config["intelligems_api_token"]}

    def get(self, path: str, **params) -> requests.Response:
        return requests.get(self.base + PREFIX + path, params=params, headers=self.headers, timeout=10)

    def export(self, experience_id: str, body: object, **kwargs) -> requests.Response:
        return requests.post(
            f"{self.base}{PREFIX}/analytics/experience/{experience_id}/export",
            json=body,
            headers=kwargs.get("headers", self.headers),
            timeout=10,
        )

    def export_url(self, experience_id: str, export_type: str = "orders", **body) -> str:
        answer = self.export(experience_id, {"exportType": export_type, **body})
        assert answer.status_code == 200, answer.text
        return answer.json()["url"]


@pytest.fixture
def api(emulator):
    return Client(emulator)


def epoch(text: str) -> str:
    return str(int(dt.datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()))


@cache
def response_validator(path: str, method: str) -> jsonschema.Draft202012Validator:
    """The published 200 schema of an operation (built once: the experience schemas are large)."""
    spec = load_spec("intelligems-exports.openapi.json")
    schema = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": spec["components"]})


def assert_published_shape(answer: dict, path: str, method: str) -> None:
    response_validator(PREFIX + path, method).validate(answer)


EXPORT_PATH = "/analytics/experience/{experienceId}/export"


# Casting written here, not taken from the emulator, so the comparison is a real check.
CASTS = {
    "string": str,
    "integer": int,
    "number": float,
    "boolean": {"true": True, "false": False}.__getitem__,
    "datetime": lambda cell: dt.datetime.fromisoformat(cell.replace("Z", "+00:00")).isoformat(),
    "json": json.loads,
}


def file_cells(body: bytes) -> tuple[list[str], list[dict[str, str]]]:
    """A file's header labels, and its rows as cell text by record key (the tap's `header_key`)."""
    assert body.startswith(BOM)
    reader = csv.reader(io.StringIO(body.decode("utf-8-sig"), newline=""), strict=True)
    labels = next(reader)
    keys = [header_key(label) for label in labels]
    return labels, [dict(zip(keys, row, strict=True)) for row in reader]


def typed_records(body: bytes, export_type: str, experience_id: str) -> list[dict]:
    """Rows typed by the guessed kinds; a column the tap does not know stays text (None when empty)."""
    kinds = {column.key: column.kind for column in EXPORT_TABLES[export_type].columns}
    return [
        {
            **{key: (CASTS[kinds.get(key, "string")](cell) if cell != "" else None) for key, cell in row.items()},
            "experience_id": experience_id,
        }
        for row in file_cells(body)[1]
    ]


def oldest_running(emulator: IntelligemsEmulator) -> str:
    """The experience running since 2024-01-01: its exports span the whole data period."""
    return min((exp for exp in emulator.experiences() if exp.status == "started"), key=lambda exp: exp.started_at).id


def ids_by_status(emulator: IntelligemsEmulator) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for experience in emulator.experiences():
        found.setdefault(experience.status, []).append(experience.id)
    return found


# ------------------------------------------------------------------------ auth


def test_api_refuses_missing_and_wrong_token(emulator, api):
    for headers in ({}, {"intelligems-access-token": "wrong"}):
        answer = requests.get(api.base + PREFIX + "/experiences-list", headers=headers, timeout=10)
        assert answer.status_code == 401
        assert answer.json() == {"error": "Unauthorized"}
        assert "x-ratelimit-remaining" in answer.headers
    assert api.get("/experiences-list").status_code == 200
    assert (
        api.export(
            emulator.experience_ids("started")[0],
            {"exportType": "orders"},
            headers={"Authorization": "Bearer " + emulator.api_token},
        ).status_code
        == 401
    )


# ----------------------------------------------------------------- experiences


def test_list_splits_pages_and_filters_by_status(emulator, api):
    first = api.get("/experiences-list", page=1, limit=2).json()
    assert (first["page"], first["limit"], first["total"], first["totalPages"]) == (1, 2, 6, 3)
    pages = [api.get("/experiences-list", page=page, limit=2).json()["experiencesList"] for page in (1, 2, 3)]
    seen = [item["id"] for page in pages for item in page]
    assert len(seen) == len(set(seen)) == 6
    assert api.get("/experiences-list", page=4, limit=2).json()["experiencesList"] == []
    statuses = {status: len(ids) for status, ids in ids_by_status(emulator).items()}
    assert statuses == {"pending": 1, "ended": 1, "paused": 1, "started": 3}
    started = api.get("/experiences-list", status="started").json()
    assert started["total"] == 3 and {item["status"] for item in started["experiencesList"]} == {"started"}


def test_list_query_is_validated_against_the_spec(api):
    answer = api.get("/experiences-list", limit="ten", status="running")
    assert answer.status_code == 400
    body = answer.json()
    assert set(body["properties"]) == {"limit", "status"}
    assert "running" in body["properties"]["status"]["errors"][0]


def test_experiences_match_the_published_response_schemas(emulator, api):
    listing = api.get("/experiences-list", limit=50).json()
    assert_published_shape(listing, "/experiences-list", "get")
    for item in listing["experiencesList"]:
        detail = api.get(f"/experiences/{item['id']}").json()
        assert_published_shape(detail, "/experiences/{experienceId}", "get")
        assert "history" not in detail["experience"] and "history" in item


def test_timestamps_are_milliseconds_and_null_when_not_applicable(emulator, api):
    items = {item["status"]: item for item in api.get("/experiences-list").json()["experiencesList"]}
    ended = items["ended"]
    assert dt.datetime.fromtimestamp(ended["endedAtTs"] / 1000, UTC) == dt.datetime(2024, 1, 15, 12, tzinfo=UTC)
    assert ended["pausedAtTs"] is None
    assert dt.datetime.fromtimestamp(items["paused"]["pausedAtTs"] / 1000, UTC).month == 2
    assert items["pending"]["startedAtTs"] is None and items["pending"]["endedAtTs"] is None
    assert items["started"]["endedAtTs"] is None and items["started"]["startedAtTs"] > 1_700_000_000_000
    names = " ".join(item["name"] for item in items.values())
    assert "," in names and '"' in names and not names.isascii()


def test_single_experience_404_and_400(emulator, api):
    experience_id = emulator.experience_ids("ended")[0]
    assert api.get(f"/experiences/{experience_id}").json()["experience"]["status"] == "ended"
    missing = api.get("/experiences/6f1c2d3e-4b5a-4c6d-8e7f-001122334455")
    assert missing.status_code == 404
    bad = api.get("/experiences/not-a-uuid")
    assert bad.status_code == 400 and bad.json()["properties"]["experienceId"]["errors"] == ["Invalid UUID"]


def test_status_progression_changes_list_and_exports(emulator, api):
    pending = emulator.experience_ids("pending")[0]
    refused = api.export(pending, {"exportType": "orders"})
    assert refused.status_code == 400 and "has not started" in refused.json()["errors"][0]

    emulator.set_status(pending, "started", dt.datetime(2024, 2, 26, tzinfo=UTC))
    assert api.get(f"/experiences/{pending}").json()["experience"]["status"] == "started"
    api.export_url(pending)
    emulator.set_status(pending, "paused", dt.datetime(2024, 2, 27, tzinfo=UTC))
    api.export_url(pending)
    emulator.set_status(pending, "ended", dt.datetime(2024, 2, 28, tzinfo=UTC))
    api.export_url(pending)

    ends = [call.end for call in emulator.exports_for(pending)]
    assert ends[0] > dt.datetime(2025, 1, 1, tzinfo=UTC)  # running: up to now
    assert ends[1:] == [dt.datetime(2024, 2, 27, tzinfo=UTC), dt.datetime(2024, 2, 28, tzinfo=UTC)]
    item = api.get(f"/experiences/{pending}").json()["experience"]
    assert [action["action"] for action in item["experienceActions"]] == ["start", "pause", "end"]
    assert api.get("/experiences-list", status="ended").json()["total"] == 2


def test_add_experiences_for_load_tests(emulator, api):
    new_ids = emulator.add_experiences(50)
    assert len(set(new_ids)) == 50
    listing = api.get("/experiences-list", limit=20).json()
    assert (listing["total"], listing["totalPages"]) == (56, 3)
    assert len(emulator.expected_records("intelligems_orders", {"experience_id": new_ids[-1]})) == 40


def test_experiences_stream_records(emulator):
    records = {record["id"]: record for record in emulator.expected_records("intelligems_experiences")}
    ended = records[emulator.experience_ids("ended")[0]]
    assert ended["ended_at"] == "2024-01-15T12:00:00+00:00"
    assert ended["paused_at"] is None and ended["status"] == "ended"
    assert "is_preview" in ended and "organization_id" in ended and "endedAtTs" not in ended


# --------------------------------------------------------------------- exports


def test_export_body_and_path_are_validated(emulator, api):
    answer = api.export(
        "not-a-uuid",
        {
            "exportType": "everything",
            "startTs": "2024-01-01",
            "filters": {"deviceType": "tablet", "countryCodes": ["US", 7]},
        },
    )
    assert answer.status_code == 400
    body = answer.json()
    assert body["errors"] == []
    assert body["properties"]["experienceId"]["errors"] == ["Invalid UUID"]
    assert "everything" in body["properties"]["exportType"]["errors"][0]
    assert "10-digit" in body["properties"]["startTs"]["errors"][0]
    filters = body["properties"]["filters"]["properties"]
    assert "tablet" in filters["deviceType"]["errors"][0]
    assert filters["countryCodes"]["items"][1]["errors"] == ["7 is not of type 'string'"]

    started = emulator.experience_ids("started")[0]
    missing = api.export(started, {})
    assert missing.json()["properties"]["exportType"]["errors"] == ["'exportType' is a required property"]
    inverted = api.export(
        started, {"exportType": "orders", "startTs": epoch("2024-02-01"), "endTs": epoch("2024-01-01")}
    )
    assert inverted.status_code == 400 and "startTs" in inverted.json()["properties"]
    assert api.export("6f1c2d3e-4b5a-4c6d-8e7f-001122334455", {"exportType": "orders"}).status_code == 404
    assert emulator.export_count == 0


def export_operation() -> dict:
    return load_spec("intelligems-exports.openapi.json")["paths"][PREFIX + EXPORT_PATH]["post"]


def formal_request_examples() -> list[dict]:
    """Every request-body example the spec publishes in OpenAPI's own fields (media type and schema)."""
    content = export_operation()["requestBody"]["content"]["application/json"]
    examples = [content["example"]] if "example" in content else []
    examples += [example["value"] for example in content.get("examples", {}).values() if "value" in example]
    examples += list(content["schema"].get("examples", []))
    return examples


def markdown_table(description: str, heading: str) -> list[list[str]]:
    """The data rows of the first table after `heading` in the operation's description, as cells."""
    lines = [line.strip() for line in description.split(heading, 1)[1].splitlines()]
    first = next(number for number, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[first + 2 :]:  # past the header row and the |---| rule
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


def literals(text: str) -> list:
    """The JSON literals the text quotes in backticks (`"mobile"`, `["US", "GB"]`)."""
    found = []
    for quoted in re.findall(r"`([^`]+)`", text):
        try:
            found.append(json.loads(quoted))
        except ValueError:
            continue
    return found


def documented_request_bodies() -> list[dict]:
    """Bodies made of what the operation's description spells out: each export type, and each filter
    with each literal value its table quotes (the spec has no formal examples for this endpoint)."""
    description = export_operation()["description"]
    export_types = [row[0].strip("`") for row in markdown_table(description, "### Export Types")]
    bodies = [{"exportType": export_type} for export_type in export_types]
    for field, kind, text in markdown_table(description, "### Filters"):
        for value in literals(text):
            if isinstance(value, list) == kind.endswith("[]"):
                bodies.append({"exportType": "orders", "filters": {field.strip("`"): value}})
    for field, _ in markdown_table(description, "#### `userBehavior` sub-fields"):
        bodies.append({"exportType": "orders", "filters": {"userBehavior": {field.strip("`"): True}}})
    return bodies


def test_every_request_example_the_vendor_publishes_is_accepted(emulator, api):
    experience_id = oldest_running(emulator)
    formal = formal_request_examples()
    documented = documented_request_bodies()
    # The spec has no formal example today; if one is added it is posted too.
    assert len(formal) == 0
    assert {body["exportType"] for body in documented} == {"orders", "order_line_items", "order_reconciliation"}
    assert {"deviceType": "mobile"} in [body.get("filters") for body in documented]
    assert {"countryCodes": ["US", "GB"]} in [body.get("filters") for body in documented]
    assert {"userBehavior": {"addedToCart": True}} in [body.get("filters") for body in documented]
    seconds = {"startTs": epoch("2024-01-10"), "endTs": epoch("2024-02-10")}  # "10-digit epoch ... in seconds"
    for body in [*formal, *documented, {**documented[0], **seconds}]:
        answer = api.export(experience_id, body)
        assert answer.status_code == 200, (body, answer.text)
        assert_published_shape(answer.json(), EXPORT_PATH, "post")


@pytest.mark.parametrize(
    "body,field",
    [
        ({"exportType": "orders", "startTs": 1704844800}, "startTs"),  # the schema types it as a string
        ({"exportType": "orders", "endTs": 1707523200}, "endTs"),
        ({"exportType": "orders", "endTs": None}, "endTs"),
        ({"exportType": "orders", "startTs": "1704844800000"}, "startTs"),  # milliseconds, not seconds
        ({"exportType": "orders", "startTs": "2024-01-10T00:00:00Z"}, "startTs"),
        ({"exportType": ["orders"]}, "exportType"),
        ({"startTs": "1704844800"}, "exportType"),
        ({"exportType": "orders", "filters": "mobile"}, "filters"),
    ],
)
def test_what_the_schema_refuses_is_refused(emulator, api, body, field):
    answer = api.export(oldest_running(emulator), body)
    assert answer.status_code == 400
    assert answer.json()["properties"][field]["errors"], answer.json()
    assert emulator.export_count == 0


def test_export_answer_follows_spec_and_file_matches_expected_records(emulator, api):
    experience_id = emulator.experience_ids("started")[-1]
    for export_type in ("orders", "order_line_items", "order_reconciliation"):
        answer = api.export(experience_id, {"exportType": export_type, "filters": {"deviceType": "mobile"}})
        assert_published_shape(answer.json(), EXPORT_PATH, "post")
        assert answer.json()["message"] == "Export ready" and answer.json()["expiresIn"] == 900
        match = S3_URL.match(answer.json()["url"])
        assert match and match["experience"] == experience_id and match["type"] == export_type
        file = requests.get(answer.json()["url"], timeout=10)
        assert file.status_code == 200 and int(file.headers["Content-Length"]) == len(file.content)
        assert b"\r\n" not in file.content
        expected = emulator.expected_records(f"intelligems_{export_type}", {"experience_id": experience_id})
        assert typed_records(file.content, export_type, experience_id) == expected
        assert 30 <= len(expected) <= 150
    assert emulator.export_count == 3
    assert emulator.exports[0].filters == {"deviceType": "mobile"}


def test_window_boundaries_are_start_inclusive_end_exclusive(emulator, api):
    experience_id = emulator.experience_ids("started")[-1]
    times = [
        record["created_at"]
        for record in emulator.expected_records("intelligems_orders", {"experience_id": experience_id})
    ]
    start, end = dt.datetime.fromisoformat(times[5]), dt.datetime.fromisoformat(times[15])
    url = api.export_url(experience_id, startTs=str(int(start.timestamp())), endTs=str(int(end.timestamp())))
    records = typed_records(requests.get(url, timeout=10).content, "orders", experience_id)
    assert [record["created_at"] for record in records] == times[5:15]
    assert records == emulator.expected_records("intelligems_orders", {"experience_id": experience_id}, start, end)


def test_ranges_default_to_and_are_clamped_to_the_lifetime(emulator, api):
    statuses = ids_by_status(emulator)
    ended, paused, running = statuses["ended"][0], statuses["paused"][0], oldest_running(emulator)
    api.export_url(ended, startTs=epoch("2023-06-01"), endTs=epoch("2024-06-01"))
    api.export_url(ended)
    api.export_url(paused)
    api.export_url(running, startTs=epoch("2024-02-01"))
    calls = emulator.exports
    lifetime = (dt.datetime(2024, 1, 3, 9, tzinfo=UTC), dt.datetime(2024, 1, 15, 12, tzinfo=UTC))
    assert (calls[0].start, calls[0].end) == lifetime == (calls[1].start, calls[1].end)
    assert calls[0].requested_start == dt.datetime(2023, 6, 1, tzinfo=UTC)
    assert calls[2].end == dt.datetime(2024, 2, 12, 18, 30, tzinfo=UTC)
    assert calls[3].start == dt.datetime(2024, 2, 1, tzinfo=UTC)
    assert abs(calls[3].end.timestamp() - time.time()) < 5
    assert len(emulator.exports_for(ended)) == 2


def test_awkward_content_of_the_default_data(emulator, api):
    experience_id = emulator.experience_ids("started")[0]
    orders = requests.get(api.export_url(experience_id), timeout=10).content
    assert orders.startswith(BOM) and b"\r" not in orders
    records = typed_records(orders, "orders", experience_id)
    notes = [record["note"] for record in records if record["note"]]
    assert max(len(note) for note in notes) >= 100_000
    assert any("\n" in note for note in notes)
    assert any(record["landing_page"] and "," in record["landing_page"] for record in records)
    assert any(record["discount"] is None for record in records) and any(record["tax"] is None for record in records)
    items = typed_records(
        requests.get(api.export_url(experience_id, "order_line_items"), timeout=10).content,
        "order_line_items",
        experience_id,
    )
    assert any(not record["product_title"].isascii() for record in items)
    assert any(isinstance(record["properties"], dict) for record in items)
    per_order = {record["order_id"]: record["items_count"] for record in records}
    assert sum(per_order.values()) == len(items)


def test_added_rows_wait_for_the_analytics_lag(emulator, api):
    experience_id = emulator.experience_ids("started")[0]
    now = dt.datetime.now(UTC)
    emulator.add_rows(
        "intelligems_orders",
        4,
        now - dt.timedelta(hours=3),
        now - dt.timedelta(minutes=20),
        {"experience_id": experience_id},
    )
    recent = {"startTs": str(int((now - dt.timedelta(hours=4)).timestamp()))}
    emulator.analytics_lag_seconds = 3600
    lagging = typed_records(
        requests.get(api.export_url(experience_id, **recent), timeout=10).content, "orders", experience_id
    )
    assert len(lagging) == 3  # rows at now-160, -120, -80 min; the one at -40 min is not analysed yet
    emulator.analytics_lag_seconds = 0
    caught_up = typed_records(
        requests.get(api.export_url(experience_id, **recent), timeout=10).content, "orders", experience_id
    )
    assert len(caught_up) == 4 and all(record["items_count"] == 1 for record in caught_up)
    assert caught_up == emulator.expected_records(
        "intelligems_orders", {"experience_id": experience_id}, now - dt.timedelta(hours=4)
    )


# -------------------------------------------------------------------- realities

ID_SHAPES = {
    "integer": r"\d+",
    "zero_padded": r"00\d+",
    "alphanumeric": r"[0-9A-Z]{10}",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
}
ID_PREFIXES = {"order": "ord_", "line_item": "li_", "order_number": "EU-", "visitor": "vis_", "sku": "SKU-"}


def id_shape(id_format: str, family: str) -> str:
    if id_format == "prefixed":
        return re.escape(ID_PREFIXES[family]) + ID_SHAPES["alphanumeric"]
    return ID_SHAPES[id_format]


def describe(reality: Reality) -> str:
    """A reality in the words of the module docstring's list (compared with spaces collapsed)."""
    retry_after = "with" if reality.retry_after else "without"
    columns = "; ".join(
        " ".join(
            [export_type]
            + [f"+{key}" for key in reality.extra_columns[export_type]]
            + [f"-{key}" for key in reality.missing_columns[export_type]]
        )
        for export_type in EXPORT_TABLES
    )
    return (
        f"seed {reality.seed}: ids {reality.id_format}, headers {reality.header_style}; 429 {retry_after} "
        f"Retry-After, reset = {reality.reset_means}, body {json.dumps(reality.too_many_requests)}; {columns}."
    )


def collapsed(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("seed", SUITE_SEEDS)
def test_each_suite_seed_s_reality_is_what_the_module_docstring_says(seed):
    reality = Reality.of_seed(seed)
    assert describe(reality) in collapsed(intelligems_module.__doc__), "\n" + textwrap.fill(describe(reality), 100)
    assert reality == IntelligemsEmulator(SandboxContext(), seed=seed).reality == Reality.of_seed(seed)


def test_each_suite_seed_is_another_combination_and_seed_7_is_not_the_old_shape():
    realities = {seed: Reality.of_seed(seed) for seed in SUITE_SEEDS}
    assert len({reality.id_format for reality in realities.values()}) == 4
    assert len({reality.header_style for reality in realities.values()}) == 4
    assert any(any(reality.missing_columns.values()) for reality in realities.values())
    assert any(not any(reality.missing_columns.values()) for reality in realities.values())
    default = realities[7]
    assert default.id_format != "integer"  # the old ids were plain integers
    for export_type, table in EXPORT_TABLES.items():
        old_order = [column.key for column in table.columns]
        assert [key for key in default.columns[export_type] if key in old_order] != old_order
        for reality in realities.values():
            assert reality.columns[export_type][: len(old_order)] != tuple(old_order)


@pytest.mark.parametrize("seed", SUITE_SEEDS)
def test_every_label_is_a_spelling_of_its_record_key(seed):
    reality = Reality.of_seed(seed)
    for export_type, table in EXPORT_TABLES.items():
        for messy in (False, True):
            for column in intelligems_module.file_columns(reality, table, messy=messy, new_column=True):
                assert header_key(column.label) == column.key, (column.label, column.key)
        keys = reality.columns[export_type]
        assert set(keys) == {c.key for c in table.columns} - set(reality.missing_columns[export_type]) | set(
            reality.extra_columns[export_type]
        )
        assert not set(reality.missing_columns[export_type]) - set(OPTIONAL_COLUMNS[export_type])
        assert set(reality.extra_columns[export_type]) <= set(EXTRA_COLUMNS[export_type])
    for style in intelligems_module.SINGLE_STYLES:
        assert header_key(intelligems_module.spelled("order_number", style)) == "order_number"
    assert intelligems_module.spelled("order_number", "sentence") == "Order number "


def test_two_seeds_write_different_headers_naming_the_same_columns():
    headers = {}
    for seed in (7, 11):
        running = started_emulator(seed)
        try:
            url = Client(running).export_url(oldest_running(running), "orders")
            headers[seed] = file_cells(requests.get(url, timeout=10).content)[0]
        finally:
            stop(running)
    assert headers[7] != headers[11]
    keys = {seed: [header_key(label) for label in labels] for seed, labels in headers.items()}
    assert keys[7] != keys[11]
    guessed = {column.key for column in EXPORT_TABLES["orders"].columns}
    for seed in (7, 11):
        reality = Reality.of_seed(seed)
        assert keys[seed] == list(reality.columns["orders"])
        assert set(keys[seed]) == guessed - set(reality.missing_columns["orders"]) | set(
            reality.extra_columns["orders"]
        )


def test_a_reality_without_extra_columns_writes_only_guessed_columns():
    emulator = IntelligemsEmulator(SandboxContext(), seed=11)
    assert any(emulator.reality.extra_columns.values())
    emulator.reality = emulator.reality.without_extra_columns()
    for stream in EXPORT_STREAMS:
        guessed = {column.key for column in EXPORT_TABLES[stream.removeprefix("intelligems_")].columns}
        records = emulator.expected_records(stream, {"experience_id": oldest_running(emulator)})
        assert records and all(set(record) - {"experience_id"} <= guessed for record in records)


@pytest.mark.parametrize("seed", SUITE_SEEDS)
def test_identifiers_follow_the_seed_s_format_and_children_name_their_parents(seed):
    emulator = IntelligemsEmulator(SandboxContext(), seed=seed)
    shape = {family: id_shape(emulator.reality.id_format, family) for family in ID_PREFIXES}
    for experience_id in emulator.experience_ids("started"):
        partition = {"experience_id": experience_id}
        orders = emulator.expected_records("intelligems_orders", partition)
        items = emulator.expected_records("intelligems_order_line_items", partition)
        reconciled = emulator.expected_records("intelligems_order_reconciliation", partition)
        order_ids = [order["order_id"] for order in orders]
        assert len(set(order_ids)) == len(order_ids) and all(re.fullmatch(shape["order"], i) for i in order_ids)
        line_ids = [item["line_item_id"] for item in items]
        assert len(set(line_ids)) == len(line_ids) and all(re.fullmatch(shape["line_item"], i) for i in line_ids)
        per_order = {order_id: 0 for order_id in order_ids}
        for item in items:
            per_order[item["order_id"]] += 1  # a KeyError is a line item whose parent is not in the orders
        assert per_order == {order["order_id"]: order["items_count"] for order in orders}
        assert [row["order_id"] for row in reconciled] == order_ids
        names = [row["order_name"] for row in orders]
        assert "order_name" not in reconciled[0] or names == [row["order_name"] for row in reconciled]
        assert all(re.fullmatch("#" + shape["order_number"], name) for name in names)
        assert all(re.fullmatch(shape["visitor"], order["visitor_id"]) for order in orders)
        skus = [item["sku"] for item in items if item.get("sku")]
        assert all(re.fullmatch(shape["sku"], sku) for sku in skus)
        assert all(isinstance(value, str) for row in orders + items for key, value in row.items() if "id" in key)


@pytest.mark.parametrize("seed", SUITE_SEEDS)
def test_records_have_the_seed_s_extra_columns_as_text_and_lack_its_missing_ones(seed):
    emulator = IntelligemsEmulator(SandboxContext(), seed=seed)
    reality = emulator.reality
    for stream in EXPORT_STREAMS:
        export_type = stream.removeprefix("intelligems_")
        records = emulator.expected_records(stream, {"experience_id": oldest_running(emulator)})
        assert records
        for record in records:
            assert set(record) == set(reality.columns[export_type]) | {"experience_id"}
        for key in reality.extra_columns[export_type]:
            values = {record[key] for record in records}
            assert values <= set(EXTRA_COLUMNS[export_type][key]) - {""} | {None} and len(values) > 1


def test_raw_rows_are_the_cells_of_the_downloaded_file_byte_for_byte(emulator, api):
    experience_id = oldest_running(emulator)
    for stream in EXPORT_STREAMS:
        body = requests.get(api.export_url(experience_id, stream.removeprefix("intelligems_")), timeout=10).content
        labels, rows = file_cells(body)
        raw = emulator.raw_rows(stream, {"experience_id": experience_id})
        assert all(row.pop("experience_id") == experience_id for row in raw)
        assert rows == raw
        keys = [header_key(label) for label in labels]
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(labels)
        writer.writerows([row[key] for key in keys] for row in raw)
        assert body == BOM + text.getvalue().encode("utf-8")


def test_raw_rows_and_expected_records_are_the_same_rows(emulator):
    experience_id = oldest_running(emulator)
    start, end = dt.datetime(2024, 1, 20, tzinfo=UTC), dt.datetime(2024, 2, 3, tzinfo=UTC)
    for stream in EXPORT_STREAMS:
        records = emulator.expected_records(stream, {"experience_id": experience_id}, start, end)
        raw = emulator.raw_rows(stream, {"experience_id": experience_id}, start, end)
        assert len(raw) == len(records) > 5
        for cells, record in zip(raw, records):
            assert set(cells) == set(record)
            assert all((cells[key] == "") == (record[key] is None) for key in record)
    everything = emulator.raw_rows("intelligems_orders")
    assert {row["experience_id"] for row in everything} == {
        exp.id for exp in emulator.experiences() if exp.started_at is not None
    }


# ------------------------------------------------------------------ messy cells

US_DATE_TIME = re.compile(r"\d\d/\d\d/\d{4} \d\d:\d\d [AP]M")


def messy_rows(rows: list[dict[str, str]], key: str, is_messy) -> list[int]:
    return [number for number, row in enumerate(rows, start=1) if is_messy(row[key])]


def test_messy_files_break_every_kind_of_guess_across_the_file(emulator, api):
    experience_id = oldest_running(emulator)
    emulator.messy_cells = True
    kinds_seen, first_messy = set(), []
    for export_type, mess in MESSES.items():
        stream = f"intelligems_{export_type}"
        labels, rows = file_cells(requests.get(api.export_url(experience_id, export_type), timeout=10).content)
        assert rows == [
            {k: v for k, v in row.items() if k != "experience_id"}
            for row in emulator.raw_rows(stream, {"experience_id": experience_id})
        ]
        keys = [header_key(label) for label in labels]
        guessed, renamed = mess.renamed
        assert renamed in keys and guessed not in keys  # the file calls a guessed column another name
        checks = {
            "number": (mess.number, lambda cell: cell == "N/A"),
            "boolean": (mess.boolean, lambda cell: cell in ("yes", "no")),
            "json": (mess.json, lambda cell: cell != "" and not_json(cell)),
            "datetime": (mess.datetime, lambda cell: bool(US_DATE_TIME.fullmatch(cell))),
        }
        for kind, (key, is_messy) in checks.items():
            if key is None:
                continue
            numbers = messy_rows(rows, key, is_messy)
            # Spread over the whole file, not only its first rows.
            assert len(numbers) >= len(rows) // 5 and numbers[-1] > len(rows) * 3 // 4, (export_type, kind, numbers)
            first_messy.append(numbers[0])
            assert len(numbers) < len(rows)  # the other rows are as guessed
            kinds_seen.add(kind)
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["created_at"]) for row in rows)
    assert kinds_seen == {"number", "boolean", "json", "datetime"}
    assert max(first_messy) > 1  # some messes come after rows that fit the guesses
    with pytest.raises(NotImplementedError):
        emulator.expected_records("intelligems_orders", {"experience_id": experience_id})


def test_messy_mode_is_decided_when_an_export_is_created(api, emulator):
    experience_id = oldest_running(emulator)
    tidy_url = api.export_url(experience_id, "order_reconciliation")
    emulator.messy_cells = True
    messy_url = api.export_url(experience_id, "order_reconciliation")
    tidy, messy = (file_cells(requests.get(url, timeout=10).content)[1] for url in (tidy_url, messy_url))
    assert not any(row["intelligems_total"] == "N/A" for row in tidy)
    assert any(row["intelligems_total"] == "N/A" for row in messy)
    emulator.messy_cells = False
    assert file_cells(requests.get(messy_url, timeout=10).content)[1] == messy
    assert IntelligemsEmulator(SandboxContext(), seed=7, messy_cells=True).messy_cells


# ---------------------------------------------------------------------- S3 host


def test_file_url_checks_signature_expiry_and_auth_mechanism(emulator, api):
    experience_id = emulator.experience_ids("started")[0]
    url = api.export_url(experience_id)
    assert requests.get(url, timeout=10).status_code == 200

    tampered = re.sub(r"X-Amz-Signature=[0-9a-f]{4}", "X-Amz-Signature=0000", url)
    assert "<Code>SignatureDoesNotMatch</Code>" in requests.get(tampered, timeout=10).text
    longer = url.replace("X-Amz-Expires=900", "X-Amz-Expires=9000")
    assert requests.get(longer, timeout=10).status_code == 403
    other_key = url.replace("/orders-1.csv", "/orders-2.csv")
    assert "SignatureDoesNotMatch" in requests.get(other_key, timeout=10).text
    unsigned = requests.get(url.split("?")[0], timeout=10)
    assert unsigned.status_code == 403 and "<Code>AccessDenied</Code>" in unsigned.text

    for header in ({"Authorization": "Bearer leaked"}, {"intelligems-access-token": emulator.api_token}):
        refused = requests.get(url, headers=header, timeout=10)
        assert refused.status_code == 400
        assert "<Code>InvalidArgument</Code>" in refused.text and "Only one auth mechanism allowed" in refused.text
        assert emulator.api_token not in refused.text and "leaked" not in refused.text

    emulator.ctx.faults.arm("url_expired")
    expired = requests.get(api.export_url(experience_id), timeout=10)
    assert expired.status_code == 403
    assert "<Code>AccessDenied</Code><Message>Request has expired</Message>" in expired.text


def test_short_ttl_expires_and_ranges_and_head(emulator, api):
    experience_id = emulator.experience_ids("started")[0]
    emulator.url_ttl_seconds = 3  # room for the reads below on a loaded 2-core CI machine
    answer = api.export(experience_id, {"exportType": "order_reconciliation"}).json()
    query = parse_qs(urlsplit(answer["url"]).query)
    assert answer["expiresIn"] == 3 and query["X-Amz-Expires"] == ["3"]
    signed_at = dt.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    whole = requests.get(answer["url"], timeout=10).content
    head = requests.head(answer["url"], timeout=10)
    assert int(head.headers["Content-Length"]) == len(whole)
    part = requests.get(answer["url"], headers={"Range": "bytes=3-12"}, timeout=10)
    assert part.status_code == 206 and part.content == whole[3:13]
    assert part.headers["Content-Range"] == f"bytes 3-12/{len(whole)}"
    time.sleep(max(0.0, signed_at + 3 - time.time()) + 0.05)
    assert "Request has expired" in requests.get(answer["url"], timeout=10).text


# ------------------------------------------------------------------ rate limits


RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
MISSING_ID = "6f1c2d3e-4b5a-4c6d-8e7f-001122334455"


def assert_rate_headers(answer: requests.Response, limit: int) -> None:
    """The documented headers (NOTES.md), names as documented, the reset a 13-digit epoch-ms time near now."""
    assert set(RATE_HEADERS) <= set(answer.raw.headers.keys()), answer.raw.headers
    assert answer.headers["x-ratelimit-limit"] == str(limit)
    assert 0 <= int(answer.headers["x-ratelimit-remaining"]) <= limit
    reset = answer.headers["x-ratelimit-reset"]
    assert re.fullmatch(r"\d{13}", reset), reset
    assert abs(int(reset) / 1000 - time.time()) < 60


def test_every_api_answer_carries_the_three_rate_limit_headers(emulator, api):
    running = emulator.experience_ids("started")[0]
    answers = {
        "list": (api.get("/experiences-list"), 50),
        "detail": (api.get(f"/experiences/{running}"), 50),
        "bad query": (api.get("/experiences-list", limit="ten"), 50),
        "no such experience": (api.get(f"/experiences/{MISSING_ID}"), 50),
        "no such path": (requests.get(f"{api.base}{PREFIX}/experiences", headers=api.headers, timeout=10), 50),
        "no token": (requests.get(f"{api.base}{PREFIX}/experiences-list", timeout=10), 50),
        "export": (api.export(running, {"exportType": "orders"}), 20),
        "bad export": (api.export(running, {"exportType": "nope"}), 20),
        "export of no such experience": (api.export(MISSING_ID, {"exportType": "orders"}), 20),
    }
    emulator.ctx.faults.arm("rate_limit")
    answers["429"] = (api.export(running, {"exportType": "orders"}), 20)
    emulator.ctx.faults.arm("server_error")
    answers["500"] = (api.get("/experiences-list"), 50)
    statuses = {name: answer.status_code for name, (answer, _) in answers.items()}
    assert statuses == {
        "list": 200,
        "detail": 200,
        "bad query": 400,
        "no such experience": 404,
        "no such path": 404,
        "no token": 401,
        "export": 200,
        "bad export": 400,
        "export of no such experience": 404,
        "429": 429,
        "500": 500,
    }
    for name, (answer, limit) in answers.items():
        try:
            assert_rate_headers(answer, limit)
        except AssertionError as problem:
            raise AssertionError(f"{name}: {problem}") from None


def test_exports_and_the_other_calls_draw_on_separate_buckets_of_the_documented_size(emulator, api):
    running = emulator.experience_ids("started")[0]
    emulator.export_rate_per_second = emulator.api_rate_per_second = 0.01  # no refill while the test runs
    exports = [api.export(running, {"exportType": "nope"}) for _ in range(21)]
    lists = [api.get("/experiences-list", limit=1) for _ in range(51)]
    assert [a.headers["x-ratelimit-remaining"] for a in exports[:3]] == ["19", "18", "17"]
    assert [a.headers["x-ratelimit-remaining"] for a in lists[:3]] == ["49", "48", "47"]
    assert [a.status_code for a in exports] == [400] * 20 + [429]  # export burst 20
    assert [a.status_code for a in lists] == [200] * 50 + [429]  # list/detail burst 50


def test_the_spec_promises_no_429_answer_so_retry_after_is_a_per_seed_guess():
    for path, operations in load_spec("intelligems-exports.openapi.json")["paths"].items():
        for method, operation in operations.items():
            assert set(operation["responses"]) == {"200"}, (path, method)
            assert "retry-after" not in {name.lower() for name in operation["responses"]["200"].get("headers", {})}


@pytest.mark.parametrize("seed", SUITE_SEEDS)
def test_a_429_differs_per_seed_only_where_the_docs_are_silent(seed):
    running = started_emulator(seed)
    try:
        api, reality = Client(running), running.reality
        running.export_rate_per_second = 0.5  # full again 40 s after empty; a token every 2 s
        experience_id = running.experience_ids("started")[0]
        limited = [api.export(experience_id, {"exportType": "nope"}) for _ in range(21)][-1]
        assert limited.status_code == 429
        assert_rate_headers(limited, 20)
        assert limited.headers["x-ratelimit-remaining"] == "0"
        assert limited.json() == reality.too_many_requests
        reset_in = int(limited.headers["x-ratelimit-reset"]) / 1000 - time.time()
        if reality.reset_means == "bucket_full":
            assert 30 < reset_in <= 40.1
        else:
            assert 0 < reset_in <= 2.1
        if reality.retry_after:
            assert limited.headers["Retry-After"] in ("1", "2")
        else:
            assert "Retry-After" not in limited.headers
    finally:
        stop(running)


def test_the_suite_seeds_cover_every_reading_of_a_429():
    realities = [Reality.of_seed(seed) for seed in SUITE_SEEDS]
    assert {reality.retry_after for reality in realities} == {True, False}
    assert {reality.reset_means for reality in realities} == {"bucket_full", "next_token"}
    assert len({json.dumps(reality.too_many_requests) for reality in realities}) == 2


def test_export_bucket_bursts_twenty_then_429_with_headers(emulator, api):
    emulator.export_rate_per_second = 0.1
    experience_id = emulator.experience_ids("started")[0]
    answers = [api.export(experience_id, {"exportType": "nope"}) for _ in range(21)]
    assert [a.status_code for a in answers[:20]] == [400] * 20
    limited = answers[20]
    assert limited.status_code == 429 and limited.json() == emulator.reality.too_many_requests
    assert limited.headers["x-ratelimit-limit"] == "20" and limited.headers["x-ratelimit-remaining"] == "0"
    reset_ms = int(limited.headers["x-ratelimit-reset"])
    assert time.time() * 1000 < reset_ms < (time.time() + 300) * 1000
    assert answers[0].headers["x-ratelimit-remaining"] == "19"
    assert api.get("/experiences-list").status_code == 200  # the other calls have their own bucket


def test_rate_limit_and_server_error_faults(emulator, api):
    emulator.ctx.faults.arm("rate_limit")
    limited = api.get("/experiences-list")
    assert limited.status_code == 429 and "x-ratelimit-reset" in limited.headers
    emulator.ctx.faults.arm("server_error", times=3)
    assert [api.get("/experiences-list").status_code for _ in range(4)] == [500, 502, 503, 200]


# ----------------------------------------------------------------------- faults


def test_null_url_and_export_latency(emulator, api):
    experience_id = emulator.experience_ids("started")[0]
    emulator.ctx.faults.arm("null_url")
    emulator.ctx.faults.arm("export_latency", times=-1, value=0.3)
    began = time.monotonic()
    answer = api.export(experience_id, {"exportType": "orders"})
    assert time.monotonic() - began >= 0.3
    assert answer.json()["url"] is None and answer.json()["expiresIn"] == 0
    assert answer.json()["message"] == "Export timed out, please retry"
    assert_published_shape(answer.json(), EXPORT_PATH, "post")
    assert emulator.export_count == 1 and emulator.exports[0].url is None
    assert api.export(experience_id, {"exportType": "orders"}).json()["url"]


@pytest.mark.parametrize("fault", ["download_reset", "download_short"])
def test_transport_faults_break_one_download(emulator, api, fault):
    url = api.export_url(emulator.experience_ids("started")[0])
    emulator.ctx.faults.arm(fault)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url, timeout=10)
    assert len(requests.get(url, timeout=10).content) > 100_000


def test_content_faults_are_fixed_in_the_file(emulator, api):
    experience_id = emulator.experience_ids("started")[0]
    faults = emulator.ctx.faults

    def faulty(name: str) -> bytes:
        faults.arm(name)
        url = api.export_url(experience_id)
        body = requests.get(url, timeout=10)
        assert int(body.headers["Content-Length"]) == len(body.content)
        assert requests.get(url, timeout=10).content == body.content  # the same object on every download
        return body.content

    assert faulty("empty_file") == b""
    labels, rows = file_cells(faulty("header_only"))
    assert [header_key(label) for label in labels] == list(emulator.reality.columns["orders"]) and rows == []

    rows = list(csv.reader(io.StringIO(faulty("malformed_row").decode("utf-8-sig"), newline="")))
    assert len(rows[1]) == len(rows[0]) + 1 and all(len(row) == len(rows[0]) for row in rows[2:])

    with pytest.raises(UnicodeDecodeError):
        faulty("bad_utf8").decode("utf-8")

    labels, rows = file_cells(faulty("new_column"))
    assert "utm_campaign" in [header_key(label) for label in labels] and rows
    assert all(row["utm_campaign"] == "spring_sale, v2" for row in rows)

    cut = faulty("download_cut_quote").decode("utf-8-sig")
    with pytest.raises(csv.Error):
        list(csv.reader(io.StringIO(cut, newline=""), strict=True))

    clean = requests.get(api.export_url(experience_id), timeout=10).content
    assert len(typed_records(clean, "orders", experience_id)) == 40


# --------------------------------------------------------------- experiment results

RESOURCE_PATH = "/analytics/resource/{experienceId}"
TIMESERIES_PATH = "/analytics/experience/{experienceId}/timeseries"


@cache
def analytics_response_validator(path: str) -> jsonschema.Draft202012Validator:
    spec = load_spec("intelligems-analytics.openapi.json")
    schema = spec["paths"][PREFIX + path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": spec["components"]})


def post_results(api: Client, path: str, experience_id: str, body: object, **kwargs) -> requests.Response:
    url = api.base + PREFIX + path.format(experienceId=experience_id)
    return requests.post(url, json=body, headers=kwargs.get("headers", api.headers), timeout=10)


@pytest.mark.parametrize(
    "body",
    [
        {"view": "overview"},
        {},
        {"view": "overview", "startTs": "1706745600", "endTs": "1709251200", "testResult": False},
    ],
)
def test_overview_answers_follow_the_published_schema(emulator, api, body):
    for experience_id in ids_by_status(emulator)["started"] + ids_by_status(emulator)["ended"]:
        answer = post_results(api, RESOURCE_PATH, experience_id, body)
        assert answer.status_code == 200, answer.text
        analytics_response_validator(RESOURCE_PATH).validate(answer.json())
        assert_rate_headers(answer, 50)
        rows = answer.json()["metrics"]
        assert {row["variation_id"] for row in rows} == {v.id for v in emulator.experience(experience_id).variations}


@pytest.mark.parametrize("granularity", ["hour", "day", "week", "month"])
@pytest.mark.parametrize("mode", ["cumulative", "noncumulative"])
def test_timeseries_answers_follow_the_published_schema(emulator, api, granularity, mode):
    target = ids_by_status(emulator)["ended"][0]
    body = {"granularity": granularity, "mode": mode, "metrics": ["n_orders", "aov", "gross_profit_per_visitor"]}
    answer = post_results(api, TIMESERIES_PATH, target, body)
    assert answer.status_code == 200, answer.text
    analytics_response_validator(TIMESERIES_PATH).validate(answer.json())
    segments = answer.json()["segments"]
    assert set(segments) == {v.name for v in emulator.experience(target).variations}
    points = next(iter(segments.values()))["data"]
    assert points and all(set(point) == {"dt", *body["metrics"]} for point in points)
    shape = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$" if granularity in ("hour", "day") else r"^\d{4}-\d{2}-\d{2}$"
    assert all(re.match(shape, point["dt"]) for point in points)
    if mode == "cumulative":
        orders = [point["n_orders"] for point in points]
        assert orders == sorted(orders)


def test_overview_totals_are_the_sum_of_the_noncumulative_days(emulator, api):
    target = ids_by_status(emulator)["ended"][0]
    days = post_results(api, TIMESERIES_PATH, target, {"mode": "noncumulative", "metrics": ["n_orders"]}).json()
    overview = post_results(api, RESOURCE_PATH, target, {"view": "overview"}).json()
    names = {v.id: v.name for v in emulator.experience(target).variations}
    for row in overview["metrics"]:
        count = row["n_orders"]["value"] if isinstance(row["n_orders"], dict) else row["n_orders"]
        assert count == sum(p["n_orders"] for p in days["segments"][names[row["variation_id"]]]["data"])
    exported = emulator.expected_records("intelligems_orders", partition={"experience_id": target})
    assert sum(p["n_orders"] for s in days["segments"].values() for p in s["data"]) == len(exported)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (RESOURCE_PATH, {"view": "summary"}, "view"),
        (RESOURCE_PATH, {"view": "overview", "audience": "device_type"}, "audience"),
        (RESOURCE_PATH, {"view": "audience"}, "audience"),
        (RESOURCE_PATH, {"startTs": "1706745600000"}, "startTs"),
        (TIMESERIES_PATH, {"mode": "daily"}, "mode"),
        (TIMESERIES_PATH, {"metrics": ["revenue_per_visitor"]}, "metrics"),
        (TIMESERIES_PATH, {"startTs": 1706745600}, "startTs"),
    ],
)
def test_results_bodies_the_schema_refuses_are_refused(emulator, api, path, body, field):
    answer = post_results(api, path, oldest_running(emulator), body)
    assert answer.status_code == 400, answer.text
    assert field in answer.json()["properties"]
    assert emulator.results_calls == []


def test_results_need_the_token_and_a_started_experience(emulator, api):
    target = oldest_running(emulator)
    for path in (RESOURCE_PATH, TIMESERIES_PATH):
        refused = post_results(api, path, target, {}, headers={"intelligems-access-token": "wrong"})
        assert refused.status_code == 401 and refused.json() == {"error": "Unauthorized"}
        assert post_results(api, path, ids_by_status(emulator)["pending"][0], {}).status_code == 400
        assert post_results(api, path, "00000000-0000-4000-8000-000000000000", {}).status_code == 404


def test_results_draw_on_the_list_bucket_not_the_export_bucket(emulator, api):
    emulator.api_burst = 3
    target = oldest_running(emulator)
    answers = [post_results(api, TIMESERIES_PATH, target, {"metrics": ["n_orders"]}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert api.export_url(target)  # the export bucket is untouched


def test_the_suite_seeds_cover_every_reading_of_the_results_spec():
    realities = [intelligems_module.ResultsReality.of_seed(seed) for seed in SUITE_SEEDS]
    for name in ("counts_as_objects", "cogs_configured", "cogs_fields", "absent_when_unknown"):
        assert {getattr(reality, name) for reality in realities} == {True, False}, name
    assert {reality.bucket_offset_hours for reality in realities} == {0, -5, 9}
    assert {"variations" in reality.overview_omits for reality in realities} == {True, False}

"""The Next Commerce emulator over real HTTP: auth, versions, validation, lifecycle, files, limits, faults,
and the per-seed realities (id formats, column order, extra and missing columns, header spelling, row-cap
behaviour) and messy cells. Every test runs on the seed conftest.py gives it, so none assumes one shape."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import re
import threading
import time
from urllib.parse import parse_qs, urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import pytest
import requests
import urllib3

from commerce_sandbox.core import SandboxContext
from commerce_sandbox.nextcommerce import TABLES, NextCommerceEmulator, Reality
from tests.harness import not_json

UTC = dt.timezone.utc
CHICAGO = ZoneInfo("America/Chicago")
VERSION = {"X-29next-API-Version": "2024-04-01"}
FILE_URL = re.compile(
    r"^http://127\.0\.0\.1:\d+/media/sandbox/export_csv/(?P<type>[a-z_]+)-(?P<id>\d+)-\d{14}\.csv"
    r"\?expires=\d+&signature=[0-9a-f]{64}$"
)
WHOLE_PERIOD = ("2024-01-01T00:00:00Z", "2024-02-29T23:59:59Z")


def start(emulator: NextCommerceEmulator) -> NextCommerceEmulator:
    for host in emulator.hosts:
        host.start()
    return emulator


def stop(emulator: NextCommerceEmulator) -> None:
    for host in emulator.hosts:
        # Host.stop() waits out serve_forever's 0.5 s poll; nothing needs that to finish before the next test.
        threading.Thread(target=host.stop, daemon=True).start()


@pytest.fixture
def ctx() -> SandboxContext:
    return SandboxContext(export_latency_seconds=0.05)


@pytest.fixture
def emulator(ctx, sandbox_seed):
    running = start(NextCommerceEmulator(ctx, seed=sandbox_seed))
    running.rate_per_second = 1000  # tests that are not about the rate limit must not trip over it
    yield running
    stop(running)


class Client:
    """A test's view of the API: base URL, credentials, and the create -> poll -> download steps."""

    def __init__(self, emulator: NextCommerceEmulator) -> None:
        config = emulator.tap_config()
        self.base = config["nextcommerce_api_url"]
        self.headers = {"Authorization": f"Bearer {config['nextcommerce_api_token']}", **VERSION}

    def get(self, path: str, headers: dict | None = None, **params) -> requests.Response:
        url = path if path.startswith("http") else self.base + path
        return requests.get(url, params=params, headers=self.headers if headers is None else headers, timeout=10)

    def create(
        self, export_type: str = "order_list", date_from: str = WHOLE_PERIOD[0], date_to: str = WHOLE_PERIOD[1]
    ) -> dict:
        response = requests.post(
            f"{self.base}/exports/",
            json={"type": export_type, "date_from": date_from, "date_to": date_to},
            headers=self.headers,
            timeout=10,
        )
        assert response.status_code == 201, response.text
        return response.json()

    def wait_available(self, export: dict, timeout: float = 3.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.get(f"/exports/{export['id']}/").json()
            if current["status"] == "available":
                return current
            time.sleep(0.02)
        raise AssertionError(f"export {export['id']} never became available")

    def file_url(self, export: dict) -> str:
        response = self.get(f"/exports/{export['id']}/download/")
        assert response.status_code == 200, response.text
        return response.json()["url"]

    def ready_file_url(
        self, export_type: str = "order_list", date_from: str = WHOLE_PERIOD[0], date_to: str = WHOLE_PERIOD[1]
    ) -> str:
        export = self.create(export_type, date_from, date_to)
        self.wait_available(export)
        return self.file_url(export)


@pytest.fixture
def client(emulator) -> Client:
    return Client(emulator)


# ---------------------------------------------------------------- file parsing (independent of the emulator)


def cast(cell: str, kind: str):
    """A CSV cell as the tap must emit it, written here independently of the emulator's code."""
    if cell == "":
        return None
    if kind == "integer":
        return int(cell)
    if kind == "number":
        return float(cell)
    if kind == "boolean":
        assert cell in ("True", "False"), cell
        return cell == "True"
    if kind == "json":
        return json.loads(cell)
    if kind == "datetime":
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", cell), f"not a naive store timestamp: {cell!r}"
        return dt.datetime.fromisoformat(cell).replace(tzinfo=CHICAGO).astimezone(UTC).isoformat()
    return cell


def snake(label: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", label.strip()).strip("_").lower()


def parse_csv(body: bytes, emulator: NextCommerceEmulator, export_type: str) -> tuple[list[str], list[dict]]:
    kinds = {column["label"]: column["kind"] for column in emulator.columns(export_type)}
    rows = list(csv.reader(io.StringIO(body.decode("utf-8"), newline=""), strict=True))
    header = rows[0]
    records = [
        {snake(label): cast(cell, kinds.get(label, "string")) for label, cell in zip(header, row)} for row in rows[1:]
    ]
    return header, records


def download(url: str) -> requests.Response:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert int(response.headers["Content-Length"]) == len(response.content)
    return response


# ------------------------------------------------------------------------------------ API surface


def test_export_types_lists_the_13_documented_types(client):
    response = client.get("/exports/types/")
    assert response.status_code == 200
    types = response.json()["types"]
    assert [t["code"] for t in types] == list(TABLES)
    assert len(types) == 13
    assert {"code": "order_line_items", "name": "Order Line Items"} in types


def test_missing_or_wrong_credentials_answer_401_in_drf_words(client):
    no_token = client.get("/exports/types/", headers=VERSION)
    wrong = client.get("/exports/types/", headers={**VERSION, "Authorization": "Bearer not-the-token"})
    basic = client.get("/exports/types/", headers={**VERSION, "Authorization": "Basic dXNlcjpwdw=="})
    assert (no_token.status_code, wrong.status_code, basic.status_code) == (401, 401, 401)
    assert no_token.json() == {"detail": "Authentication credentials were not provided."}
    assert wrong.json() == {"detail": "Invalid token."}
    assert no_token.headers["WWW-Authenticate"].startswith("Bearer")


def test_api_version_header_is_required_and_must_be_2024_04_01(client):
    missing = client.get("/exports/types/", headers={"Authorization": client.headers["Authorization"]})
    other = client.get("/exports/types/", headers={**client.headers, "X-29next-API-Version": "2023-02-10"})
    assert missing.status_code == 400 and "X-29next-API-Version" in missing.json()["detail"]
    assert other.status_code == 400 and "2024-04-01" in other.json()["detail"]
    lower = client.get("/exports/types/", headers={**client.headers, "X-29Next-Api-Version": "2024-04-01"})
    assert lower.status_code == 200  # header names are case-insensitive


def test_create_body_is_validated_against_the_published_schema(client, emulator):
    def post(body: object) -> requests.Response:
        return requests.post(f"{client.base}/exports/", json=body, headers=client.headers, timeout=10)

    missing = post({"type": "order_list"})
    assert missing.status_code == 400
    assert missing.json() == {"date_from": ["This field is required."], "date_to": ["This field is required."]}
    bad_type = post({"type": "orders", "date_from": WHOLE_PERIOD[0], "date_to": WHOLE_PERIOD[1]})
    assert bad_type.status_code == 400 and "'orders' is not one of" in bad_type.json()["type"][0]
    bad_date = post({"type": "order_list", "date_from": "last tuesday", "date_to": WHOLE_PERIOD[1]})
    assert bad_date.status_code == 400 and "Datetime has wrong format" in bad_date.json()["date_from"][0]
    reversed_range = post({"type": "order_list", "date_from": WHOLE_PERIOD[1], "date_to": WHOLE_PERIOD[0]})
    assert reversed_range.status_code == 400 and "non_field_errors" in reversed_range.json()
    not_object = post(["order_list"])
    assert not_object.json() == {"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]}
    broken_json = requests.post(
        f"{client.base}/exports/",
        data=b'{"type": ',
        timeout=10,
        headers={**client.headers, "Content-Type": "application/json"},
    )
    assert broken_json.status_code == 400 and broken_json.json()["detail"].startswith("JSON parse error")
    assert emulator.exports_created == 0

    form = requests.post(
        f"{client.base}/exports/",
        data={"type": "customer_list", "date_from": WHOLE_PERIOD[0], "date_to": WHOLE_PERIOD[1]},
        headers=client.headers,
    )
    assert form.status_code == 201 and form.json()["type"] == "customer_list"
    assert emulator.exports_created == 1


def test_the_guides_own_create_request_is_accepted(client):
    """The "API Exports" guide (../shared/seeds/001_*) creates an export with exactly this body."""
    guide_example = {"type": "order_list", "date_from": "2025-01-01T00:00:00Z", "date_to": "2025-03-31T23:59:59Z"}
    answer = requests.post(f"{client.base}/exports/", json=guide_example, headers=client.headers, timeout=10)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert created["status"] == "pending" and created["type"] == "order_list"
    assert created["date_from"] == "2025-01-01T00:00:00Z" and created["date_to"] == "2025-03-31T23:59:59Z"


def test_export_object_goes_from_pending_to_available_after_the_latency(client, emulator, ctx):
    ctx.faults.arm("export_latency", times=-1, value=0.3)
    created = client.create("order_list", "2024-01-01T00:00:00Z", "2024-01-31T23:59:59Z")
    assert set(created) == {"id", "created_at", "type", "status", "date_from", "date_to", "url"}
    assert isinstance(created["id"], int) and created["status"] == "pending"
    assert created["date_from"] == "2024-01-01T00:00:00Z" and created["date_to"] == "2024-01-31T23:59:59Z"
    assert created["url"] == f"{client.base}/exports/{created['id']}/"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", created["created_at"])

    early = client.get(f"/exports/{created['id']}/download/")
    assert early.status_code == 400 and "not available yet" in early.json()["detail"]
    assert client.get(created["url"]).json()["status"] == "pending"
    time.sleep(0.35)
    assert client.get(created["url"]).json() == {**created, "status": "available"}
    assert client.get("/exports/999/").status_code == 404


def test_export_stuck_stays_pending_and_there_is_no_failed_status(client, ctx):
    ctx.faults.arm("export_stuck")
    stuck = client.create()
    fine = client.create()
    time.sleep(0.15)
    assert client.get(f"/exports/{stuck['id']}/").json()["status"] == "pending"
    assert client.get(f"/exports/{fine['id']}/").json()["status"] == "available"
    assert client.get(f"/exports/{stuck['id']}/download/").status_code == 400


# ------------------------------------------------------------------------------------ listing


def test_list_is_newest_first_with_cursor_pages_and_filters(client, emulator):
    emulator.page_size = 4
    ids = [client.create("order_list" if n % 2 else "customer_list")["id"] for n in range(10)]
    first = client.get("/exports/").json()
    assert [e["id"] for e in first["results"]] == ids[::-1][:4] and first["previous"] is None
    cursor = parse_qs(urlsplit(first["next"]).query)["cursor"][0]
    assert base64.b64decode(cursor).decode() == f"p={ids[-4]}"

    second = client.get(first["next"]).json()
    assert [e["id"] for e in second["results"]] == ids[::-1][4:8]
    back = client.get(second["previous"]).json()
    assert [e["id"] for e in back["results"]] == ids[::-1][:4] and back["previous"] is None
    third = client.get(second["next"]).json()
    assert [e["id"] for e in third["results"]] == ids[::-1][8:] and third["next"] is None

    orders = client.get("/exports/", type="order_list").json()
    assert {e["type"] for e in orders["results"]} == {"order_list"} and "type=order_list" in orders["next"]
    today = dt.datetime.now(CHICAGO).date()
    assert len(client.get("/exports/", date_created_from=today.isoformat()).json()["results"]) == 4
    assert client.get("/exports/", date_created_to=(today - dt.timedelta(days=1)).isoformat()).json()["results"] == []

    assert client.get("/exports/", cursor="not*base64").json() == {"detail": "Invalid cursor"}
    assert client.get("/exports/", type="orders").status_code == 400
    assert client.get("/exports/", date_created_from="2024/01/01").json() == {
        "date_created_from": ["Enter a valid date."]
    }


# ------------------------------------------------------------------------------------ files


def test_download_url_is_signed_on_the_file_host_and_fresh_each_call(client, emulator):
    export = client.create("order_list", "2024-01-01T00:00:00Z", "2024-01-10T23:59:59Z")
    client.wait_available(export)
    url = client.file_url(export)
    match = FILE_URL.match(url)
    assert match and match["type"] == "order_list" and int(match["id"]) == export["id"]
    assert urlsplit(url).netloc != urlsplit(client.base).netloc
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    assert 290 <= expires - time.time() <= 301

    response = download(url)
    assert response.headers["Content-Type"].startswith("text/csv")
    assert "Transfer-Encoding" not in response.headers
    assert emulator.download_urls_issued == 1 and emulator.downloads == 1
    emulator.download_url_ttl_seconds = 600
    assert client.file_url(export) != url  # a new expiry, a new signature


def test_file_host_refuses_expired_and_tampered_urls_with_403(client, emulator, ctx):
    url = client.ready_file_url("customer_list")
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    tampered_sig = urlunsplit(parts._replace(query=f"expires={query['expires'][0]}&signature={'0' * 64}"))
    longer = urlunsplit(
        parts._replace(query=f"expires={int(query['expires'][0]) + 999}&signature={query['signature'][0]}")
    )
    other_file = url.replace("customer_list-", "order_list-")
    for bad in (tampered_sig, longer, other_file, url.split("?")[0]):
        refused = requests.get(bad, timeout=10)
        assert refused.status_code == 403 and "Signature does not match" in refused.text

    ctx.faults.arm("url_expired")
    export = client.create("customer_list")
    client.wait_available(export)
    expired = client.file_url(export)
    refused = requests.get(expired, timeout=10)
    assert refused.status_code == 403 and "expired" in refused.text
    download(client.file_url(export))  # asking again gives a working URL, with no new export
    assert emulator.exports_created == 2


def test_file_host_refuses_requests_carrying_api_credentials(client, ctx):
    url = client.ready_file_url("customer_list")
    leaked = requests.get(url, headers={"Authorization": client.headers["Authorization"]}, timeout=10)
    assert leaked.status_code == 400
    assert "must not carry API credentials" in leaked.text and client.headers["Authorization"] not in leaked.text
    logged = ctx.log.entries(host="nextcommerce-files")[-1]
    assert logged.headers["authorization"] == client.headers["Authorization"] and logged.status == 400


def test_file_is_csv_with_crlf_naive_store_times_and_awkward_cells(client, emulator):
    body = download(client.ready_file_url("order_list", "2024-01-01T00:00:00Z", "2024-01-31T23:59:59Z")).content
    assert not body.startswith(b"\xef\xbb\xbf")
    assert body.split(b"\n", 1)[0].endswith(b"\r")
    header, records = parse_csv(body, emulator, "order_list")
    keys = [snake(label) for label in header]
    assert {"order_number", "date_created", "customer_id", "notes"} <= set(keys)
    assert "metadata_sales_channel" not in keys  # the window ends before the drift date
    notes = [r["notes"] for r in records if r["notes"]]
    assert max(len(note) for note in notes) >= 99_000
    assert any("\n" in note for note in notes) and any('"' in note for note in notes)
    assert all(", " in r["shipping_address"] for r in records)
    assert any(not r["customer_name"].isascii() for r in records)
    assert any(r["metadata"] is None for r in records) and any(isinstance(r["metadata"], dict) for r in records)
    first_row = list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))[1]
    local = dt.datetime.fromisoformat(records[0]["date_created"]).astimezone(CHICAGO).strftime("%Y-%m-%d %H:%M:%S")
    assert first_row[keys.index("date_created")] == local


@pytest.mark.parametrize("export_type", list(TABLES))
def test_every_type_has_an_id_and_a_date_column_and_agrees_with_expected_records(client, emulator, export_type):
    columns = emulator.columns(export_type)
    table = TABLES[export_type]
    assert 8 <= len(table.columns) <= 20
    assert {snake(table.id_label), snake(table.date_label)} <= {c["key"] for c in columns}
    body = download(client.ready_file_url(export_type, "2024-01-20T00:00:00Z", "2024-01-30T23:59:59Z")).content
    header, records = parse_csv(body, emulator, export_type)
    assert header == [c["label"] for c in columns if c["since"] is None]
    assert snake(table.id_label) in map(snake, header) and snake(table.date_label) in map(snake, header)
    expected = emulator.expected_records(
        f"nextcommerce_{export_type}", start="2024-01-20T00:00:00Z", end="2024-01-31T00:00:00Z"
    )
    assert records == expected and len(records) > 3
    ids = [r[snake(table.id_label)] for r in records]
    assert len(set(ids)) == len(ids)
    dates = [r[snake(table.date_label)] for r in records]
    assert dates == sorted(dates)


def test_window_includes_both_ends(client, emulator):
    rows = emulator.expected_records("nextcommerce_transaction_list")
    first, last = rows[10]["date_created"], rows[14]["date_created"]
    to_api = lambda iso: dt.datetime.fromisoformat(iso).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = download(client.ready_file_url("transaction_list", to_api(first), to_api(last))).content
    _, records = parse_csv(body, emulator, "transaction_list")
    assert [r["transaction_id"] for r in records] == [r["transaction_id"] for r in rows[10:15]]

    one_second_in = lambda iso, s: (dt.datetime.fromisoformat(iso) + dt.timedelta(seconds=s)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    body = download(client.ready_file_url("transaction_list", one_second_in(first, 1), one_second_in(last, -1))).content
    assert [r["transaction_id"] for r in parse_csv(body, emulator, "transaction_list")[1]] == [
        r["transaction_id"] for r in rows[11:14]
    ]


def test_naive_date_from_means_the_store_timezone(client, emulator):
    export = client.create("order_list", "2024-01-10T00:00:00", "2024-01-10T23:59:59")
    assert export["date_from"] == "2024-01-10T06:00:00Z" and export["date_to"] == "2024-01-11T05:59:59Z"


def test_line_items_carry_their_parent_id_and_date(client, emulator):
    orders = {r["order_number"]: r for r in emulator.expected_records("nextcommerce_order_list")}
    lines = emulator.expected_records("nextcommerce_order_line_items")
    assert len(lines) == 2 * len(orders)
    for line in lines:
        order = orders[line["order_number"]]
        assert line["order_date_created"] == order["date_created"]
    for number, order in orders.items():
        own = [line for line in lines if line["order_number"] == number]
        assert len(own) == emulator_lines_count(emulator, number)
        if "lines_count" in order:  # an optional column some realities leave out
            assert len(own) == order["lines_count"]
        if "subtotal_incl_tax" in order and all("total_incl_tax" in line for line in own):
            assert round(sum(line["total_incl_tax"] for line in own), 2) == order["subtotal_incl_tax"]


def emulator_lines_count(emulator: NextCommerceEmulator, order_number: str) -> int:
    """Lines per order repeat 1, 2, 3 in date order (module docstring), whatever columns a file has."""
    numbers = [order["order_number"] for order in emulator.expected_records("nextcommerce_order_list")]
    return (1, 2, 3)[numbers.index(order_number) % 3]


def test_row_cap_truncate_silently_keeps_the_first_rows(client, emulator):
    emulator.row_cap, emulator.row_cap_behavior = 7, "truncate"
    body = download(client.ready_file_url("customer_list")).content
    _, records = parse_csv(body, emulator, "customer_list")
    assert records == emulator.expected_records("nextcommerce_customer_list")[:7]


def test_row_cap_refuse_answers_400_in_drf_shape_for_a_window_over_the_cap(client, emulator):
    emulator.row_cap_behavior = "refuse"
    rows = emulator.expected_records("nextcommerce_customer_list")
    emulator.row_cap = len(rows) - 1
    refused = requests.post(
        f"{client.base}/exports/",
        json={"type": "customer_list", "date_from": WHOLE_PERIOD[0], "date_to": WHOLE_PERIOD[1]},
        headers=client.headers,
        timeout=10,
    )
    assert refused.status_code == 400
    assert refused.json() == {
        "non_field_errors": [
            f"Exports are limited to {len(rows) - 1} objects; this export has {len(rows)}. Narrow the date range."
        ]
    }
    assert emulator.exports_created == 0

    emulator.row_cap = len(rows)  # exactly at the cap: exported whole
    body = download(client.ready_file_url("customer_list")).content
    assert parse_csv(body, emulator, "customer_list")[1] == rows


def test_order_list_gains_a_metadata_column_from_february(client, emulator):
    january = download(client.ready_file_url("order_list", "2024-01-25T00:00:00Z", "2024-01-31T23:59:59Z")).content
    spanning = download(client.ready_file_url("order_list", "2024-01-25T00:00:00Z", "2024-02-05T23:59:59Z")).content
    assert "Metadata Sales Channel" not in parse_csv(january, emulator, "order_list")[0]
    header, records = parse_csv(spanning, emulator, "order_list")
    assert snake(header[-1]) == "metadata_sales_channel"
    drift = dt.datetime(2024, 2, 1, tzinfo=UTC)
    for record in records:
        late = dt.datetime.fromisoformat(record["date_created"]) >= drift
        assert (record["metadata_sales_channel"] is not None) == late
    expected = emulator.expected_records(
        "nextcommerce_order_list", start="2024-01-25T00:00:00Z", end="2024-02-06T00:00:00Z"
    )
    assert [{k: v for k, v in r.items() if v is not None} for r in records] == [
        {k: v for k, v in r.items() if v is not None} for r in expected
    ]
    assert all(
        ("metadata_sales_channel" in r) == (dt.datetime.fromisoformat(r["date_created"]) >= drift) for r in expected
    )


def test_add_rows_appear_in_new_exports_only(client, emulator):
    before = client.create("dispute_list", "2024-02-10T00:00:00Z", "2024-02-10T23:59:59Z")
    emulator.add_rows(
        "nextcommerce_dispute_list", 4, dt.datetime(2024, 2, 10, 1, tzinfo=UTC), dt.datetime(2024, 2, 10, 5, tzinfo=UTC)
    )
    after = client.create("dispute_list", "2024-02-10T00:00:00Z", "2024-02-10T23:59:59Z")
    client.wait_available(after)
    old = parse_csv(download(client.file_url(before)).content, emulator, "dispute_list")[1]
    new = parse_csv(download(client.file_url(after)).content, emulator, "dispute_list")[1]
    assert len(new) == len(old) + 4
    assert new == emulator.expected_records(
        "nextcommerce_dispute_list", start="2024-02-10T00:00:00Z", end="2024-02-11T00:00:00Z"
    )
    added_ids = {r["dispute_id"] for r in new} - {r["dispute_id"] for r in old}
    assert len(added_ids) == 4 and len({r["dispute_id"] for r in new}) == len(new)


def test_a_million_rows_per_type_are_never_materialized(ctx, sandbox_seed):
    big = start(NextCommerceEmulator(ctx, seed=sandbox_seed, rows_per_type=1_000_000))
    big.rate_per_second = 1000
    try:
        started = time.monotonic()
        records = big.expected_records(
            "nextcommerce_order_line_items", start="2024-02-10T00:00:00Z", end="2024-02-10T00:30:00Z"
        )
        assert 500 < len(records) < 1000
        body = download(
            Client(big).ready_file_url("order_line_items", "2024-02-10T00:00:00Z", "2024-02-10T00:29:59Z")
        ).content
        assert parse_csv(body, big, "order_line_items")[1] == records
        assert time.monotonic() - started < 3
    finally:
        stop(big)


# ------------------------------------------------------------------------------------ limits and faults


def test_rate_limit_is_4_per_second_per_token_with_retry_after_1(ctx, sandbox_seed):
    limited = start(NextCommerceEmulator(ctx, seed=sandbox_seed))
    try:
        client = Client(limited)
        assert limited.rate_per_second == 4 and limited.rate_burst == 4
        statuses = [client.get("/exports/types/") for _ in range(6)]
        refused = [r for r in statuses if r.status_code == 429]
        assert [r.status_code for r in statuses[:4]] == [200] * 4 and refused
        assert refused[0].headers["Retry-After"] == "1" and "throttled" in refused[0].json()["detail"]
        time.sleep(1.0)
        assert client.get("/exports/types/").status_code == 200
    finally:
        stop(limited)


def test_rate_limit_fault_answers_429(client, ctx):
    ctx.faults.arm("rate_limit", times=2)
    statuses = [client.get("/exports/types/") for _ in range(3)]
    assert [r.status_code for r in statuses] == [429, 429, 200]
    assert statuses[0].headers["Retry-After"] == "1"


def test_server_error_fault_answers_500_then_502_then_503(client, ctx):
    ctx.faults.arm("server_error", times=3)
    statuses = [client.get("/exports/types/") for _ in range(4)]
    assert [r.status_code for r in statuses] == [500, 502, 503, 200]
    assert statuses[0].json() == {"detail": "A server error occurred."}


def test_download_reset_cuts_the_connection_mid_body(client, emulator, ctx):
    url = client.ready_file_url("order_list", "2024-01-01T00:00:00Z", "2024-01-31T23:59:59Z")
    ctx.faults.arm("download_reset")
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        requests.get(url, timeout=10).content
    download(url)  # the next attempt is whole


def test_download_short_sends_less_than_content_length(client, ctx):
    url = client.ready_file_url("customer_list")
    ctx.faults.arm("download_short")
    with requests.get(url, stream=True, timeout=10) as response:
        declared = int(response.headers["Content-Length"])
        received = b""
        with pytest.raises(urllib3.exceptions.ProtocolError, match="IncompleteRead"):
            for chunk in response.raw.stream(65536, decode_content=False):
                received += chunk
    assert 0 < len(received) < declared
    download(url)


def test_download_cut_quote_ends_inside_a_quoted_field_with_an_honest_length(client, emulator, ctx):
    url = client.ready_file_url("order_list", "2024-01-01T00:00:00Z", "2024-01-31T23:59:59Z")
    whole = download(url).content
    ctx.faults.arm("download_cut_quote")
    cut = download(url).content
    assert len(cut) < len(whole) and whole.startswith(cut)
    assert cut.count(b'"') % 2 == 1
    with pytest.raises(csv.Error):
        list(csv.reader(io.StringIO(cut.decode("utf-8"), newline=""), strict=True))
    assert download(url).content == whole


def test_content_faults_are_decided_when_the_export_is_created(client, ctx):
    ctx.faults.arm("header_only")
    faulty = client.create("return_list")
    healthy = client.create("return_list")
    client.wait_available(faulty)
    client.wait_available(healthy)
    first, again = download(client.file_url(faulty)).content, download(client.file_url(faulty)).content
    assert first == again and first.count(b"\r\n") == 1  # the stored file stays bad
    assert download(client.file_url(healthy)).content.count(b"\r\n") > 100


def test_empty_file_is_zero_bytes_and_all_armed_content_faults_go_to_one_export(client, ctx):
    for fault in ("malformed_row", "bad_utf8", "empty_file", "header_only", "new_column"):
        ctx.faults.arm(fault)
    response = download(client.ready_file_url("return_list", "2024-01-01T00:00:00Z", "2024-01-31T23:59:59Z"))
    assert response.content == b"" and response.headers["Content-Length"] == "0"
    assert not any(ctx.faults.active(f) for f in ("malformed_row", "bad_utf8", "header_only", "new_column"))


def test_malformed_row_and_bad_utf8_touch_the_first_data_row(client, emulator, ctx):
    ctx.faults.arm("malformed_row")
    malformed = download(client.ready_file_url("return_list")).content
    rows = list(csv.reader(io.StringIO(malformed.decode("utf-8"), newline="")))
    assert len(rows[1]) == len(rows[0]) + 1 and all(len(row) == len(rows[0]) for row in rows[2:])

    ctx.faults.arm("bad_utf8")
    bad = download(client.ready_file_url("return_list")).content
    with pytest.raises(UnicodeDecodeError):
        bad.decode("utf-8")
    header_line, first_row = bad.split(b"\r\n")[:2]
    assert header_line.decode("utf-8") == ",".join(rows[0]) and b" caf\xe9" in first_row


def test_header_only_and_new_column(client, emulator, ctx):
    ctx.faults.arm("header_only")
    header_only = download(client.ready_file_url("fulfillment_list")).content
    assert header_only.count(b"\r\n") == 1
    assert header_only.decode().rstrip("\r\n").split(",") == [c["label"] for c in emulator.columns("fulfillment_list")]

    ctx.faults.arm("new_column")
    header, records = parse_csv(
        download(client.ready_file_url("fulfillment_list")).content, emulator, "fulfillment_list"
    )
    assert snake(header[-1]) == "metadata_affiliate_code"
    assert any(r["metadata_affiliate_code"] for r in records)
    assert [
        {k: v for k, v in r.items() if k != "metadata_affiliate_code"} for r in records
    ] == emulator.expected_records("nextcommerce_fulfillment_list")


def test_requests_are_logged_with_their_headers(client, ctx):
    client.get("/exports/types/")
    entry = ctx.log.entries(host="nextcommerce-api", path_pattern=r"/exports/types/$")[-1]
    assert entry.headers["authorization"] == client.headers["Authorization"]
    assert entry.headers["x-29next-api-version"] == "2024-04-01" and entry.status == 200


# ------------------------------------------------------------------------------------ realities

#: The table of the emulator's module docstring: id format, header style, extra columns, missing columns per
#: type, row-cap behaviour.
DOCUMENTED_REALITIES = {
    7: ("hex", "snake", ("GCLID", "First Purchase Date", "Last Purchase Date"), 1, "refuse"),
    11: ("uuid", "mixed", ("First Purchase Date", "Last Purchase Date"), 0, "truncate"),
    23: ("zero_padded", "sentence", ("GCLID",), 1, "refuse"),
    42: ("prefixed", "upper", ("Cancellation Date", "First Purchase Date", "Last Purchase Date"), 2, "truncate"),
}
ID_PATTERNS = {
    "plain": r"[1-9]\d*",
    "zero_padded": r"0\d{8}",
    "prefixed": r"[a-z]+_[0-9A-Z]{6}",
    "hex": r"[0-9A-F]{8}",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
}
HEADER_STYLES = {
    "title": lambda h: h == h.strip() and all(word[:1].isupper() for word in h.split(" ")),
    "snake": lambda h: re.fullmatch(r"[a-z0-9_]+", h) is not None,
    "upper": lambda h: h == h.upper() == h.strip() and "_" not in h,
    "sentence": lambda h: h.endswith(" ") and h[:1].isupper() and h[1:] == h[1:].lower(),
}
EXTRA_KEYS = {"gclid": "order_list", "cancellation_date": "order_list"} | dict.fromkeys(
    ("first_purchase_date", "last_purchase_date"), "customer_list"
)
DRIFT_WINDOW = ("2024-01-25T00:00:00Z", "2024-02-05T23:59:59Z")


def is_identifier(key: str) -> bool:
    return key.endswith("_id") or key in ("order_number", "line_number", "sku")


def text_files(client: Client, types=tuple(TABLES), window=DRIFT_WINDOW) -> dict[str, tuple[list[str], list[dict]]]:
    """Each type's file over the window as (header, rows of cell text keyed by snake_case of the header)."""
    exports = {export_type: client.create(export_type, *window) for export_type in types}
    files = {}
    for export_type, export in exports.items():
        client.wait_available(export)
        rows = list(csv.reader(io.StringIO(download(client.file_url(export)).content.decode("utf-8"), newline="")))
        keys = [snake(label) for label in rows[0]]
        files[export_type] = (rows[0], [dict(zip(keys, row)) for row in rows[1:]])
    return files


@pytest.fixture
def seeded(ctx):
    """`seeded(seed)`: a running emulator of that seed with its client, stopped after the test."""
    running: list[NextCommerceEmulator] = []

    def make(seed: int, **options) -> tuple[NextCommerceEmulator, Client]:
        emulator = start(NextCommerceEmulator(ctx, seed=seed, **options))
        emulator.rate_per_second = 1000
        running.append(emulator)
        return emulator, Client(emulator)

    yield make
    for emulator in running:
        stop(emulator)


@pytest.mark.parametrize("seed", sorted(DOCUMENTED_REALITIES))
def test_each_seed_writes_the_reality_its_docstring_documents(seeded, seed):
    id_format, header_style, extras, missing_per_type, row_cap_behavior = DOCUMENTED_REALITIES[seed]
    emulator, client = seeded(seed)
    reality = emulator.reality
    assert reality == Reality.of_seed(seed)
    assert (reality.id_format, reality.header_style, reality.extra_columns) == (id_format, header_style, extras)
    assert (reality.missing_per_type, emulator.row_cap_behavior) == (missing_per_type, row_cap_behavior)

    files = text_files(client)
    styles_seen, left_out = set(), 0
    for export_type, (header, rows) in files.items():
        table = TABLES[export_type]
        keys = [snake(label) for label in header]
        canonical = [column.key for column in table.columns]
        # Identifiers, in every column that holds one, are written in the seed's format.
        for key in filter(is_identifier, keys):
            cells = [row[key] for row in rows if row[key]]
            assert cells and all(re.fullmatch(ID_PATTERNS[id_format], cell) for cell in cells), (export_type, key)
        # Headers: the seed's spelling; columns in another order than the canonical one.
        styles = {name for label in header for name, fits in HEADER_STYLES.items() if fits(label)}
        styles_seen |= styles
        if header_style != "mixed":
            assert all(HEADER_STYLES[header_style](label) for label in header), header
        assert [key for key in keys if key in canonical] != [key for key in canonical if key in keys]
        # Changelog columns as documented; the missing ones are optional columns, never ids or dates.
        assert {key for key in keys if key in EXTRA_KEYS} == {
            snake(label) for label in extras if EXTRA_KEYS[snake(label)] == export_type
        }
        missing = set(canonical) - set(keys)
        assert missing == {snake(label) for code, label in reality.missing_columns if code == export_type}
        assert len(missing) <= missing_per_type and not any(is_identifier(k) or "date" in k for k in missing)
        assert {snake(table.id_label), snake(table.date_label)} <= set(keys)
        left_out += len(missing)
    assert (left_out > 0) == (missing_per_type > 0), left_out
    if header_style == "mixed":
        assert len(styles_seen) >= 3, styles_seen


@pytest.mark.parametrize("seed,other_seed", [(7, 11), (23, 42)])
def test_two_seeds_write_different_headers_and_ids(seeded, seed, other_seed):
    first_file = text_files(seeded(seed)[1], ("order_list", "customer_list"))
    other_file = text_files(seeded(other_seed)[1], ("order_list", "customer_list"))
    for export_type in ("order_list", "customer_list"):
        (header, rows), (other_header, other_rows) = first_file[export_type], other_file[export_type]
        assert header != other_header and set(map(snake, header)) != set(map(snake, other_header))
        id_key = snake(TABLES[export_type].id_label)
        assert not {row[id_key] for row in rows} & {row[id_key] for row in other_rows}


@pytest.mark.parametrize(
    "lines,parent,parent_key,date_key",
    [
        ("order_line_items", "order_list", "order_number", "order_date_created"),
        ("subscription_line_items", "subscription_list", "subscription_id", "subscription_date_created"),
        ("open_cart_line_items", "open_cart_list", "cart_id", "cart_date_created"),
        ("return_line_items", "return_list", "return_id", "return_date_created"),
        ("fulfillment_line_items", "fulfillment_list", "fulfillment_id", "fulfillment_date_created"),
    ],
)
def test_a_line_items_parent_id_is_written_exactly_as_its_parents_own_id(client, lines, parent, parent_key, date_key):
    files = text_files(client, (lines, parent))
    parents = {row[parent_key]: row for row in files[parent][1]}
    assert len(parents) == len(files[parent][1]) > 3
    for row in files[lines][1]:
        assert row[parent_key] in parents, f"{row[parent_key]!r} is no {parent} id cell"
        assert row[date_key] == parents[row[parent_key]]["date_created"]
    assert {row[parent_key] for row in files[lines][1]} == set(parents)


def test_customer_ids_of_orders_and_subscriptions_are_customer_list_ids(emulator):
    customers = {row["customer_id"] for row in emulator.expected_records("nextcommerce_customer_list")}
    for stream in ("nextcommerce_order_list", "nextcommerce_subscription_list"):
        referenced = {row["customer_id"] for row in emulator.expected_records(stream)}
        assert referenced and referenced <= customers, stream


def rendered(header: list[str], rows: list[dict[str, str]]) -> bytes:
    """A CSV file written from rows of cell text, the way the export writes files (CRLF, minimal quoting)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    keys = [snake(label) for label in header]
    for row in rows:
        writer.writerow([row.get(key, "") for key in keys])  # the drift cell of a row dated before it is empty
    return buffer.getvalue().encode("utf-8")


@pytest.mark.parametrize("messy", [False, True], ids=["clean", "messy"])
def test_raw_rows_are_the_cells_of_a_downloaded_file_byte_for_byte(client, emulator, messy):
    emulator.messy_cells = messy
    for export_type in TABLES:
        export = client.create(export_type, *DRIFT_WINDOW)
        client.wait_available(export)
        body = download(client.file_url(export)).content
        header = next(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))
        raw = emulator.raw_rows(f"nextcommerce_{export_type}", start=DRIFT_WINDOW[0], end="2024-02-06T00:00:00Z")
        assert raw and all(isinstance(cell, str) for row in raw for cell in row.values())
        assert rendered(header, raw) == body, export_type
        if not messy:
            typed = emulator.expected_records(
                f"nextcommerce_{export_type}", start=DRIFT_WINDOW[0], end="2024-02-06T00:00:00Z"
            )
            assert [set(row) for row in raw] == [set(record) for record in typed]
            # Identifiers and the columns the tap does not know are typed as exactly their cell text.
            text_keys = [key for key in raw[0] if is_identifier(key) or key in EXTRA_KEYS]
            assert [[row[key] or None for key in text_keys] for row in raw] == [
                [record[key] for key in text_keys] for record in typed
            ]


OTHER_DATETIME = re.compile(r"\d{2}/\d{2}/\d{4} \d{2}:\d{2} [AP]M")


def damaged_rows(rows: list[dict], key: str, damaged) -> list[int]:
    return [number for number, row in enumerate(rows) if row.get(key) and damaged(row[key])]


def test_messy_cells_are_spread_over_every_types_file_and_only_in_exports_created_after(client, emulator):
    clean_exports = {export_type: client.create(export_type, *WHOLE_PERIOD) for export_type in TABLES}
    emulator.messy_cells = True
    messy = text_files(client, window=WHOLE_PERIOD)
    with pytest.raises(NotImplementedError):
        emulator.expected_records("nextcommerce_order_list")
    for export_type, (header, rows) in messy.items():
        table = TABLES[export_type]
        client.wait_available(clean_exports[export_type])
        clean_body = download(client.file_url(clean_exports[export_type])).content.decode("utf-8")
        clean_keys = [snake(label) for label in next(csv.reader(io.StringIO(clean_body, newline="")))]
        keys = [snake(label) for label in header]
        assert b"N/A" not in clean_body.encode() and len(set(keys) - set(clean_keys)) == 1, export_type  # renamed
        assert len(set(clean_keys) - set(keys)) == 1 and len(keys) == len(clean_keys)
        spread = damage_counts(table, keys, rows)
        assert not damaged_rows(rows, snake(table.date_label), OTHER_DATETIME.fullmatch)
        assert len(rows) > 10 and spread["N/A"] >= 3, (export_type, spread)
        assert all(count >= 3 for count in spread.values()), (export_type, spread)


def damage_counts(table, keys: list[str], rows: list[dict]) -> dict[str, int]:
    """For each kind of damage the type's columns allow: the most rows damaged so in one column."""
    kinds = {column.key: column.kind for column in table.columns}
    date_key = snake(table.date_label)

    def present(*wanted: str) -> list[str]:
        return [key for key in keys if kinds.get(key) in wanted and key != date_key]

    checks = {
        "N/A": (present("number", "integer"), lambda cell: cell == "N/A"),
        "other date-time format": (present("datetime"), OTHER_DATETIME.fullmatch),
        "yes/no": (present("boolean"), lambda cell: cell in ("yes", "no")),
        "not JSON": (present("json"), not_json),
    }
    return {
        name: max(len(damaged_rows(rows, key, damaged)) for key in columns)
        for name, (columns, damaged) in checks.items()
        if columns
    }

"""The Intelligems emulator over real HTTP: auth, validation, lifecycle, exports, S3 URLs, limits, faults."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import threading
import time
from functools import cache
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import requests

from tap_commerce_exports.openapi import load_spec
from tap_commerce_exports.sandbox.core import SandboxContext
from tap_commerce_exports.sandbox.intelligems import EXPORT_TABLES, IntelligemsEmulator

UTC = dt.timezone.utc
PREFIX = "/v25-10-beta"
BOM = b"\xef\xbb\xbf"
S3_URL = re.compile(
    r"^http://127\.0\.0\.1:\d+/[a-z0-9.-]+/exports/(?P<experience>[0-9a-f-]{36})/(?P<type>[a-z_]+)-(?P<n>\d+)\.csv"
    r"\?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=[^&]+&X-Amz-Date=\d{8}T\d{6}Z&X-Amz-Expires=900"
    r"&X-Amz-SignedHeaders=host&X-Amz-Signature=[0-9a-f]{64}$"
)


@pytest.fixture
def emulator():
    ctx = SandboxContext(export_latency_seconds=0.05)
    running = IntelligemsEmulator(ctx)
    for host in running.hosts:
        host.start()
    yield running
    for host in running.hosts:
        # Host.stop() waits out serve_forever's 0.5 s poll; nothing needs that to finish before the next test.
        threading.Thread(target=host.stop, daemon=True).start()


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


def typed_records(body: bytes, export_type: str, experience_id: str) -> list[dict]:
    assert body.startswith(BOM)
    kinds = {column.label: column.kind for column in EXPORT_TABLES[export_type].columns}
    rows = list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"), newline=""), strict=True))
    return [
        {
            **{key: (CASTS[kinds[key]](cell) if cell != "" else None) for key, cell in row.items()},
            "experience_id": experience_id,
        }
        for row in rows
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


def test_export_bucket_bursts_twenty_then_429_with_headers(emulator, api):
    emulator.export_rate_per_second = 0.1
    experience_id = emulator.experience_ids("started")[0]
    answers = [api.export(experience_id, {"exportType": "nope"}) for _ in range(21)]
    assert [a.status_code for a in answers[:20]] == [400] * 20
    limited = answers[20]
    assert limited.status_code == 429 and limited.json() == {"error": "Too Many Requests"}
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
    assert faulty("header_only").decode("utf-8-sig").startswith("order_id,") and faulty("header_only").count(b"\n") == 1

    rows = list(csv.reader(io.StringIO(faulty("malformed_row").decode("utf-8-sig"), newline="")))
    assert len(rows[1]) == len(rows[0]) + 1 and all(len(row) == len(rows[0]) for row in rows[2:])

    with pytest.raises(UnicodeDecodeError):
        faulty("bad_utf8").decode("utf-8")

    rows = list(csv.reader(io.StringIO(faulty("new_column").decode("utf-8-sig"), newline="")))
    assert "utm_campaign" in rows[0] and {len(row) for row in rows} == {len(rows[0])}

    cut = faulty("download_cut_quote").decode("utf-8-sig")
    with pytest.raises(csv.Error):
        list(csv.reader(io.StringIO(cut, newline=""), strict=True))

    clean = requests.get(api.export_url(experience_id), timeout=10).content
    assert len(typed_records(clean, "orders", experience_id)) == 40

"""The Voucherify emulator over real HTTP: auth, validation, export lifecycle, files, limits and faults.

The emulator runs with the suite's seed (TAP_SANDBOX_SEED, rotated by conftest): tests of what the
seed varies read the emulator's attributes rather than assume one reality.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import decimal
import http.client
import io
import json
import math
import re
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import requests

import tap_commerce_exports
from commerce_sandbox.core import SandboxContext, load_spec
from commerce_sandbox.server import default_seed
from commerce_sandbox.voucherify import (
    KINDS,
    SEED_SHAPES,
    SPEC_FILE,
    STREAMS,
    VoucherifyEmulator,
    campaign_transaction_fields,
    header_label,
    next_cycle_start,
    record_key,
)

LATENCY = 0.05
ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T")
VOUCHERIFY_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


# ------------------------------------------------------------------ fixtures


def started(emulator: VoucherifyEmulator) -> VoucherifyEmulator:
    for host in emulator.hosts:
        host.start()
    return emulator


def stop_in_background(emulator: VoucherifyEmulator) -> None:
    """Host.stop waits out serve_forever's 0.5 s poll; each test has its own ports, so do not wait."""
    for host in emulator.hosts:
        threading.Thread(target=host.stop, daemon=True).start()


def new_emulator(**knobs: Any) -> VoucherifyEmulator:
    return VoucherifyEmulator(SandboxContext(export_latency_seconds=LATENCY), seed=default_seed(), **knobs)


@pytest.fixture
def emulator():
    emulator = started(new_emulator())
    yield emulator
    stop_in_background(emulator)


class Client:
    """Talks to the emulator as the tap would: credentials on both hosts."""

    def __init__(self, emulator: VoucherifyEmulator) -> None:
        self.emulator = emulator
        self.headers = {"X-App-Id": emulator.app_id, "X-App-Token": emulator.app_token}

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return requests.request(method, self.emulator.api_host.base_url + path, headers=headers, timeout=5, **kwargs)

    def create(self, path: str, body: dict) -> dict:
        response = self.api("POST", path, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, export_id: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            export = self.api("GET", f"/v1/exports/{export_id}").json()
            if export["status"] not in ("SCHEDULED", "IN_PROGRESS") or time.monotonic() > deadline:
                return export
            time.sleep(0.01)

    def download(self, url: str, **kwargs: Any) -> requests.Response:
        return requests.get(url, headers=kwargs.pop("headers", self.headers), timeout=5, **kwargs)

    def export_file(self, path: str, body: dict) -> tuple[dict, requests.Response]:
        export = self.wait(self.create(path, body)["id"])
        assert export["status"] == "DONE", export
        response = self.download(export["result"]["url"])
        assert response.status_code == 200, response.text
        return export, response


@pytest.fixture
def client(emulator) -> Client:
    return Client(emulator)


def csv_rows(content: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(content.decode("utf-8-sig"), newline=""), strict=True))


def declared_length(response: requests.Response) -> int:
    """Content-Length when the seed sends it; else the body came chunked and its length is what came."""
    if "Content-Length" in response.headers:
        return int(response.headers["Content-Length"])
    assert response.headers.get("Transfer-Encoding") == "chunked"
    return len(response.content)


def voucherify_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def window_filter(field: str, start: dt.datetime, end: dt.datetime) -> dict:
    """The tap's window: $after is strict, so it starts 1 ms early; $before is strict too."""
    return {
        "junction": "and",
        field: {
            "conditions": {
                "$after": voucherify_time(start - dt.timedelta(milliseconds=1)),
                "$before": voucherify_time(end),
            }
        },
    }


def cell_matches(cell: str, expected: Any) -> bool:
    """Whether a CSV cell holds the typed value the tap must emit (its own parsing, not the emulator's)."""
    if expected is None:
        return cell == ""
    if isinstance(expected, bool):
        return cell == ("true" if expected else "false")
    if isinstance(expected, int):
        return int(cell) == expected
    if isinstance(expected, float):
        return decimal.Decimal(cell) == decimal.Decimal(expected)
    if isinstance(expected, dict):
        return json.loads(cell) == expected
    if ISO_DATETIME.match(expected):
        same = dt.datetime.fromisoformat(cell) == dt.datetime.fromisoformat(expected)
        return bool(VOUCHERIFY_TIME.match(cell)) and same
    return cell == expected


def assert_file_holds(rows: list[list[str]], fields: list[str], expected: list[dict]) -> None:
    assert rows[0] == [header_label(name) for name in fields]
    assert len(rows) - 1 == len(expected)
    for row, record in zip(rows[1:], expected, strict=True):
        for name, cell in zip(fields, row, strict=True):
            assert cell_matches(cell, record[record_key(name)]), (name, cell, record[record_key(name)])


def spec_validator(schema_name: str) -> jsonschema.Draft202012Validator:
    spec = load_spec(SPEC_FILE)
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]}
    )


# ----------------------------------------------------------------------- auth


def test_both_hosts_refuse_missing_or_wrong_credentials(client, emulator):
    _, response = client.export_file("/v1/orders/export", {"parameters": {"fields": ["id"]}})
    url = response.url
    wrong = (
        {},
        {"X-App-Id": emulator.app_id, "X-App-Token": "wrong"},
        {"X-App-Id": "x", "X-App-Token": emulator.app_token},
    )
    for headers in wrong:
        for answer in (
            requests.get(emulator.api_host.base_url + "/v1/campaigns", headers=headers, timeout=5),
            requests.get(url, headers=headers, timeout=5),
        ):
            assert answer.status_code == 401
            body = answer.json()
            assert set(body) == {"code", "key", "message", "details", "request_id"}
            assert body["code"] == 401 and body["key"] == "unauthorized"
            assert emulator.app_token not in answer.text


def test_download_host_receives_the_app_credentials(client, emulator):
    """Voucherify's download host needs the X-App headers: the log shows they went there."""
    client.export_file("/v1/orders/export", {})
    (download,) = emulator.ctx.log.entries(host="voucherify-download")
    assert download.headers["x-app-id"] == emulator.app_id
    assert download.headers["x-app-token"] == emulator.app_token
    assert download.status == 200


# ------------------------------------------------------------------ campaigns


def test_campaigns_are_listed_by_type_and_paged(client, emulator):
    gift = {"campaign_type": "GIFT_VOUCHERS", "limit": 100, "page": 1}
    answer = client.api("GET", "/v1/campaigns", params=gift).json()
    assert answer["object"] == "list" and answer["data_ref"] == "campaigns" and answer["total"] == 2
    assert [c["campaign_type"] for c in answer["campaigns"]] == ["GIFT_VOUCHERS"] * 2
    spec_validator("CampaignsListResponseBody").validate(answer)
    everything = client.api("GET", "/v1/campaigns", params={"limit": 2, "page": 3}).json()
    assert everything["total"] == 5 and [c["campaign_type"] for c in everything["campaigns"]] == ["DISCOUNT_COUPONS"]
    assert client.api("GET", "/v1/campaigns", params={"limit": 0}).status_code == 400
    assert client.api("GET", "/v1/campaigns", params={"campaign_type": "NOPE"}).status_code == 400


def test_deleted_campaign_leaves_the_list_and_its_exports_answer_404(client, emulator):
    loyalty = emulator.campaign_ids("LOYALTY_PROGRAM")
    emulator.delete_campaign(loyalty[0])
    listed = client.api("GET", "/v1/campaigns", params={"campaign_type": "LOYALTY_PROGRAM"}).json()
    assert [c["id"] for c in listed["campaigns"]] == loyalty[1:]
    answer = client.api("POST", f"/v1/campaigns/{loyalty[0]}/transactions/export", json={})
    assert answer.status_code == 404
    assert answer.json()["key"] == "not_found" and answer.json()["resource_type"] == "campaign"
    assert emulator.expected_records("voucherify_campaign_transactions", {"campaign_id": loyalty[0]}) == []


def test_campaign_paths_take_names_and_loyalty_path_takes_only_loyalty(client, emulator):
    gift_id = emulator.campaign_ids("GIFT_VOUCHERS")[0]
    assert client.api("POST", f"/v1/loyalties/{gift_id}/transactions/export", json={}).status_code == 404
    by_name = client.api("POST", "/v1/loyalties/Loyalty Club/transactions/export", json={})
    assert by_name.status_code == 200
    discount_id = emulator.campaign_ids("DISCOUNT_COUPONS")[0]
    _, response = client.export_file(f"/v1/campaigns/{discount_id}/transactions/export", {})
    assert len(csv_rows(response.content)) == 1  # no transactions: header only


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/v1/orders/export", {"parameters": {"fields": ["id", "colour"]}}, "parameters/fields/1"),
        ("/v1/orders/export", {"parameters": {"order": "amount"}}, "parameters/order"),
        (
            "/v1/exports",
            {"exported_object": "voucher", "parameters": {"fields": ["code", "date"]}},
            "parameters/fields/1",
        ),
        ("/v1/exports", {"exported_object": "coupon"}, "exported_object"),
        ("/v1/exports", {"parameters": {"fields": ["id"]}}, "exported_object"),
        (
            "/v1/orders/export",
            {"parameters": {"filters": {"updated_at": {"conditions": {"$after": "last week"}}}}},
            "parameters.filters.updated_at.conditions.$after",
        ),
        (
            "/v1/orders/export",
            {"parameters": {"filters": {"amount": {"conditions": {"$count_more": 100}}}}},
            "parameters.filters.amount.conditions.$count_more",
        ),
        (
            "/v1/orders/export",
            {"parameters": {"filters": {"amount": {"conditions": {"$more_than": "lots"}}}}},
            "parameters.filters.amount.conditions.$more_than",
        ),
        (
            "/v1/orders/export",
            {"parameters": {"filters": {"updated_at": {"conditions": {"$more_than": 10}}}}},
            "parameters.filters.updated_at.conditions.$more_than",
        ),
        (
            "/v1/exports",
            {
                "exported_object": "points_expiration",
                "parameters": {"filters": {"expires_at": {"conditions": {"$after": "2024-01-01T00:00:00Z"}}}},
            },
            "parameters.filters.expires_at",
        ),
        (
            "/v1/campaigns/Loyalty Club/transactions/export",
            {"parameters": {"filters": {"created_at": {"conditions": {"$after": 1704067200}}}}},
            "parameters/filters/created_at/conditions/$after",
        ),
        (
            "/v1/campaigns/Loyalty Club/transactions/export",
            {"parameters": {"filters": {"created_at": {"conditions": {"$before": []}}}}},
            "parameters/filters/created_at/conditions/$before",
        ),
        (
            "/v1/campaigns/Loyalty Club/transactions/export",
            {
                "parameters": {
                    "filters": {
                        "created_at": {"conditions": {"$after": ["2024-01-01T00:00:00.000Z", "2024-02-01T00:00:00Z"]}}
                    }
                }
            },
            "parameters.filters.created_at.conditions.$after: expected one value",
        ),
        (
            "/v1/exports",
            {
                "exported_object": "voucher_transactions",
                "parameters": {"filters": {"created_at": {"conditions": {"$after": "2024-01-01T00:00:00Z"}}}},
            },
            "parameters/filters/created_at/conditions/$after",
        ),
    ],
)
def test_bad_bodies_are_refused_naming_the_field(client, path, body, named):
    answer = client.api("POST", path, json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()
    assert error["key"] == "invalid_payload" and error["code"] == 400
    assert named in error["details"]


def test_body_that_is_not_json_is_refused(client):
    answer = client.api("POST", "/v1/exports", data=b"{nope", headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "JSON" in answer.json()["details"]


def test_order_metadata_fields_are_accepted_and_exported(client, emulator):
    fields = ["id", "metadata", "metadata.payment_mean", "metadata.channel", "metadata.unknown_name"]
    _, response = client.export_file("/v1/orders/export", {"parameters": {"fields": fields}})
    rows = csv_rows(response.content)
    assert rows[0] == ["ID", "Metadata", "Metadata Payment Mean", "Metadata Channel", "Metadata Unknown Name"]
    for row in rows[1:]:
        metadata = json.loads(row[1])
        assert row[2] == metadata.get("payment_mean", "") and row[3] == metadata["channel"] and row[4] == ""
    generic = {"exported_object": "order", "parameters": {"fields": ["metadata.payment_mean"]}}
    assert client.api("POST", "/v1/exports", json=generic).status_code == 200


@pytest.mark.parametrize("exported_object", ["voucher", "redemption", "publication", "customer"])
def test_metadata_name_fields_are_refused_where_only_orders_document_them(client, exported_object):
    body = {"exported_object": exported_object, "parameters": {"fields": ["metadata", "metadata.tier"]}}
    refused = client.api("POST", "/v1/exports", json=body)
    assert refused.status_code == 400 and "metadata.tier" in refused.json()["details"]
    _, whole = client.export_file(
        "/v1/exports", {"exported_object": exported_object, "parameters": {"fields": ["metadata"]}}
    )
    cells = [row[0] for row in csv_rows(whole.content)[1:]]
    assert any(isinstance(json.loads(cell), dict) and json.loads(cell) for cell in cells if cell)


def test_omitted_fields_give_the_documented_defaults(client):
    _, orders = client.export_file("/v1/orders/export", {})
    assert csv_rows(orders.content)[0] == ["ID", "Source ID", "Status"]
    _, publications = client.export_file("/v1/exports", {"exported_object": "publication"})
    rows = csv_rows(publications.content)
    assert rows[0] == ["Code", "Customer ID", "Date", "Channel"] and all(row[0] for row in rows[1:])


# ------------------------------------------------------------------- lifecycle


def test_export_goes_scheduled_in_progress_done_with_fresh_tokens(client, emulator):
    emulator.ctx.faults.arm("export_latency", times=-1, value=0.4)
    created = client.create("/v1/orders/export", {"parameters": {"fields": ["id", "status"]}})
    assert created["status"] == "SCHEDULED" and created["result"] is None and created["channel"] == "API"
    assert created["parameters"] == {"fields": ["id", "status"]} and created["exported_object"] == "order"
    spec_validator("ExportsCreateResponseBody").validate(created)
    time.sleep(0.25)
    assert client.api("GET", f"/v1/exports/{created['id']}").json()["status"] == "IN_PROGRESS"
    time.sleep(0.2)
    first = client.api("GET", f"/v1/exports/{created['id']}").json()
    second = client.api("GET", f"/v1/exports/{created['id']}").json()
    assert first["status"] == "DONE"
    spec_validator("ExportsGetResponseBody").validate(first)
    assert first["result"]["url"].startswith(f"{emulator.download_host.base_url}/v1/exports/{created['id']}?token=")
    assert first["result"]["url"] != second["result"]["url"]
    for export in (first, second):
        answer = client.download(export["result"]["url"])
        assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")


def test_exports_are_listed_deleted_and_unknown_ids_answer_404(client, emulator):
    export, _ = client.export_file("/v1/orders/export", {})
    other = client.create("/v1/exports", {"exported_object": "customer"})
    listed = client.api("GET", "/v1/exports", params={"limit": 10}).json()
    spec_validator("ExportsListResponseBody").validate(listed)
    assert listed["total"] == 2 and [e["id"] for e in listed["exports"]] == [other["id"], export["id"]]
    assert client.api("DELETE", f"/v1/exports/{export['id']}").status_code == 204
    assert client.api("GET", f"/v1/exports/{export['id']}").status_code == 404
    assert client.download(export["result"]["url"]).status_code == 404
    missing = client.api("GET", "/v1/exports/exp_doesnotexist")
    assert missing.status_code == 404 and missing.json()["key"] == "not_found"


def test_the_export_listing_pages_newest_first_and_refuses_undocumented_parameters(client):
    ids = [client.create("/v1/exports", {"exported_object": "customer"})["id"] for _ in range(3)]
    first = client.api("GET", "/v1/exports", params={"limit": 2, "page": 1, "order": "-created_at"}).json()
    second = client.api("GET", "/v1/exports", params={"limit": 2, "page": 2, "order": "-created_at"}).json()
    assert [e["id"] for e in first["exports"] + second["exports"]] == ids[::-1] and first["total"] == 3
    for params in ({"status": "DONE"}, {"exported_object": "customer"}, {"limit": 101}, {"order": "id"}):
        answer = client.api("GET", "/v1/exports", params=params)
        assert answer.status_code == 400 and answer.json()["key"] == "invalid_payload", params


@pytest.mark.parametrize(
    ("plan", "limit", "window", "cycle"), [("business", 100, 60.0, 100_000), ("sandbox", 100, 3600.0, None)]
)
def test_a_plan_sets_the_documented_limits_and_a_limit_given_alone_wins(plan, limit, window, cycle, monkeypatch):
    emulator = new_emulator(plan=plan)
    assert (emulator.requests_per_minute, emulator.rate_window_seconds, emulator.requests_per_cycle) == (
        limit,
        window,
        cycle,
    )
    assert new_emulator(plan=plan, requests_per_minute=7).requests_per_minute == 7
    monkeypatch.setenv("TAP_SANDBOX_VOUCHERIFY_PLAN", "organization")
    assert new_emulator().requests_per_minute == 2_000
    with pytest.raises(ValueError, match="unknown Voucherify plan"):
        new_emulator(plan="gold")


# ---------------------------------------------------------------- download host


def test_download_refuses_tampered_foreign_and_expired_tokens(client, emulator):
    first, _ = client.export_file("/v1/orders/export", {})
    second, _ = client.export_file("/v1/exports", {"exported_object": "customer"})
    url = first["result"]["url"]
    expires, _, signature = url.split("token=")[1].split(".")
    tampered = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    later = url.replace(f"token={expires}", f"token={int(expires) + 1000}")
    foreign = second["result"]["url"].replace(second["id"], first["id"])
    no_token = url.split("?")[0]
    emulator.ctx.faults.arm("url_expired")
    expired = client.api("GET", f"/v1/exports/{first['id']}").json()["result"]["url"]
    emulator.download_token_ttl_seconds = 0
    zero_ttl = client.api("GET", f"/v1/exports/{first['id']}").json()["result"]["url"]
    answers = [client.download(u) for u in (tampered, later, foreign, no_token, expired, zero_ttl)]
    assert [a.status_code for a in answers] == [403] * 6
    assert len({a.json()["details"] for a in answers}) == 1  # expired and tampered look alike
    assert client.download(url).status_code == 200


# ---------------------------------------------- rate limits (NOTES.md, guides/limits)

RATE_HEADERS = ("X-Rate-Limit-Limit", "X-Rate-Limit-Remaining", "X-Rate-Limit-Retry")


def start_of_next_window(seconds: float) -> None:
    """Sleep into a fresh window (windows are aligned to multiples of their length in Unix time)."""
    time.sleep(seconds - time.time() % seconds + 0.01)


def assert_429(answer: requests.Response, emulator: VoucherifyEmulator, limit_type: str) -> float:
    """A documented 429; returns its X-Rate-Limit-Retry (a Unix time)."""
    assert answer.status_code == 429
    body = answer.json()
    assert set(body) == {"code", "key", "message", "details", "request_id"}
    assert body["code"] == 429 and body["key"] == "too_many_requests"
    assert answer.headers["X-Rate-Limit-Remaining"] == "0"
    retry_at = float(answer.headers["X-Rate-Limit-Retry"])
    assert ("." in answer.headers["X-Rate-Limit-Retry"]) == emulator.retry_with_milliseconds
    assert answer.headers.get("X-Rate-Limit-Type") == (limit_type if emulator.sends_rate_limit_type else None)
    if emulator.sends_retry_after:
        assert int(answer.headers["Retry-After"]) >= retry_at - time.time()
    else:
        assert "Retry-After" not in answer.headers
    return retry_at


def test_every_api_answer_carries_the_rate_limit_headers_with_a_unix_time_retry(client, emulator):
    emulator.ctx.faults.arm("server_error")
    answers = [
        client.api("GET", "/v1/campaigns"),  # 500 (the fault)
        client.api("GET", "/v1/campaigns"),  # 200
        client.api("POST", "/v1/exports", json={"exported_object": "coupon"}),  # 400
        client.api("GET", "/v1/exports/exp_nope"),  # 404
        client.api("GET", "/v1/campaigns", headers={"X-App-Token": "wrong"}),  # 401
    ]
    assert [a.status_code for a in answers] == [500, 200, 400, 404, 401]
    for answer in answers:
        assert all(name in answer.headers for name in RATE_HEADERS), answer.status_code
        # Calls are left, so the next one may come now: a Unix time, not a delay.
        assert abs(float(answer.headers["X-Rate-Limit-Retry"]) - time.time()) < 2
        assert "X-Rate-Limit-Type" not in answer.headers and "Retry-After" not in answer.headers
    assert int(answers[1].headers["X-Rate-Limit-Remaining"]) > int(answers[3].headers["X-Rate-Limit-Remaining"])


def test_a_per_minute_limit_answers_429_until_the_window_ends(client):
    emulator = client.emulator
    emulator.requests_per_minute = 3
    emulator.rate_window_seconds = 1.0
    start_of_next_window(1.0)
    window_end = math.floor(time.time()) + 1
    answers = [client.api("GET", "/v1/campaigns") for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert [a.headers["X-Rate-Limit-Remaining"] for a in answers] == ["2", "1", "0", "0", "0"]
    assert {a.headers["X-Rate-Limit-Limit"] for a in answers} == {"3"}
    # The last admitted call already says when the next may come: the window's end.
    assert float(answers[2].headers["X-Rate-Limit-Retry"]) == window_end
    assert assert_429(answers[3], emulator, "api_calls") == window_end
    assert emulator.rate_limited == 2  # refused calls count toward no limit
    time.sleep(max(0.0, window_end - time.time()))
    assert client.api("GET", "/v1/campaigns").headers["X-Rate-Limit-Remaining"] == "2"


def test_a_spent_billing_cycle_quota_answers_429_until_the_first_of_next_month(client):
    emulator = client.emulator
    emulator.requests_per_cycle = 2
    answers = [client.api("GET", "/v1/campaigns") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 429, 429]
    reset = next_cycle_start(time.time())
    assert dt.datetime.fromtimestamp(reset, dt.timezone.utc).day == 1
    for answer in answers[2:]:
        assert assert_429(answer, emulator, "api_calls_cycle") == reset
        assert answer.headers["X-Rate-Limit-Limit"] == "2"
    emulator.reset_cycle()
    assert client.api("GET", "/v1/campaigns").status_code == 200


def test_quota_exhausted_fault_spends_the_cycle_until_it_resets(client, emulator):
    emulator.ctx.faults.arm("quota_exhausted")
    answers = [client.api("GET", "/v1/exports") for _ in range(3)]
    assert [a.status_code for a in answers] == [429, 429, 429]
    assert assert_429(answers[0], emulator, "api_calls_cycle") == next_cycle_start(time.time())
    assert answers[0].headers["X-Rate-Limit-Limit"] == "100000"  # the Business plan's cycle (NOTES.md)
    emulator.reset_cycle()
    assert client.api("GET", "/v1/exports").status_code == 200


def test_rate_limit_fault_blocks_the_api_until_the_unix_time_it_names(client, emulator):
    emulator.ctx.faults.arm("rate_limit", times=1, value=1.0)
    sent = time.time()
    limited = client.api("GET", "/v1/exports")
    retry_at = assert_429(limited, emulator, "api_calls")
    assert sent + 1.0 <= retry_at <= time.time() + 2.0
    during = client.api("GET", "/v1/exports")
    assert during.status_code == 429 and float(during.headers["X-Rate-Limit-Retry"]) == retry_at
    assert emulator.ctx.faults.fired["rate_limit"] == 1  # calls during the block take no shot
    time.sleep(max(0.0, retry_at - time.time()))
    assert client.api("GET", "/v1/exports").status_code == 200


def test_rate_limit_fault_default_wait_is_about_a_second(client, emulator):
    emulator.ctx.faults.arm("rate_limit")
    sent = time.time()
    retry_at = assert_429(client.api("GET", "/v1/campaigns"), emulator, "api_calls")
    assert sent + 1.0 <= retry_at <= time.time() + 2.0


def test_the_suites_seeds_vary_every_open_choice_and_seed_7_sends_no_retry_after():
    shapes = [SEED_SHAPES[seed] for seed in (7, 11, 23, 42)]
    for choice in ("retry_after", "rate_limit_type", "retry_milliseconds", "result_extras", "bom", "content_length"):
        assert {getattr(shape, choice) for shape in shapes} == {True, False}, choice
    assert {shape.line_ending for shape in shapes} == {"\r\n", "\n"}
    assert not SEED_SHAPES[7].retry_after and any(not SEED_SHAPES[s].retry_after for s in (11, 23, 42))
    for seed, shape in SEED_SHAPES.items():
        emulator = VoucherifyEmulator(SandboxContext(), seed=seed)
        assert (emulator.sends_retry_after, emulator.sends_rate_limit_type) == (
            shape.retry_after,
            shape.rate_limit_type,
        )
        assert emulator.sends_content_length == shape.content_length and emulator.file_bom == shape.bom


def test_server_error_fault_answers_500_502_503(client, emulator):
    emulator.ctx.faults.arm("server_error", times=3)
    statuses = [client.api("GET", "/v1/campaigns").status_code for _ in range(4)]
    assert statuses == [500, 502, 503, 200]


# ------------------------------------------------------------------- export faults


def test_export_error_fault_ends_in_error_without_result(client, emulator):
    emulator.ctx.faults.arm("export_error")
    export = client.wait(client.create("/v1/orders/export", {})["id"])
    assert export["status"] == "ERROR" and export["result"] is None
    assert client.wait(client.create("/v1/orders/export", {})["id"])["status"] == "DONE"


def test_export_stuck_fault_stays_in_progress(client, emulator):
    emulator.ctx.faults.arm("export_stuck")
    export = client.wait(client.create("/v1/orders/export", {})["id"], timeout=4 * LATENCY)
    assert export["status"] == "IN_PROGRESS" and export["result"] is None


def test_export_latency_fault_sets_readiness(client, emulator):
    emulator.ctx.faults.arm("export_latency", times=-1, value=0)
    assert client.create("/v1/orders/export", {})["status"] == "DONE"


def raw_download(url: str, headers: dict) -> tuple[int | None, bytes, bool]:
    """(declared length or None, bytes received, whether the body was cut short) over plain
    http.client, which reports a chunked body that stops before its last chunk as cut too."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    connection.request("GET", f"{parts.path}?{parts.query}", headers=headers)
    response = connection.getresponse()
    length = response.getheader("Content-Length")
    declared = None if length is None else int(length)
    try:
        return declared, response.read(), False
    except http.client.IncompleteRead as exc:
        return declared, exc.partial, True
    finally:
        connection.close()


def test_download_reset_and_short_cut_the_body(client, emulator):
    export, whole = client.export_file("/v1/exports", {"exported_object": "customer"})
    url = export["result"]["url"]
    emulator.ctx.faults.arm("download_reset")
    declared, received, cut = raw_download(url, client.headers)
    assert cut and received == whole.content[: len(whole.content) // 2]
    assert declared == (len(whole.content) if emulator.sends_content_length else None)
    emulator.ctx.faults.arm("download_short")
    declared, received, cut = raw_download(url, client.headers)
    assert cut and declared > len(whole.content) and received == whole.content
    with pytest.raises(requests.exceptions.RequestException):
        emulator.ctx.faults.arm("download_short")
        client.download(url)
    assert client.download(url).content == whole.content


def test_download_cut_quote_ends_inside_a_quoted_field(client, emulator):
    export, whole = client.export_file(
        "/v1/exports", {"exported_object": "customer", "parameters": {"fields": list(KINDS["customer"].fields)}}
    )
    emulator.ctx.faults.arm("download_cut_quote")
    cut = client.download(export["result"]["url"])
    assert cut.status_code == 200 and declared_length(cut) == len(cut.content) < len(whole.content)
    assert whole.content.startswith(cut.content)
    with pytest.raises(csv.Error):
        csv_rows(cut.content)


@pytest.mark.parametrize("fault", ["malformed_row", "bad_utf8", "empty_file", "header_only", "new_column"])
def test_content_faults_are_baked_into_the_export(client, emulator, fault):
    body = {"exported_object": "redemption", "parameters": {"fields": ["id", "customer_name", "date"]}}
    emulator.ctx.faults.arm(fault)
    export, damaged = client.export_file("/v1/exports", body)
    _, clean = client.export_file("/v1/exports", body)
    assert client.download(client.wait(export["id"])["result"]["url"]).content == damaged.content  # same file again
    clean_rows = csv_rows(clean.content)
    if fault == "empty_file":
        assert damaged.content == b""
    elif fault == "header_only":
        assert csv_rows(damaged.content) == clean_rows[:1]
    elif fault == "new_column":
        rows = csv_rows(damaged.content)
        assert rows[0] == [*clean_rows[0], "Loyalty Tier"] and all(len(row) == 4 for row in rows)
        assert [row[:3] for row in rows] == clean_rows
    elif fault == "malformed_row":
        widths = [len(row) for row in csv_rows(damaged.content)]
        assert widths.count(4) == 1 and widths[3] == 4
    else:
        with pytest.raises(UnicodeDecodeError):
            damaged.content.decode("utf-8-sig")
        assert damaged.content.replace(b"\xff\xfe", b"") == clean.content


# ------------------------------------------------------------ data and windows

START = dt.datetime(2024, 1, 20, tzinfo=dt.timezone.utc)
END = dt.datetime(2024, 2, 10, tzinfo=dt.timezone.utc)


def tap_like_request(emulator: VoucherifyEmulator, stream_name: str) -> tuple[str, dict, dict | None]:
    """The path and body the tap sends for a stream's window, and the partition (for transactions,
    the campaign the export is filtered to, as `voucherify_campaign_ids` does)."""
    stream = STREAMS[stream_name]
    filter_field = {"date": "created_at"}.get(stream.replication_key, stream.replication_key)
    parameters: dict = {"fields": list(stream.fields())}
    if filter_field:
        filters = window_filter(filter_field, START, END)
        # As the tap writes them (NOTES.md: one-element arrays); FieldConditions accepts only lists.
        conditions = filters[filter_field]["conditions"]
        filters[filter_field]["conditions"] = {operator: [value] for operator, value in conditions.items()}
        parameters |= {"filters": filters, "order": filter_field}
    if stream.kind == "order":
        return "/v1/orders/export", {"parameters": parameters}, None
    partition = None
    if stream.per_campaign:
        partition = {"campaign_id": emulator.campaign_ids("LOYALTY_PROGRAM")[1]}
        parameters["filters"]["campaign_id"] = {"conditions": {"$in": [partition["campaign_id"]]}}
    return "/v1/exports", {"exported_object": stream.kind, "parameters": parameters}, partition


@pytest.mark.parametrize("stream_name", list(STREAMS))
def test_expected_records_agree_with_the_csv_for_a_window(client, emulator, stream_name):
    path, body, partition = tap_like_request(emulator, stream_name)
    _, response = client.export_file(path, body)
    expected = emulator.expected_records(stream_name, partition, START, END)
    assert expected, "the window should hold rows"
    assert_file_holds(csv_rows(response.content), body["parameters"]["fields"], expected)
    if partition:
        assert {record["campaign_id"] for record in expected} == {partition["campaign_id"]}


def test_window_boundaries_are_strict_after_and_before(client, emulator):
    records = emulator.expected_records("voucherify_orders")
    midnight = next(r["updated_at"] for r in records if r["updated_at"].endswith("T00:00:00+00:00"))
    moment = dt.datetime.fromisoformat(midnight)
    day = dt.timedelta(days=1)

    def ids(after: dt.datetime, before: dt.datetime) -> list[str]:
        filters = {"updated_at": {"conditions": {"$after": voucherify_time(after), "$before": voucherify_time(before)}}}
        _, response = client.export_file(
            "/v1/orders/export",
            {"parameters": {"fields": ["id", "updated_at"], "filters": filters, "order": "updated_at"}},
        )
        return [row[0] for row in csv_rows(response.content)[1:]]

    row_id = next(r["id"] for r in records if r["updated_at"] == midnight)
    assert row_id in ids(moment - dt.timedelta(milliseconds=1), moment + day)
    assert row_id not in ids(moment, moment + day)
    assert row_id not in ids(moment - day, moment)
    expected = [r["id"] for r in emulator.expected_records("voucherify_orders", None, moment, moment + day)]
    assert expected[0] == row_id and ids(moment - dt.timedelta(milliseconds=1), moment + day) == expected


def test_order_parameter_sorts_rows(client):
    def column(order: str, field: str) -> list[str]:
        _, response = client.export_file("/v1/orders/export", {"parameters": {"fields": ["id", field], "order": order}})
        return [row[1] for row in csv_rows(response.content)[1:]]

    ascending = column("updated_at", "updated_at")
    assert ascending == sorted(ascending) and column("-updated_at", "updated_at") == ascending[::-1]
    statuses = column("-status", "status")
    assert statuses == sorted(statuses, reverse=True)


def test_voucher_transactions_export_merges_campaigns_and_filters_by_campaign(client, emulator):
    gift = emulator.campaign_ids("GIFT_VOUCHERS")[0]
    fields = ["id", "campaign_id", "created_at"]
    _, everything = client.export_file(
        "/v1/exports", {"exported_object": "voucher_transactions", "parameters": {"fields": fields}}
    )
    rows = csv_rows(everything.content)[1:]
    assert len(rows) == len(emulator.expected_records("voucherify_campaign_transactions"))
    assert [row[2] for row in rows] == sorted(row[2] for row in rows)
    _, one = client.export_file(
        "/v1/exports",
        {
            "exported_object": "voucher_transactions",
            "parameters": {
                "fields": fields,
                "filters": {"junction": "and", "campaign_id": {"conditions": {"$in": [gift]}}},
            },
        },
    )
    expected = emulator.expected_records("voucherify_campaign_transactions", {"campaign_id": gift})
    assert [row[0] for row in csv_rows(one.content)[1:]] == [record["id"] for record in expected]


def test_added_rows_reach_later_exports_only(client, emulator):
    next_day = window_filter("updated_at", END, END + dt.timedelta(days=1))
    body = {"parameters": {"fields": ["id", "updated_at"], "filters": next_day}}
    before = client.create("/v1/orders/export", body)
    added = emulator.add_rows("voucherify_orders", 3, END, END + dt.timedelta(hours=3))
    old = client.download(client.wait(before["id"])["result"]["url"])
    _, new = client.export_file("/v1/orders/export", body)
    new_ids = [row[0] for row in csv_rows(new.content)[1:]]
    assert {r["id"] for r in added} <= set(new_ids)
    assert not {r["id"] for r in added} & {row[0] for row in csv_rows(old.content)[1:]}
    window = emulator.expected_records("voucherify_orders", None, END, END + dt.timedelta(days=1))
    assert [r["id"] for r in window] == new_ids


def test_default_files_hold_the_awkward_parts(client, emulator):
    _, vouchers = client.export_file(
        "/v1/exports", {"exported_object": "voucher", "parameters": {"fields": list(KINDS["voucher"].fields)}}
    )
    _, customers = client.export_file(
        "/v1/exports", {"exported_object": "customer", "parameters": {"fields": list(KINDS["customer"].fields)}}
    )
    raw = vouchers.content
    assert raw.startswith(b"\xef\xbb\xbf") == emulator.file_bom
    ending = emulator.file_line_ending.encode()
    assert raw.split(b"\n", 1)[0].endswith(b"\r") == (ending == b"\r\n") and raw.count(ending) >= 60
    voucher_rows = csv_rows(raw)
    info = voucher_rows[0].index("Additional Info")
    assert max(len(row[info]) for row in voucher_rows[1:]) >= 100_000
    assert any("\n" in row[info] for row in voucher_rows[1:] if len(row[info]) < 1000)
    assert any(re.fullmatch(r"\d+\.\d\d", row[voucher_rows[0].index("Value")]) for row in voucher_rows[1:])
    assert any(row[voucher_rows[0].index("Category")] == "VIP, Gold" for row in voucher_rows[1:])
    customer_rows = csv_rows(customers.content)
    names = {row[0] for row in customer_rows[1:]}
    assert {"Zoë Ångström", "山田太郎", "Smith, John"} <= names
    description = customer_rows[0].index("Description")
    assert any("\n" in row[description] for row in customer_rows[1:])
    assert any("" in row for row in customer_rows[1:])
    assert customer_rows[0][customer_rows[0].index("Address Line 1")] == "Address Line 1"


def test_every_documented_field_is_generated(emulator):
    for kind in KINDS.values():
        source = next(s for s in emulator.data.sources.values() if s.kind == kind.name and s.base_count)
        row = emulator.data.build(source, 0, source.timeline.at(0))
        assert set(kind.fields) <= set(row), kind.name
    assert len(campaign_transaction_fields()) == 11
    assert header_label("qr_code") == "QR Code" and header_label("metadata.payment_mean") == "Metadata Payment Mean"
    assert header_label("validation_rules_id") == "Validation Rules ID"


def test_large_exports_stream_with_an_exact_content_length_or_chunked():
    emulator = started(
        VoucherifyEmulator(SandboxContext(export_latency_seconds=0), seed=default_seed(), rows_per_type=5_000)
    )
    try:
        client = Client(emulator)
        body = {"parameters": {"fields": ["id", "updated_at"], "filters": window_filter("updated_at", START, END)}}
        export = client.create("/v1/orders/export", body)
        response = client.download(export["result"]["url"], stream=True)
        received = sum(len(chunk) for chunk in response.iter_content(65536))
        if emulator.sends_content_length:
            assert received == int(response.headers["Content-Length"])
        else:
            assert "Content-Length" not in response.headers and response.headers["Transfer-Encoding"] == "chunked"
        expected = emulator.expected_records("voucherify_orders", None, START, END)
        assert 1_000 < len(expected) < 5_000
        assert len(csv_rows(client.download(export["result"]["url"]).content)) == len(expected) + 1
    finally:
        stop_in_background(emulator)


# ----------------------------------------------- the vendor's own request examples

EXPORT_PATHS = (
    "/v1/orders/export",
    "/v1/campaigns/{campaignId}/transactions/export",
    "/v1/loyalties/{campaignId}/transactions/export",
    "/v1/exports",
)


def published_request_examples() -> list[tuple[str, str, dict]]:
    """(path, example name, body) of every request-body example of the export endpoints."""
    spec = json.loads((Path(tap_commerce_exports.__file__).parent / "specs" / SPEC_FILE).read_text())
    found = []
    for path in EXPORT_PATHS:
        for content in spec["paths"][path]["post"]["requestBody"]["content"].values():
            if "example" in content:
                found.append((path, "example", content["example"]))
            for name, example in (content.get("examples") or {}).items():
                found.append((path, name, example["value"]))
    return found


def test_every_published_request_example_of_the_export_endpoints_is_accepted_and_applied(client, emulator):
    examples = published_request_examples()
    # The spec publishes two order examples and one for campaign (and loyalty) transactions;
    # POST /v1/exports has none. Dates in the examples are written as one-element arrays.
    assert {path for path, _, _ in examples} >= {"/v1/orders/export", "/v1/campaigns/{campaignId}/transactions/export"}
    assert len(examples) >= 3
    loyalty = emulator.campaign_ids("LOYALTY_PROGRAM")[0]
    for path, name, body in examples:
        export, response = client.export_file(path.replace("{campaignId}", loyalty), body)
        rows = csv_rows(response.content)
        fields = body.get("parameters", {}).get("fields") or []
        assert rows[0] == [header_label(field) for field in fields], (path, name)
        # The examples filter on dates after the data (2024-10) and on discounts above any order's:
        # applied, they leave no rows; ignored, they would leave every row.
        if body.get("parameters", {}).get("filters"):
            assert rows[1:] == [], (path, name)
        assert export["parameters"]["fields"] == fields


def test_date_conditions_filter_alike_as_strings_and_as_one_element_arrays(client, emulator):
    start, end = dt.datetime(2024, 1, 10, tzinfo=dt.timezone.utc), dt.datetime(2024, 2, 5, tzinfo=dt.timezone.utc)
    as_text = window_filter("created_at", start, end)
    as_list = copy.deepcopy(as_text)
    conditions = as_list["created_at"]["conditions"]
    conditions.update({operator: [value] for operator, value in conditions.items()})
    campaign = emulator.campaign_ids("GIFT_VOUCHERS")[0]
    files = [
        client.export_file(
            f"/v1/campaigns/{campaign}/transactions/export",
            {"parameters": {"fields": ["id", "created_at"], "filters": filters}},
        )[1].content
        for filters in (as_text, as_list)
    ]
    expected = emulator.expected_records("voucherify_campaign_transactions", {"campaign_id": campaign}, start, end)
    assert expected and files[0] == files[1]
    assert [row[0] for row in csv_rows(files[0])[1:]] == [record["id"] for record in expected]
    orders = client.export_file("/v1/orders/export", {"parameters": {"fields": ["id"], "filters": as_list}})[1]
    created = [r["id"] for r in emulator.expected_records("voucherify_orders") if start <= parse(r["created_at"]) < end]
    assert sorted(row[0] for row in csv_rows(orders.content)[1:]) == sorted(created)


def parse(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def test_number_conditions_compare_numbers(client, emulator):
    filters = {
        "discount_amount": {"conditions": {"$more_than": 900}},
        "amount": {"conditions": {"$less_than": [20000]}},
    }
    _, response = client.export_file(
        "/v1/orders/export", {"parameters": {"fields": ["id", "discount_amount", "amount"], "filters": filters}}
    )
    got = [row[0] for row in csv_rows(response.content)[1:]]
    records = emulator.expected_records("voucherify_orders")
    want = [r["id"] for r in records if r["discount_amount"] > 900 and r["amount"] < 20000]
    assert got == want and 0 < len(want) < len(records)


# ------------------------------------------------------ what the result and files hold


def test_a_done_result_holds_the_url_and_on_some_seeds_more(client, emulator):
    export, _ = client.export_file("/v1/orders/export", {})
    spec_validator("ExportsGetResponseBody").validate(export)
    if emulator.result_extra_fields:
        assert set(export["result"]) == {"url", "file_name", "expires_at"}
        assert VOUCHERIFY_TIME.match(export["result"]["expires_at"])
    else:
        assert set(export["result"]) == {"url"}


def test_foreign_download_host_fault_names_another_host_in_result_url(client, emulator):
    created = client.create("/v1/orders/export", {})
    client.wait(created["id"])
    emulator.ctx.faults.arm("foreign_download_host", 1, value="https://files.example.invalid")
    foreign = client.api("GET", f"/v1/exports/{created['id']}").json()["result"]["url"]
    usual = client.api("GET", f"/v1/exports/{created['id']}").json()["result"]["url"]
    assert foreign.startswith(f"https://files.example.invalid/v1/exports/{created['id']}?token=")
    assert usual.startswith(emulator.download_host.base_url)


def test_download_redirect_fault_answers_302_to_another_host(client, emulator):
    export, _ = client.export_file("/v1/orders/export", {})
    emulator.ctx.faults.arm("download_redirect", 1, value="https://files.example.invalid")
    redirected = client.download(export["result"]["url"], allow_redirects=False)
    assert redirected.status_code == 302
    assert redirected.headers["Location"] == f"https://files.example.invalid/v1/exports/{export['id']}.csv"
    assert client.download(export["result"]["url"]).status_code == 200


@pytest.mark.parametrize("stream_name", list(STREAMS))
def test_raw_rows_are_the_files_cells_keyed_like_the_taps_records(client, emulator, stream_name):
    path, body, partition = tap_like_request(emulator, stream_name)
    _, response = client.export_file(path, body)
    raw = emulator.raw_rows(stream_name, partition, START, END)
    expected = emulator.expected_records(stream_name, partition, START, END)
    assert raw and [set(row) for row in raw] == [set(record) for record in expected]
    keys = [record_key(name) for name in body["parameters"]["fields"]]
    from_file = [dict(zip(keys, row, strict=True)) for row in csv_rows(response.content)[1:]]
    assert [{key: row[key] for key in keys} for row in raw] == from_file
    if partition:
        assert {row["campaign_id"] for row in raw} == {partition["campaign_id"]}

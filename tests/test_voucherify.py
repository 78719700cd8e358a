"""Voucherify end to end: the tap against the emulated API over HTTP, every stream, state, faults."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import signal
import time

import pytest
import requests
from werkzeug.wrappers import Response

from commerce_sandbox.core import Host
from commerce_sandbox.server import Sandbox
from commerce_sandbox.voucherify import next_cycle_start
from tap_commerce_exports.exports import http
from tap_commerce_exports.exports.job import ExportFailed, ExportRequest
from tap_commerce_exports.sources import voucherify
from tests.harness import by_key, run_tap, start_tap_process

STREAMS = {stream.name: tuple(stream.primary_keys) for stream in voucherify.STREAM_TYPES}


def transaction_campaigns(emulator) -> list[str]:
    return emulator.campaign_ids("GIFT_VOUCHERS") + emulator.campaign_ids("LOYALTY_PROGRAM")


def expected(emulator, stream: str, **window) -> dict:
    """The sandbox's rows for a stream, all partitions, keyed like `by_key`."""
    if stream == "voucherify_campaign_transactions":
        rows = [
            row
            for campaign in transaction_campaigns(emulator)
            for row in emulator.expected_records(stream, partition={"campaign_id": campaign}, **window)
        ]
    else:
        rows = emulator.expected_records(stream, **window)
    return by_key(rows, STREAMS[stream])


def emitted(output, stream: str) -> dict:
    """The tap's records keyed like `expected`. Orders also carry `metadata` (all of it, as JSON),
    which the sandbox's expected rows leave out: it is checked against the metadata columns."""
    records = output.records(stream)
    if stream == "voucherify_orders":
        for record in records:
            metadata = record.pop("metadata") or {}
            assert metadata.get("payment_mean") == record["metadata_payment_mean"]
            assert metadata.get("channel") == record["metadata_channel"]
    return by_key(records, STREAMS[stream])


def test_full_sync_emits_every_stream_exactly_with_typed_values(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    output = run_tap(emulator.tap_config())

    assert output.error is None, output.error
    for stream in STREAMS:
        got = emitted(output, stream)
        want = expected(emulator, stream)
        assert want, f"the sandbox holds no {stream} rows"
        assert got == want, f"{stream}: records differ from the sandbox's data"
    order = output.records("voucherify_orders")[0]
    assert isinstance(order["amount"], int) and isinstance(order["total_amount"], int)
    assert dt.datetime.fromisoformat(order["updated_at"]).utcoffset() == dt.timedelta(0)
    transaction = next(r for r in output.records("voucherify_campaign_transactions") if r["details"])
    assert isinstance(transaction["details"], dict) and transaction["campaign_id"]


def test_request_bodies_match_the_published_schemas_and_write_dates_as_the_examples_do(voucherify_sandbox):
    run_tap(voucherify_sandbox.voucherify.tap_config())
    refused = [e for e in voucherify_sandbox.log.entries(host="voucherify-api") if e.status == 400]
    assert refused == []
    creates = voucherify_sandbox.log.entries(host="voucherify-api", method="POST")
    order_export = next(e for e in creates if e.path == "/v1/orders/export")
    assert "metadata.payment_mean" in order_export.body["parameters"]["fields"]
    windowed = [e for e in creates if e.body["parameters"].get("filters")]
    assert {e.path.split("/")[2] for e in windowed} == {"orders", "exports"}
    transactions = [e for e in creates if e.body.get("exported_object") == "voucher_transactions"]
    assert transactions and all("campaign_id" in e.body["parameters"]["fields"] for e in transactions)
    for entry in windowed:
        filters = {k: v for k, v in entry.body["parameters"]["filters"].items() if k != "junction"}
        ((_, clause),) = filters.items()
        assert set(clause["conditions"]) == {"$after", "$before"}
        # NOTES.md: every vendor request example writes them as one-element arrays.
        for value in clause["conditions"].values():
            assert isinstance(value, list) and len(value) == 1 and value[0].endswith("Z"), (entry.path, value)


def test_each_window_moves_the_bookmark_and_a_second_run_exports_only_new_windows(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    config = {**emulator.tap_config(), "end_date": "2024-02-01T00:00:00Z"}
    first = run_tap(config, streams={"voucherify_orders"})
    bookmark = first.final_state["bookmarks"]["voucherify_orders"]
    assert bookmark["replication_key"] == "updated_at"
    assert bookmark["replication_key_value"] == "2024-02-01T00:00:00+00:00"
    bookmarks_seen = [
        s["bookmarks"]["voucherify_orders"].get("replication_key_value")
        for s in first.states()
        if "voucherify_orders" in s.get("bookmarks", {})
    ]
    assert "2024-01-16T00:00:00+00:00" in bookmarks_seen  # the first 15-day window, before the second

    emulator.add_rows(
        "voucherify_orders",
        5,
        dt.datetime(2024, 2, 10, tzinfo=dt.timezone.utc),
        dt.datetime(2024, 2, 20, tzinfo=dt.timezone.utc),
    )
    voucherify_sandbox.log.clear()
    second = run_tap(
        {**emulator.tap_config(), "end_date": "2024-03-01T00:00:00Z"},
        state=first.final_state,
        streams={"voucherify_orders"},
    )

    created = voucherify_sandbox.log.entries(host="voucherify-api", method="POST", path_pattern="orders/export")
    afters = [e.body["parameters"]["filters"]["updated_at"]["conditions"]["$after"][0] for e in created]
    assert afters and min(afters) >= "2024-01-31T23:59:59.999Z"
    start = dt.datetime(2024, 2, 1, tzinfo=dt.timezone.utc)
    assert emitted(second, "voucherify_orders") == expected(
        emulator, "voucherify_orders", start=start, end=dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
    )
    assert len(second.records("voucherify_orders")) > 0


def test_a_killed_run_resumes_from_its_last_state_without_losing_a_row(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    config = {**emulator.tap_config(), "export_window_days": 5}
    process = start_tap_process(config)
    lines, last_state = [], None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        message = json.loads(line)
        lines.append(message)
        if message["type"] == "STATE" and "voucherify_orders" in message["value"].get("bookmarks", {}):
            last_state = message["value"]
            if last_state["bookmarks"]["voucherify_orders"].get("replication_key_value"):
                process.send_signal(signal.SIGKILL)
                break
    process.wait(timeout=30)
    assert last_state is not None, "the tap wrote no bookmark before it was killed"

    second = run_tap(config, state=last_state)
    first_rows = [m for m in lines if m["type"] == "RECORD" and m["stream"] == "voucherify_orders"]
    second.messages[:0] = first_rows
    assert emitted(second, "voucherify_orders") == expected(emulator, "voucherify_orders")


def test_an_export_that_ends_in_error_is_created_again(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    voucherify_sandbox.faults.arm("export_error", 1)
    output = run_tap(emulator.tap_config(), streams={"voucherify_orders"})

    assert output.error is None
    assert emitted(output, "voucherify_orders") == expected(emulator, "voucherify_orders")
    creates = voucherify_sandbox.log.entries(host="voucherify-api", method="POST", path_pattern="orders/export")
    windows = {json.dumps(e.body["parameters"]["filters"], sort_keys=True) for e in creates}
    assert len(creates) == len(windows) + 1
    assert "ended 'ERROR'; creating it again" in output.log_text


def test_an_export_that_keeps_failing_stops_its_stream_with_a_clear_error(voucherify_sandbox):
    voucherify_sandbox.faults.arm("export_error", -1)
    output = run_tap(voucherify_sandbox.voucherify.tap_config(), streams={"voucherify_orders"})
    assert output.error is not None
    assert "export failed 4 times" in str(output.error) and "ERROR" in str(output.error)


def test_an_export_that_never_finishes_times_out_naming_the_export_and_its_status(voucherify_sandbox):
    voucherify_sandbox.faults.arm("export_stuck", -1)
    output = run_tap(
        {**voucherify_sandbox.voucherify.tap_config(), "export_timeout_seconds": 0.5}, streams={"voucherify_orders"}
    )
    assert output.error is not None
    message = str(output.error)
    assert "voucherify_orders" in message and "export exp_" in message
    assert "was still 'IN_PROGRESS'" in message or "was still 'SCHEDULED'" in message
    assert output.records("voucherify_orders") == []


def test_a_column_the_tap_does_not_know_is_kept_and_announced_by_schema_first(voucherify_sandbox):
    voucherify_sandbox.faults.arm("new_column", 1)
    output = run_tap(voucherify_sandbox.voucherify.tap_config(), streams={"voucherify_orders"})
    assert output.error is None
    known = set(output.schemas("voucherify_orders")[0]["properties"])
    with_new = [r for r in output.records("voucherify_orders") if set(r) - known]
    assert with_new, "the new column reached no record"
    new_key = (set(with_new[0]) - known).pop()
    first_record_index = next(
        i for i, m in enumerate(output.messages) if m["type"] == "RECORD" and new_key in m["record"]
    )
    schema_index = next(
        i for i, m in enumerate(output.messages) if m["type"] == "SCHEMA" and new_key in m["schema"]["properties"]
    )
    assert schema_index < first_record_index
    assert output.messages[schema_index]["schema"]["properties"][new_key]["type"] == ["string", "null"]


def test_credentials_never_appear_in_output_or_logs(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    voucherify_sandbox.faults.arm("url_expired", 1)
    voucherify_sandbox.faults.arm("server_error", 2)
    output = run_tap(emulator.tap_config())
    text = output.text()
    assert emulator.tap_config()["voucherify_app_token"] not in text
    for entry in voucherify_sandbox.log.entries(host="voucherify-download"):
        token = entry.query.get("token")
        if token:
            assert token not in text


def test_streams_are_discovered_only_when_credentials_are_set(voucherify_sandbox):
    from tap_commerce_exports.tap import TapCommerceExports
    from tests.harness import FAST_SETTINGS

    with_credentials = TapCommerceExports(config={**FAST_SETTINGS, **voucherify_sandbox.voucherify.tap_config()})
    assert set(STREAMS) <= set(with_credentials.streams)
    # Another source alone (a tap with no source at all is a configuration error).
    other_source = {**FAST_SETTINGS, "intelligems_api_token": "token"}
    without = TapCommerceExports(config=other_source, parse_env_config=False)
    assert without.streams and not any(name.startswith("voucherify_") for name in without.streams)


def test_plain_http_is_refused_for_hosts_other_than_loopback():
    from tap_commerce_exports.sources.base import ConfigError
    from tap_commerce_exports.tap import TapCommerceExports
    from tests.harness import FAST_SETTINGS

    config = {
        **FAST_SETTINGS,
        "voucherify_app_id": "a",
        "voucherify_app_token": "b",
        "voucherify_api_url": "http://api.voucherify.io",
    }
    with pytest.raises(ConfigError, match=r"voucherify_api_url.*plain http"):
        TapCommerceExports(config=config)


def test_exports_started_but_not_read_are_remembered_in_state_and_resumed(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    config = {**emulator.tap_config(), "export_window_days": 10}
    first = run_tap(config, streams={"voucherify_orders"})
    remembered = [
        s["bookmarks"]["voucherify_orders"]["exports_in_flight"]
        for s in first.states()
        if s.get("bookmarks", {}).get("voucherify_orders", {}).get("exports_in_flight")
    ]
    assert remembered, "no STATE named the exports running ahead of the reader"
    # A state from the middle of the run: its bookmark and the exports it says are in flight.
    middle = next(
        s
        for s in first.states()
        if s.get("bookmarks", {}).get("voucherify_orders", {}).get("exports_in_flight")
        and s["bookmarks"]["voucherify_orders"].get("replication_key_value")
    )
    in_flight = {item["export_id"] for item in middle["bookmarks"]["voucherify_orders"]["exports_in_flight"]}
    voucherify_sandbox.log.clear()

    second = run_tap(config, state=middle, streams={"voucherify_orders"})
    assert second.error is None
    polled = {e.path.rsplit("/", 1)[-1] for e in voucherify_sandbox.log.entries(host="voucherify-api", method="GET")}
    assert in_flight <= polled
    assert "resuming export" in second.log_text
    remembered_starts = {
        dt.datetime.fromisoformat(item["window_start"])
        for item in middle["bookmarks"]["voucherify_orders"]["exports_in_flight"]
    }
    created_starts = {
        dt.datetime.fromisoformat(
            e.body["parameters"]["filters"]["updated_at"]["conditions"]["$after"][0].replace("Z", "+00:00")
        )
        + dt.timedelta(milliseconds=1)
        for e in voucherify_sandbox.log.entries(host="voucherify-api", method="POST")
    }
    assert not remembered_starts & created_starts, "a remembered export was paid for again"
    assert emitted(second, "voucherify_orders") == expected(
        emulator, "voucherify_orders", start=middle["bookmarks"]["voucherify_orders"]["replication_key_value"]
    )


# ------------------------------------------------- rate limits (NOTES.md, guides/limits)

ONE_WINDOW = 60  # days: the whole data period in one export, so API calls come one after another
FAST_EXPORTS = 0.05  # seconds before an emulated export is ready
WAIT_LOGGED = re.compile(r"voucherify: rate limited[^\n]*?, waiting (\d+(?:\.\d+)?)s as the API asked")


def test_a_429_without_retry_after_is_waited_until_the_unix_time_x_rate_limit_retry_names(every_seed):
    """X-Rate-Limit-Retry is the Unix time of the next allowed call, not a delay; Retry-After is optional.
    Over every seed: they write that time in whole seconds or in milliseconds, with or without the type."""
    with Sandbox(("voucherify",), seed=every_seed, export_latency_seconds=FAST_EXPORTS) as sandbox:
        emulator = sandbox.voucherify
        emulator.sends_retry_after = False
        sandbox.faults.arm("rate_limit", 2, value=0.6)  # blocks the API 0.6 s from each 429
        output = run_tap({**emulator.tap_config(), "export_window_days": ONE_WINDOW}, streams={"voucherify_orders"})

        assert output.error is None, output.error
        assert emitted(output, "voucherify_orders") == expected(emulator, "voucherify_orders")
        # A call made before the named time would meet the block and be refused again.
        assert [e.status for e in sandbox.log.entries(host="voucherify-api")].count(429) == 2
    waits = [float(wait) for wait in WAIT_LOGGED.findall(output.log_text)]
    # 0.6 s, or up to a second more where the time is written in whole seconds (rounded up)
    assert len(waits) == 2 and all(0.4 <= wait <= 1.7 for wait in waits), waits


def test_a_per_minute_plan_limit_is_met_by_pacing_not_by_a_storm_of_429s(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    emulator.requests_per_minute = 5  # a Business plan's 100/minute, shrunk to fit a test
    emulator.rate_window_seconds = 2.0
    streams = {"voucherify_orders", "voucherify_vouchers", "voucherify_customers"}
    output = run_tap(emulator.tap_config(), streams=streams)

    assert output.error is None, output.error
    for stream in streams:
        assert emitted(output, stream) == expected(emulator, stream), stream
    admitted = [e for e in voucherify_sandbox.log.entries(host="voucherify-api") if e.status != 429]
    assert len(admitted) > 2 * emulator.requests_per_minute, "the run fit in two windows: nothing needed pacing"
    assert emulator.rate_limited <= 3, f"{emulator.rate_limited} calls were answered 429"


PACER_WAIT_LOGGED = re.compile(
    r"voucherify: the API's request budget is spent; GET \S+ waits (\d+\.\d)s, until (\S+Z), for it to renew"
)


def test_a_pacer_wait_within_max_rate_limit_wait_seconds_is_waited_out_and_logged_with_its_end(
    voucherify_sandbox, monkeypatch
):
    """A Sandbox project's 100 calls an hour, shrunk to 2 calls per 2 s: once the budget is spent, the next
    call waits for the window to end (under the setting), and the log says until when, date included."""
    monkeypatch.setattr(http, "PACING_NOTICE_SECONDS", 0.5)  # waits this short are logged too
    emulator = voucherify_sandbox.voucherify
    emulator.use_plan("sandbox")
    emulator.requests_per_minute, emulator.rate_window_seconds = 2, 2.0
    time.sleep(2.0 - time.time() % 2.0)  # start with a window, so the first wait is about as long as one
    config = {**emulator.tap_config(), "export_window_days": ONE_WINDOW, "max_rate_limit_wait_seconds": 5}
    output = run_tap(config, streams={"voucherify_orders"})

    assert output.error is None, output.error
    assert emitted(output, "voucherify_orders") == expected(emulator, "voucherify_orders")
    assert emulator.rate_limited == 0, "a call went before the budget renewed"
    waits = PACER_WAIT_LOGGED.findall(output.log_text)
    assert waits and all(0.5 <= float(seconds) <= 2.0 for seconds, _ in waits), waits
    arrivals = [entry.at for entry in voucherify_sandbox.log.entries(host="voucherify-api")]
    for _, until in waits:  # to the second: the next call came once that moment had passed, and soon
        ends = dt.datetime.fromisoformat(until.replace("Z", "+00:00")).timestamp()
        assert 0 <= min(at for at in arrivals if at >= ends) - ends < 1.5


def test_a_spent_billing_cycle_quota_ends_the_run_at_once_instead_of_waiting_for_next_month(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    voucherify_sandbox.faults.arm("quota_exhausted")
    started = time.monotonic()
    output = run_tap(emulator.tap_config(), streams={"voucherify_orders"})

    assert output.error is not None
    assert time.monotonic() - started < 30
    assert 1 <= emulator.rate_limited <= 3, f"{emulator.rate_limited} calls were answered 429"
    text = f"{output.error}\n{output.log_text}"
    reset = dt.datetime.fromtimestamp(next_cycle_start(time.time()), dt.timezone.utc)
    assert reset.strftime("%Y-%m-%dT%H:%M") in text, "the error does not say when the quota resets"
    if emulator.sends_rate_limit_type:
        assert "api_calls_cycle" in text
    assert output.records("voucherify_orders") == []


# ------------------------------------------- credentials go only to Voucherify's hosts


def _refusal(api_url: str, file_url: str) -> str | None:
    """What the tap does with a DONE export whose result.url is `file_url`: None, or its error."""
    api = voucherify.build_api(
        {"voucherify_api_url": api_url, "voucherify_app_id": "app", "voucherify_app_token": "secret"},
        logging.getLogger("test"),
    )
    request = ExportRequest("voucherify_orders", "order", None)
    try:
        handle = api._handle(request, {"id": "exp_1", "status": "DONE", "result": {"url": file_url}})
        assert api.file_url(request, handle) == file_url
    except ExportFailed as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    ("api_url", "file_url"),
    [
        ("https://api.voucherify.io", "https://download.voucherify.io/v1/exports/exp_1?token=t"),
        ("https://us1.api.voucherify.io", "https://us1.download.voucherify.io/v1/exports/exp_1?token=t"),
        ("https://as1.api.voucherify.io", "https://as1.download.voucherify.io/v1/exports/exp_1?token=t"),
        ("https://api.voucherify.io", "https://API.voucherify.io./v1/exports/exp_1?token=t"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:6000/v1/exports/exp_1?token=t"),
        ("http://127.0.0.1:5000", "http://localhost:6000/v1/exports/exp_1?token=t"),
        ("http://127.0.0.1:5000", "http://127.0.0.2:6000/v1/exports/exp_1?token=t"),
    ],
)
def test_file_urls_on_the_clusters_own_hosts_are_accepted(api_url, file_url):
    assert _refusal(api_url, file_url) is None


@pytest.mark.parametrize(
    ("api_url", "file_url", "host"),
    [
        ("https://us1.api.voucherify.io", "https://download.voucherify.io/v1/exports/exp_1?token=t", "download"),
        ("https://api.voucherify.io", "http://download.voucherify.io/v1/exports/exp_1?token=t", "download"),
        ("https://api.voucherify.io", "https://download.voucherify.io.evil.example/x?token=t", "evil.example"),
        ("https://api.voucherify.io", "https://download.voucherify.io@evil.example/x?token=t", "evil.example"),
        ("https://api.voucherify.io", "https://evil.example\\@download.voucherify.io/x?token=t", "evil.example"),
        ("https://api.voucherify.io", "https://bucket.s3.amazonaws.com/f.csv?X-Amz-Signature=t", "s3.amazonaws"),
        ("https://api.voucherify.io", "/v1/exports/exp_1?token=t", "none"),
        ("http://127.0.0.1:5000", "https://download.voucherify.io/v1/exports/exp_1?token=t", "download"),
    ],
)
def test_file_urls_on_any_other_host_are_refused_before_any_credential_is_sent(api_url, file_url, host):
    refusal = _refusal(api_url, file_url)
    assert refusal is not None and host in refusal
    assert "no credentials were sent" in refusal and "exp_1" in refusal and "voucherify_orders" in refusal
    assert "token=" not in refusal and "X-Amz" not in refusal and "secret" not in refusal


FOREIGN = "http://files.example.invalid"  # never resolves (RFC 6761); the trap below answers for it


@pytest.fixture
def foreign_trap(voucherify_sandbox, monkeypatch):
    """Every request to a host but 127.0.0.1 goes to this "proxy", which logs it with its headers
    (as host "trap"): had the tap sent anything to a foreign host, the log shows it, and nothing
    leaves the machine either way."""
    trap = Host("trap", voucherify_sandbox.log)
    trap.route("/<path:anything>", ["GET"], lambda request, anything: Response("a,b\r\n", mimetype="text/plain"))
    trap.start()
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, trap.base_url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1")
    assert requests.get(f"{FOREIGN}/probe", timeout=5).text == "a,b\r\n"  # the trap works
    voucherify_sandbox.log.clear()
    yield trap
    trap.stop()


def hosts_that_got_credentials(sandbox) -> set[str]:
    return {e.host for e in sandbox.log.entries() if "x-app-token" in e.headers or "x-app-id" in e.headers}


def test_a_done_export_whose_url_names_another_host_fails_its_window_and_gets_no_credentials(
    voucherify_sandbox, foreign_trap
):
    emulator = voucherify_sandbox.voucherify
    voucherify_sandbox.faults.arm("foreign_download_host", -1, value=FOREIGN)
    output = run_tap({**emulator.tap_config(), "export_window_days": ONE_WINDOW}, streams={"voucherify_orders"})

    assert output.error is not None
    text = f"{output.error}\n{output.log_text}"
    assert "'files.example.invalid'" in text and "no credentials were sent" in text
    assert "token=" not in text
    assert output.records("voucherify_orders") == []
    assert voucherify_sandbox.log.entries(host="trap") == []
    assert voucherify_sandbox.log.entries(host="voucherify-download") == []
    assert hosts_that_got_credentials(voucherify_sandbox) == {"voucherify-api"}


def test_a_download_redirected_to_another_host_takes_no_credentials_there(voucherify_sandbox, foreign_trap):
    """requests keeps custom headers across hosts (it strips only Authorization): the downloader does not
    follow a redirect of a file host that needs the API's credentials."""
    emulator = voucherify_sandbox.voucherify
    voucherify_sandbox.faults.arm("download_redirect", 1, value=FOREIGN)
    output = run_tap({**emulator.tap_config(), "export_window_days": ONE_WINDOW}, streams={"voucherify_orders"})

    assert voucherify_sandbox.faults.fired["download_redirect"] == 1
    assert hosts_that_got_credentials(voucherify_sandbox) <= {"voucherify-api", "voucherify-download"}
    assert voucherify_sandbox.log.entries(host="trap") == []
    # Not followed, and not retried with a new export (it would be redirected again): the window fails.
    assert "redirected to" in str(output.error) and "not followed" in str(output.error)
    assert len(voucherify_sandbox.log.entries(method="POST")) == 1
    assert output.records("voucherify_orders") == []

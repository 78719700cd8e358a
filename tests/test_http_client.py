"""The HTTP client alone: rate-limit headers read as NOTES.md documents them, budgets, stopping, secrets.

A small scripted HTTP server on 127.0.0.1 answers each request with the next status and headers of
its script (headers may be computed when the request arrives, for "now + 1 s" Unix times) and
records what it received. The pacer is also driven directly with an injected clock, so its
arithmetic is checked without sleeping. Wall-clock assertions are generous bounds only.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from tap_commerce_exports.exports import pacing
from tap_commerce_exports.exports.http import (
    MIN_RATE_LIMIT_WAIT,
    ApiClient,
    ApiError,
    QuotaExhausted,
    RateLimitWaitTooLong,
    install_log_redaction,
    rate_limit_answer,
    rate_limit_wait,
    reported_budget,
)
from tap_commerce_exports.exports.pacing import PacerWaitTooLong, RequestPacer

APP_TOKEN = "app-token-5ecret-4f1c9e"
SIGNED_QUERY = "sig-5ecret-77d0b2"
FAR_RESET = datetime(2099, 12, 31, tzinfo=timezone.utc)
ENDS_SOON = 2.0  # "within ~1 s" of setting stopping, as a generous bound
#: How logs and errors write a wait's end: a full UTC date-time, since a per-hour wait may end tomorrow.
ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"

Headers = dict[str, str] | Callable[[], dict[str, str]]


# ------------------------------------------------------------------ scripted server


@dataclass
class Answer:
    status: int = 200
    headers: Headers | None = None
    body: Any = None


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    at: float  # time.time() on arrival


class ScriptedServer:
    """Answers with `script` in order (the last answer repeats) and keeps every request it received."""

    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"

    def answer(self, *answers: Answer) -> None:
        self.script = list(answers)

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < count:
            assert time.monotonic() < deadline, f"the server saw {self.count()} requests, not {count}"
            time.sleep(0.01)

    def _next(self, request: Received) -> Answer:
        with self._lock:
            self.received.append(request)
            if len(self.script) > 1:
                return self.script.pop(0)
            return self.script[0] if self.script else Answer()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._serve()

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                arrived = Received(self.command, parts.path, parse_qs(parts.query), dict(self.headers), time.time())
                answer = server._next(arrived)
                headers = answer.headers() if callable(answer.headers) else dict(answer.headers or {})
                body = json.dumps(answer.body if answer.body is not None else {"ok": True}).encode()
                self.send_response(answer.status)
                for name, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> ScriptedServer:
        threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def server():
    with ScriptedServer() as running:
        yield running


@pytest.fixture
def client(server):
    return make_client(server)


def make_client(server: ScriptedServer, **fields: Any) -> ApiClient:
    return ApiClient(
        api_name="voucherify",
        base_url=server.url,
        credential_headers={"X-App-Token": APP_TOKEN},
        logger=logging.getLogger("tests.http_client"),
        **fields,
    )


def in_background(call: Callable[[], Any]) -> Future:
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def unix_in(seconds: int) -> float:
    """A whole Unix second about `seconds` from now (half a second either way): the header has no decimals."""
    return float(math.ceil(time.time() + seconds - 0.5))


def waits_logged(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [float(w) for w in re.findall(rf"waiting (\d+\.\d)s as the API asked, until {ISO_UTC}", caplog.text)]


def retried_at(server: ScriptedServer, retry_at: float) -> None:
    """The second request came once `retry_at` had passed, and not long after (the floor aside)."""
    assert server.count() == 2
    sent = server.received[1].at
    assert retry_at - 0.05 <= sent < max(retry_at, server.received[0].at + MIN_RATE_LIMIT_WAIT) + 3.0, (
        f"retried {sent - retry_at:+.2f}s from the time the API gave"
    )


# ------------------------------------------------------------ reading the headers

NOW = 1_800_000_000.0


def test_x_rate_limit_retry_is_a_unix_time_in_seconds():
    answer = rate_limit_answer(CaseInsensitiveDict({"X-Rate-Limit-Retry": f"{NOW + 41.5:.1f}"}), now=NOW)
    assert answer.wait_seconds == pytest.approx(41.5)
    assert answer.header == "X-Rate-Limit-Retry"
    assert answer.retry_at == datetime.fromtimestamp(NOW + 41.5, tz=timezone.utc)


def test_a_retry_time_already_past_waits_only_the_floor():
    answer = rate_limit_answer(CaseInsensitiveDict({"X-Rate-Limit-Retry": f"{NOW - 5:.0f}"}), now=NOW)
    assert answer.wait_seconds == MIN_RATE_LIMIT_WAIT


def test_retry_after_wins_over_the_other_headers_in_seconds_or_as_an_http_date():
    others = {"X-Rate-Limit-Retry": f"{NOW + 600:.0f}", "x-ratelimit-reset": f"{(NOW + 900) * 1000:.0f}"}
    assert rate_limit_wait(CaseInsensitiveDict({"Retry-After": "7", **others}), now=NOW) == (7.0, "Retry-After")
    http_date = "Fri, 15 Jan 2027 08:00:30 GMT"
    now = datetime(2027, 1, 15, 8, 0, 0, tzinfo=timezone.utc).timestamp()
    assert rate_limit_wait(CaseInsensitiveDict({"Retry-After": http_date, **others}), now=now) == (30.0, "Retry-After")


def test_an_unreadable_retry_after_falls_back_to_the_next_header():
    headers = CaseInsensitiveDict({"Retry-After": "soon", "X-Rate-Limit-Retry": f"{NOW + 3:.0f}"})
    assert rate_limit_wait(headers, now=NOW) == (3.0, "X-Rate-Limit-Retry")


def test_intelligems_reset_is_epoch_milliseconds():
    headers = CaseInsensitiveDict({"x-ratelimit-reset": f"{(NOW + 2.5) * 1000:.0f}"})
    assert rate_limit_wait(headers, now=NOW) == (pytest.approx(2.5), "x-ratelimit-reset")


def test_an_absurd_retry_time_is_a_wait_too_long_not_a_crash():
    answer = rate_limit_answer(CaseInsensitiveDict({"X-Rate-Limit-Retry": "1e300"}), now=NOW)
    assert answer.wait_seconds > 1e200 and answer.resume_at.year == 9999


def test_a_429_without_any_wait_header_waits_one_second_and_says_the_api_did_not_ask():
    answer = rate_limit_answer(CaseInsensitiveDict({"X-Rate-Limit-Type": "api_calls"}), now=NOW)
    assert (answer.wait_seconds, answer.header, answer.limit_type) == (1.0, None, "api_calls")


def response_with(headers: dict[str, str]) -> requests.Response:
    response = requests.Response()
    response.headers = CaseInsensitiveDict(headers)
    return response


def test_the_reported_budget_of_each_api():
    intelligems = {"x-ratelimit-limit": "20", "x-ratelimit-remaining": "3", "x-ratelimit-reset": f"{(NOW + 4) * 1000}"}
    assert reported_budget(response_with(intelligems), now=NOW) == (3, pytest.approx(4.0), 20, False)
    voucherify = {"X-Rate-Limit-Limit": "100", "X-Rate-Limit-Remaining": "9", "X-Rate-Limit-Retry": f"{NOW + 30:.0f}"}
    assert reported_budget(response_with(voucherify), now=NOW) == (9, 30.0, 100, True)  # one budget per plan
    # A retry time not in the future says nothing about the window's end: the reset is unknown.
    voucherify["X-Rate-Limit-Retry"] = f"{NOW:.0f}"
    assert reported_budget(response_with(voucherify), now=NOW) == (9, None, 100, True)
    assert reported_budget(response_with({"Retry-After": "1"}), now=NOW) == (None, None, None, False)


# ------------------------------------------------------------------- 429 over HTTP


def test_a_429_with_x_rate_limit_retry_one_second_ahead_is_retried_after_about_a_second(server, client, caplog):
    caplog.set_level(logging.INFO)
    retry_at = unix_in(1)
    server.answer(Answer(429, {"X-Rate-Limit-Retry": f"{retry_at:.0f}"}), Answer(200))

    assert client.get("/v1/exports/exp_1") == {"ok": True}
    retried_at(server, retry_at)
    assert len(waits_logged(caplog)) == 1 and waits_logged(caplog)[0] <= 1.6


def test_retry_after_wins_when_present(server, client):
    far = {"X-Rate-Limit-Retry": f"{unix_in(600):.0f}", "x-ratelimit-reset": f"{unix_in(600) * 1000:.0f}"}
    server.answer(Answer(429, {"Retry-After": "1", **far}), Answer(200))

    assert client.get("/v1/exports") == {"ok": True}
    assert server.count() == 2
    assert 0.95 <= server.received[1].at - server.received[0].at < 4.0


def test_an_intelligems_429_waits_for_x_ratelimit_reset_in_milliseconds(server, client):
    reset = time.time() + 0.5
    server.answer(Answer(429, {"x-ratelimit-reset": f"{reset * 1000:.0f}"}), Answer(200))

    assert client.post("/v25-10-beta/orders/export", body={}) == {"ok": True}
    retried_at(server, reset)


def test_the_wait_is_logged_with_the_limit_type_and_its_end_in_utc(server, client, caplog):
    caplog.set_level(logging.INFO)
    server.answer(Answer(429, {"Retry-After": "0.3", "X-Rate-Limit-Type": "api_calls"}), Answer(200))

    client.get("/v1/exports")
    assert re.search(
        rf"voucherify: rate limited \(api_calls\), waiting 0\.3s as the API asked, until {ISO_UTC}", caplog.text
    )


def test_the_billing_cycle_quota_raises_after_one_request_naming_limit_and_reset(server, client):
    quota = {"X-Rate-Limit-Type": "api_calls_cycle", "X-Rate-Limit-Retry": f"{FAR_RESET.timestamp():.0f}"}
    server.answer(Answer(429, {**quota, "Retry-After": "1"}))

    started = time.monotonic()
    with pytest.raises(QuotaExhausted) as raised:
        client.post("/v1/exports", body={})
    assert time.monotonic() - started < 1.0, "the quota was waited for"
    assert server.count() == 1
    message = str(raised.value)
    assert message.startswith("voucherify: ")
    assert "X-Rate-Limit-Type: api_calls_cycle" in message and "2099-12-31T00:00:00Z" in message
    assert (raised.value.api_name, raised.value.limit_type, raised.value.resets_at) == (
        "voucherify",
        "api_calls_cycle",
        FAR_RESET,
    )
    assert isinstance(raised.value, ApiError) and raised.value.status == 429
    assert str(pickle.loads(pickle.dumps(raised.value))) == message  # crosses process pools intact
    # The quota stays spent: later calls are refused without being sent.
    with pytest.raises(QuotaExhausted):
        client.get("/v1/exports")
    assert server.count() == 1


def test_a_quota_without_a_reset_time_says_so(server, client):
    server.answer(Answer(429, {"X-Rate-Limit-Type": "api_calls_cycle"}))
    with pytest.raises(QuotaExhausted, match="did not say when it resets") as raised:
        client.get("/v1/exports")
    assert raised.value.resets_at is None


def test_a_wait_longer_than_max_rate_limit_wait_seconds_raises_at_once(server):
    client = make_client(server, max_rate_limit_wait_seconds=5.0)
    server.answer(Answer(429, {"Retry-After": "3600", "X-Rate-Limit-Type": "api_calls"}))

    started = time.monotonic()
    with pytest.raises(RateLimitWaitTooLong) as raised:
        client.get("/v1/exports")
    assert time.monotonic() - started < 1.0, "the long wait was started"
    assert server.count() == 1
    message = str(raised.value)
    assert message.startswith("voucherify: GET ") and "/v1/exports" in message
    assert "3600.0s" in message and "max_rate_limit_wait_seconds (5s)" in message and "(api_calls)" in message
    assert re.search(rf"until {ISO_UTC}", message)
    assert raised.value.wait_seconds == 3600.0
    assert str(pickle.loads(pickle.dumps(raised.value))) == message
    # The API refuses calls until then: later calls give up the same way without being sent.
    with pytest.raises(RateLimitWaitTooLong, match="max_rate_limit_wait_seconds"):
        client.post("/v1/exports", body={})
    assert server.count() == 1


def wait_for_text(caplog: pytest.LogCaptureFixture, text: str) -> None:
    deadline = time.monotonic() + ENDS_SOON
    while text not in caplog.text:
        assert time.monotonic() < deadline, f"nothing logged {text!r}"
        time.sleep(0.01)


def test_the_default_max_wait_waits_out_an_hour_long_voucherify_window_but_no_longer_one(server, client, caplog):
    """A Sandbox project's 100 calls per hour (NOTES.md): a 429 may ask for up to an hour."""
    caplog.set_level(logging.INFO)
    server.answer(Answer(429, {"X-Rate-Limit-Retry": f"{unix_in(3600):.0f}"}))
    call = in_background(lambda: client.get("/v1/exports"))
    wait_for_text(caplog, "as the API asked")
    client.stopping.set()
    with pytest.raises(ApiError, match="not sent: the run is stopping"):
        call.result(timeout=ENDS_SOON)
    assert waits_logged(caplog) == [pytest.approx(3600, abs=1.5)]

    server.answer(Answer(429, {"X-Rate-Limit-Retry": f"{unix_in(3700):.0f}"}))
    with pytest.raises(RateLimitWaitTooLong, match="max_rate_limit_wait_seconds \\(3660s\\)"):
        make_client(server).get("/v1/exports")
    assert server.count() == 2


def spent_for(seconds: int) -> dict[str, str]:
    """A Voucherify answer whose budget is spent until `seconds` from now."""
    return {"X-Rate-Limit-Limit": "100", "X-Rate-Limit-Remaining": "0", "X-Rate-Limit-Retry": f"{unix_in(seconds):.0f}"}


def test_a_pacer_wait_longer_than_max_rate_limit_wait_seconds_raises_at_once_naming_the_budget(server):
    """The issue: with the budget spent for the hour the tap logged a 35381.6s wait and hung."""
    client = make_client(server, max_rate_limit_wait_seconds=5.0)
    server.answer(Answer(200, spent_for(3600)))
    client.get("/v1/exports/exp_1")

    started = time.monotonic()
    with pytest.raises(RateLimitWaitTooLong) as raised:
        client.get("/v1/exports/exp_2")
    assert time.monotonic() - started < 1.0, "the long wait was started"
    assert server.count() == 1
    message = str(raised.value)
    assert message.startswith("voucherify: GET ") and "/v1/exports/exp_2 is rate limited" in message
    assert "request budget (limit: 100) is spent and renews in 3" in message
    assert re.search(
        rf"renews in \d+\.\ds, until {ISO_UTC}; that is longer than max_rate_limit_wait_seconds \(5s\)", message
    )
    assert "raise that setting to wait it out" in message
    assert raised.value.stops_source and raised.value.status == 429
    assert str(pickle.loads(pickle.dumps(raised.value))) == message


def test_an_hour_long_pacer_wait_is_begun_under_the_default_and_logged_with_its_date(server, client, caplog):
    caplog.set_level(logging.INFO)
    server.answer(Answer(200, spent_for(3600)))
    client.get("/v1/exports/exp_1")
    call = in_background(lambda: client.get("/v1/exports/exp_2"))
    wait_for_text(caplog, "request budget is spent")
    client.stopping.set()
    with pytest.raises(ApiError, match="not sent: the run is stopping"):
        call.result(timeout=ENDS_SOON)
    assert server.count() == 1
    waits = re.findall(rf"exp_2 waits (\d+\.\d)s, until {ISO_UTC}, for it to renew", caplog.text)
    assert [float(wait) for wait in waits] == [pytest.approx(3600, abs=1.5)]


def test_the_total_time_rate_limited_is_capped(server):
    client = make_client(server, max_rate_limited_seconds=0.5)
    server.answer(Answer(429, {"Retry-After": "0.3"}))
    with pytest.raises(ApiError, match="still rate limited"):
        client.get("/v1/exports")
    assert server.count() == 2


# ---------------------------------------------------------------------- stopping


def test_stopping_ends_a_long_rate_limit_wait(server, client):
    server.answer(Answer(429, {"Retry-After": "60"}))
    call = in_background(lambda: client.get("/v1/exports"))
    server.wait_for_requests(1)
    time.sleep(0.2)
    client.stopping.set()

    with pytest.raises(ApiError, match=r"voucherify: GET .*/v1/exports not sent: the run is stopping"):
        call.result(timeout=ENDS_SOON)
    assert server.count() == 1


def test_stopping_ends_a_pacer_wait_before_anything_is_sent(server, client):
    client.pacer.done("GET", remaining=0, reset_in=60.0)  # the API said: nothing left for a minute
    call = in_background(lambda: client.get("/v1/exports"))
    time.sleep(0.3)
    assert server.count() == 0
    client.stopping.set()

    with pytest.raises(ApiError, match="not sent: the run is stopping"):
        call.result(timeout=ENDS_SOON)
    assert server.count() == 0


def test_stopping_ends_the_backoff_between_retries_of_5xx(server, caplog):
    caplog.set_level(logging.INFO)
    client = make_client(server, retry_backoff_factor=30.0, max_backoff_seconds=60.0, retry_jitter=lambda s: s)
    server.answer(Answer(500))
    call = in_background(lambda: client.get("/v1/exports"))
    server.wait_for_requests(1)
    time.sleep(0.2)
    client.stopping.set()

    with pytest.raises(ApiError, match="not sent: the run is stopping"):
        call.result(timeout=ENDS_SOON)
    assert server.count() == 1
    assert "failed (HTTP 500), retry 1 of 7 in 30.0s" in caplog.text


def test_5xx_are_retried_then_given_up_after_max_tries(server):
    client = make_client(server, max_tries=3, retry_jitter=lambda s: 0.0)
    server.answer(Answer(500), Answer(502), Answer(503))
    with pytest.raises(ApiError, match="failed after 3 tries: HTTP 503"):
        client.get("/v1/exports")
    assert server.count() == 3


def test_a_pacer_wait_returns_without_a_turn_when_stopping_is_set():
    pacer = RequestPacer(None)
    pacer.done("POST", remaining=0, reset_in=60.0)
    stopping = threading.Event()
    turn = in_background(lambda: pacer.wait_turn("POST", stopping=stopping))
    time.sleep(0.2)
    assert not turn.done()
    stopping.set()
    assert turn.result(timeout=ENDS_SOON) is False


# ---------------------------------------------------------------- budget pacing


def test_at_zero_voucherify_budget_the_next_call_waits_for_the_reset(server, client):
    reset = unix_in(1)
    spent = {"X-Rate-Limit-Limit": "100", "X-Rate-Limit-Remaining": "0", "X-Rate-Limit-Retry": f"{reset:.0f}"}
    server.answer(Answer(200, spent), Answer(200, {"X-Rate-Limit-Limit": "100", "X-Rate-Limit-Remaining": "99"}))

    client.get("/v1/exports/exp_1")
    second = in_background(lambda: client.get("/v1/exports/exp_2"))
    time.sleep(max(0.0, reset - time.time() - 0.3))
    assert server.count() == 1, "sent before the reported budget renewed"
    second.result(timeout=5.0)
    assert server.count() == 2
    assert server.received[1].at >= reset - 0.05


def test_at_zero_intelligems_budget_the_next_export_waits_for_the_reset(server, client):
    reset = time.time() + 0.5
    spent = {"x-ratelimit-limit": "20", "x-ratelimit-remaining": "0", "x-ratelimit-reset": f"{reset * 1000:.0f}"}
    server.answer(Answer(200, spent), Answer(200))

    client.post("/orders/export", body={})
    client.post("/orders/export", body={})
    assert server.count() == 2
    assert server.received[1].at >= reset - 0.05


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def turn_times(pacer: RequestPacer, clock: FakeClock, turns: int, kind: str = "") -> list[float]:
    """When each of `turns` callers gets its turn, the clock jumping over every wait."""
    times: list[float] = []
    while len(times) < turns:
        wait = pacer.try_turn(kind)
        if wait > 0:
            clock.now += wait
        else:
            times.append(round(clock.now, 6))
    return times


def test_a_low_budget_is_spread_evenly_until_the_reset():
    clock = FakeClock()
    pacer = RequestPacer(None, clock=clock)
    pacer.done("GET", remaining=5, reset_in=10.0, limit=100)  # 5 of 100 left: under 10%
    assert turn_times(pacer, clock, 5, "GET") == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert pacer.try_turn("GET") == pytest.approx(2.0)  # spent: the next waits for the reset


def test_a_healthy_budget_is_not_spread():
    clock = FakeClock()
    pacer = RequestPacer(None, clock=clock)
    pacer.done("GET", remaining=50, reset_in=10.0, limit=100)
    assert turn_times(pacer, clock, 5, "GET") == [0.0] * 5


def test_requests_in_flight_are_taken_off_the_reported_budget():
    clock = FakeClock()
    pacer = RequestPacer(None, clock=clock)
    assert turn_times(pacer, clock, 3, "POST") == [0.0, 0.0, 0.0]
    pacer.done("POST", remaining=3, reset_in=10.0)  # two requests still in flight: one left
    assert pacer.try_turn("POST") == 0.0
    assert pacer.try_turn("POST") == pytest.approx(10.0)


def test_budgets_are_per_kind_of_call():
    clock = FakeClock()
    pacer = RequestPacer(None, clock=clock)
    pacer.done("POST", remaining=0, reset_in=30.0)
    assert pacer.try_turn("GET") == 0.0
    assert pacer.try_turn("POST") == pytest.approx(30.0)


def test_a_shared_budget_counts_every_kind_of_call():
    clock = FakeClock()
    pacer = RequestPacer(None, clock=clock)
    assert pacer.try_turn("GET") == 0.0 and pacer.try_turn("POST") == 0.0
    pacer.done("GET", remaining=2, reset_in=30.0, limit=100, shared=True)  # the POST is still in flight
    assert pacer.try_turn("GET") == 0.0
    assert pacer.try_turn("POST") == pytest.approx(30.0)
    assert pacer.try_turn("GET") == pytest.approx(30.0)


def test_a_late_answer_with_a_higher_count_does_not_raise_a_voucherify_window_budget():
    clock = FakeClock()
    pacer = RequestPacer(None, clock=clock)
    assert turn_times(pacer, clock, 3, "GET") == [0.0] * 3
    pacer.done("GET", remaining=0, reset_in=5.0, limit=10, shared=True)  # the last the API counted
    pacer.done("GET", remaining=2, reset_in=None, limit=10, shared=True)  # counted before it, answered after
    pacer.done("GET", remaining=1, reset_in=None, limit=10, shared=True)
    assert pacer.try_turn("GET") == pytest.approx(5.0)
    clock.now = 5.0  # a new window: one request learns its budget
    assert pacer.try_turn("GET") == 0.0
    assert pacer.try_turn("GET") > 0
    pacer.done("GET", remaining=9, reset_in=None, limit=10, shared=True)
    assert turn_times(pacer, clock, 9, "GET") == [5.0] * 9
    assert pacer.try_turn("GET") > 0


def test_an_intelligems_answer_to_an_older_turn_does_not_replace_a_newer_count():
    clock = FakeClock()
    pacer = RequestPacer(None, clock=clock)
    first, second = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)
    assert first.submit(pacer.try_turn, "POST").result() == 0.0
    assert second.submit(pacer.try_turn, "POST").result() == 0.0
    second.submit(pacer.done, "POST", 3, 10.0).result()
    first.submit(pacer.done, "POST", 4, 10.0).result()  # sent first, answered last: an older count
    first.shutdown()
    second.shutdown()
    assert turn_times(pacer, clock, 3, "POST") == [0.0] * 3
    assert pacer.try_turn("POST") == pytest.approx(10.0)


def test_a_spent_budget_with_no_known_reset_lets_one_request_at_a_time_through():
    clock = FakeClock()
    pacer = RequestPacer(None, clock=clock)
    pacer.done("GET", remaining=0, reset_in=None, limit=100)
    assert pacer.try_turn("GET") == 0.0  # its answer renews the budget or says when to come back
    assert pacer.try_turn("GET") > 0.0
    pacer.done("GET", remaining=40, reset_in=None, limit=100)
    assert turn_times(pacer, clock, 3, "GET") == [0.0, 0.0, 0.0]


def test_past_its_reset_a_spent_budget_sends_one_request_and_waits_for_its_answer():
    clock = FakeClock()
    pacer = RequestPacer(None, clock=clock)
    pacer.done("POST", remaining=0, reset_in=0.02, limit=20)  # Intelligems: the reset may be the next token only
    assert pacer.try_turn("POST") == pytest.approx(0.02)
    clock.now = 0.02
    assert pacer.try_turn("POST") == 0.0
    assert pacer.try_turn("POST") > 0.0
    pacer.done("POST", remaining=12, reset_in=0.3, limit=20)
    assert turn_times(pacer, clock, 3, "POST") == [0.02] * 3


def test_a_waiting_caller_goes_as_soon_as_an_answer_renews_the_budget():
    pacer = RequestPacer(None)
    pacer.done("GET", remaining=0, reset_in=None)
    assert pacer.try_turn("GET") == 0.0  # the one request in flight
    turn = in_background(lambda: pacer.wait_turn("GET", stopping=threading.Event()))
    time.sleep(0.1)
    assert not turn.done()
    pacer.done("GET", remaining=10, reset_in=None)
    assert turn.result(timeout=ENDS_SOON) is True


def test_a_waiting_caller_that_learns_of_a_reset_beyond_its_max_wait_gives_up_then():
    pacer = RequestPacer(None)
    pacer.done("GET", remaining=0, reset_in=None)
    assert pacer.try_turn("GET") == 0.0  # the one request in flight, whose answer will tell
    turn = in_background(lambda: pacer.wait_turn("GET", stopping=threading.Event(), max_wait=5.0))
    time.sleep(0.1)
    assert not turn.done()
    pacer.done("GET", remaining=0, reset_in=3600.0, limit=100, shared=False)
    with pytest.raises(PacerWaitTooLong) as raised:
        turn.result(timeout=ENDS_SOON)
    assert raised.value.seconds == pytest.approx(3600, abs=1) and raised.value.limit == 100


def test_a_budget_wait_is_announced_once_and_again_when_an_answer_moves_its_end_later(monkeypatch):
    monkeypatch.setattr(pacing, "ANNOUNCE_SLACK", 0.1)
    pacer = RequestPacer(None)
    pacer.done("GET", remaining=0, reset_in=0.3)
    heard: list[float] = []
    turn = in_background(lambda: pacer.wait_turn("GET", stopping=threading.Event(), announce=heard.append))
    time.sleep(0.1)
    pacer.done("GET", remaining=0, reset_in=0.5)  # another call's answer: the window ends later
    assert turn.result(timeout=ENDS_SOON) is True
    assert heard == [pytest.approx(0.3, abs=0.05), pytest.approx(0.5, abs=0.05)]


def test_spreading_a_low_budget_never_spaces_calls_wider_than_the_max_wait():
    """Spacing is the pacer's courtesy: it must not turn into a wait the setting forbids."""
    clock = FakeClock()
    pacer = RequestPacer(None, clock=clock)
    pacer.done("GET", remaining=2, reset_in=100.0, limit=100)
    assert pacer.try_turn("GET", max_wait=5.0) == 0.0
    assert pacer.try_turn("GET", max_wait=5.0) == pytest.approx(5.0)  # not 100 s / 2


def test_the_token_bucket_and_a_429_pause():
    clock = FakeClock()
    pacer = RequestPacer(4.0, burst=1, clock=clock)
    assert turn_times(pacer, clock, 3) == [0.0, 0.25, 0.5]
    pacer.pause_for(5.0)
    assert pacer.try_turn() == pytest.approx(5.0)


# ------------------------------------------------------------------------ secrets


def test_no_credential_or_query_string_in_any_message_or_log_line(server, caplog):
    install_log_redaction()
    caplog.set_level(logging.DEBUG)
    messages = []
    params = {"token": SIGNED_QUERY}
    scripts = [
        (
            make_client(server, retry_jitter=lambda s: 0.0),
            [Answer(429, {"Retry-After": "0.3"}), Answer(500), Answer(200)],
        ),
        (make_client(server, max_tries=2, retry_jitter=lambda s: 0.0), [Answer(503)]),
        (make_client(server), [Answer(404, body={"message": "not found"})]),
        (make_client(server), [Answer(429, {"Retry-After": "86400"})]),
        (make_client(server), [Answer(429, {"X-Rate-Limit-Type": "api_calls_cycle"})]),
    ]
    for client, script in scripts:
        server.answer(*script)
        try:
            client.get("/v1/exports", params=params)
        except ApiError as exc:
            messages.append(str(exc))
    stopped = make_client(server)
    stopped.stopping.set()
    with pytest.raises(ApiError) as raised:
        stopped.get("/v1/exports", params=params)
    messages.append(str(raised.value))

    assert len(messages) == 5, messages
    assert all(r.headers.get("X-App-Token") == APP_TOKEN for r in server.received)
    assert all(r.query.get("token") == [SIGNED_QUERY] for r in server.received)
    everything = "\n".join(messages) + "\n" + caplog.text
    assert "/v1/exports" in caplog.text and "retry 1 of" in caplog.text
    assert APP_TOKEN not in everything and SIGNED_QUERY not in everything


def test_an_intelligems_count_leaves_out_an_older_request_that_reached_the_api_after_it():
    clock = FakeClock()
    pacer = RequestPacer(None, clock=clock)
    first, second = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)
    assert first.submit(pacer.try_turn, "POST").result() == 0.0
    assert second.submit(pacer.try_turn, "POST").result() == 0.0
    # The API took the second request first (2 left), then the first (1 left), answering it first.
    first.submit(pacer.done, "POST", 1, 10.0).result()
    second.submit(pacer.done, "POST", 2, 10.0).result()  # the newer turn, but not the newer count
    first.shutdown()
    second.shutdown()
    assert turn_times(pacer, clock, 1, "POST") == [0.0]
    assert pacer.try_turn("POST") == pytest.approx(10.0)


def test_a_budget_renewing_beyond_any_date_is_a_wait_too_long_not_a_crash():
    """X-Rate-Limit-Retry sent in milliseconds (a broken header) with no budget left: the error names
    the wait, with the latest date there is, instead of an OverflowError."""
    error = RateLimitWaitTooLong.of_budget("voucherify", "POST /v1/exports", PacerWaitTooLong(1.8e12, 100), 3660)
    assert error.until.year == 9999 and "max_rate_limit_wait_seconds (3660s)" in str(error)

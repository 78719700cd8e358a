"""Where we retry API calls: one client for every API, with rate limits, timeouts and redaction.

API calls go through `ApiClient`, which carries the API's credentials, paces itself under the
documented rate limit, honours the API's own "wait this long" headers on 429, and retries bursts of
5xx and dropped connections with exponential backoff. It never puts a secret in an error message:
errors name the method and the path, not the query string or the headers.
"""

from __future__ import annotations

import email.utils
import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import backoff
import requests
import requests.adapters

TIMEOUT = (10.0, 120.0)  # connect, read: every request has both
RETRIABLE_STATUSES = {500, 502, 503, 504}
MIN_RATE_LIMIT_WAIT = 0.25


class ApiError(RuntimeError):
    """An API answered with an error we cannot retry our way out of."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiTimeout(ApiError):
    """The API did not answer within the read timeout the caller chose (a synchronous export)."""


class _RateLimited(Exception):
    def __init__(self, wait_seconds: float) -> None:
        self.wait_seconds = wait_seconds


class _Retriable(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


POOL_CONNECTIONS = 64  # above any sensible max_concurrent_exports: workers never queue for a socket


def pooled_session() -> requests.Session:
    """A session whose connection pools hold one connection per worker (requests keeps 10)."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=POOL_CONNECTIONS, pool_maxsize=POOL_CONNECTIONS)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def without_query(url: str) -> str:
    """A URL safe to log: signed URLs carry their credentials in the query string."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class QueryStringRedactor(logging.Filter):
    """Removes query strings from urllib3's request log lines, at every level.

    urllib3 logs each request line at DEBUG, and signed file URLs carry their credentials
    (signature, token) in the query string.
    """

    _QUERY = re.compile(r"\?[^\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._QUERY.sub("?<redacted>", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str) and "?" in record.msg:
            record.msg = self._QUERY.sub("?<redacted>", record.msg)
        return True


def install_log_redaction() -> None:
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, QueryStringRedactor) for f in logger.filters):
        logger.addFilter(QueryStringRedactor())


def retry_after_seconds(response: requests.Response, default: float = 1.0) -> float:
    """How long the API asked us to wait, from whichever header it uses.

    Retry-After (seconds or an HTTP date), Voucherify's X-Rate-Limit-Retry (seconds) and
    Intelligems' x-ratelimit-reset (epoch milliseconds).
    """
    headers = response.headers
    if value := headers.get("Retry-After"):
        if value.strip().replace(".", "", 1).isdigit():
            return float(value)
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    if value := headers.get("X-Rate-Limit-Retry"):
        return float(value)
    if value := headers.get("x-ratelimit-reset"):
        return max(0.0, float(value) / 1000.0 - time.time())
    return default


def reported_budget(response: requests.Response | None) -> tuple[int | None, float | None]:
    """(requests left, seconds to reset) from x-ratelimit-remaining / x-ratelimit-reset, if sent."""
    if response is None:
        return None, None
    remaining = response.headers.get("x-ratelimit-remaining")
    reset = response.headers.get("x-ratelimit-reset")
    if remaining is None or reset is None or not remaining.strip().isdigit():
        return None, None
    return int(remaining), max(0.0, float(reset) / 1000.0 - time.time())


class RequestPacer:
    """Keeps one API's callers, across threads, inside its rate limits.

    Two limits, either may be absent: a client-side token bucket for a documented requests per
    second (Next Commerce's 4/s), and the budget the API reports itself (Intelligems'
    x-ratelimit-remaining / x-ratelimit-reset). The reported budget is reduced by the requests
    still in flight, which the API had not counted when it answered; at zero, callers wait for the
    reset instead of sending a request bound to be refused. Budgets are kept per `kind` of call
    (the export endpoint and the others have separate buckets).
    """

    def __init__(self, per_second: float | None, burst: int = 1) -> None:
        self.per_second = per_second
        self.burst = burst
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._paused_until = 0.0
        self._budgets: dict[str, tuple[int, float]] = {}  # kind -> (requests left, reset time)
        self._in_flight: dict[str, int] = {}

    def wait_turn(self, kind: str = "") -> None:
        while True:
            with self._lock:
                wait = self._wait_needed(kind, time.monotonic())
                if wait <= 0:
                    self._in_flight[kind] = self._in_flight.get(kind, 0) + 1
                    return
            time.sleep(wait)

    def _wait_needed(self, kind: str, now: float) -> float:
        """0 and the turn is taken, or how long to wait. Call with the lock held."""
        if self._paused_until > now:
            return self._paused_until - now
        left, reset = self._budgets.get(kind, (1, 0.0))
        if left <= 0 and reset > now:
            return reset - now
        if self.per_second is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.per_second)
            self._last = now
            if self._tokens < 1.0:
                return (1.0 - self._tokens) / self.per_second
            self._tokens -= 1.0
        if kind in self._budgets:
            self._budgets[kind] = (left - 1, reset) if reset > now else (1, 0.0)
        return 0.0

    def done(self, kind: str = "", remaining: int | None = None, reset_in: float | None = None) -> None:
        """A request answered; `remaining`/`reset_in` are the budget the API reported, if any."""
        with self._lock:
            self._in_flight[kind] = max(0, self._in_flight.get(kind, 1) - 1)
            if remaining is not None and reset_in is not None:
                self._budgets[kind] = (remaining - self._in_flight[kind], time.monotonic() + reset_in)

    def pause_for(self, seconds: float) -> None:
        """Everyone waits: the API answered 429."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)


@dataclass
class ApiClient:
    """Calls one API: base URL, credential headers, pacing and retries."""

    api_name: str
    base_url: str
    credential_headers: dict[str, str]
    logger: logging.Logger
    pacer: RequestPacer = field(default_factory=lambda: RequestPacer(None))
    extra_headers: dict[str, str] = field(default_factory=dict)
    max_tries: int = 8
    max_backoff_seconds: float = 10.0
    max_rate_limited_seconds: float = 900.0
    calls: int = 0
    session: requests.Session = field(default_factory=pooled_session)
    #: Set when the run is stopping: no further attempt is made (retries would outlive the run).
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.session.headers.update({"Accept": "application/json", "User-Agent": "tap-commerce-exports"})
        self.session.headers.update(self.extra_headers)
        self.session.headers.update(self.credential_headers)
        self._calls_lock = threading.Lock()

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url.rstrip('/')}/{path.lstrip('/')}"

    def get(self, path: str, *, params: dict | None = None, ok: Iterable[int] = (200,)) -> Any:
        return self.request("GET", path, params=params, ok=ok)

    def post(self, path: str, *, body: Any, ok: Iterable[int] = (200, 201), read_timeout: float | None = None) -> Any:
        """`read_timeout`: give up (ApiTimeout, no retry) when the answer takes longer."""
        return self.request("POST", path, json_body=body, ok=ok, read_timeout=read_timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        json_body: Any = None,
        ok: Iterable[int] = (200,),
        read_timeout: float | None = None,
    ) -> Any:
        """The parsed JSON answer (None for an empty body), after retries; ApiError otherwise."""
        response = self._send_with_retries(method, self.url(path), params, json_body, read_timeout)
        if response.status_code not in set(ok):
            raise ApiError(self._describe_failure(method, path, response), response.status_code)
        return response.json() if response.content else None

    def _send_with_retries(
        self, method: str, url: str, params: dict | None, body: Any, read_timeout: float | None
    ) -> requests.Response:
        send = backoff.on_exception(
            backoff.expo,
            _Retriable,
            max_tries=self.max_tries,
            max_value=self.max_backoff_seconds,
            factor=0.5,
            on_backoff=lambda d: self.logger.warning(
                "%s: %s %s failed (%s), retry %d of %d in %.1fs",
                self.api_name,
                method,
                without_query(url),
                d["exception"].reason,
                d["tries"],
                self.max_tries - 1,
                d["wait"],
            ),
            on_giveup=lambda d: self._give_up(method, url, d["exception"]),
        )(
            backoff.on_exception(
                backoff.runtime,
                _RateLimited,
                # Many exports share one budget: the API's hint can be a few ms, so a floor keeps
                # workers from stampeding, and the limit is a time, not a count of tries.
                value=lambda exc: max(MIN_RATE_LIMIT_WAIT, exc.wait_seconds),
                jitter=None,
                max_time=self.max_rate_limited_seconds,
                on_backoff=lambda d: self.logger.info(
                    "%s: rate limited, waiting %.1fs as the API asked", self.api_name, d["wait"]
                ),
                on_giveup=lambda d: self._give_up(method, url, d["exception"]),
            )(self._send_once)
        )
        return send(method, url, params, body, read_timeout)

    def _give_up(self, method: str, url: str, exc: Exception) -> None:
        if isinstance(exc, _RateLimited):
            raise ApiError(
                f"{self.api_name}: {method} {without_query(url)} was still rate limited after "
                f"{self.max_rate_limited_seconds:.0f}s of waiting as the API asked"
            )
        raise ApiError(
            f"{self.api_name}: {method} {without_query(url)} failed after {self.max_tries} tries: "
            f"{getattr(exc, 'reason', exc)}"
        )

    def _send_once(
        self, method: str, url: str, params: dict | None, body: Any, read_timeout: float | None
    ) -> requests.Response:
        if self.stopping.is_set():
            raise ApiError(f"{self.api_name}: {method} {without_query(url)} not sent: the run is stopping")
        kind = method  # Intelligems' export bucket is its POSTs; reads have another
        self.pacer.wait_turn(kind)
        with self._calls_lock:
            self.calls += 1
        timeout = (TIMEOUT[0], read_timeout) if read_timeout else TIMEOUT
        response = None
        try:
            response = self.session.request(method, url, params=params, json=body, timeout=timeout)
        except requests.ReadTimeout:
            if read_timeout:
                where = without_query(url)
                raise ApiTimeout(f"{self.api_name}: {method} {where} gave no answer in {read_timeout:g}s") from None
            raise _Retriable("ReadTimeout") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Retriable(type(exc).__name__) from None
        finally:
            self.pacer.done(kind, *reported_budget(response))
        if response.status_code == 429:
            wait = retry_after_seconds(response)
            self.pacer.pause_for(wait)
            raise _RateLimited(wait)
        if response.status_code in RETRIABLE_STATUSES:
            raise _Retriable(f"HTTP {response.status_code}")
        return response

    def _describe_failure(self, method: str, path: str, response: requests.Response) -> str:
        detail = response.text[:300].strip() if response.content else ""
        where = without_query(self.url(path))
        return f"{self.api_name}: {method} {where} answered HTTP {response.status_code}: {detail}"

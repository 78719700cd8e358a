"""Where we retry API calls: one client for every API, with rate limits, timeouts and redaction.

API calls go through `ApiClient`, which carries the API's credentials, paces itself under the
limits the API documents and reports, honours the API's own "wait until" headers on 429, and
retries bursts of 5xx and dropped connections with exponential backoff. It never puts a secret in
an error message: errors name the method and the path, not the query string or the headers.

What each API documents (NOTES.md, /work/shared/reference/):
- Voucherify (guides/limits): every response carries `X-Rate-Limit-Limit`,
  `X-Rate-Limit-Remaining` and `X-Rate-Limit-Retry` = the Unix time, in seconds, at which the
  next request may be made (a time, not a delay); `Retry-After` (seconds) is optional;
  `X-Rate-Limit-Type` (optional) names the limit hit: `api_calls`, `bulk_api_calls`,
  `api_calls_cycle` (the billing-cycle quota), `webhook_calls`. Plans count per minute (Business
  100/min), per hour (a Sandbox project 100/h) and per billing cycle (100,000).
- Intelligems: `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset` (epoch
  milliseconds); export POSTs have their own bucket.
- Next Commerce: 4 requests/second per token; over it, 429 with `Retry-After: 1`.

Choices:
- A 429 is waited out as the headers say (`rate_limit_wait`); a billing-cycle quota
  (`api_calls_cycle`) is not: no wait within a run can help, so `QuotaExhausted` is raised at once
  and later calls of that client are refused without being sent. A single wait longer than
  `max_rate_limit_wait_seconds` raises `RateLimitWaitTooLong` instead of holding the run up for
  it; `max_rate_limited_seconds` still caps the total waited on 429s by one call.
- The budget an API reports on every answer is spent down by the pacer (`RequestPacer`), so a
  100/minute plan meets its limit as a pause, not as a storm of 429s. The pacer's wait for a spent
  budget obeys `max_rate_limit_wait_seconds` too: it is the same limit, met before the 429.
- Rate-limit waits are logged with their end as a full UTC date-time: a per-hour wait may end tomorrow.
- Every wait (429, pacer, backoff between retries) ends when `stopping` is set (the pacer's within
  `PACER_WAIT_SLICE`), with `ApiError("... not sent: the run is stopping")`. The `backoff` library
  gives the retry schedule only: its decorators sleep with `time.sleep`, which nothing can cut short."""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import backoff
import requests
import requests.adapters

from tap_commerce_exports.exports.pacing import PacerWaitTooLong, RequestPacer

TIMEOUT = (10.0, 120.0)  # connect, read: every request has both
RETRIABLE_STATUSES = {500, 502, 503, 504}
#: Many exports share one budget and the API's hint can be a few ms: a floor keeps workers from stampeding.
MIN_RATE_LIMIT_WAIT = 0.25
#: A 429 that says nothing about when to come back.
DEFAULT_RATE_LIMIT_WAIT = 1.0
#: Voucherify's X-Rate-Limit-Type for the billing-cycle quota (NOTES.md): no wait in a run helps.
CYCLE_QUOTA_TYPES = frozenset({"api_calls_cycle"})


#: A wait for the reported budget to renew at least this long is logged: otherwise the tap looks stuck.
PACING_NOTICE_SECONDS = 5.0


class ApiError(RuntimeError):
    """An API answered with an error we cannot retry our way out of."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiTimeout(ApiError):
    """The API did not answer within the read timeout the caller chose (a synchronous export)."""


class QuotaExhausted(ApiError):
    """The API's billing-cycle quota is used up (Voucherify `X-Rate-Limit-Type: api_calls_cycle`).

    NOTES.md (Voucherify, guides/limits): "Exceeding a limit blocks the API until it resets"; the
    cycle quota resets with the billing cycle, so the source should stop, not wait.
    """

    #: Every export of this API stops for the rest of the run (exports/runner.py: stops_source).
    stops_source = True

    def __init__(self, api_name: str, limit_type: str, resets_at: datetime | None) -> None:
        when = f"it resets at {iso_utc(resets_at)}" if resets_at else "the API did not say when it resets"
        super().__init__(
            f"{api_name}: the API's billing-cycle quota is used up (X-Rate-Limit-Type: {limit_type}); {when}. "
            "Waiting is pointless: the source stops; the next run resumes from its bookmarks",
            429,
        )
        self.api_name = api_name
        self.limit_type = limit_type
        self.resets_at = resets_at

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite its own constructor
        return type(self), (self.api_name, self.limit_type, self.resets_at)


class RateLimitWaitTooLong(ApiError):
    """A rate limit would hold a call up longer than `ApiClient.max_rate_limit_wait_seconds`: not waited.

    Either a 429 asked for the wait (`of_answer`) or the budget the API reports on every answer is
    spent and renews that far ahead (`of_budget`, the pacer's wait); both end the same way.
    """

    #: The client refuses further calls until then, so the source's other exports stop too.
    stops_source = True

    def __init__(
        self, api_name: str, why: str, wait_seconds: float, until: datetime, setting: float, limit_type: str | None
    ) -> None:
        super().__init__(
            f"{api_name}: {why} {wait_seconds:.1f}s, until {iso_utc(until)}; that is longer than "
            f"max_rate_limit_wait_seconds ({setting:g}s), so the call is given up instead: raise that setting "
            "to wait it out",
            429,
        )
        self.api_name = api_name
        self.wait_seconds = wait_seconds
        self.until = until
        self.limit_type = limit_type
        self._args = (api_name, why, wait_seconds, until, setting, limit_type)

    @classmethod
    def of_answer(cls, api_name: str, where: str, answer: RateLimitAnswer, setting: float) -> RateLimitWaitTooLong:
        why = f"{where} is rate limited{answer.type_note}: the API asked to wait"
        return cls(api_name, why, answer.wait_seconds, answer.resume_at, setting, answer.limit_type)

    @classmethod
    def of_budget(cls, api_name: str, where: str, spent: PacerWaitTooLong, setting: float) -> RateLimitWaitTooLong:
        limit = f" (limit: {spent.limit})" if spent.limit is not None else ""
        why = f"{where} is rate limited: the API's request budget{limit} is spent and renews in"
        return cls(api_name, why, spent.seconds, _utc(time.time() + spent.seconds), setting, None)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), self._args


class _RateLimited(Exception):
    def __init__(self, answer: RateLimitAnswer) -> None:
        self.answer = answer


class _Retriable(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(epoch_seconds: float) -> datetime:
    # To the millisecond: `now + (retry_at - now)` must not print a second before the header's time.
    try:
        return datetime.fromtimestamp(round(epoch_seconds, 3), tz=timezone.utc)
    except (OverflowError, OSError, ValueError):  # a header out of datetime's range is no reason to crash
        return datetime.max.replace(tzinfo=timezone.utc)


# ------------------------------------------------------------- rate limit headers


def _number(headers: Any, name: str) -> float | None:
    """A header's value as a finite number, or None when absent or not a number."""
    value = headers.get(name)
    try:
        number = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _whole_number(headers: Any, name: str) -> int | None:
    number = _number(headers, name)
    return int(number) if number is not None else None


def _retry_after(value: str, now: float) -> float | None:
    """RFC 9110 Retry-After: delay-seconds or an HTTP date; None when it is neither."""
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": the RFC's "UTC, source zone unknown"
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp() - now


@dataclass(frozen=True)
class RateLimitAnswer:
    """What a 429 said: how long to wait (floored), by which header, and which limit was hit."""

    wait_seconds: float
    resume_at: datetime  # now + wait_seconds: exact when a header named the moment
    header: str | None  # None: no header said how long
    limit_type: str | None
    #: Voucherify's X-Rate-Limit-Retry, the moment the API takes requests again, if sent.
    retry_at: datetime | None

    @property
    def type_note(self) -> str:
        return f" ({self.limit_type})" if self.limit_type else ""


def rate_limit_wait(headers: Any, now: float | None = None) -> tuple[float, str] | None:
    """Seconds the API asked us to wait on a 429, and the header that said it; None if none did.

    In this order (NOTES.md): `Retry-After` (seconds or an HTTP date; Voucherify's is optional,
    Next Commerce sends `Retry-After: 1`), Voucherify's `X-Rate-Limit-Retry` (the Unix time in
    seconds at which the next request may be made: the wait is that time minus now), then
    Intelligems' `x-ratelimit-reset` (epoch milliseconds). May be negative (a time already past).
    """
    now = time.time() if now is None else now
    if (value := headers.get("Retry-After")) is not None and (seconds := _retry_after(value.strip(), now)) is not None:
        return seconds, "Retry-After"
    if (retry_at := _number(headers, "X-Rate-Limit-Retry")) is not None:
        return retry_at - now, "X-Rate-Limit-Retry"
    if (reset_ms := _number(headers, "x-ratelimit-reset")) is not None:
        return reset_ms / 1000.0 - now, "x-ratelimit-reset"
    return None


def rate_limit_answer(headers: Any, now: float | None = None) -> RateLimitAnswer:
    """A 429's headers read as NOTES.md documents them (see `rate_limit_wait`), wait floored."""
    now = time.time() if now is None else now
    asked = rate_limit_wait(headers, now)
    wait, header = asked if asked is not None else (DEFAULT_RATE_LIMIT_WAIT, None)
    wait = max(MIN_RATE_LIMIT_WAIT, wait)
    retry_at = _number(headers, "X-Rate-Limit-Retry")
    limit_type = (headers.get("X-Rate-Limit-Type") or "").strip() or None
    return RateLimitAnswer(wait, _utc(now + wait), header, limit_type, _utc(retry_at) if retry_at is not None else None)


class Budget(NamedTuple):
    """The request budget an answer reported: requests left, seconds to its reset, the limit."""

    remaining: int | None = None
    reset_in: float | None = None  # None: the answer did not say when the budget resets
    limit: int | None = None
    shared: bool = False  # one budget for every kind of call (Voucherify's plan), not one per kind


def reported_budget(response: requests.Response | None, now: float | None = None) -> Budget:
    """The budget an answer reports, from whichever API's headers it carries.

    Intelligems (NOTES.md): `x-ratelimit-remaining`, `x-ratelimit-limit`, `x-ratelimit-reset` in
    epoch ms. Voucherify (NOTES.md, guides/limits): `X-Rate-Limit-Remaining`, `X-Rate-Limit-Limit`,
    and `X-Rate-Limit-Retry` (Unix seconds), taken as the reset only when it lies in the future.
    When it does not, the docs do not say when the window ends (a minute on most plans, an hour on
    a Sandbox project): the reset is left unknown rather than guessed, and the pacer then lets one
    request at a time through at zero budget, whose answer renews the budget or, as a 429, carries
    the exact moment to come back. One refused request per window, not a storm, and no guess.
    Voucherify's limits are per plan, whatever the endpoint (NOTES.md), so its budget is `shared`;
    Intelligems documents separate buckets (exports apart from the rest), so its budget is per kind.
    """
    if response is None:
        return Budget()
    headers = response.headers
    now = time.time() if now is None else now
    if (remaining := _whole_number(headers, "x-ratelimit-remaining")) is not None:
        reset_ms = _number(headers, "x-ratelimit-reset")
        reset_in = max(0.0, reset_ms / 1000.0 - now) if reset_ms is not None else None
        return Budget(remaining, reset_in, _whole_number(headers, "x-ratelimit-limit"))
    if (remaining := _whole_number(headers, "X-Rate-Limit-Remaining")) is not None:
        retry_at = _number(headers, "X-Rate-Limit-Retry")
        reset_in = retry_at - now if retry_at is not None and retry_at > now else None
        return Budget(remaining, reset_in, _whole_number(headers, "X-Rate-Limit-Limit"), shared=True)
    return Budget()


# ------------------------------------------------------------------ sessions, logs

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


# ------------------------------------------------------------------------- client


@dataclass
class ApiClient:
    """Calls one API: base URL, credential headers, pacing and retries (see the module docstring)."""

    api_name: str
    base_url: str
    credential_headers: dict[str, str]
    logger: logging.Logger
    pacer: RequestPacer = field(default_factory=lambda: RequestPacer(None))
    extra_headers: dict[str, str] = field(default_factory=dict)
    max_tries: int = 8
    max_backoff_seconds: float = 10.0
    #: Backoff between retries of 5xx / dropped connections: backoff.expo(factor), then `retry_jitter`.
    retry_backoff_factor: float = 0.5
    retry_jitter: Callable[[float], float] = backoff.full_jitter
    #: Cap on the total one call waits on 429s; None: twice `max_rate_limit_wait_seconds`, so a
    #: wait that setting allows is never cut short by this one.
    max_rate_limited_seconds: float | None = None
    #: A single rate-limit wait (a 429's, or the pacer's for a spent budget) longer than this is not
    #: waited: RateLimitWaitTooLong. The tap sets it from its setting of that name (settings.py).
    max_rate_limit_wait_seconds: float = 3660.0
    #: Which rate-limit bucket a call draws on, from its method and URL: APIs with one bucket per kind
    #: of call (Intelligems) say which; by default each HTTP method is a bucket of its own.
    bucket_of: Callable[[str, str], str] = lambda method, url: method
    calls: int = 0
    session: requests.Session = field(default_factory=pooled_session)
    #: Set when the run is stopping: no further attempt is made and every wait ends.
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.session.headers.update({"Accept": "application/json", "User-Agent": "tap-commerce-exports"})
        self.session.headers.update(self.extra_headers)
        self.session.headers.update(self.credential_headers)
        self._calls_lock = threading.Lock()
        self._quota_spent: QuotaExhausted | None = None
        self._blocked: RateLimitAnswer | None = None  # a 429 whose wait was too long, until it passes

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
        """429s are waited out apart from the `max_tries` count, which is for 5xx and dropped connections."""
        where = f"{method} {without_query(url)}"
        delays = self._backoff_delays()
        failures = 0
        rate_limited = 0.0
        while True:
            try:
                return self._send_once(method, url, params, body, read_timeout)
            except _RateLimited as limited:
                rate_limited += self._wait_out(limited.answer, where, rate_limited)
            except _Retriable as failure:
                failures += 1
                if failures >= self.max_tries:
                    raise ApiError(
                        f"{self.api_name}: {where} failed after {self.max_tries} tries: {failure.reason}"
                    ) from None
                self._back_off(where, failure.reason, failures, next(delays))

    def _backoff_delays(self) -> Iterator[float]:
        delays = backoff.expo(factor=self.retry_backoff_factor, max_value=self.max_backoff_seconds)
        next(delays)  # backoff's wait generators open with a value for the decorator's priming send
        return delays

    def _back_off(self, where: str, reason: str, failures: int, delay: float) -> None:
        wait = self.retry_jitter(delay)
        tries = self.max_tries - 1
        self.logger.warning(
            "%s: %s failed (%s), retry %d of %d in %.1fs", self.api_name, where, reason, failures, tries, wait
        )
        self._sleep(wait, where)

    def _wait_out(self, answer: RateLimitAnswer, where: str, waited_before: float) -> float:
        """Wait as a 429 asked (NOTES.md, see `rate_limit_wait`), within both caps; the seconds waited."""
        wait, until = answer.wait_seconds, answer.resume_at
        if wait > self.max_rate_limit_wait_seconds:
            self._blocked = answer
            raise RateLimitWaitTooLong.of_answer(self.api_name, where, answer, self.max_rate_limit_wait_seconds)
        if waited_before + wait > (total := self._max_rate_limited()):
            raise ApiError(
                f"{self.api_name}: {where} was still rate limited after {waited_before:.0f}s of waiting as the API "
                f"asked, and asked for {wait:.1f}s more (max_rate_limited_seconds: {total:g})",
                429,
            )
        asked = "as the API asked" if answer.header else "(the API did not say how long)"
        self.logger.info(
            "%s: rate limited%s, waiting %.1fs %s, until %s",
            self.api_name,
            answer.type_note,
            wait,
            asked,
            iso_utc(until),
        )
        self.pacer.pause_for(wait)
        self._sleep(wait, where)
        return wait

    def _max_rate_limited(self) -> float:
        if self.max_rate_limited_seconds is not None:
            return self.max_rate_limited_seconds
        return 2 * self.max_rate_limit_wait_seconds

    def _sleep(self, seconds: float, where: str) -> None:
        if self.stopping.wait(seconds):
            self._raise_stopping(where)

    def _raise_stopping(self, where: str) -> None:
        raise ApiError(f"{self.api_name}: {where} not sent: the run is stopping")

    def _send_once(
        self, method: str, url: str, params: dict | None, body: Any, read_timeout: float | None
    ) -> requests.Response:
        where = f"{method} {without_query(url)}"
        if self.stopping.is_set():
            self._raise_stopping(where)
        self._refuse_if_quota_spent()
        self._raise_if_blocked()
        kind = self.bucket_of(method, url)
        self._take_turn(kind, where)
        with self._calls_lock:
            self.calls += 1
        timeout = (TIMEOUT[0], read_timeout) if read_timeout else TIMEOUT
        response = None
        try:
            response = self.session.request(method, url, params=params, json=body, timeout=timeout)
        except requests.ReadTimeout:
            if read_timeout:
                raise ApiTimeout(f"{self.api_name}: {where} gave no answer in {read_timeout:g}s") from None
            raise _Retriable("ReadTimeout") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Retriable(type(exc).__name__) from None
        finally:
            budget = reported_budget(response)
            self.pacer.done(kind, budget.remaining, budget.reset_in, limit=budget.limit, shared=budget.shared)
        if response.status_code == 429:
            self._raise_rate_limited(rate_limit_answer(response.headers))
        if response.status_code in RETRIABLE_STATUSES:
            raise _Retriable(f"HTTP {response.status_code}")
        return response

    def _take_turn(self, kind: str, where: str) -> None:
        """The pacer's turn, waiting as long as `max_rate_limit_wait_seconds` allows and no longer."""
        try:
            taken = self.pacer.wait_turn(
                kind,
                self.stopping,
                max_wait=self.max_rate_limit_wait_seconds,
                announce=lambda wait: self._announce_pacing(where, wait),
            )
        except PacerWaitTooLong as spent:
            cap = self.max_rate_limit_wait_seconds
            raise RateLimitWaitTooLong.of_budget(self.api_name, where, spent, cap) from None
        if not taken:
            self._raise_stopping(where)

    def _announce_pacing(self, where: str, wait: float) -> None:
        if wait >= PACING_NOTICE_SECONDS:
            until = datetime.now(timezone.utc) + timedelta(seconds=wait)
            self.logger.info(
                "%s: the API's request budget is spent; %s waits %.1fs, until %s, for it to renew",
                self.api_name,
                where,
                wait,
                iso_utc(until),
            )

    def _raise_rate_limited(self, answer: RateLimitAnswer) -> None:
        """NOTES.md (Voucherify): `X-Rate-Limit-Type: api_calls_cycle` is the billing-cycle quota."""
        if (answer.limit_type or "").lower() in CYCLE_QUOTA_TYPES:
            self._quota_spent = QuotaExhausted(self.api_name, answer.limit_type or "", answer.retry_at)
            self._refuse_if_quota_spent()
        raise _RateLimited(answer)

    def _raise_if_blocked(self) -> None:
        """Until a too-long wait has passed, calls are not sent: the API said it would refuse them."""
        blocked = self._blocked
        if blocked is None:
            return
        left = blocked.resume_at.timestamp() - time.time()
        if left <= 0:
            self._blocked = None
            return
        raise _RateLimited(dataclasses.replace(blocked, wait_seconds=max(MIN_RATE_LIMIT_WAIT, left)))

    def _refuse_if_quota_spent(self) -> None:
        """Once the cycle quota is spent, no call of this client is sent until its reset passes."""
        spent = self._quota_spent
        if spent is None:
            return
        if spent.resets_at is not None and spent.resets_at.timestamp() <= time.time():
            self._quota_spent = None
            return
        raise QuotaExhausted(spent.api_name, spent.limit_type, spent.resets_at)

    def _describe_failure(self, method: str, path: str, response: requests.Response) -> str:
        detail = response.text[:300].strip() if response.content else ""
        where = without_query(self.url(path))
        return f"{self.api_name}: {method} {where} answered HTTP {response.status_code}: {detail}"

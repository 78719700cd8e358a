"""The sandbox's shared machinery: hosts, request log, faults, rate limits, signed URLs, schema checks.

Each emulated API (voucherify.py, nextcommerce.py, intelligems.py) builds on these pieces and only
says what its own API does. Everything here is thread-safe: hosts serve requests on threads.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import secrets
import socket
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

from tap_commerce_exports.openapi import SpecValidator, load_spec  # noqa: F401  (emulators validate with it)

Handler = Callable[..., Response]


# ---------------------------------------------------------------- request log


@dataclass(frozen=True)
class LoggedRequest:
    """One request as a host received it, for tests to assert on."""

    host: str
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    status: int
    at: float


class RequestLog:
    """Every request every host received, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[LoggedRequest] = []

    def add(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._entries.append(entry)

    def entries(
        self, host: str | None = None, method: str | None = None, path_pattern: str | None = None
    ) -> list[LoggedRequest]:
        """Requests filtered by host name, method and a regex on the path."""
        with self._lock:
            found = list(self._entries)
        if host:
            found = [e for e in found if e.host == host]
        if method:
            found = [e for e in found if e.method == method.upper()]
        if path_pattern:
            found = [e for e in found if re.search(path_pattern, e.path)]
        return found

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# --------------------------------------------------------------------- faults


class Faults:
    """Faults switched on per run: name -> how many more times it fires (-1: always).

    An emulator asks `faults.fire("download_reset")` at the point where the fault applies; the
    answer is True while the fault has shots left. Tests arm faults with `arm(name, times)`.
    Some faults carry a value (for example the latency of an export): `value(name, default)`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shots: dict[str, int] = {}
        self._values: dict[str, Any] = {}
        self.fired: dict[str, int] = defaultdict(int)

    def arm(self, name: str, times: int = 1, value: Any = None) -> None:
        with self._lock:
            self._shots[name] = times
            if value is not None:
                self._values[name] = value

    def disarm(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._shots.clear()
                self._values.clear()
            else:
                self._shots.pop(name, None)
                self._values.pop(name, None)

    def fire(self, name: str) -> bool:
        with self._lock:
            shots = self._shots.get(name, 0)
            if shots == 0:
                return False
            if shots > 0:
                self._shots[name] = shots - 1
            self.fired[name] += 1
            return True

    def active(self, name: str) -> bool:
        with self._lock:
            return self._shots.get(name, 0) != 0

    def value(self, name: str, default: Any = None) -> Any:
        with self._lock:
            return self._values.get(name, default)


# ---------------------------------------------------------------- rate limits


@dataclass
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    retry_after_seconds: float
    reset_at_epoch: float


class TokenBucket:
    """A token bucket per key (an API token): `rate` tokens a second, at most `burst` saved."""

    def __init__(self, rate_per_second: float, burst: int) -> None:
        self.rate = rate_per_second
        self.burst = burst
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}
        self.rejected = 0

    def take(self, key: str) -> RateDecision:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            else:
                self.rejected += 1
            self._buckets[key] = (tokens, now)
            wait = 0.0 if allowed else (1.0 - tokens) / self.rate
            refill = (self.burst - tokens) / self.rate
        return RateDecision(allowed, self.burst, int(tokens), wait, time.time() + refill)


# ---------------------------------------------------------------- signed URLs


class UrlSigner:
    """Signs a path with an expiry, like S3 presigned URLs and signed CDN links."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def sign(self, path: str, expires_at: float) -> str:
        message = f"{path}\n{int(expires_at)}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def check(self, path: str, expires_at: str | None, signature: str | None) -> str:
        """'ok', 'expired' or 'invalid'."""
        if not expires_at or not signature or not expires_at.isdigit():
            return "invalid"
        if not hmac.compare_digest(self.sign(path, int(expires_at)), signature):
            return "invalid"
        return "ok" if time.time() < int(expires_at) else "expired"


# ----------------------------------------------------------------------- hosts


CHUNK_BYTES = 64 * 1024
UTC = dt.timezone.utc


def as_utc(moment: dt.datetime | str | None) -> dt.datetime | None:
    """A datetime or ISO string as an aware UTC datetime; naive means UTC."""
    if moment is None:
        return None
    if isinstance(moment, str):
        moment = dt.datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def record_instant(moment: dt.datetime) -> str:
    """How the tap's expected records spell an instant: `isoformat()` in UTC (`+00:00`)."""
    return moment.astimezone(UTC).isoformat()


def record_value(value: Any) -> Any:
    """A typed value as the tap must emit it (expected_records of every emulator)."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dt.datetime):
        return record_instant(value)
    return value


def chunked(pieces: Iterable[bytes], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """CSV lines regrouped into chunks of about `size` bytes, for streamed response bodies."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        if len(buffer) >= size:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload), status=status, headers=headers or {}, mimetype="application/json")


SECRET_HEADERS = {"authorization", "x-app-token", "intelligems-access-token"}


class Host:
    """One emulated host (an API or a file host) on its own 127.0.0.1 port, served on threads.

    Routes are werkzeug rules mapped to handlers `handler(request, **path_values) -> Response`.
    Every request is logged (secret header values are kept: tests assert where secrets went).
    """

    def __init__(self, name: str, log: RequestLog) -> None:
        self.name = name
        self.log = log
        self._rules: list[Rule] = []
        self._handlers: dict[str, Handler] = {}
        self._url_map: Map | None = None
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def route(self, path: str, methods: Iterable[str], handler: Handler) -> None:
        endpoint = f"{handler.__qualname__}:{path}:{','.join(methods)}"
        self._rules.append(Rule(path, methods=list(methods), endpoint=endpoint, strict_slashes=False))
        self._handlers[endpoint] = handler

    @property
    def base_url(self) -> str:
        assert self._server is not None, f"host {self.name} is not started"
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self, port: int = 0) -> None:
        # werkzeug's access log would print signed URLs, tokens included, on the console.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._url_map = Map(self._rules, merge_slashes=False)
        self._server = make_server("127.0.0.1", port, self._wsgi, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"sandbox-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _wsgi(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        request = Request(environ)
        body: Any = None
        raw = request.get_data(cache=True)
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        try:
            adapter = self._url_map.bind_to_environ(environ)  # type: ignore[union-attr]
            endpoint, values = adapter.match()
            response = self._handlers[endpoint](request, **values)
        except NotFound:
            response = json_response({"code": 404, "message": "Resource not found", "path": request.path}, 404)
        except MethodNotAllowed:
            response = json_response({"code": 405, "message": "Method not allowed"}, 405)
        except HTTPException as exc:
            response = exc.get_response(environ)  # type: ignore[assignment]
        self.log.add(
            LoggedRequest(
                host=self.name,
                method=request.method,
                path=request.path,
                query=dict(request.args),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                status=response.status_code,
                at=time.time(),
            )
        )
        return response(environ, start_response)


@dataclass
class SandboxContext:
    """What every emulator shares: the log, the faults and the export latency."""

    log: RequestLog = field(default_factory=RequestLog)
    faults: Faults = field(default_factory=Faults)
    export_latency_seconds: float = 0.3


# ------------------------------------------------------------------ file bodies and their faults


def whole_second(moment: dt.datetime) -> dt.datetime:
    return moment.replace(microsecond=0)


def inside_quotes_cut(line: bytes, opening: int) -> int:
    """Where to cut a line so it ends inside the quoted field opened at `opening`, on a UTF-8 boundary."""
    closing = line.find(b'"', opening + 1)
    cut = opening + 1 + max(0, min(8, closing - opening - 1))
    while cut > opening + 1 and (line[cut] & 0xC0) == 0x80:
        cut -= 1  # never split a multi-byte character: the fault is about quoting, not encoding
    return cut


def byte_slice(chunks: Iterable[bytes], start: int, stop: int) -> Iterator[bytes]:
    """Bytes [start, stop) of a chunked body, without joining it."""
    position = 0
    for chunk in chunks:
        chunk_end = position + len(chunk)
        if chunk_end > start and position < stop:
            yield chunk[max(0, start - position) : stop - position]
        position = chunk_end
        if position >= stop:
            return


def reset_connection(environ: dict) -> None:
    """Abort the TCP connection (RST, not FIN) and tell werkzeug the peer is gone, quietly."""
    connection = environ.get("werkzeug.socket")
    if connection is not None:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raise ConnectionResetError("sandbox fault download_reset")


def with_transport_faults(faults: Faults, body: Iterator[bytes], size: int, environ: dict) -> Iterator[bytes]:
    """A file body as the network delivers it: whole, reset mid-way (`download_reset`), or shorter
    than its Content-Length (`download_short`; werkzeug then closes: the client sees EOF early)."""
    if size > 1 and faults.fire("download_reset"):
        return _reset_after(body, size // 2, environ)
    if size > 1 and faults.fire("download_short"):
        return byte_slice(body, 0, size - max(1, size // 10))
    return body


def _reset_after(body: Iterator[bytes], sent: int, environ: dict) -> Iterator[bytes]:
    yield from byte_slice(body, 0, sent)
    reset_connection(environ)


# ------------------------------------------------------------ self-description


@dataclass(frozen=True)
class FaultMatrixProfile:
    """How an emulator describes itself to the fault matrix (tests/test_fault_matrix.py), which then asks
    every API the same questions without knowing any of them.

    Class-level facts only; what depends on the emulator's data is asked of the emulator itself
    (`Emulator.matrix_partition`, `Emulator.ready_for_matrix`).
    """

    api_host: str
    file_host: str
    #: Two streams the matrix syncs, with their primary and replication keys.
    streams: tuple[str, str]
    keys: dict[str, tuple[str, ...]]
    replication_keys: dict[str, str]
    #: Regex on the path of the call that creates an export.
    create_pattern: str
    #: Seconds its 429 answer asks to wait when the `rate_limit` fault fires, and the value to arm the
    #: fault with (None: the emulator's own, fixed wait).
    retry_header_wait: float
    rate_limit_fault_value: float | None
    #: The data row the `malformed_row` fault damages.
    bad_row: int
    #: Download faults that cut the stored file itself (only a new export cures them), not the transfer.
    content_faults: tuple[str, ...] = ()
    #: Settings that make the matrix's windows exact (no re-read before the bookmark).
    settings: tuple[tuple[str, Any], ...] = ()
    #: The setting that names partitions to read (the matrix reads only `matrix_partition`'s).
    partition_setting: str | None = None
    #: APIs whose exports outlive a run: the path that reads one ({id}), its ids, one that never existed.
    export_read: str | None = None
    export_id: str | None = None
    vanished_export_id: str | None = None

    @property
    def resumable(self) -> bool:
        return self.export_read is not None


class Emulator:
    """What every emulator provides to the Sandbox and to the tests (each API's module subclasses it)."""

    name: str
    fault_matrix: FaultMatrixProfile

    def hosts(self) -> list[Host]:
        raise NotImplementedError

    def tap_config(self) -> dict[str, Any]:
        """The tap settings that point at this emulator, with its credentials."""
        raise NotImplementedError

    def expected_records(
        self, stream_name: str, partition: dict | None = None, start: Any = None, end: Any = None
    ) -> list[dict]:
        """Rows of a tap stream with start <= replication key < end, typed and keyed as the tap emits them."""
        raise NotImplementedError

    def every_expected_record(self, stream_name: str) -> list[dict]:
        """Every row of a stream over all its partitions: what a complete sync delivers."""
        return self.expected_records(stream_name)

    def matrix_partition(self) -> dict | None:
        """The partition the fault matrix reads its streams in (None: the streams are not partitioned)."""
        return None

    def ready_for_matrix(self) -> None:
        """Loosen what would only slow the fault matrix down (a rate limit it does not test)."""

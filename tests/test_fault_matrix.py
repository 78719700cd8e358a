"""The fault matrix: one test per fault, each against the sandbox over real HTTP with the fault on.

Every test is named after the behaviour it proves and asserts on what the tap emitted (records,
STATE) and on what the sandbox received (its request log). Faults the per-API modules already prove
(Voucherify ERROR/stuck/new column, Next Commerce 429 log line/stuck/expired URL, Intelligems null
URL/expired URL) are not repeated here.
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from commerce_sandbox.core import FaultMatrixProfile
from commerce_sandbox.server import API_NAMES as SANDBOX_APIS
from commerce_sandbox.server import Sandbox, emulator_type
from tap_commerce_exports.sources import SOURCES, intelligems
from tap_commerce_exports.stream import ExportStream
from tap_commerce_exports.tap import SyncFailures
from tests.harness import (
    SingerOutput,
    catalog_selecting,
    drain,
    normalized,
    run_tap,
    start_tap_process,
    wait_for_log,
    wait_until,
)

START = "2024-01-01T00:00:00+00:00"
END = "2024-03-01T00:00:00+00:00"
ONE_WINDOW = 60  # export_window_days that make [start_date, end_date) one window
FAST_EXPORTS = 0.05


# ----------------------------------------------------------------- the three APIs


def keyed(records: list[dict], key: tuple[str, ...]) -> dict[tuple, dict]:
    """Records by primary key, keys and values normalized (instants as instants, '.093' == '.093000')."""
    return {tuple(normalized(record.get(k)) for k in key): normalized(record) for record in records}


def first_experience(emulator) -> str:
    """The running experience that starts with the data period: its lifetime spans every window."""
    started = [e for e in emulator.experiences() if e.started_at is not None and e.status == "started"]
    return min(started, key=lambda e: e.started_at).id


@dataclass(frozen=True)
class Target:
    """One API as the matrix talks about it: what its emulator says of itself (FaultMatrixProfile)."""

    name: str
    profile: FaultMatrixProfile

    @property
    def api_host(self) -> str:
        return self.profile.api_host

    @property
    def file_host(self) -> str:
        return self.profile.file_host

    @property
    def streams(self) -> tuple[str, str]:
        return self.profile.streams

    @property
    def keys(self) -> dict[str, tuple[str, ...]]:
        return self.profile.keys

    @property
    def replication_keys(self) -> dict[str, str]:
        return self.profile.replication_keys

    @property
    def stream(self) -> str:
        return self.streams[0]

    def emulator(self, sandbox):
        return sandbox.emulators[self.name]

    def config(self, sandbox, **extra) -> dict:
        emulator = self.emulator(sandbox)
        emulator.ready_for_matrix()
        config = {**emulator.tap_config(), **dict(self.profile.settings)}
        partition = emulator.matrix_partition()
        if partition and self.profile.partition_setting:
            config[self.profile.partition_setting] = list(partition.values())
        return {**config, **extra}

    def context(self, sandbox) -> dict | None:
        return self.emulator(sandbox).matrix_partition()

    def expected(self, sandbox, stream: str, start: Any = None, end: Any = None) -> dict:
        emulator = self.emulator(sandbox)
        rows = emulator.expected_records(stream, partition=self.context(sandbox), start=start, end=end)
        return keyed(rows, self.keys[stream])

    def emitted(self, output: SingerOutput, stream: str) -> dict:
        return keyed(output.records(stream), self.keys[stream])

    def creates(self, sandbox) -> list:
        return sandbox.log.entries(host=self.api_host, method="POST", path_pattern=self.profile.create_pattern)

    def bookmark(self, state: dict, stream: str, sandbox) -> str | None:
        entry = state.get("bookmarks", {}).get(stream, {})
        context = self.context(sandbox)
        if context is not None:
            entry = next((p for p in entry.get("partitions", []) if p.get("context") == context), {})
        return entry.get("replication_key_value")

    def state_at(self, bookmark: str, sandbox) -> dict:
        """A STATE whose bookmark for both streams is `bookmark` (as a previous run would leave it)."""
        bookmarks = {}
        context = self.context(sandbox)
        for stream in self.streams:
            entry = {"replication_key": self.profile.replication_keys[stream], "replication_key_value": bookmark}
            bookmarks[stream] = {"partitions": [{"context": context, **entry}]} if context else entry
        return {"bookmarks": bookmarks}


TARGETS = {name: Target(name, emulator_type(name).fault_matrix) for name in SANDBOX_APIS}
API_NAMES = tuple(TARGETS)


@pytest.fixture
def sandbox_for(request):
    """`sandbox_for(api)`: a fresh sandbox of that API (the conftest fixtures, chosen by name)."""
    return lambda api: request.getfixturevalue(f"{api}_sandbox")


def emitted_rows_logged(output: SingerOutput, stream: str) -> list[int]:
    """Row counts of the 'emitted N rows' lines: one per file the stream parsed to the end."""
    return [int(n) for n in re.findall(rf"{stream}\b[^\n]*: emitted (\d+) rows", output.log_text)]


def assert_rows_exactly_once(output: SingerOutput, target: Target, sandbox, stream: str) -> None:
    records = output.records(stream)
    want = target.expected(sandbox, stream)
    assert want, f"the sandbox holds no {stream} rows"
    assert target.emitted(output, stream) == want, f"{stream}: records differ from the sandbox's data"
    assert len(records) == len(want), f"{stream}: {len(records) - len(want)} rows emitted more than once"


def gaps_after(entries: list, status: int) -> list[float]:
    """For each answer with `status`, seconds until the host's next request."""
    gaps = []
    for index, entry in enumerate(entries):
        if entry.status == status and index + 1 < len(entries):
            gaps.append(entries[index + 1].at - entry.at)
    return gaps


# -------------------------------------------------------------------- API faults


@pytest.mark.parametrize("api", API_NAMES)
def test_429_waits_as_long_as_the_apis_own_retry_header_says(api, sandbox_for):
    """Retry-After (Next Commerce), X-Rate-Limit-Retry (Voucherify), x-ratelimit-reset (Intelligems)."""
    target, sandbox = TARGETS[api], sandbox_for(api)
    # Voucherify's header value is the fault's value; the others are fixed by their emulators (1 s).
    sandbox.faults.arm("rate_limit", 2, value=target.profile.rate_limit_fault_value)
    output = run_tap(target.config(sandbox, export_window_days=ONE_WINDOW), streams={target.stream})

    assert output.error is None, output.error
    assert_rows_exactly_once(output, target, sandbox, target.stream)
    api_calls = sandbox.log.entries(host=target.api_host)
    assert [e.status for e in api_calls].count(429) == 2
    gaps = gaps_after(api_calls, 429)
    assert len(gaps) == 2
    # The log stamps an answer just before sending it; the retry comes at least the asked wait later.
    assert min(gaps) >= target.profile.retry_header_wait - 0.05, f"retried {min(gaps):.2f}s after a 429"
    assert max(gaps) < target.profile.retry_header_wait + 2.0, "waited far longer than the API asked"


@pytest.mark.parametrize("api", API_NAMES)
def test_a_burst_of_500_502_503_is_retried_with_backoff_and_loses_nothing(api, sandbox_for):
    target, sandbox = TARGETS[api], sandbox_for(api)
    sandbox.faults.arm("server_error", 3)
    output = run_tap(target.config(sandbox, export_window_days=ONE_WINDOW), streams={target.stream})

    assert output.error is None, output.error
    assert_rows_exactly_once(output, target, sandbox, target.stream)
    api_calls = sandbox.log.entries(host=target.api_host)
    assert [e.status for e in api_calls[:3]] == [500, 502, 503]
    # Each failed call is retried as the same call, then succeeds.
    assert len({(e.method, e.path) for e in api_calls[:4]}) == 1
    assert api_calls[3].status < 400
    assert len([e for e in target.creates(sandbox) if e.status < 400]) == 1, "an export was paid for twice"
    assert output.log_text.count("retry ") >= 3


# -------------------------------------------------------------- download faults

DOWNLOAD_FAULTS = ("download_reset", "download_short", "download_cut_quote")


@pytest.mark.parametrize(
    "api,fault",
    [pytest.param(api, fault) for api in API_NAMES for fault in DOWNLOAD_FAULTS],
)
def test_a_cut_download_is_detected_fetched_again_and_its_rows_emitted_once(api, fault, sandbox_for):
    target, sandbox = TARGETS[api], sandbox_for(api)
    sandbox.faults.arm(fault, 1)
    output = run_tap(target.config(sandbox, export_window_days=ONE_WINDOW), streams={target.stream})

    assert output.error is None, output.error
    assert sandbox.faults.fired[fault] == 1
    assert "was incomplete" in output.log_text
    if fault == "download_cut_quote":
        assert "file ends inside a quoted field" in output.log_text
    assert_rows_exactly_once(output, target, sandbox, target.stream)
    # Only the whole file was parsed: one file read to its end, holding every row.
    assert emitted_rows_logged(output, target.stream) == [len(target.expected(sandbox, target.stream))]
    downloads = sandbox.log.entries(host=target.file_host)
    if fault in target.profile.content_faults:  # the cut is in the stored file: only a new export gives a whole one
        assert len(target.creates(sandbox)) == 2
    else:  # a transport fault: the same export, downloaded again
        assert len(target.creates(sandbox)) == 1
        assert len(downloads) == 2 and downloads[0].path == downloads[1].path


def test_an_expired_voucherify_url_is_renewed_by_reading_the_export_again(voucherify_sandbox):
    target, sandbox = TARGETS["voucherify"], voucherify_sandbox
    sandbox.faults.arm("url_expired", 1)
    output = run_tap(target.config(sandbox, export_window_days=ONE_WINDOW), streams={target.stream})

    assert output.error is None, output.error
    assert_rows_exactly_once(output, target, sandbox, target.stream)
    assert len(target.creates(sandbox)) == 1, "a new export was paid for a fresh URL"
    downloads = sandbox.log.entries(host="voucherify-download")
    assert [d.status for d in downloads] == [403, 200]
    assert downloads[0].query["token"] != downloads[1].query["token"]
    export_id = downloads[0].path.rsplit("/", 1)[-1]
    reads = sandbox.log.entries(host="voucherify-api", method="GET", path_pattern=f"/v1/exports/{export_id}$")
    assert [r for r in reads if downloads[0].at <= r.at <= downloads[1].at], "no re-read between 403 and retry"


def test_an_intelligems_export_that_never_answers_times_out_after_export_timeout_seconds(intelligems_sandbox):
    target, sandbox = TARGETS["intelligems"], intelligems_sandbox
    sandbox.faults.arm("export_latency", 0, value=4.0)  # the export POST answers after 4 s
    started = time.monotonic()
    output = run_tap(
        target.config(sandbox, export_window_days=ONE_WINDOW, export_timeout_seconds=1), streams={target.stream}
    )
    elapsed = time.monotonic() - started

    assert output.error is not None, f"an export slower than export_timeout_seconds=1 was waited for ({elapsed:.1f}s)"
    assert first_experience(sandbox.intelligems) in str(output.error)
    assert "export_timeout_seconds" in str(output.error)


# ------------------------------------------------------------------ file faults

RESUME_AT = "2024-01-16T00:00:00+00:00"


def bad_window_of(error_text: str, stream: str) -> tuple[str, str]:
    match = re.search(rf"{stream}[^\n]*\[([^,]+), ([^)]+)\) export (\S+): row", error_text)
    assert match, f"the error does not name the window and export: {error_text}"
    return match.group(1), match.group(2)


@pytest.mark.parametrize(
    "api,fault",
    [pytest.param(api, fault) for fault in ("malformed_row", "bad_utf8") for api in API_NAMES],
)
def test_a_bad_row_fails_its_window_naming_stream_export_and_row_while_other_streams_sync(api, fault, sandbox_for):
    target, sandbox = TARGETS[api], sandbox_for(api)
    sandbox.faults.arm(fault, 1)
    # One export at a time: the first export created (the first stream's first window) is the bad one.
    config = target.config(sandbox, max_concurrent_exports=1)
    output = run_tap(config, state=target.state_at(RESUME_AT, sandbox), streams=set(target.streams))

    assert isinstance(output.error, SyncFailures), output.error
    assert len(output.error.failures) == 1, output.error.failures
    failure = output.error.failures[0]
    bad_stream = failure.split(":", 1)[0]
    good_stream = next(s for s in target.streams if s != bad_stream)
    assert bad_stream in target.streams
    # The message names the stream, the export and the data row.
    export_id = re.search(r"\) export (\S+): row", failure).group(1)
    if not target.profile.resumable:  # a synchronous API's export id names its partition
        assert export_id.startswith(next(iter(target.context(sandbox).values())))
    else:
        read = sandbox.log.entries(
            host=target.api_host, method="GET", path_pattern=rf"/exports/{export_id}/?(download/)?$"
        )
        assert read, f"export {export_id} named in the error is not one the API made"
    reason = "fields but the header has" if fault == "malformed_row" else "holds bytes that are not UTF-8"
    assert reason in failure, failure
    assert f"row {target.profile.bad_row} " in failure or f"row {target.profile.bad_row}," in failure, failure
    window_start, window_end = bad_window_of(failure, bad_stream)
    assert window_start == RESUME_AT
    # The bad stream's bookmark never passes the bad window; nothing after that window was emitted.
    assert all(
        target.bookmark(s, bad_stream, sandbox) == RESUME_AT
        for s in output.states()
        if target.bookmark(s, bad_stream, sandbox) is not None
    )
    assert target.bookmark(output.final_state, bad_stream, sandbox) == RESUME_AT
    rk = target.replication_keys[bad_stream]
    assert all(normalized(r[rk]) < normalized(window_end) for r in output.records(bad_stream))
    # The other stream synced every row from the bookmark on, and its bookmark reached the end.
    assert target.emitted(output, good_stream) == target.expected(sandbox, good_stream, start=RESUME_AT)
    assert target.bookmark(output.final_state, good_stream, sandbox) == END


@pytest.mark.parametrize("api", API_NAMES)
@pytest.mark.parametrize("fault", ["empty_file", "header_only"])
def test_a_file_without_rows_emits_nothing_moves_the_bookmark_and_succeeds(api, fault, sandbox_for):
    target, sandbox = TARGETS[api], sandbox_for(api)
    sandbox.faults.arm(fault, 1)
    output = run_tap(target.config(sandbox, export_window_days=ONE_WINDOW), streams={target.stream})

    assert output.error is None, output.error
    assert sandbox.faults.fired[fault] == 1
    assert output.records(target.stream) == []
    assert emitted_rows_logged(output, target.stream) == [0]
    assert target.bookmark(output.final_state, target.stream, sandbox) == END


@pytest.mark.parametrize("api", ["nextcommerce", "intelligems"])
def test_a_new_column_is_kept_as_text_and_announced_by_schema_first(api, sandbox_for):
    target, sandbox = TARGETS[api], sandbox_for(api)
    sandbox.faults.arm("new_column", 1)
    output = run_tap(target.config(sandbox, export_window_days=ONE_WINDOW), streams={target.stream})

    assert output.error is None, output.error
    known = set(output.schemas(target.stream)[0]["properties"])
    records = output.records(target.stream)
    # Columns of the seed's reality that discovery cannot know are in the sandbox's rows too.
    expected_keys = set().union(*target.expected(sandbox, target.stream).values())
    new_keys = set().union(*(set(r) for r in records)) - known - expected_keys
    assert len(new_keys) == 1, new_keys
    new_key = new_keys.pop()
    assert all(isinstance(r[new_key], str) for r in records if r[new_key] is not None)
    assert any(r[new_key] for r in records)
    first_record = next(i for i, m in enumerate(output.messages) if m["type"] == "RECORD" and new_key in m["record"])
    schema_at = next(
        i for i, m in enumerate(output.messages) if m["type"] == "SCHEMA" and new_key in m["schema"]["properties"]
    )
    assert schema_at < first_record
    assert output.messages[schema_at]["schema"]["properties"][new_key]["type"] == ["string", "null"]
    # Every other value is as the sandbox holds it.
    without_new = [{k: v for k, v in r.items() if k != new_key} for r in records]
    assert keyed(without_new, target.keys[target.stream]) == target.expected(sandbox, target.stream)


# ---------------------------------------------------- kills, signals and resumes


def read_messages(process, *, stop: Callable[[dict, list[dict]], bool], timeout: float = 60) -> list[dict]:
    """Singer messages from a tap process until `stop(message, so_far)` says to stop (or the tap ends)."""
    messages: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        message = json.loads(line)
        messages.append(message)
        if stop(message, messages):
            break
    return messages


def full_expected(sandbox) -> dict[str, dict]:
    """Every file stream (and full-table listing) of every API in the sandbox, keyed: the data set a
    complete sync must deliver. The results streams read JSON answers: their own tests cover them."""
    expected: dict[str, dict] = {}
    for source in SOURCES:
        if source.name not in sandbox.emulators:
            continue
        for stream_type in source.stream_types:
            if issubclass(stream_type, ExportStream) or stream_type.replication_key is None:
                rows = sandbox.emulators[source.name].every_expected_record(stream_type.name)
                expected[stream_type.name] = keyed(rows, tuple(stream_type.primary_keys))
    return expected


# The export streams: the results streams read JSON answers, not files (tests/test_intelligems_results.py).
INTELLIGEMS_KEYS = {
    stream.name: tuple(stream.primary_keys)
    for stream in intelligems.STREAM_TYPES
    if issubclass(stream, ExportStream) and getattr(stream, "partition_key", None)
}


def union_emitted(messages: list[dict], expected: dict[str, dict]) -> dict[str, dict]:
    """Records of several runs merged by primary key, compared the way `full_expected` keys them.

    Orders' `metadata` (the whole JSON, not in the sandbox's rows) is checked against its columns and
    dropped; a Next Commerce drift column is None in rows read from files that have it but whose row
    predates it, where the sandbox's row has no such key.
    """
    keys = {stream.name: tuple(stream.primary_keys) for source in SOURCES for stream in source.stream_types}
    merged: dict[str, dict] = {stream: {} for stream in expected}
    for message in messages:
        if message["type"] != "RECORD":
            continue
        stream, record = message["stream"], dict(message["record"])
        if stream not in expected:
            continue  # not an export (Intelligems results): the kill tests are about exports and files
        if stream == "voucherify_orders":
            metadata = record.pop("metadata") or {}
            assert metadata.get("payment_mean") == record.get("metadata_payment_mean")
        key = tuple(normalized(record.get(k)) for k in keys[stream])
        want = expected[stream].get(key, {})
        for column, value in want.items():  # an empty JSON cell is left out of its record
            if value is None:
                record.setdefault(column, None)
        if stream.startswith("nextcommerce_"):
            record = {k: v for k, v in record.items() if v is not None or k in want}
        merged[stream][key] = normalized(record)
    return merged


@pytest.mark.parametrize("kill_after_states", [1, 3, 7])
def test_a_run_killed_at_any_state_loses_no_row_once_resumed_from_its_last_state(kill_after_states):
    with Sandbox(export_latency_seconds=FAST_EXPORTS, rows_per_type=12) as sandbox:
        config = {**sandbox.tap_config(), "nextcommerce_requests_per_second": 50, "export_window_days": 15}
        sandbox.nextcommerce.rate_per_second = 100
        sandbox.nextcommerce.rate_burst = 100
        process = start_tap_process(config)
        seen = read_messages(
            process,
            stop=lambda m, so_far: (
                m["type"] == "STATE" and sum(1 for x in so_far if x["type"] == "STATE") == kill_after_states
            ),
        )
        process.send_signal(signal.SIGKILL)
        rest, _ = drain(process)
        killed = seen + rest
        states = [m["value"] for m in killed if m["type"] == "STATE"]
        assert len(states) >= kill_after_states, "the tap ended before it was killed"
        assert process.returncode == -signal.SIGKILL

        second = run_tap(config, state=states[-1])
        assert second.error is None, second.error
        expected = full_expected(sandbox)
        got = union_emitted(killed + second.messages, expected)
        for stream, want in expected.items():
            assert want, f"the sandbox holds no {stream} rows"
            assert got[stream] == want, f"{stream}: the killed run and its resume together differ from the data"


def test_sigterm_mid_window_exits_cleanly_with_a_state_as_its_last_message():
    with Sandbox(("voucherify",), export_latency_seconds=FAST_EXPORTS, rows_per_type=2000) as sandbox:
        config = {**sandbox.voucherify.tap_config(), "export_window_days": 15}
        catalog = catalog_selecting(config, {"voucherify_orders"})
        process = start_tap_process(config, catalog=catalog)
        after_state = []

        def stop(message: dict, so_far: list[dict]) -> bool:
            if message["type"] == "STATE":
                after_state.append(0)
            elif message["type"] == "RECORD" and after_state:
                after_state[0] += 1
            return bool(after_state) and after_state[0] >= 50  # 50 rows into the second of 4 windows

        seen = read_messages(process, stop=stop)
        assert after_state and after_state[0] >= 50, "the tap ended before the second window"
        process.send_signal(signal.SIGTERM)
        rest, last_line = drain(process)
        stderr = Path(process.stderr_path).read_text()

        assert process.returncode == 128 + signal.SIGTERM, f"exit code {process.returncode}, not a clean stop"
        assert "Traceback" not in stderr
        last = (rest or seen)[-1]
        assert last["type"] == "STATE", f"last message is a {last['type']}: {(last_line or json.dumps(last))[:120]}"


# ---------------------------------------------- a stop ends every wait in seconds

STOP_SIGNALS = pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
#: Seconds from the signal to the end of the process (exit code 128 + signal, a STATE last).
STOPS_WITHIN = 5.0
#: Longer than any test here takes: a tap still running then is killed, and the test fails.
STUCK_AFTER = 30.0
#: Imported by the tap process (PYTHONPATH) in the backoff test: every retry of a 5xx waits 30 s, so
#: a stop that waited one out would show. Jitter is bound as ApiClient's default when http.py loads.
LONG_BACKOFF = """
import itertools
import backoff
backoff.full_jitter = lambda seconds: seconds
from tap_commerce_exports.exports import http
http.ApiClient._backoff_delays = lambda self: itertools.repeat(30.0)
"""


@contextlib.contextmanager
def voucherify_orders_tap(sandbox: Sandbox, **settings: Any):
    """The tap in a subprocess, exporting Voucherify orders in one window; killed if a test leaves it running."""
    config = {**sandbox.voucherify.tap_config(), "export_window_days": ONE_WINDOW, **settings}
    process = start_tap_process(config, catalog=catalog_selecting(config, {"voucherify_orders"}))
    try:
        yield process, Path(process.stderr_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_stops_in_seconds(process, signum: int) -> str:
    """Signal the tap: it ends within STOPS_WITHIN, with exit code 128 + signal and a STATE last. Its stderr."""
    stopped_at = time.monotonic()
    process.send_signal(signum)
    watchdog = threading.Timer(STUCK_AFTER, process.kill)  # drain reads until the tap closes its stdout
    watchdog.start()
    try:
        messages, _ = drain(process)
    finally:
        watchdog.cancel()
    seconds = time.monotonic() - stopped_at
    stderr = Path(process.stderr_path).read_text()
    assert process.returncode == 128 + signum, f"exit code {process.returncode}: {stderr[-2000:]}"
    assert messages and messages[-1]["type"] == "STATE", f"the last message is no STATE: {stderr[-2000:]}"
    assert seconds < STOPS_WITHIN, f"the tap took {seconds:.1f}s to stop"
    return stderr


@STOP_SIGNALS
def test_a_stop_during_a_long_download_does_not_wait_for_it(signum):
    with Sandbox(("voucherify",), export_latency_seconds=FAST_EXPORTS, rows_per_type=10_000) as sandbox:
        sandbox.faults.arm("download_slow", 1, value=0.3)  # ~2.3 MB in 64 KiB chunks: ~11 s
        with voucherify_orders_tap(sandbox) as (process, _):
            wait_until(lambda: sandbox.faults.fired.get("download_slow"), "the download to start")
            stderr = assert_stops_in_seconds(process, signum)
    assert "downloaded" not in stderr


@STOP_SIGNALS
def test_a_stop_during_a_poll_sleep_ends_the_run_in_seconds(signum):
    with Sandbox(("voucherify",), export_latency_seconds=FAST_EXPORTS) as sandbox:
        sandbox.faults.arm("export_latency", 0, value=120.0)  # the export stays in progress
        with voucherify_orders_tap(sandbox, poll_interval_seconds=60, poll_max_interval_seconds=60) as (process, log):
            wait_for_log(log, "created export")  # its first poll comes 60 s later
            time.sleep(0.3)
            assert_stops_in_seconds(process, signum)
    assert not sandbox.log.entries(host="voucherify-api", path_pattern=r"^/v1/exports"), "it polled: no sleep"


@STOP_SIGNALS
def test_a_stop_during_a_429_wait_ends_the_run_in_seconds(signum):
    with Sandbox(("voucherify",), export_latency_seconds=FAST_EXPORTS) as sandbox:
        sandbox.faults.arm("export_latency", 0, value=120.0)  # polled until the 429
        with voucherify_orders_tap(sandbox) as (process, log):
            wait_for_log(log, "created export")
            sandbox.faults.arm("rate_limit", 1, value=60.0)  # the next poll: a 429 that asks for 60 s
            wait_for_log(log, "voucherify: rate limited")
            stderr = assert_stops_in_seconds(process, signum)
    (asked,) = re.findall(r"waiting (\d+\.\d)s as the API asked", stderr)
    assert 59 <= float(asked) <= 61.5  # the block's 60 s (to the whole second on some seeds)


@STOP_SIGNALS
def test_a_stop_during_the_backoff_between_5xx_retries_ends_the_run_in_seconds(signum, tmp_path, monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(LONG_BACKOFF)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with Sandbox(("voucherify",), export_latency_seconds=FAST_EXPORTS) as sandbox:
        sandbox.faults.arm("export_latency", 0, value=120.0)  # polled until the 5xx
        with voucherify_orders_tap(sandbox) as (process, log):
            wait_for_log(log, "created export")
            sandbox.faults.arm("server_error", -1)
            wait_for_log(log, "retry 1 of 7 in 30.0s")
            assert_stops_in_seconds(process, signum)


def batch_rows(messages: list[dict]) -> set[str]:
    """Order ids in the files that BATCH messages announced."""
    ids = set()
    for message in messages:
        if message["type"] == "BATCH":
            for url in message["manifest"]:
                with open(url.removeprefix("file://")) as batch:
                    ids.update(json.loads(line)["id"] for line in batch)
    return ids


def start_batch_run(sandbox, storage: Path) -> tuple[Any, dict, Path]:
    """Voucherify orders in BATCH mode: 4 windows of 100 orders, exported one after another, each
    taking 2 s, in files of 150 records (so files span windows). Returns process, config, stderr."""
    config = {
        **sandbox.voucherify.tap_config(),
        "export_window_days": 15,
        "max_concurrent_exports": 1,
        "batch_config": {
            "encoding": {"format": "jsonl", "compression": "none"},
            "storage": {"root": f"file://{storage}"},
            "batch_size": 150,
        },
    }
    sandbox.voucherify.faults.arm("export_latency", 0, value=2.0)
    process = start_tap_process(config, catalog=catalog_selecting(config, {"voucherify_orders"}))
    return process, config, Path(process.stderr_path)


def resume_and_check_every_order_arrives(sandbox, config: dict, first_run: list[dict]) -> None:
    """A second run from the first run's last STATE (none: from the start) completes the data."""
    states = [m["value"] for m in first_run if m["type"] == "STATE"]
    sandbox.voucherify.faults.disarm("export_latency")
    resumed = run_tap(config, state=states[-1] if states else None, streams={"voucherify_orders"})
    assert resumed.error is None, resumed.error
    expected = {row["id"] for row in sandbox.voucherify.expected_records("voucherify_orders")}
    assert batch_rows(first_run) | batch_rows(resumed.messages) == expected


@pytest.mark.parametrize("signals", [1, 2])
def test_a_batch_run_stopped_while_a_file_is_open_loses_no_row_once_resumed(signals, tmp_path):
    """Stopped while window 2's last rows sit in the open file (file 1 holds window 1 and half of
    window 2): no STATE may pass them, whether the run stops at a safe point or at once."""
    with Sandbox(("voucherify",), export_latency_seconds=FAST_EXPORTS, rows_per_type=400) as sandbox:
        process, config, stderr = start_batch_run(sandbox, tmp_path)
        wait_for_log(stderr, ": emitted ", count=2)  # window 3's export takes 2 s more
        process.send_signal(signal.SIGTERM)
        if signals == 2:  # the second, once the first is heard, stops at once (unless the first got there)
            wait_for_log(stderr, "Signal 15 received")
            process.send_signal(signal.SIGTERM)
        stopped, _ = drain(process)
        assert process.returncode == 128 + signal.SIGTERM, stderr.read_text()[-2000:]
        if signals == 1:  # a stop at a safe point announces the open file and ends with STATE
            assert "stopping at once" not in stderr.read_text() and stopped[-1]["type"] == "STATE"
            assert len(batch_rows(stopped)) == 200
        elif "stopping at once" in stderr.read_text():  # the last STATE is the one after file 1 (window 1)
            states = [m["value"] for m in stopped if m["type"] == "STATE"]
            assert states[-1]["bookmarks"]["voucherify_orders"]["replication_key_value"] == "2024-01-16T00:00:00+00:00"
            assert len(batch_rows(stopped)) == 150
        resume_and_check_every_order_arrives(sandbox, config, stopped)


def test_a_batch_file_that_fails_to_land_takes_no_bookmark_with_it(tmp_path):
    """Window 1's last rows sit in the open file when its storage breaks: the run fails, and no STATE
    passes those rows, so the next run exports them again."""
    storage = tmp_path / "batches"
    with Sandbox(("voucherify",), export_latency_seconds=FAST_EXPORTS, rows_per_type=400) as sandbox:
        process, config, stderr = start_batch_run(sandbox, storage)
        wait_for_log(stderr, ": emitted ")  # window 2's export takes 2 s more
        storage.rmdir()
        storage.write_text("not a directory: the first file cannot land")
        failed, _ = drain(process)
        assert process.returncode == 1, stderr.read_text()[-2000:]
        assert not batch_rows(failed)
        states = [m["value"] for m in failed if m["type"] == "STATE"]
        bookmark = states[-1]["bookmarks"]["voucherify_orders"].get("replication_key_value") if states else None
        assert bookmark in (None, "2024-01-01T00:00:00+00:00"), f"STATE passed rows never announced: {bookmark}"
        storage.unlink()
        resume_and_check_every_order_arrives(sandbox, config, failed)


# -------------------------------------------------------- exports not paid twice

RESUMABLE = tuple(name for name, target in TARGETS.items() if target.profile.resumable)
# A poll of the export or (Next Commerce, whose polls go through its export listing) its download URL.


def in_flight(state: dict, stream: str) -> list[dict]:
    return state.get("bookmarks", {}).get(stream, {}).get("exports_in_flight", [])


@pytest.mark.parametrize("api", RESUMABLE)
def test_a_run_killed_while_its_export_is_in_flight_resumes_that_export_instead_of_paying_again(api, sandbox_for):
    target, sandbox = TARGETS[api], sandbox_for(api)
    sandbox.faults.arm("export_latency", 0, value=2.5)  # exports stay in flight long enough to kill the tap
    config = target.config(sandbox, export_window_days=ONE_WINDOW)
    process = start_tap_process(config, catalog=catalog_selecting(config, {target.stream}))
    seen = read_messages(
        process, stop=lambda m, _: m["type"] == "STATE" and bool(in_flight(m["value"], target.stream)), timeout=30
    )
    process.send_signal(signal.SIGKILL)
    drain(process)
    states = [m["value"] for m in seen if m["type"] == "STATE" and in_flight(m["value"], target.stream)]
    assert states, "no STATE named the export in flight before the tap was killed"
    remembered = in_flight(states[-1], target.stream)
    assert [item["export_id"] for item in remembered] and len(target.creates(sandbox)) == 1

    sandbox.faults.disarm("export_latency")
    sandbox.log.clear()
    second = run_tap(config, state=states[-1], streams={target.stream})
    assert second.error is None, second.error
    assert target.creates(sandbox) == [], "the remembered export was paid for again"
    export_id = remembered[0]["export_id"]
    assert sandbox.log.entries(
        host=target.api_host, method="GET", path_pattern=target.profile.export_read.format(id=export_id)
    )
    assert f"resuming export {export_id} from state" in second.log_text
    assert_rows_exactly_once(second, target, sandbox, target.stream)


def remembered_state(target: Target, export_id: str) -> dict:
    return {
        "bookmarks": {
            target.stream: {"exports_in_flight": [{"export_id": export_id, "window_start": START, "window_end": END}]}
        }
    }


@pytest.mark.parametrize("api", RESUMABLE)
def test_an_export_remembered_in_state_is_polled_and_downloaded_not_created_again(api, sandbox_for):
    target, sandbox = TARGETS[api], sandbox_for(api)
    config = target.config(sandbox, export_window_days=ONE_WINDOW)
    run_tap(config, streams={target.stream})  # leaves one finished export on the API
    reads = [
        re.search(TARGETS[api].profile.export_read.format(id=TARGETS[api].profile.export_id), e.path)
        for e in sandbox.log.entries(host=target.api_host, method="GET")
    ]
    (export_id,) = {read.group(1) for read in reads if read}
    sandbox.log.clear()

    output = run_tap(config, state=remembered_state(target, export_id), streams={target.stream})
    assert output.error is None, output.error
    assert target.creates(sandbox) == []
    assert f"resuming export {export_id} from state" in output.log_text
    assert sandbox.log.entries(
        host=target.api_host, method="GET", path_pattern=target.profile.export_read.format(id=export_id)
    )
    assert_rows_exactly_once(output, target, sandbox, target.stream)
    assert in_flight(output.final_state, target.stream) == [], "a read export is still remembered"


@pytest.mark.parametrize("api", RESUMABLE)
def test_a_remembered_export_that_vanished_is_created_again(api, sandbox_for):
    target, sandbox = TARGETS[api], sandbox_for(api)
    vanished = target.profile.vanished_export_id
    output = run_tap(
        target.config(sandbox, export_window_days=ONE_WINDOW),
        state=remembered_state(target, vanished),
        streams={target.stream},
    )

    assert output.error is None, output.error
    lookups = sandbox.log.entries(
        host=target.api_host, method="GET", path_pattern=target.profile.export_read.format(id=vanished)
    )
    assert [e.status for e in lookups] == [404]
    assert len(target.creates(sandbox)) == 1
    assert_rows_exactly_once(output, target, sandbox, target.stream)
    assert in_flight(output.final_state, target.stream) == []


# ------------------------------------------------------------- partition isolation


def test_an_intelligems_experience_that_404s_fails_alone_while_the_others_sync(intelligems_sandbox):
    emulator = intelligems_sandbox.intelligems
    stream = "intelligems_orders"
    real = first_experience(emulator)
    ghost = str(uuid.UUID(int=0x5EED, version=4))
    output = run_tap({**emulator.tap_config(), "intelligems_experience_ids": [real, ghost]}, streams={stream})

    assert isinstance(output.error, SyncFailures), output.error
    assert len(output.error.failures) == 1 and f"experience_id={ghost}" in output.error.failures[0]
    want = keyed(emulator.expected_records(stream, partition={"experience_id": real}), INTELLIGEMS_KEYS[stream])
    assert keyed(output.records(stream), INTELLIGEMS_KEYS[stream]) == want
    partitions = output.final_state["bookmarks"][stream]["partitions"]
    assert any(p["context"] == {"experience_id": real} and p["replication_key_value"] == END for p in partitions)


# --------------------------------------------------------------------- secrets

CREDENTIAL_HEADERS = ("authorization", "x-app-id", "x-app-token", "intelligems-access-token")
SIGNED_QUERY_VALUES = ("token", "signature", "X-Amz-Signature", "X-Amz-Credential")


def test_no_credential_or_signed_url_secret_appears_in_any_output_of_a_faulty_debug_run(monkeypatch):
    with Sandbox(export_latency_seconds=FAST_EXPORTS, rows_per_type=30) as sandbox:
        sandbox.nextcommerce.rate_per_second = 100
        sandbox.nextcommerce.rate_burst = 100
        config = {**sandbox.tap_config(), "nextcommerce_requests_per_second": 50, "export_window_days": 30}
        # An unknown experience makes the run fail with an API error message, the likeliest place for a leak.
        ghost = str(uuid.UUID(int=0x5EED, version=4))
        config["intelligems_experience_ids"] = [first_experience(sandbox.intelligems), ghost]
        for fault, times in (
            ("server_error", 3),
            ("rate_limit", 2),
            ("url_expired", 3),
            ("download_reset", 1),
            ("download_short", 1),
            ("download_cut_quote", 1),
            ("malformed_row", 1),
        ):
            sandbox.faults.arm(fault, times, value=0.3 if fault == "rate_limit" else None)
        monkeypatch.setenv("LOGLEVEL", "DEBUG")
        process = start_tap_process(config)
        stdout, _ = process.communicate(timeout=120)
        stderr = Path(process.stderr_path).read_text()

        assert process.returncode == 1, "the unknown experience should fail its partition and the run"
        assert f"experience_id={ghost}" in stderr
        assert "| DEBUG" in stderr, "the run did not log at DEBUG"
        assert all(sandbox.faults.fired[f] for f in ("server_error", "url_expired", "download_reset")), dict(
            sandbox.faults.fired
        )
        everything = stdout + "\n" + stderr
        credentials = {
            name: value
            for name, value in config.items()
            if name in ("voucherify_app_id", "voucherify_app_token", "nextcommerce_api_token", "intelligems_api_token")
        }
        assert len(credentials) == 4
        secrets = dict(credentials)
        file_requests = [
            e
            for host in ("voucherify-download", "nextcommerce-files", "intelligems-s3")
            for e in sandbox.log.entries(host=host)
        ]
        assert {e.host for e in file_requests} == {"voucherify-download", "nextcommerce-files", "intelligems-s3"}
        for entry in file_requests:
            for name in SIGNED_QUERY_VALUES:
                if entry.query.get(name):
                    secrets[f"{entry.host} {name}"] = entry.query[name]
                    if name == "token":  # <expiry>.<nonce>.<signature>: the signature alone is the secret
                        secrets[f"{entry.host} token signature"] = entry.query[name].rsplit(".", 1)[-1]
        assert len(secrets) > 4
        leaked = sorted(name for name, value in secrets.items() if value and value in everything)
        assert leaked == [], f"secrets in the tap's output: {leaked}"

        # API credentials never travel to the S3 / CDN file hosts (Voucherify's download host needs them).
        for entry in file_requests:
            if entry.host == "voucherify-download":
                continue
            assert not set(entry.headers) & set(CREDENTIAL_HEADERS), (entry.host, sorted(entry.headers))
            header_text = " ".join(entry.headers.values())
            assert not [name for name in credentials if credentials[name] in header_text], entry.host
            assert entry.status != 400, f"{entry.host} refused a request carrying credentials"


# ------------------------------------------------------------------------ load


def test_fifty_intelligems_experiences_sync_in_one_run_within_the_rate_limit():
    with Sandbox(("intelligems",), export_latency_seconds=FAST_EXPORTS, rows_per_type=3) as sandbox:
        emulator = sandbox.intelligems
        added = emulator.add_experiences(50)
        started = [e.id for e in emulator.experiences() if e.started_at is not None]
        assert set(added) <= set(started)
        before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        began = time.monotonic()
        output = run_tap({**emulator.tap_config(), "export_window_days": ONE_WINDOW}, streams=set(INTELLIGEMS_KEYS))
        elapsed = time.monotonic() - began
        growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 1024

        assert output.error is None, output.error
        for stream, key in INTELLIGEMS_KEYS.items():
            want = keyed(
                [row for e in started for row in emulator.expected_records(stream, partition={"experience_id": e})], key
            )
            assert keyed(output.records(stream), key) == want, stream
            assert {r["experience_id"] for r in output.records(stream)} == {k[0] for k in want}, (
                f"{stream}: some experiences delivered nothing"
            )
        posts = sandbox.log.entries(host="intelligems-api", method="POST")
        exports = [e for e in posts if e.path.endswith("/export")]  # not the results' POSTs
        refused = [e for e in exports if e.status == 429]
        accepted = [e for e in exports if e.status == 200]
        assert len(accepted) == len(started) * 3
        # The tap spends the budget the API reports (x-ratelimit-remaining, less the requests in
        # flight) and waits for x-ratelimit-reset at zero: it stays inside the limit, no 429.
        assert refused == [], f"{len(refused)} exports answered 429 out of {len(exports)}"
        assert growth_mb < 300, f"peak RSS grew by {growth_mb:.0f} MB"
        print(
            f"50-experience load: {len(exports)} export calls, {len(refused)} 429s, {elapsed:.1f}s, "
            f"peak RSS +{growth_mb:.0f} MB"
        )

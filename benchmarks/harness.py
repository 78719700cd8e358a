"""Pieces of the benchmark: a file cache for the sandbox, subprocess runs with a counting sink and
peak-RSS sampling, the tap's log lines, catalogs, and the machine's description.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

from tap_commerce_exports.output.parallel_batches import usable_cpus

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
PYTHON = sys.executable
TAP_COMMAND = [PYTHON, "-m", "tap_commerce_exports.tap"]
READ_CHUNK = 1 << 20


# ------------------------------------------------------------------ sandbox file cache


class FileCache:
    """Serve each distinct export file of an emulator from a rendered copy on disk.

    The emulators compute an exact Content-Length by generating a file twice (once to count, once
    to send) at some 15-60k rows/s per pass, so a million-row download takes minutes and measures
    the emulator, not the tap. This wraps one emulator instance (instance attributes shadow its
    `_file_size`/`_file_chunks`; the sandbox's code is untouched): the first request for a file
    renders it once, with the emulator's own generator, into `directory`; every later export with
    the same content (same kind, sources, fields, filter, order, fault) is streamed from that copy.
    Size and bytes are exactly what the emulator would send.
    """

    def __init__(self, emulator: Any, directory: str) -> None:
        self.emulator = emulator
        self.directory = directory
        self._render_size = emulator._file_size
        self._render_chunks = emulator._file_chunks
        self._lock = threading.Lock()
        self._paths: dict[tuple, str] = {}
        self.renders: list[tuple[int, float]] = []  # (bytes, seconds) per file rendered
        self.served = 0
        emulator._file_size = self.file_size
        emulator._file_chunks = self.file_chunks

    @staticmethod
    def key(job: Any, variant: str) -> tuple:
        return (
            job.kind.name,
            tuple(source.key for source in job.sources),
            job.added_counts,
            job.fields,
            job.row_filter,
            job.sort,
            job.content_fault,
            variant,
        )

    def path(self, job: Any, variant: str = "whole") -> str:
        """The rendered file of this export (rendering it now if no export with its content was)."""
        key = self.key(job, variant)
        with self._lock:  # one render at a time; renders are rare and the lock keeps it simple
            if key not in self._paths:
                started = time.monotonic()
                handle, path = tempfile.mkstemp(prefix=f"{job.kind.name}-", suffix=".csv", dir=self.directory)
                size = 0
                with os.fdopen(handle, "wb") as out:
                    for chunk in self._render_chunks(job, variant):
                        out.write(chunk)
                        size += len(chunk)
                self.renders.append((size, time.monotonic() - started))
                self._paths[key] = path
            return self._paths[key]

    def file_size(self, job: Any, variant: str) -> int:
        return os.path.getsize(self.path(job, variant))

    def file_chunks(self, job: Any, variant: str):
        path = self.path(job, variant)
        self.served += 1

        def chunks():
            with open(path, "rb") as source:
                while chunk := source.read(READ_CHUNK):
                    yield chunk

        return chunks()


# ------------------------------------------------------------------------ subprocesses


@dataclass
class Run:
    """One subprocess whose stdout went to the counting sink."""

    label: str
    returncode: int
    wall_seconds: float
    started_at: float  # time.time() at spawn
    peak_rss_bytes: int  # VmHWM: the process's own high-water mark
    sink: dict
    log_path: str
    log_text: str = ""
    peak_rss_with_children_bytes: int = 0  # its own peak plus each child's (BATCH worker processes)
    children: int = 0

    @property
    def records(self) -> int:
        return int(self.sink["counts"]["RECORD"])

    def record_window(self, kind: str = "RECORD") -> float | None:
        first, last = self.sink["first"].get(kind), self.sink["last"].get(kind)
        return None if first is None or last is None else last - first


class RssSampler(threading.Thread):
    """Reads VmHWM (peak resident set) of a process and of its children from /proc every
    `interval` seconds.

    VmHWM belongs to the process's own address space (the one exec created), so unlike a child's
    ru_maxrss it never includes the parent it was forked from. The last reading before exit is the
    peak unless memory grew in the final interval. Children (the BATCH worker processes) are found
    through /proc/PID/task/PID/children; their peaks are kept per process, since they exit first.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.children_peak_kb: dict[int, int] = {}
        self.stopped = threading.Event()

    @property
    def peak_with_children_kb(self) -> int:
        """The sum of each process's own peak: an upper bound of the peak of their sum."""
        return self.peak_kb + sum(self.children_peak_kb.values())

    def run(self) -> None:
        own_command = _cmdline(self.pid)
        while not self.stopped.is_set():
            self.peak_kb = max(self.peak_kb, _peak_kb(self.pid))
            for child in _children(self.pid):
                # Between fork and exec a child still maps all of its parent's pages (shared, not
                # copied) and reports them as its own: count it only once it runs its own program.
                if _cmdline(child) == own_command:
                    continue
                peak = _peak_kb(child)
                if _cmdline(child) != own_command:
                    self.children_peak_kb[child] = max(self.children_peak_kb.get(child, 0), peak)
            self.stopped.wait(self.interval)


def _peak_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return 0


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read()
    except OSError:
        return b""


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return []


def run_to_sink(label: str, command: list[str], workdir: str, *, env: dict | None = None) -> Run:
    """Run `command` with stdout piped into sink.py; stderr (the logs) goes to a file."""
    slug = re.sub(r"[^0-9a-zA-Z]+", "-", label).strip("-")
    log_path = os.path.join(workdir, f"{slug}.log")
    summary_path = os.path.join(workdir, f"{slug}.sink.json")
    with open(log_path, "w") as log:
        started_at = time.time()
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, cwd=PROJECT, env=env)
        sampler = RssSampler(process.pid)
        sampler.start()
        sink = subprocess.Popen([PYTHON, os.path.join(HERE, "sink.py"), summary_path], stdin=process.stdout)
        assert process.stdout is not None
        process.stdout.close()  # the sink holds the only read end: the tap sees EPIPE if it dies
        returncode = process.wait()
        wall = time.monotonic() - started
        sampler.stopped.set()
        sampler.join()
        sink.wait()
    with open(summary_path) as summary, open(log_path, encoding="utf-8", errors="replace") as log_file:
        return Run(
            label,
            returncode,
            wall,
            started_at,
            sampler.peak_kb * 1024,
            json.load(summary),
            log_path,
            log_file.read(),
            peak_rss_with_children_bytes=sampler.peak_with_children_kb * 1024,
            children=len(sampler.children_peak_kb),
        )


def run_json(command: list[str]) -> Any:
    done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT, check=True)
    return json.loads(done.stdout)


# ------------------------------------------------------------------------ the tap's logs

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_PATTERNS = {
    "created": re.compile(r"created export (\S+) \(status"),
    "ready": re.compile(r"export (\S+) is (\S+) after \d+s \((\d+) polls\)"),
    "downloaded": re.compile(r"export (\S+): downloaded (\d+) bytes in ([\d.]+)s"),
    "emitted": re.compile(r"export (\S+): emitted (\d+) rows \((\d+) bytes\) in ([\d.]+)s"),
    "finished": re.compile(r"Sync finished in ([\d.]+)s with (\d+) failure"),
}


def _stamp(line: str) -> float | None:
    match = _STAMP.match(line)
    if not match:
        return None
    return dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class ExportLog:
    export_id: str
    created_at: float | None = None
    ready_at: float | None = None
    polls: int = 0
    downloaded_at: float | None = None
    download_seconds: float = 0.0
    bytes: int = 0
    emitted_at: float | None = None
    rows: int = 0
    emit_seconds: float = 0.0


@dataclass
class TapLog:
    exports: dict[str, ExportLog] = field(default_factory=dict)
    sync_seconds: float | None = None
    failures: int | None = None
    first_line_at: float | None = None

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.exports.values())

    @property
    def emit_seconds(self) -> float:
        return sum(e.emit_seconds for e in self.exports.values())


def parse_tap_log(text: str) -> TapLog:
    """What the tap said about each export: created, ready, downloaded, emitted; and the total."""
    parsed = TapLog()

    def export(export_id: str) -> ExportLog:
        return parsed.exports.setdefault(export_id, ExportLog(export_id))

    for line in text.splitlines():
        at = _stamp(line)
        if parsed.first_line_at is None and at is not None:
            parsed.first_line_at = at
        if match := _PATTERNS["created"].search(line):
            export(match.group(1)).created_at = at
        elif match := _PATTERNS["ready"].search(line):
            if match.group(2).lower() in ("done", "available", "ready", "completed", "succeeded"):
                item = export(match.group(1))
                item.ready_at, item.polls = at, int(match.group(3))
        elif match := _PATTERNS["downloaded"].search(line):
            item = export(match.group(1))
            item.downloaded_at, item.bytes, item.download_seconds = at, int(match.group(2)), float(match.group(3))
        elif match := _PATTERNS["emitted"].search(line):
            item = export(match.group(1))
            item.emitted_at, item.rows, item.emit_seconds = at, int(match.group(2)), float(match.group(4))
        elif match := _PATTERNS["finished"].search(line):
            parsed.sync_seconds, parsed.failures = float(match.group(1)), int(match.group(2))
    return parsed


# --------------------------------------------------------------------------- catalogs


def discover(config_path: str) -> dict:
    return run_json([*TAP_COMMAND, "--config", config_path, "--discover"])


def select_streams(catalog: dict, wanted: set[str]) -> dict:
    """The catalog with exactly the `wanted` streams selected (the others explicitly not)."""
    catalog = json.loads(json.dumps(catalog))
    for stream in catalog["streams"]:
        for entry in stream.get("metadata", []):
            if entry.get("breadcrumb") == []:
                entry["metadata"]["selected"] = stream["tap_stream_id"] in wanted
    return catalog


def write_json(path: str, value: Any) -> str:
    with open(path, "w") as out:
        json.dump(value, out, indent=1)
    return path


# ------------------------------------------------------------------------ Voucherify API


def voucherify_session(tap_config: dict) -> requests.Session:
    session = requests.Session()
    session.headers.update(
        {"X-App-Id": tap_config["voucherify_app_id"], "X-App-Token": tap_config["voucherify_app_token"]}
    )
    return session


def wait_for_export(session: requests.Session, api_url: str, export_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        export = session.get(f"{api_url}/v1/exports/{export_id}", timeout=30).json()
        if export["status"] == "DONE":
            return export
        if export["status"] == "ERROR" or time.monotonic() > deadline:
            raise RuntimeError(f"sandbox export {export_id} ended {export['status']}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- machine


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        model = platform.processor() or "unknown"
    usable = usable_cpus()  # what the tap itself counts (affinity and cgroup quota)
    memory = "unknown"
    try:
        with open("/proc/meminfo") as meminfo:
            total_kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
            memory = f"{total_kb / 1024**2:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    from importlib.metadata import version

    return {
        "nproc": str(usable),
        "cpu": model,
        "memory": memory,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "singer-sdk": version("singer-sdk"),
        "platform": platform.platform(),
    }

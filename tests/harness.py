"""Run the tap against the sandbox and read what it wrote: records, schemas, states, logs.

`run_tap` runs the tap in-process (fast, and the sandbox's request log sees every call);
`start_tap_process` runs the real console script in a subprocess, for kill and signal tests.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tap_commerce_exports.tap import TapCommerceExports

FAST_SETTINGS = {
    "start_date": "2024-01-01T00:00:00Z",
    "end_date": "2024-03-01T00:00:00Z",
    "export_window_days": 15,
    "poll_interval_seconds": 0.05,
    "poll_max_interval_seconds": 0.2,
    "export_timeout_seconds": 20,
}


@dataclass
class SingerOutput:
    """The messages of one run, grouped the way tests ask about them."""

    messages: list[dict] = field(default_factory=list)
    log_text: str = ""
    error: BaseException | None = None

    @classmethod
    def parse(cls, stdout: str, log_text: str = "", error: BaseException | None = None) -> SingerOutput:
        messages = [json.loads(line) for line in stdout.splitlines() if line.strip().startswith("{")]
        return cls(messages, log_text, error)

    def records(self, stream: str) -> list[dict]:
        """The stream's records as a target reads them: an empty JSON cell is left out of its record
        (so targets store SQL NULL, not the JSON literal null), which reads as None here."""
        records = [m["record"] for m in self.messages if m["type"] == "RECORD" and m["stream"] == stream]
        json_keys = self.json_columns(stream)
        for record in records:
            for key in json_keys:
                record.setdefault(key, None)
        return records

    def json_columns(self, stream: str) -> set[str]:
        columns: set[str] = set()
        for schema in self.schemas(stream):
            for key, prop in schema.get("properties", {}).items():
                types = prop.get("type", [])
                if types == ["object", "array", "null"]:  # the JSON kind of csv_records.py
                    columns.add(key)
        return columns

    def streams_with_records(self) -> set[str]:
        return {m["stream"] for m in self.messages if m["type"] == "RECORD"}

    def schemas(self, stream: str) -> list[dict]:
        return [m["schema"] for m in self.messages if m["type"] == "SCHEMA" and m["stream"] == stream]

    def states(self) -> list[dict]:
        return [m["value"] for m in self.messages if m["type"] == "STATE"]

    @property
    def final_state(self) -> dict:
        states = self.states()
        return states[-1] if states else {}

    def text(self) -> str:
        return "\n".join(json.dumps(m) for m in self.messages) + "\n" + self.log_text


def select_only(tap: TapCommerceExports, stream_names: set[str] | None) -> None:
    if stream_names is None:
        return
    for name, stream in tap.streams.items():
        stream.selected = name in stream_names


def run_tap(
    config: dict,
    *,
    state: dict | None = None,
    streams: set[str] | None = None,
    deselected_columns: dict[str, set[str]] | None = None,
) -> SingerOutput:
    """Sync in-process; returns the output even when the tap fails (the error is kept).
    `deselected_columns`: columns of a stream its catalog leaves out, by stream."""
    stdout = io.StringIO()
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.DEBUG)
    error = None
    try:
        with contextlib.redirect_stdout(stdout):
            tap = TapCommerceExports(config={**FAST_SETTINGS, **config}, state=state, parse_env_config=False)
            select_only(tap, streams)
            for name, columns in (deselected_columns or {}).items():
                stream = tap.streams[name]
                for column in columns:
                    stream.metadata[("properties", column)].selected = False
                stream.selected = stream.selected  # the SDK's selection mask is resolved again
            try:
                tap.sync_all()
            except Exception as exc:  # the test decides whether this was expected
                error = exc
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
    return SingerOutput.parse(stdout.getvalue(), logs.getvalue(), error)


def start_tap_process(
    config: dict,
    *,
    state: dict | None = None,
    catalog: dict | None = None,
    workdir: str | None = None,
    own_process_group: bool = False,
) -> subprocess.Popen:
    """The console script in a subprocess, writing Singer messages to its stdout pipe; in a process
    group of its own (pid = group id) when a test signals the whole group, as orchestrators do."""
    workdir = workdir or tempfile.mkdtemp(prefix="tap-run-")
    config_path = os.path.join(workdir, "config.json")
    with open(config_path, "w") as out:
        json.dump({**FAST_SETTINGS, **config}, out)
    command = [sys.executable, "-m", "tap_commerce_exports.tap", "--config", config_path]
    if state is not None:
        state_path = os.path.join(workdir, "state.json")
        with open(state_path, "w") as out:
            json.dump(state, out)
        command += ["--state", state_path]
    if catalog is not None:
        catalog_path = os.path.join(workdir, "catalog.json")
        with open(catalog_path, "w") as out:
            json.dump(catalog, out)
        command += ["--catalog", catalog_path]
    # stderr goes to a file: a pipe nobody reads fills up and blocks the tap mid-run.
    stderr = open(os.path.join(workdir, "stderr.log"), "w")  # noqa: SIM115  (closed with the process)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=own_process_group
    )
    process.stderr_path = stderr.name  # type: ignore[attr-defined]
    return process


def normalized(value: Any) -> Any:
    """Compare values as a target would store them: instants as instants, numbers as numbers."""
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == "T":
        with contextlib.suppress(ValueError):
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if moment.tzinfo is not None:
                return moment.astimezone(dt.timezone.utc)
    if isinstance(value, float) and value.is_integer():
        return value
    return value


def by_key(records: list[dict], key: tuple[str, ...]) -> dict[tuple, dict]:
    return {tuple(normalized(record.get(k)) for k in key): normalized(record) for record in records}


def drain(process) -> tuple[list[dict], str]:
    """Whatever the process still wrote, as messages (a line cut by a kill is left out), and its last line."""
    rest = process.stdout.read()
    process.wait(timeout=30)
    messages, last = [], ""
    for line in rest.splitlines():
        try:
            messages.append(json.loads(line))
            last = line
        except ValueError:
            pass
    return messages, last


def catalog_selecting(config: dict, streams: set[str]) -> dict:
    tap = TapCommerceExports(config={**FAST_SETTINGS, **config}, parse_env_config=False)
    catalog = tap.catalog_dict
    for entry in catalog["streams"]:
        for item in entry["metadata"]:
            if item["breadcrumb"] == []:
                item["metadata"]["selected"] = entry["tap_stream_id"] in streams
    return catalog


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:.0f}s for {what}"
        time.sleep(0.01)


def wait_for_log(stderr: Path, text: str, count: int = 1) -> None:
    wait_until(lambda: stderr.read_text().count(text) >= count, f"the tap to log {text!r} {count} time(s)")


def not_json(cell: str) -> bool:
    """Whether a CSV cell is text a JSON column cannot hold (the sandbox's messy cells)."""
    try:
        json.loads(cell)
    except ValueError:
        return True
    return False

"""tap-commerce-exports: the tap's settings, its sources, and a sync that starts exports early."""

from __future__ import annotations

import difflib
import gc
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any

import click
from singer_sdk import Tap
from singer_sdk import singerlib as singer
from singer_sdk import typing as th
from singer_sdk.exceptions import ConfigValidationError

from tap_commerce_exports.exports.download import ExportCancelled, FileDownloader
from tap_commerce_exports.exports.http import install_log_redaction
from tap_commerce_exports.exports.job import stops_source
from tap_commerce_exports.exports.runner import ExportRunner
from tap_commerce_exports.exports.scheduler import ExportScheduler
from tap_commerce_exports.exports.windows import parse_instant
from tap_commerce_exports.output.collector import collector_tuned_for_rows
from tap_commerce_exports.output.fast_records import widen_stdout_pipe
from tap_commerce_exports.output.parallel_batches import DEFAULT_MAX_WORKERS, BatchWorkerPool, usable_cpus
from tap_commerce_exports.output.storage_check import check_batch_storage, describe_storage_params
from tap_commerce_exports.sdk_adapter import environment_config, write_initial_state
from tap_commerce_exports.settings import COMMON_SETTINGS, SyncSettings
from tap_commerce_exports.sources import SOURCES
from tap_commerce_exports.sources.base import ConfigError
from tap_commerce_exports.stream import ExportStream, SourceRuntime, StopRequested

#: How often the sync looks for a stream that can write rows while every stream waits for its export.
STREAM_PICK_SECONDS = 0.1
#: How long the sync waits for every source's credential check before it starts exports without the
#: checks still waiting (a rate-limited source); those then fail only their own source if refused.
CREDENTIAL_CHECK_SECONDS = 30.0

_NO_SOURCE_MESSAGE = "no source is configured: set the credentials of at least one of " + ", ".join(
    f"{s.name} ({' + '.join(s.credential_settings)})" for s in SOURCES
)
_NO_START_DATE_MESSAGE = (
    "setting 'start_date' is not set: set the date-time to export from, such as 2024-01-01T00:00:00Z"
)


class TapCommerceExports(Tap):
    """Bulk CSV exports of Intelligems, Next Commerce and Voucherify as incremental Singer streams."""

    name = "tap-commerce-exports"
    package_name = "tap-commerce-exports"
    config_jsonschema = th.PropertiesList(
        *COMMON_SETTINGS, *(setting for source in SOURCES for setting in source.settings)
    ).to_dict()

    stop_signal: int = 0

    def __init__(self, *, config: Any = None, parse_env_config: bool = False, **kwargs: Any) -> None:
        # Before the SDK's schema check, whose error for a config that lost its environment names only
        # 'start_date' (in `--test` as a traceback) and says nothing of the sources.
        if isinstance(config, dict):
            self._check_essentials({**config, **(_environment_config() if parse_env_config else {})})
        super().__init__(config=config, parse_env_config=parse_env_config, **kwargs)

    @classmethod
    def append_builtin_config(cls, config_jsonschema: dict) -> None:
        super().append_builtin_config(config_jsonschema)
        describe_storage_params(config_jsonschema)

    def discover_streams(self) -> list[ExportStream]:
        install_log_redaction()
        self._check_settings()
        self._check_catalog_selection()
        self.settings = SyncSettings.of(self.config)
        self.scheduler = ExportScheduler(self.settings.max_concurrent_exports, self.logger)
        streams: list[ExportStream] = []
        self._runtimes: dict[str, SourceRuntime] = {}
        for source in SOURCES:
            if source.is_configured(self.config):
                runtime = self._runtimes[source.name] = self._runtime(source)
                streams += [stream_type(self, runtime) for stream_type in source.stream_types]
        return streams

    def check_connections(self) -> list[tuple[str, bool, str]]:
        """Authenticate to every configured source with one cheap call: (source, ok, detail)."""
        results = []
        for source in SOURCES:
            if not source.is_configured(self.config) or source.check_connection is None:
                continue
            runtime = self._runtimes[source.name]
            try:
                results.append((source.name, True, source.check_connection(runtime.api)))
            except Exception as exc:
                results.append((source.name, False, source_failure(source.name, exc)))
        return results

    @classmethod
    def get_singer_command(cls) -> click.Command:
        """The SDK's command, with this tap's own --check-connection (handled in `main`) in --help,
        and --test described as what it does here."""
        command = super().get_singer_command()
        for param in command.params:
            if param.name == "test":
                param.help = (
                    "Authenticate to each configured source with one call (no export is created) and exit "
                    "non-zero if one fails. --test=schema writes the schemas."
                )
        command.params.append(
            click.Option(
                ["--check-connection"],
                is_flag=True,
                expose_value=False,
                help="Print PASS or FAIL per configured source after one authenticated call each "
                "(exit 1 on a FAIL, 2 on a configuration error). Takes --config FILE or --config ENV.",
            )
        )
        return command

    def run_connection_test(self) -> bool:  # type: ignore[misc]  # final in the SDK; --test must not sync
        """`--test`: the cheap check, not a sync. One authenticated call per configured source, no
        export created (an export API's "first record" costs a whole export); fails unless all pass."""
        results = self.check_connections()
        if not results:
            raise ConfigError(_NO_SOURCE_MESSAGE)
        for name, ok, detail in results:
            log = self.logger.info if ok else self.logger.error
            log("Connection test %s: %s: %s", "PASS" if ok else "FAIL", name, detail)
        failed = [f"{name}: {detail}" for name, ok, detail in results if not ok]
        if failed:
            raise ConnectionTestFailed(failed)
        return True

    def _runtime(self, source) -> SourceRuntime:
        logger = logging.getLogger(f"tap_commerce_exports.{source.name}")
        api = source.build_api(dict(self.config), logger)
        if api.client is not None:
            api.client.stopping = self.scheduler.stopping
            api.client.max_rate_limit_wait_seconds = self.settings.max_rate_limit_wait_seconds
        downloader = FileDownloader(logger, stopping=self.scheduler.stopping)
        runner = ExportRunner(api, downloader, self.settings.poll_policy, logger, self.scheduler.stopping)
        return SourceRuntime(api, runner, self.scheduler, self.settings, source.naive_zone(self.config))

    @classmethod
    def _check_essentials(cls, config: dict) -> None:
        """The settings no run can do without, all named in one line."""
        problems = missing_essentials(config)
        if problems:
            cls._warn_of_unknown_settings(config)  # a typo in a credential's name is the likeliest cause
            raise ConfigError("; ".join(problems))

    def _check_settings(self) -> None:
        config = self.config
        self._check_essentials(dict(config))
        try:
            start = parse_instant(config["start_date"])
            end = parse_instant(config["end_date"]) if config.get("end_date") else None
        except ValueError as exc:
            raise ConfigError(f"setting 'start_date' or 'end_date' is not a date-time: {exc}") from None
        if end is not None and end <= start:
            raise ConfigError(
                f"setting 'end_date' ({end.isoformat()}) must be after 'start_date' ({start.isoformat()})"
            )
        for setting in (
            "export_window_days",
            "poll_interval_seconds",
            "poll_max_interval_seconds",
            "export_timeout_seconds",
            "max_concurrent_exports",
            "max_rate_limit_wait_seconds",
            "batch_worker_processes",
        ):
            if setting in config and float(config[setting]) <= 0:
                raise ConfigError(f"setting {setting!r} must be greater than 0, got {config[setting]!r}")
        self._warn_of_unknown_settings(config)
        for source in SOURCES:
            if source.is_configured(config):
                source.validate(dict(config))

    def _check_catalog_selection(self) -> None:
        """A stream selected in the catalog whose source is not configured would be left out of the sync
        without a word, and the run would end green."""
        if self.input_catalog is None:
            return
        selected = {
            entry.tap_stream_id
            for entry in self.input_catalog.streams
            if entry.metadata.resolve_selection()[()]  # the SDK's own reading of `selected`
        }
        for source in SOURCES:
            source.check_selected_streams(self.config, selected)

    @classmethod
    def _warn_of_unknown_settings(cls, config: Any) -> None:
        """A setting the tap does not know is most often a typo of one it does: say which."""
        known = set(cls.config_jsonschema["properties"])
        for name in sorted(set(config) - known):
            closest = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {closest[0]!r}?" if closest else ""
            cls.logger.warning("Unknown setting %r is ignored%s", name, hint)

    def sync_all(self) -> None:  # type: ignore[misc]  # final in the SDK; see the docstring
        """Start every selected stream's first exports, then read the streams one by one.

        A stream or partition that fails does not stop the others: their rows and state are
        written, and the run ends with a summary of what failed (and a non-zero exit).
        """
        started = time.monotonic()
        if self.config.get("batch_config"):  # the files' storage works, before any export is paid for
            check_batch_storage(self.config["batch_config"], self.logger)
        widen_stdout_pipe()  # the whole run's messages go through it, whichever path writes them
        self.failures: list[str] = []
        write_initial_state(self)
        export_streams = [s for s in self.streams.values() if isinstance(s, ExportStream) and s.selected]
        for stream in export_streams:
            stream.prepare_sync()
        try:
            with collector_tuned_for_rows() as frozen:
                self.logger.debug(
                    "garbage collector: %s frozen, young generation collected every %d allocations",
                    plural(frozen, "long-lived object"),
                    gc.get_threshold()[0],
                )
                self.check_stop()
                waiting = [stream for stream in self.streams.values() if stream.selected]
                self._start_sources(waiting)
                while waiting:
                    stream = self._next_stream_to_sync(waiting)
                    waiting.remove(stream)
                    self._sync_one(stream)
        except StopRequested as stop:
            self._stop_workers()
            self._write_final_state_and_exit(stop.signum)
        finally:
            self._stop_workers()
        self._log_summary(export_streams, time.monotonic() - started)
        if self.failures:
            raise SyncFailures(self.failures)

    def _start_sources(self, streams: list) -> None:
        """Each source, on a thread of its own: one cheap call to check its credentials (refused ones fail
        its streams before any export is created), then its streams' partitions are listed and their
        first exports started. A source that waits (a rate limit, a slow listing) holds up neither the
        other sources nor the output of their rows."""
        self._starters = {
            name: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"start-{name}") for name in self._runtimes
        }
        checks = {name: starter.submit(self._check_source, name) for name, starter in self._starters.items()}
        self._credentials_settled = threading.Event()
        self._stream_starts: dict[str, Future[None]] = {}
        for stream in streams:
            source = stream.runtime.api.name
            self._stream_starts[stream.name] = self._starters[source].submit(self._start_stream, checks[source], stream)
        self._await_credential_checks(checks)
        self._credentials_settled.set()

    def _await_credential_checks(self, checks: dict[str, Future[None]]) -> None:
        """Refused credentials stop the run before any export is created or record written, naming the
        source (a wrong token is a configuration error, and `meltano config test` must fail on it). A
        check still waiting after CREDENTIAL_CHECK_SECONDS (a rate limit) holds up no one longer."""
        deadline = time.monotonic() + CREDENTIAL_CHECK_SECONDS
        for check in checks.values():
            while not check.done() and time.monotonic() < deadline:
                self.check_stop()
                futures_wait([check], timeout=STREAM_PICK_SECONDS)
            if check.done() and isinstance(check.exception(), CredentialsRefused):
                # The other checks' lines first: Meltano shows a failed plugin's last line of output.
                futures_wait(checks.values(), timeout=max(0.0, deadline - time.monotonic()))
                raise ConfigError(str(check.exception()))

    def _check_source(self, name: str) -> None:
        source = next(source for source in SOURCES if source.name == name)
        runtime = self._runtimes[name]
        if source.check_connection is None:
            return
        try:
            self.logger.info("Connection to %s: ok (%s)", name, source.check_connection(runtime.api))
        except Exception as exc:
            detail = source_failure(name, exc)
            if "HTTP 401" in detail or "HTTP 403" in detail:
                raise CredentialsRefused(f"{name} refused the credentials: {detail}") from None
            if stops_source(exc):
                runtime.runner.halt(exc)
                raise
            self.logger.warning("Connection check of %s failed (%s); trying the exports anyway", name, detail)

    def _start_stream(self, source_check: Future[None], stream: Any) -> None:
        source_check.result()  # its error is each of the source's streams' error
        while not self._credentials_settled.wait(STREAM_PICK_SECONDS):  # every source's answer, first
            if self.scheduler.stopping.is_set():
                raise ExportCancelled(f"{stream.name}: not started: the run is stopping")
        runner = stream.runtime.runner
        if runner.halted_by is not None:
            raise runner.halted_by
        try:
            if isinstance(stream, ExportStream):
                stream.start_exports()
            elif hasattr(stream, "prefetch"):
                stream.prefetch()
        except Exception as exc:
            if stops_source(exc):
                runner.halt(exc)
            raise

    def _next_stream_to_sync(self, waiting: list) -> Any:
        """The first stream, in catalog order, that can write rows now; while none can, wait, writing
        STATE about exports started meanwhile (a killed run resumes them instead of paying again)."""
        last_note = time.monotonic()
        while True:
            self.check_stop()
            for stream in waiting:
                if self._can_sync_now(stream):
                    return stream
            time.sleep(STREAM_PICK_SECONDS)
            if time.monotonic() - last_note >= 1.0:
                self.note_exports_in_flight()
                last_note = time.monotonic()

    def _can_sync_now(self, stream: Any) -> bool:
        start = self._stream_starts.get(stream.name)
        if start is not None and not start.done():
            return False
        if start is None or start.exception() is not None or not isinstance(stream, ExportStream):
            return True
        return stream.first_export_settled()

    def _sync_one(self, stream) -> None:
        start = getattr(self, "_stream_starts", {}).get(stream.name)
        if start is not None and start.exception() is not None:
            # Its source refused the credentials or stopped, or it could not list its partitions.
            self.record_failure(stream.name, None, start.exception())
            return
        try:
            stream.sync()
        except Exception as exc:
            self.record_failure(stream.name, None, exc)
        if isinstance(stream, ExportStream):
            stream.totals.finished = time.monotonic()
        stream.finalize_state_progress_markers()
        stream.log_sync_costs()

    def _stop_workers(self) -> None:
        for starter in getattr(self, "_starters", {}).values():
            starter.shutdown(wait=False, cancel_futures=True)
        if hasattr(self, "scheduler"):
            self.scheduler.shutdown()
        for stream in self.streams.values():
            if isinstance(stream, ExportStream):
                stream.cancel_exports()
        if getattr(self, "_batch_worker_pool", None) is not None:
            self._batch_worker_pool.shutdown()

    def batch_workers(self) -> BatchWorkerPool | None:
        """The processes that write large exports' batch files, shared by every stream; None when
        files are written in this process (one CPU, or `batch_worker_processes` is 1)."""
        processes = self.settings.batch_worker_processes or min(usable_cpus(), DEFAULT_MAX_WORKERS)
        if processes < 2:
            return None
        if getattr(self, "_batch_worker_pool", None) is None:
            self._batch_worker_pool = BatchWorkerPool(processes)
        return self._batch_worker_pool

    def record_failure(self, stream_name: str, context: dict | None, error: BaseException) -> None:
        where = "".join(f" {key}={value}" for key, value in (context or {}).items())
        # Engine errors already start with the stream and partition they concern: say them once.
        detail = str(error).removeprefix(f"{stream_name}{where} ")
        message = f"{stream_name}:{where} {detail}"
        self.failures.append(message)
        self.logger.error("Stream %s%s failed, continuing with the others: %s", stream_name, where, error)

    def _handle_termination(self, signum: int, frame: Any) -> None:  # type: ignore[override]
        """SIGTERM/SIGINT: stop at the next safe point (a chunk of rows written, or a wait).

        Stopping inside the handler could interleave the final STATE with a half-written chunk of
        records; so the handler only asks, and `check_stop` ends the run where output is whole.
        A second signal stops at once, like a kill but with the signal's exit code: every STATE
        already written is safe to resume from, and writing one more from here could land inside
        a message being written.
        """
        if self.stop_signal:
            self.logger.warning(
                "Signal %d again: stopping at once; the last STATE written resumes the next run", signum
            )
            logging.shutdown()
            os._exit(128 + signum)  # like a kill: no thread, pool or buffered message holds it up
        self.stop_signal = signum
        self.logger.warning("Signal %d received: stopping after the rows being written", signum)
        if hasattr(self, "scheduler"):
            # Every wait, poll, retry and download gives up now. Set from another thread: the handler
            # may interrupt this one inside the event's own (non-reentrant) lock.
            threading.Thread(target=self.scheduler.stopping.set, daemon=True).start()

    def check_stop(self) -> None:
        if self.stop_signal:
            raise StopRequested(self.stop_signal)

    def _write_final_state_and_exit(self, signum: int) -> None:
        """The bookmarks name finished windows only, so the next run re-sends the rest. Exit code
        128 + signal tells an orchestrator the run was interrupted."""
        self.write_message(singer.StateMessage(value=self.state))
        sys.stdout.flush()
        self.logger.warning("Stopped by signal %d; the last STATE resumes the next run", signum)
        exit_soon(128 + signum)

    def note_exports_in_flight(self) -> None:
        """While waiting for a file: put exports started meanwhile into STATE (see ExportStream)."""
        self.check_stop()
        for stream in self.streams.values():
            if isinstance(stream, ExportStream) and stream.selected:
                stream.note_all_exports_in_flight()

    def _log_summary(self, streams: list[ExportStream], elapsed: float) -> None:
        for stream in streams:
            t = stream.totals
            self.logger.info(
                "Summary %s: %s, %s, %s, %s, %s, %s; %.1fs from its first export to its last row",
                stream.name,
                plural(t.windows, "window"),
                plural(t.exports, "export"),
                plural(t.rows, "row"),
                plural(t.bytes, "byte"),
                plural(t.polls, "poll"),
                plural(t.splits, "split"),
                t.wall_seconds,
            )
        self.logger.info(
            "Sync finished in %.1fs with %s", elapsed, plural(len(getattr(self, "failures", [])), "failure")
        )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def source_failure(name: str, error: BaseException) -> str:
    """A source's error for a line that names the source already: its API's errors start with its name."""
    return str(error).removeprefix(f"{name}: ")


def missing_essentials(config: dict) -> list[str]:
    """What keeps any run from starting: no start_date, a source half configured, or no source at all."""
    problems = [problem for source in SOURCES if (problem := source.half_configured(config))]
    if not problems and not any(source.is_configured(config) for source in SOURCES):
        problems.append(_NO_SOURCE_MESSAGE)
    if not config.get("start_date"):
        problems.append(_NO_START_DATE_MESSAGE)
    return problems


#: How long a stopping run waits for its export threads to leave before it exits without them.
EXIT_GRACE_SECONDS = 3.0


def exit_soon(code: int) -> None:
    """Exit within seconds, with `code` whatever else arrives. Export threads give up at once when the
    run stops, but one inside a request to a host gone silent leaves only at its read timeout, and
    Python's own exit would wait for it; a signal arriving during that exit would end the process
    with the signal's default action instead of `code`. Every message is out: flush and leave."""
    deadline = time.monotonic() + EXIT_GRACE_SECONDS
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class CredentialsRefused(RuntimeError):
    """A source answered its connection check with 401 or 403: none of its exports is created."""


class ConnectionTestFailed(RuntimeError):
    """`--test` found a source it could not authenticate to."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__("connection test failed: " + "; ".join(failures))


class SyncFailures(RuntimeError):
    """Some streams or partitions failed; the others were synced."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = failures
        super().__init__(f"{len(failures)} stream(s) or partition(s) failed:\n  " + "\n  ".join(failures))


def _environment_config() -> dict:
    """Settings from TAP_COMMERCE_EXPORTS_* (as `meltano invoke` sets them), numbers as numbers."""
    schema = TapCommerceExports.config_jsonschema
    config = environment_config(schema, "TAP_COMMERCE_EXPORTS_")
    for name, value in list(config.items()):
        if "number" in schema["properties"].get(name, {}).get("type", []) and isinstance(value, str):
            config[name] = float(value)
    return config


def _config_file(path: str) -> dict:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def check_connection_main(argv: list[str]) -> int:
    """`tap-commerce-exports --check-connection --config FILE` (or `--config ENV`): pass or fail per source."""
    config_path = argv[argv.index("--config") + 1] if "--config" in argv else "ENV"
    config = _environment_config() if config_path == "ENV" else _config_file(config_path)
    tap = TapCommerceExports(config=config)
    results = tap.check_connections()
    if not results:
        raise ConfigError(_NO_SOURCE_MESSAGE)
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}: {name}: {detail}")
    return 0 if all(ok for _, ok, _ in results) else 1


def configuration_problem(error: ConfigError | ConfigValidationError) -> str:
    if isinstance(error, ConfigValidationError):
        return "; ".join(error.errors) or str(error)  # the schema's errors, not the SDK's summary
    return str(error)


def main() -> None:
    if "--check-connection" in sys.argv[1:]:
        try:
            sys.exit(check_connection_main(sys.argv[1:]))
        except (ConfigError, ConfigValidationError) as exc:
            print(f"FAIL: configuration error: {configuration_problem(exc)}")
            sys.exit(2)
    # Logged at error level, not printed: Meltano shows a plugin's lines at the level they carry.
    logger = logging.getLogger(TapCommerceExports.name)
    try:
        TapCommerceExports.cli()
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        sys.exit(2)
    except ConfigValidationError as exc:  # `--test`: the SDK reports its schema errors only in a sync
        logger.error("configuration error: %s", configuration_problem(exc))
        sys.exit(1)  # the SDK's exit code for them in a sync
    except (SyncFailures, ConnectionTestFailed) as exc:
        logger.error("%s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()

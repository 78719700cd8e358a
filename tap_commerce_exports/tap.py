"""tap-commerce-exports: the tap's settings, its sources, and a sync that starts exports early."""

from __future__ import annotations

import datetime as dt
import logging
import sys

from singer_sdk import Tap
from singer_sdk import typing as th

from tap_commerce_exports.engine.download import FileDownloader
from tap_commerce_exports.engine.export_job import ExportRunner, PollPolicy
from tap_commerce_exports.engine.scheduler import ExportScheduler
from tap_commerce_exports.engine.stream import ExportStream, SourceRuntime
from tap_commerce_exports.engine.windows import parse_instant
from tap_commerce_exports.sources import SOURCES
from tap_commerce_exports.sources.base import ConfigError

COMMON_SETTINGS = [
    th.Property("start_date", th.DateTimeType, required=True,
                description="Export data from this moment on (first run; later runs start at the bookmark)."),
    th.Property("end_date", th.DateTimeType,
                description="Export data before this moment. Default: now."),
    th.Property("export_window_days", th.NumberType, default=30,
                description="Largest date range asked for in one export; smaller windows mean smaller files "
                            "and finer-grained bookmarks."),
    th.Property("lookback_hours", th.NumberType, default=0,
                description="Re-export this many hours before the bookmark, for rows that reach the vendor's "
                            "exports late (Intelligems analytics lag up to ~2 h)."),
    th.Property("poll_interval_seconds", th.NumberType, default=5,
                description="First wait between status polls of an export."),
    th.Property("poll_max_interval_seconds", th.NumberType, default=60,
                description="Polls back off (x1.5 each) up to this wait."),
    th.Property("export_timeout_seconds", th.NumberType, default=3600,
                description="Give up on an export still not ready after this long, naming its id and status."),
    th.Property("max_concurrent_exports", th.IntegerType, default=8,
                description="Exports created, polled and downloaded at the same time across all streams."),
]


class TapCommerceExports(Tap):
    """Bulk CSV exports of Intelligems, Next Commerce and Voucherify as incremental Singer streams."""

    name = "tap-commerce-exports"
    package_name = "tap-commerce-exports"
    config_jsonschema = th.PropertiesList(
        *COMMON_SETTINGS, *(setting for source in SOURCES for setting in source.settings)
    ).to_dict()

    def discover_streams(self) -> list[ExportStream]:
        self._check_settings()
        self.scheduler = ExportScheduler(int(self.config.get("max_concurrent_exports", 8)))
        streams: list[ExportStream] = []
        for source in SOURCES:
            if source.is_configured(self.config):
                runtime = self._runtime(source)
                streams += [stream_type(self, runtime) for stream_type in source.stream_types]
        if not streams:
            self.logger.warning(
                "No source is configured: set the credentials of at least one of %s",
                ", ".join(f"{s.name} ({' + '.join(s.credential_settings)})" for s in SOURCES),
            )
        return streams

    def _runtime(self, source) -> SourceRuntime:
        logger = logging.getLogger(f"tap_commerce_exports.{source.name}")
        api = source.build_api(dict(self.config), logger)
        runner = ExportRunner(api, FileDownloader(logger), self._poll_policy(), logger)
        return SourceRuntime(api, runner, self.scheduler, source.naive_zone(self.config))

    def _poll_policy(self) -> PollPolicy:
        config = self.config
        return PollPolicy(
            interval=float(config.get("poll_interval_seconds", 5)),
            max_interval=float(config.get("poll_max_interval_seconds", 60)),
            timeout=float(config.get("export_timeout_seconds", 3600)),
        )

    def _check_settings(self) -> None:
        config = self.config
        try:
            start = parse_instant(config["start_date"])
            end = parse_instant(config["end_date"]) if config.get("end_date") else None
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"setting 'start_date'/'end_date' is missing or not a date-time: {exc}") from None
        if end is not None and end <= start:
            raise ConfigError(f"setting 'end_date' ({end.isoformat()}) must be after 'start_date' ({start.isoformat()})")
        for setting in ("export_window_days", "poll_interval_seconds", "poll_max_interval_seconds",
                        "export_timeout_seconds", "max_concurrent_exports"):
            if setting in config and float(config[setting]) <= 0:
                raise ConfigError(f"setting {setting!r} must be greater than 0, got {config[setting]!r}")
        for source in SOURCES:
            if source.is_configured(config):
                source.validate(dict(config))

    def sync_all(self) -> None:
        """Start every selected stream's first exports, then read the streams one by one."""
        started = dt.datetime.now(dt.timezone.utc)
        export_streams = [s for s in self.streams.values() if isinstance(s, ExportStream) and s.selected]
        for stream in export_streams:
            stream.start_exports()
        try:
            super().sync_all()
        finally:
            self.scheduler.shutdown()
        self._log_summary(export_streams, started)

    def _log_summary(self, streams: list[ExportStream], started: dt.datetime) -> None:
        for stream in streams:
            t = stream.totals
            self.logger.info(
                "Summary %s: %d windows, %d exports, %d rows, %d bytes, %d polls, %d splits",
                stream.name, t.windows, t.exports, t.rows, t.bytes, t.polls, t.splits,
            )
        elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
        self.logger.info("Sync finished in %.1fs", elapsed)


def main() -> None:
    try:
        TapCommerceExports.cli()
    except ConfigError as exc:
        print(f"tap-commerce-exports: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

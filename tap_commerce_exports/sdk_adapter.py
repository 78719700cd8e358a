"""The only place that touches the Singer SDK's private members (singer-sdk ~=0.54.9).

The export streams do things the SDK's public API has no word for: they move bookmarks per window
instead of per record, write STATE while waiting for an export, add a column to the schema
mid-stream, and write records without the SDK's per-record loop
when that loop changes nothing. Each of those needs an SDK internal; they are all named here, so an
SDK upgrade breaks this file, loudly (tests/unit/test_sdk_adapter.py checks that every member
below still exists with the signature used), and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from singer_sdk import Tap
from singer_sdk.configuration._dict_config import parse_environment_config
from singer_sdk.streams import Stream

#: Stream members used, for the upgrade test: (name, parameters after self, or None for attributes).
STREAM_MEMBERS: dict[str, tuple[str, ...] | None] = {
    "_write_schema_message": (),
    "_write_state_message": (),
    "_write_starting_replication_value": ("context",),
    "_get_state_partition_context": ("context",),
    "_finalize_state": ("state",),
    "_sync_records": ("context", "write_messages"),
    "_process_record": ("record", "child_context", "partition_context"),
    "_increment_stream_state": ("latest_record", "context"),
    "_input_schema": None,
    "_stream_version": None,
    "_stream_maps": None,
    "_tap": None,
    "ABORT_AT_RECORD_COUNT": None,
}
#: Tap members used, likewise.
TAP_MEMBERS: dict[str, tuple[str, ...] | None] = {
    "_reset_state_progress_markers": (),
    "_set_compatible_replication_methods": (),
    "_state_writer": None,
}


class SdkStream(Stream):
    """A Singer SDK stream with the internals the export streams need, under names that say why.

    The SDK's internals are reached only through the members below.
    """

    # ---------------------------------------------------------------- SDK overrides

    def _increment_stream_state(self, latest_record: dict, *, context: Any = None) -> None:
        """Bookmarks move per finished window (stream.py), never per record."""

    def _process_record(self, record: dict, child_context: Any = None, partition_context: Any = None) -> None:
        """Export streams have no child streams and already carry their partition keys."""
        if self.child_streams:
            super()._process_record(record, child_context, partition_context)

    # --------------------------------------------------------------- SDK internals

    @property
    def tap(self) -> Any:
        return self._tap

    @property
    def selected_schema(self) -> dict | None:
        """The schema as the catalog selected it (None before the sync builds it)."""
        return self._input_schema

    @property
    def stream_version(self) -> int | None:
        return self._stream_version

    @property
    def counts_records_one_by_one(self) -> bool:
        """--test and dry runs stop after a number of records, which the SDK counts in its own loop."""
        return self.ABORT_AT_RECORD_COUNT is not None

    def write_schema(self) -> None:
        """A SCHEMA message now."""
        self._write_schema_message()

    def write_state(self) -> None:
        """A STATE message now, with the bookmarks as they are."""
        self._write_state_message()

    def mark_state_unflushed(self) -> None:
        self.state_manager.is_flushed = False

    def schema_changed(self) -> None:
        """The stream's schema changed mid-stream: the maps are rebuilt from it before the next record."""
        self._tap.mapper.register_raw_stream_schema(self.name, self.schema, self.primary_keys)
        self._stream_maps = []

    def start_partition(self, context: dict | None) -> None:
        """What the SDK's loop does as a partition starts: its starting replication value."""
        self._write_starting_replication_value(context)

    def finalize_partition(self, context: dict | None) -> None:
        """What the SDK's loop does as a partition ends: its state's progress markers settle."""
        if context == self._get_state_partition_context(context):
            self._finalize_state(self.get_context_state(context))

    def finalize_stream(self) -> None:
        self._finalize_state(self.stream_state)

    def records_of_sdk_loop(self, context: Mapping[str, Any] | None) -> Iterable[dict]:
        """Records through the SDK's own loop, without writing them (BATCH with one-by-one counting)."""
        return self._sync_records(context, write_messages=False)


def write_initial_state(tap: Tap) -> None:
    """Before the sync, as the SDK's sync_all does: progress markers reset, replication methods set,
    and the state given to the tap written first."""
    tap._reset_state_progress_markers()
    tap._set_compatible_replication_methods()
    if tap.state:
        tap._state_writer.write_state(tap.state)


def environment_config(schema: dict, prefix: str) -> dict:
    """Settings from `<prefix><SETTING>` environment variables, parsed as the SDK parses them."""
    return parse_environment_config(schema, prefix)

"""What every source module provides to the tap: its settings, its API and its streams."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from singer_sdk import typing as th

from tap_commerce_exports.exports.job import ExportApi
from tap_commerce_exports.exports.pacing import RequestPacer
from tap_commerce_exports.exports.windows import UTC
from tap_commerce_exports.stream import ExportStream


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names the setting."""


@dataclass(frozen=True)
class SourceDefinition:
    """One API: its settings, when it counts as configured, and how to build its API and streams."""

    name: str
    settings: list[th.Property]
    credential_settings: tuple[str, ...]
    build_api: Callable[[dict, logging.Logger], ExportApi]
    stream_types: tuple[type[ExportStream], ...]
    naive_zone: Callable[[dict], dt.tzinfo] = lambda config: UTC
    validate: Callable[[dict], None] = lambda config: None
    check_connection: Callable[[ExportApi], str] | None = None

    def is_configured(self, config: Mapping[str, Any]) -> bool:
        """A source's streams are discovered only when its credentials are set."""
        return all(config.get(setting) for setting in self.credential_settings)

    def settings_given(self, config: Mapping[str, Any]) -> list[str]:
        """This source's settings that the user set (a value other than the default)."""
        defaults = {prop.name: prop.to_dict()[prop.name].get("default") for prop in self.settings}
        return [name for name, default in defaults.items() if config.get(name) not in (None, "", [], {}, default)]

    def half_configured(self, config: Mapping[str, Any]) -> str | None:
        """A source with some of its settings set but not all its credentials is a mistake (a typo in a
        credential's name, an environment variable lost): its streams would vanish without a word."""
        if self.is_configured(config):
            return None
        given = self.settings_given(config)
        if not given:
            return None
        missing = self.missing_credentials(config)
        return (
            f"{self.name} is half configured: {', '.join(repr(s) for s in given)} "
            f"{'is' if len(given) == 1 else 'are'} set but {' and '.join(repr(s) for s in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not. Set {' and '.join(missing)}, or remove the "
            f"{self.name} settings to leave it out"
        )

    def check_selected_streams(self, config: Mapping[str, Any], selected: set[str]) -> None:
        """A catalog that selects this source's streams while its credentials are not set (an environment
        variable lost) would sync without them, exit 0, and not say a word about them."""
        if self.is_configured(config):
            return
        streams = sorted(selected & self.stream_names())
        if streams:
            missing = self.missing_credentials(config)
            raise ConfigError(
                f"{', '.join(streams)} {'is' if len(streams) == 1 else 'are'} selected in the catalog but "
                f"{self.name} is not configured: {' and '.join(repr(s) for s in missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set. Set {' and '.join(missing)}, or deselect "
                f"the {self.name} streams"
            )

    def stream_names(self) -> set[str]:
        # Every stream type sets `name` on its class; the SDK declares it for instances only.
        return {stream_type.name for stream_type in self.stream_types}  # type: ignore[misc]

    def missing_credentials(self, config: Mapping[str, Any]) -> list[str]:
        return [setting for setting in self.credential_settings if not config.get(setting)]


def checked_base_url(config: dict, setting: str) -> str:
    """An API URL setting, refusing plain http except on loopback (the sandbox)."""
    url = str(config.get(setting) or "").strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"setting {setting!r} must be an http(s) URL, got {url!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError(
            f"setting {setting!r} uses plain http for {parts.hostname}; only https is allowed "
            "(plain http is accepted for loopback hosts such as 127.0.0.1, for the sandbox)"
        )
    return url.rstrip("/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def string_list(config: Mapping[str, Any], setting: str) -> list[str]:
    """A list setting given as a JSON array or as one comma-separated string (env vars)."""
    value: Any = config.get(setting) or []
    if isinstance(value, str):
        value = [part for part in value.split(",")]
    return [str(item).strip() for item in value if str(item).strip()]


def pacer(per_second: float | None, burst: int = 1) -> RequestPacer:
    return RequestPacer(per_second, burst)

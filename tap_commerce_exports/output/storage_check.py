"""Before any export is paid for: can BATCH files be written where `batch_config` says?

Exports cost the vendor's quota and minutes of waiting; a storage that cannot take the files used to
be found out only when the first file was written (a missing s3fs after four exports had been created
and downloaded; a wrong endpoint after 52 s of botocore's retries). So a sync that writes BATCH
files first writes a small probe object where the first file will go, and removes it. It fails within
PROBE_SECONDS, naming the root (without credentials) and the cause: a missing extra, an unreachable
endpoint, refused credentials, a missing bucket.

A missing bucket is never created: writing an object does not create its bucket (only a `mkdir` of
the bucket does, which the SDK's storage does before each file). A typo in a bucket name then fails
here instead of filling a new bucket that nobody reads.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tap_commerce_exports.output.jsonl_batches import OBJECT_STORE_PROTOCOLS, local_directory_of
from tap_commerce_exports.sources.base import ConfigError

#: The whole check's bound: a storage that has not taken and removed the probe by then fails the run.
PROBE_SECONDS = 20.0
#: For S3: one attempt, a short connect; botocore's defaults (retries with backoff, 60 s connects)
#: are right for the run's files but made an unreachable endpoint take 52 s to report.
PROBE_CONNECT_SECONDS = 5
PROBE_READ_SECONDS = 10
#: The extra that brings each protocol's fsspec backend.
EXTRA_OF_PROTOCOL = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
}
#: Encodings the tap writes: jsonl itself (gzip or none), parquet through the SDK (pyarrow).
COMPRESSIONS = {"jsonl": (None, "none", "gzip"), "parquet": (None, "none", "gzip")}
#: Storage parameters whose values are secrets: never shown in a message.
_SECRET_NAME = re.compile(r"key|secret|token|password|credential|sas|signature|connection_string", re.I)

#: Loggers of the storage clients whose DEBUG lines hold credentials (botocore logs each request's
#: Authorization header, access key id included): kept at INFO however verbose the run is.
CLIENT_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3transfer", "s3fs", "gcsfs", "google", "adlfs", "azure")

_logger = logging.getLogger(__name__)


def check_batch_storage(batch_config: Mapping[str, Any], logger: logging.Logger = _logger) -> None:
    """Raise ConfigError unless a probe object can be written and removed where the files will go."""
    keep_credentials_out_of_client_logs()
    _check_encoding(batch_config.get("encoding") or {})
    storage = batch_config.get("storage") or {}
    root = storage.get("root")
    if not isinstance(root, str) or not root:
        raise ConfigError(
            "setting 'batch_config' has no 'storage.root' (e.g. file:///data/batches or s3://bucket/path)"
        )
    params = dict(storage.get("params") or {})
    shown = shown_root(root)
    secrets = secret_values(params, root)
    started = time.monotonic()
    try:
        within(PROBE_SECONDS, lambda: write_and_remove_probe(root, params, storage.get("prefix") or ""))
    except ProbeTimedOut:
        raise ConfigError(
            f"BATCH storage {shown}: no answer within {PROBE_SECONDS:.0f}s to writing a probe object "
            "(an endpoint that does not answer?); no export was created"
        ) from None
    except Exception as exc:
        raise ConfigError(
            f"BATCH storage {shown}: {redacted(cause(exc, root), secrets)}; no export was created"
        ) from None
    logger.info("BATCH storage %s: a probe object was written and removed in %.2fs", shown, time.monotonic() - started)


STORAGE_PARAMS_SCHEMA = {
    "type": ["object", "null"],
    "title": "Batch Storage Parameters",
    "description": 'Options of the storage\'s fsspec filesystem (s3fs, gcsfs, adlfs), e.g. {"endpoint_url": '
    '"https://minio.example.com"} for an S3-compatible server. Credentials are best left to the '
    "environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*). README: "
    '"BATCH to object storage".',
    "additionalProperties": True,
}


def describe_storage_params(config_jsonschema: dict[str, Any]) -> None:
    """`--about` names `batch_config.storage.params`, which the SDK accepts but does not list."""
    batch = config_jsonschema.get("properties", {}).get("batch_config", {})
    storage = batch.get("properties", {}).get("storage", {})
    storage.setdefault("properties", {}).setdefault("params", STORAGE_PARAMS_SCHEMA)


def keep_credentials_out_of_client_logs() -> None:
    for name in CLIENT_LOGGERS:
        client = logging.getLogger(name)
        if client.getEffectiveLevel() < logging.INFO:
            client.setLevel(logging.INFO)


def _check_encoding(encoding: Mapping[str, Any]) -> None:
    file_format = encoding.get("format", "jsonl")
    if file_format not in COMPRESSIONS:
        raise ConfigError(
            f"setting 'batch_config': encoding format {file_format!r} is not one of {sorted(COMPRESSIONS)}"
        )
    compression = encoding.get("compression")
    if compression not in COMPRESSIONS[file_format]:
        # The SDK would write such files uncompressed while the BATCH message names the compression.
        raise ConfigError(
            f"setting 'batch_config': {file_format} files take compression 'gzip' or none, not {compression!r}"
        )
    if file_format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError(
                "setting 'batch_config': parquet files need pyarrow: pip install 'singer-sdk[parquet]'"
            ) from None


def write_and_remove_probe(root: str, params: dict[str, Any], prefix: str) -> None:
    name = f"{prefix}.tap-commerce-exports-probe-{uuid.uuid4().hex}"
    local = local_directory_of(root, params)
    if local is not None:
        _probe_local(local / name)
    else:
        _probe_remote(root, params, name)


def _probe_local(probe: Path) -> None:
    probe.parent.mkdir(parents=True, exist_ok=True)  # a local directory is made, as the SDK makes it
    probe.write_bytes(b"probe\n")
    probe.unlink()


def _probe_remote(root: str, params: dict[str, Any], name: str) -> None:
    from fsspec.core import url_to_fs

    protocol = urlsplit(root).scheme.lower()
    # A filesystem of its own (not fsspec's cached one, which the run's files then use), failing fast.
    fs, path = url_to_fs(root, skip_instance_cache=True, **failing_fast(protocol, params))
    if hasattr(fs, "retries"):  # s3fs retries some errors itself, on top of botocore
        fs.retries = 1
    probe = f"{path.rstrip('/')}/{name}"
    fs.pipe_file(probe, b"probe\n")  # never creates the bucket: a write to a missing one fails
    fs.rm_file(probe)


def failing_fast(protocol: str, params: dict[str, Any]) -> dict[str, Any]:
    """The storage parameters, with S3's connect and retries bounded for the probe (the user's
    smaller bounds kept)."""
    if protocol not in ("s3", "s3a"):
        return params
    config = dict(params.get("config_kwargs") or {})
    config["connect_timeout"] = min(config.get("connect_timeout", PROBE_CONNECT_SECONDS), PROBE_CONNECT_SECONDS)
    config["read_timeout"] = min(config.get("read_timeout", PROBE_READ_SECONDS), PROBE_READ_SECONDS)
    config["retries"] = {"max_attempts": 1, "mode": "standard"}
    return {**params, "config_kwargs": config}


class ProbeTimedOut(Exception):
    """The storage did not take and remove the probe in time."""


def within(seconds: float, work: Callable[[], None]) -> None:
    """Run `work` on a thread of its own; ProbeTimedOut if it is not done in `seconds` (the thread is
    left behind: a daemon, ended with the process, which then exits with the error)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="batch-storage-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise ProbeTimedOut
    if outcome[0] is not None:
        raise outcome[0]


def cause(exc: BaseException, root: str) -> str:
    """What went wrong, in the user's terms, with the backend's own words after it."""
    detail = f"{type(exc).__name__}: {exc}"
    protocol = urlsplit(root).scheme.lower()
    if isinstance(exc, ImportError):
        extra = EXTRA_OF_PROTOCOL.get(protocol)
        install = (
            f"pip install 'tap-commerce-exports[{extra}]'" if extra else f"install the fsspec backend of {protocol}://"
        )
        return f"the filesystem for {protocol}:// is not installed: {install} ({exc})"
    if isinstance(exc, FileNotFoundError) and protocol in OBJECT_STORE_PROTOCOLS:
        bucket = urlsplit(root).netloc.rpartition("@")[2]
        return (
            f"the bucket {bucket!r} does not exist, or these credentials may not see it; the tap never creates "
            f"one: create it or correct the root ({detail})"
        )
    if isinstance(exc, PermissionError):
        return f"the storage refused the credentials, or they may not write there ({detail})"
    if _is_connection_error(exc):
        return f"could not reach the storage endpoint ({detail})"
    return f"could not write a probe object ({detail})"


def _is_connection_error(exc: BaseException) -> bool:
    """botocore's, aiohttp's and the standard library's words for an endpoint that is not there."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(
        names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerTimeoutError"}
    )


def shown_root(root: str) -> str:
    """The root as it may appear in a message: no user, password or query (a SAS token, a signature)."""
    parts = urlsplit(root)
    if not parts.scheme or len(parts.scheme) == 1:  # a local path (a drive letter is no scheme)
        return root
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def secret_values(params: Mapping[str, Any], root: str = "") -> set[str]:
    """Every value among the storage parameters that may be a secret, and any credentials in the root."""
    found = {value for value in _secret_leaves(params) if len(value) >= 4}
    parts = urlsplit(root)
    found |= {part for part in (parts.username, parts.password, parts.query) if part}
    return found


def _secret_leaves(params: Mapping[str, Any], secret: bool = False) -> Iterator[str]:
    for name, value in params.items():
        is_secret = secret or bool(_SECRET_NAME.search(str(name)))
        if isinstance(value, Mapping):
            yield from _secret_leaves(value, is_secret)
        elif isinstance(value, str) and is_secret:
            yield value


def redacted(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    return text

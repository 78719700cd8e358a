"""Where export files are fetched: streamed to a temporary file, checked whole, never held in memory.

File hosts get a session of their own that carries no API credentials (S3 refuses a second auth
mechanism, and a CDN has no business seeing our token); an API whose file host needs them
(Voucherify) passes them explicitly. A file is accepted only when it is complete: as long as its
Content-Length says, and not ending inside a quoted field. Anything else is downloaded again, with a
fresh URL when the old one expired. Only then is it parsed, so a cut file is never taken for a
whole one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
import urllib3

from tap_commerce_exports.exports.http import TIMEOUT, pooled_session, without_query

#: Read size: also how often a download in progress notices that the run is stopping.
CHUNK_BYTES = 256 * 1024
QUOTE = ord('"')
#: A download taking longer than this says how far it got, and again each time as long.
PROGRESS_EVERY_SECONDS = 30.0


class DownloadError(RuntimeError):
    """A file could not be fetched whole within the allowed attempts."""


class RedirectRefused(RuntimeError):
    """A file host that needs the API's credentials redirected elsewhere: not followed, and not retried
    (a new export would be redirected again)."""


class ExportCancelled(RuntimeError):
    """The run is stopping; workers give up their waits and downloads (partial files removed)."""


class UrlExpired(Exception):
    """The file host refused the signed URL (403): it expired or its signature is no longer valid."""


class _Incomplete(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass
class DownloadedFile:
    path: str
    size_bytes: int
    attempts: int
    seconds: float

    def remove(self) -> None:
        # OSError, not only FileNotFoundError: on Windows a worker process still reading the file
        # (a slice of a stopped run) makes unlink fail, and that must not hide the run's own error.
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class FileDownloader:
    """Fetches signed file URLs with a credential-free session; retries until the file is whole."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        max_attempts: int = 5,
        max_file_bytes: int = 50 * 1024**3,
        temp_dir: str | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.logger = logger
        #: Set when the run is stopping; a large file should not hold the exit up.
        self.stopping = stopping or threading.Event()
        self.max_attempts = max_attempts
        self.max_file_bytes = max_file_bytes
        self.temp_dir = temp_dir
        self.session = pooled_session()  # no credentials: file hosts get none
        self.session.headers.update({"User-Agent": "tap-commerce-exports", "Accept-Encoding": "identity"})

    def fetch(
        self,
        url: str,
        *,
        describe: str,
        refresh_url: Callable[[], str],
        headers: dict[str, str] | None = None,
    ) -> DownloadedFile:
        """Download `url` whole; `refresh_url()` gets a new URL when the host says it expired."""
        started = time.monotonic()
        for attempt in range(1, self.max_attempts + 1):
            self._raise_if_stopping(describe)
            try:
                path, size = self._download_once(url, headers or {}, describe)
                return DownloadedFile(path, size, attempt, time.monotonic() - started)
            except UrlExpired:
                self.logger.info("%s: file URL expired or was refused (403); asking for a fresh one", describe)
                url = refresh_url()
            except _Incomplete as exc:
                self.logger.warning(
                    "%s: download attempt %d of %d was incomplete (%s); downloading again",
                    describe,
                    attempt,
                    self.max_attempts,
                    exc.reason,
                )
                self.stopping.wait(min(2.0 ** (attempt - 1) * 0.2, 10.0))
        raise DownloadError(f"{describe}: the file could not be downloaded whole in {self.max_attempts} attempts")

    def _download_once(self, url: str, headers: dict[str, str], describe: str) -> tuple[str, int]:
        try:
            # requests keeps custom headers across a redirect to another host (it strips only
            # Authorization): a file host that needs credentials is not followed anywhere else.
            response = self.session.get(url, headers=headers, stream=True, timeout=TIMEOUT, allow_redirects=not headers)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Incomplete(type(exc).__name__) from None
        with response:
            if response.is_redirect:
                target = urlsplit(response.headers.get("Location", "")).hostname or "another host"
                raise RedirectRefused(
                    f"{describe}: the file host {urlsplit(url).hostname} redirected to {target}; not followed, "
                    "so the API's credentials go nowhere but the vendor's hosts"
                )
            if response.status_code == 403:
                raise UrlExpired()
            if response.status_code >= 500:
                raise _Incomplete(f"HTTP {response.status_code}")
            if response.status_code != 200:
                raise DownloadError(
                    f"file host {without_query(url)} answered HTTP {response.status_code}: {response.text[:200]}"
                )
            return self._save(response, describe)

    def _raise_if_stopping(self, describe: str) -> None:
        if self.stopping.is_set():
            raise ExportCancelled(f"{describe}: download given up: the run is stopping")

    def _save(self, response: requests.Response, describe: str) -> tuple[str, int]:
        expected = response.headers.get("Content-Length")
        handle, path = tempfile.mkstemp(prefix="export-", suffix=".csv", dir=self.temp_dir)
        size = quotes = 0
        started = next_report = time.monotonic()
        next_report += PROGRESS_EVERY_SECONDS
        try:
            with os.fdopen(handle, "wb") as out:
                for chunk in response.raw.stream(CHUNK_BYTES, decode_content=False):
                    self._raise_if_stopping(describe)
                    size += len(chunk)
                    if time.monotonic() >= next_report:
                        self._report_progress(describe, size, expected, time.monotonic() - started)
                        next_report += PROGRESS_EVERY_SECONDS
                    if size > self.max_file_bytes:
                        raise DownloadError(f"file is larger than the {self.max_file_bytes} byte limit")
                    quotes += chunk.count(QUOTE)
                    out.write(chunk)
            self._check_complete(size, expected, quotes)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            os.unlink(path)
            raise _Incomplete(f"connection broke after {size} bytes ({type(exc).__name__})") from None
        except BaseException:
            os.unlink(path)
            raise
        return path, size

    def _report_progress(self, describe: str, size: int, expected: str | None, seconds: float) -> None:
        of = f" of {int(expected) / 1e6:.1f} MB" if expected and expected.isdigit() else ""
        self.logger.info("%s: downloading, %.1f MB%s so far after %.0fs", describe, size / 1e6, of, seconds)

    @staticmethod
    def _check_complete(size: int, expected: str | None, quotes: int) -> None:
        if expected is not None and expected.isdigit() and int(expected) != size:
            raise _Incomplete(f"got {size} of {expected} bytes")
        # CSV doubles quotes inside quoted fields, so a whole file holds an even number of them;
        # an odd count means the file stops inside a quoted field.
        if quotes % 2:
            raise _Incomplete("file ends inside a quoted field")

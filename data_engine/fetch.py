"""Download image bytes for URL-list sources: http(s) through httpx, s3:// and file://
through fsspec. Timeouts (per read and per download), retries with exponential backoff for
what may pass (timeouts, 5xx, 408/429, dropped connections, short bodies), a per-host limit
on concurrent requests, and a size cap. A failure raises `FetchError` with a reason a person
can act on."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import fsspec
import httpx

SCHEMES = ("http", "https", "s3", "file")
# A server may send images as octet-stream; these types say it sent a page or an error instead.
NOT_IMAGE_TYPES = ("text/", "application/json", "application/xml", "application/xhtml", "application/javascript")


@dataclass(frozen=True)
class FetchOptions:
    timeout_s: float
    retries: int
    backoff_s: float
    max_bytes: int
    concurrency: int
    per_host: int
    user_agent: str = "any-size-diffusion-ingest/0.1 (+https://arxiv.org/abs/2308.16582)"


class FetchError(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class Fetcher:
    """Thread-safe; one per ingest run. Use as a context manager (closes the HTTP pool)."""

    def __init__(self, options: FetchOptions, storage_options: dict[str, Any] | None = None) -> None:
        self.options = options
        self.storage_options = storage_options or {}
        self.client = httpx.Client(
            follow_redirects=True, headers={"User-Agent": options.user_agent},
            timeout=httpx.Timeout(options.timeout_s),
            limits=httpx.Limits(max_connections=options.concurrency, max_keepalive_connections=options.concurrency),
        )
        self._lock = threading.Lock()
        self._hosts: dict[str, threading.Semaphore] = defaultdict(lambda: threading.Semaphore(options.per_host))
        self.attempts = 0

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client.close()

    def _host(self, host: str) -> threading.Semaphore:
        with self._lock:
            return self._hosts[host]

    def fetch(self, url: str) -> bytes:
        parsed = urlparse(url)
        scheme = parsed.scheme.lower()
        if scheme not in SCHEMES:
            raise FetchError(f"unsupported URL scheme {scheme or '(none)'!r} (use {', '.join(SCHEMES)})", False)
        last: FetchError | None = None
        for attempt in range(self.options.retries + 1):
            if attempt:
                time.sleep(self.options.backoff_s * 2 ** (attempt - 1))
            with self._host(parsed.netloc or scheme):
                with self._lock:
                    self.attempts += 1
                try:
                    return self._http(url) if scheme in ("http", "https") else self._fsspec(url)
                except FetchError as exc:
                    last = exc
            if not last.retryable:
                break
        assert last is not None
        tries = attempt + 1
        raise FetchError(f"{last} (after {tries} attempt{'s' if tries > 1 else ''})", last.retryable)

    def _http(self, url: str) -> bytes:
        deadline = time.monotonic() + self.options.timeout_s * 3  # whole-download cap for slow drips
        try:
            with self.client.stream("GET", url) as resp:
                if resp.status_code >= 400:
                    retry = resp.status_code >= 500 or resp.status_code in (408, 425, 429)
                    raise FetchError(f"HTTP {resp.status_code} {resp.reason_phrase}", retry)
                ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype.startswith(NOT_IMAGE_TYPES):
                    raise FetchError(f"wrong content type {ctype!r}: the server did not send an image", False)
                declared = int(resp.headers.get("content-length") or 0)
                if declared > self.options.max_bytes:
                    raise FetchError(f"too large: {declared} bytes > max_bytes {self.options.max_bytes}", False)
                chunks, size = [], 0
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if size > self.options.max_bytes:
                        raise FetchError(f"too large: over max_bytes {self.options.max_bytes}", False)
                    if time.monotonic() > deadline:
                        raise FetchError(f"too slow: not done after {self.options.timeout_s * 3:g} s", True)
                    chunks.append(chunk)
                data = b"".join(chunks)
                if declared and len(data) < declared and resp.headers.get("content-encoding") in (None, "identity"):
                    raise FetchError(f"truncated body: {len(data)} of {declared} bytes", True)
                return data
        except FetchError:
            raise
        except httpx.TimeoutException as exc:
            raise FetchError(f"timed out ({type(exc).__name__}, limit {self.options.timeout_s:g} s)", True) from exc
        except httpx.RemoteProtocolError as exc:
            raise FetchError(f"connection dropped: {exc}", True) from exc
        except httpx.TransportError as exc:
            raise FetchError(f"{type(exc).__name__}: {exc}", True) from exc

    def _fsspec(self, url: str) -> bytes:
        opts = self.storage_options if url.startswith("s3://") else {}
        try:
            with fsspec.open(url, "rb", **opts) as f:
                data = f.read(self.options.max_bytes + 1)
        except FileNotFoundError as exc:
            raise FetchError(f"not found: {url}", False) from exc
        except PermissionError as exc:
            raise FetchError(f"permission denied: {exc}", False) from exc
        except (IsADirectoryError, NotADirectoryError, ValueError) as exc:
            raise FetchError(f"{type(exc).__name__}: {exc}", False) from exc
        except Exception as exc:  # noqa: BLE001 - network and service errors of the object store
            raise FetchError(f"{type(exc).__name__}: {exc}", True) from exc
        if len(data) > self.options.max_bytes:
            raise FetchError(f"too large: over max_bytes {self.options.max_bytes}", False)
        return data

"""The downloader of the data engine: image bytes for URL-list entries.

URL lists come from strangers (scraped from the web), so by default:
- only the schemes in `allow_schemes` (http, https) are fetched; `file://` and `s3://` need an
  explicit flag, and a refused scheme is refused before anything is opened (an error never says
  whether a local file exists);
- every host is resolved and each of its addresses checked before connecting, at every redirect
  hop (redirects are followed here, by hand): loopback, private, link-local (cloud metadata),
  shared, reserved and multicast addresses are refused unless `allow_private_addresses`; the
  connection goes to the checked address (the name is only sent as Host / TLS SNI), so a DNS
  answer cannot change between the check and the connection;
- `s3://` entries are read anonymously unless source credentials are named;
- one deadline covers the whole request, headers included (a server trickling headers is cut
  off); the body is capped in bytes on the wire and in decoded bytes (one content-encoding
  layer at most, decoded in bounded steps, so a compression bomb never inflates in memory).

Retries with exponential backoff for what may pass (timeouts, 5xx, 408/429, dropped
connections, short bodies) and a per-host limit on concurrent requests. A failure raises
`FetchError` with a reason a person can act on, never a credential.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import fsspec
import httpx

from artifact_store import redact

URL_SCHEMES = ("http", "https", "s3", "file")  # every scheme a URL list may be allowed to use
MAX_REDIRECTS = 5
# A server may send images as octet-stream; these types say it sent a page or an error instead.
NOT_IMAGE_TYPES = (
    "text/",
    "application/json",
    "application/xml",
    "application/xhtml",
    "application/javascript",
)
USER_AGENT = "any-size-diffusion-ingest/0.1 (+https://arxiv.org/abs/2308.16582)"


class _RedactingFilter(logging.Filter):
    """httpx logs every request line at INFO, query string included: those lines are redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        return True


def redact_httpx_log() -> None:
    """Put the redacting filter on httpx's logger (once per process; done by every Fetcher)."""
    httpx_log = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactingFilter) for f in httpx_log.filters):
        httpx_log.addFilter(_RedactingFilter())


@dataclass(frozen=True)
class FetchOptions:
    timeout_s: float  # per read; the whole request (headers included) gets 3x this
    retries: int
    backoff_s: float
    max_bytes: int  # on the wire and decoded
    concurrency: int
    per_host: int
    allow_schemes: tuple[str, ...]
    allow_private_addresses: bool
    source_credentials: str | None  # None: s3:// entries anonymous; "env" or an AWS profile name


class FetchError(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def address_refusal(ip_text: str) -> str | None:
    """Why connecting to this address is refused by default (None: a public address)."""
    ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for attr, what in (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local (cloud metadata)"),
        ("is_multicast", "multicast"),
        ("is_unspecified", "unspecified"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(ip, attr):
            return what
    if not ip.is_global:
        return "non-public"
    return None


def resolve_checked(host: str, port: int, allow_private: bool) -> str:
    """One address of `host` to connect to, after checking every address it resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchError(f"cannot resolve host {host!r}: {exc.strerror or exc}", True) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise FetchError(f"host {host!r} has no address", True)
    if not allow_private:
        for addr in addresses:
            why = address_refusal(addr)
            if why:
                raise FetchError(
                    f"refused: {host} resolves to a {why} address ({addr}); "
                    "pass --allow-private-addresses to fetch from such hosts",
                    False,
                )
    return addresses[0]


class _Decoder:
    """Content-encoding of one body, decoded in bounded steps (at most `limit` bytes out)."""

    def __init__(self, encoding: str, limit: int) -> None:
        layers = [
            e.strip().lower() for e in encoding.split(",") if e.strip() and e.strip().lower() != "identity"
        ]
        if len(layers) > 1:
            raise FetchError(
                f"refused: {len(layers)} content-encoding layers ({encoding}); at most one is accepted", False
            )
        self.kind = layers[0] if layers else None
        if self.kind not in (None, "gzip", "x-gzip", "deflate"):
            raise FetchError(f"unsupported content-encoding {self.kind!r}", False)
        self.limit = limit
        self.out = 0
        self._z = zlib.decompressobj(47) if self.kind else None  # 47: gzip or zlib header, detected

    def feed(self, raw: bytes) -> bytes:
        if self._z is None:
            data = raw
        else:
            # at most one byte past the cap: a chunk that would inflate further is never expanded
            data = self._z.decompress(raw, self.limit - self.out + 1)
        self.out += len(data)
        if self.out > self.limit:
            raise FetchError(f"too large: over max_bytes {self.limit} once decoded", False)
        return data


class Fetcher:
    """Thread-safe; one per ingest run (each request opens and closes its own HTTP client)."""

    def __init__(self, options: FetchOptions, storage_options: dict[str, Any] | None = None) -> None:
        redact_httpx_log()  # before the first request
        self.options = options
        self.storage_options = storage_options or {}
        self._lock = threading.Lock()
        self._hosts: dict[str, threading.Semaphore] = defaultdict(
            lambda: threading.Semaphore(options.per_host)
        )
        self.attempts = 0

    def _host(self, host: str) -> threading.Semaphore:
        with self._lock:
            return self._hosts[host]

    def check_scheme(self, url: str) -> str:
        scheme = urlsplit(url).scheme.lower()
        if scheme not in self.options.allow_schemes:
            allowed = ", ".join(self.options.allow_schemes)
            if scheme in URL_SCHEMES:
                raise FetchError(
                    f"refused: scheme {scheme!r} is not allowed (allowed: {allowed}; widen with "
                    "--allow-schemes)",
                    False,
                )
            raise FetchError(f"unsupported URL scheme {scheme or '(none)'!r} (allowed: {allowed})", False)
        return scheme

    def fetch(self, url: str) -> bytes:
        scheme = self.check_scheme(url)
        host = urlsplit(url).netloc.rsplit("@", 1)[-1] or scheme
        last: FetchError | None = None
        attempt = 0
        for attempt in range(self.options.retries + 1):
            if attempt:
                time.sleep(self.options.backoff_s * 2 ** (attempt - 1))
            with self._host(host):
                with self._lock:
                    self.attempts += 1
                try:
                    return self._http(url) if scheme in ("http", "https") else self._fsspec(url, scheme)
                except FetchError as exc:
                    last = exc
            if not last.retryable:
                break
        assert last is not None
        tries = attempt + 1
        raise FetchError(f"{last} (after {tries} attempt{'s' if tries > 1 else ''})", last.retryable)

    # -- http(s) ---------------------------------------------------------------------------
    def _http(self, url: str) -> bytes:
        deadline = time.monotonic() + self.options.timeout_s * 3  # the whole request, headers included
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            status, location, body = self._one_request(current, deadline)
            if location is None:
                return body
            nxt = urljoin(current, location)
            if urlsplit(nxt).scheme.lower() not in ("http", "https"):
                raise FetchError(f"refused: redirect to a {urlsplit(nxt).scheme or 'relative'} URL", False)
            self.check_scheme(nxt)
            current = nxt
        raise FetchError(f"too many redirects (over {MAX_REDIRECTS})", False)

    def _one_request(self, url: str, deadline: float) -> tuple[int, str | None, bytes]:
        parts = urlsplit(url)
        host = parts.hostname
        if not host:
            raise FetchError("URL has no host", False)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        ip = resolve_checked(host, port, self.options.allow_private_addresses)
        pinned_host = f"[{ip}]" if ":" in ip else ip
        pinned = parts._replace(netloc=f"{pinned_host}:{port}").geturl()
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        auth = (parts.username or "", parts.password or "") if parts.username else None
        client = httpx.Client(
            timeout=httpx.Timeout(self.options.timeout_s),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "gzip, deflate, identity"},
        )
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), client.close)
        timer.daemon = True
        timer.start()
        try:
            with client.stream(
                "GET", pinned, headers={"Host": host_header}, auth=auth, extensions={"sni_hostname": host}
            ) as resp:
                return self._read_response(resp, deadline)
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a reason; every transport error is data
            if time.monotonic() >= deadline:
                raise FetchError(
                    f"too slow: not done after {self.options.timeout_s * 3:g} s (headers included)", True
                ) from exc
            raise self._transport_error(exc) from exc
        finally:
            timer.cancel()
            client.close()

    def _transport_error(self, exc: Exception) -> FetchError:
        if isinstance(exc, httpx.TimeoutException):
            return FetchError(f"timed out ({type(exc).__name__}, limit {self.options.timeout_s:g} s)", True)
        if isinstance(exc, httpx.RemoteProtocolError):
            return FetchError(f"connection dropped: {redact(str(exc))}", True)
        if isinstance(exc, httpx.TransportError | OSError | RuntimeError):
            return FetchError(f"{type(exc).__name__}: {redact(str(exc))}", True)
        return FetchError(f"{type(exc).__name__}: {redact(str(exc))}", False)

    def _read_response(self, resp: httpx.Response, deadline: float) -> tuple[int, str | None, bytes]:
        if resp.status_code in (301, 302, 303, 307, 308):
            location = resp.headers.get("location")
            if not location:
                raise FetchError(f"HTTP {resp.status_code} redirect without a Location", False)
            return resp.status_code, location, b""
        if resp.status_code >= 400:
            retry = resp.status_code >= 500 or resp.status_code in (408, 425, 429)
            raise FetchError(f"HTTP {resp.status_code} {resp.reason_phrase}", retry)
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith(NOT_IMAGE_TYPES):
            raise FetchError(f"wrong content type {ctype!r}: the server did not send an image", False)
        cap = self.options.max_bytes
        declared = int(resp.headers.get("content-length") or 0)
        if declared > cap:
            raise FetchError(f"too large: {declared} bytes > max_bytes {cap}", False)
        decoder = _Decoder(resp.headers.get("content-encoding", ""), cap)
        chunks, raw_size = [], 0
        for raw in resp.iter_raw():
            raw_size += len(raw)
            if raw_size > cap:
                raise FetchError(f"too large: over max_bytes {cap}", False)
            if time.monotonic() > deadline:
                raise FetchError(f"too slow: not done after {self.options.timeout_s * 3:g} s", True)
            chunks.append(decoder.feed(raw))
        if declared and raw_size < declared:
            raise FetchError(f"truncated body: {raw_size} of {declared} bytes", True)
        return resp.status_code, None, b"".join(chunks)

    # -- s3:// and file:// (only when allowed) ------------------------------------------------
    def _fsspec(self, url: str, scheme: str) -> bytes:
        opts: dict[str, Any] = {}
        if scheme == "s3":
            opts = {k: v for k, v in self.storage_options.items() if k in ("client_kwargs", "config_kwargs")}
            creds = self.options.source_credentials
            if creds is None:
                opts["anon"] = True  # never the store's credentials for a stranger's URL
            elif creds != "env":
                opts["profile"] = creds
        try:
            with fsspec.open(url, "rb", **opts) as f:
                data = f.read(self.options.max_bytes + 1)
        except FileNotFoundError as exc:
            raise FetchError("not found", False) from exc
        except PermissionError as exc:
            raise FetchError("permission denied", False) from exc
        except (IsADirectoryError, NotADirectoryError, ValueError) as exc:
            raise FetchError(f"{type(exc).__name__}: {redact(str(exc))}", False) from exc
        except Exception as exc:  # noqa: BLE001 - network and service errors of the object store
            raise FetchError(f"{type(exc).__name__}: {redact(str(exc))}", True) from exc
        if len(data) > self.options.max_bytes:
            raise FetchError(f"too large: over max_bytes {self.options.max_bytes}", False)
        return data

"""`asd dashboard serve`: the store's dashboard over HTTP on this machine (read-only).

What it serves, and nothing else: the built site (`_site/`, `/` and `/_site/` are its index) and
the recorded files of committed versions (`KIND/NAME/VERSION/PATH`, pinned to the recorded S3
VersionId). Uncommitted versions, pending markers, commit records, run records and the catalog
are a 404, as is any path that leaves the store or names a folder.

It is built for a shared store that strangers may write into: files are streamed in chunks
(HEAD reads none), every connection has a socket timeout and a deadline for its whole request
line and headers (a client trickling headers a byte at a time is dropped when it passes), at
most `max_connections` are served at once and `per_client` from one address (the next get a
503 and are closed), a version's file is served only while it hashes to its record, every response carries `nosniff` and a
content-security policy, HTML/SVG/XML and scripts stored in versions are sent as attachments in
a sandbox (never run on the dashboard's origin; the site's own zoom pages show large outputs),
the viewer's script a version lists is sent from this package (a version's copy, edited or not,
never runs), and an overlong path is a 414."""

from __future__ import annotations

import contextlib
import io
import logging
import mimetypes
import posixpath
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from artifact_store import ArtifactStore, StoreError
from artifact_store.refs import KINDS, SITE_DIR, VERSION_RE, ArtifactRef
from dashboard.viewer import vendor_files

log = logging.getLogger("asd.dashboard")
MAX_PATH = 2048  # characters of a request path; longer is a 414
CHUNK = 256 << 10
SITE_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
STORED_POLICY = "sandbox; default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"
ACTIVE_TYPES = {
    "text/html",
    "image/svg+xml",
    "application/xhtml+xml",
    "text/xml",
    "application/xml",
    "text/javascript",
    "application/javascript",
}


class _Found:
    """A file to send: its size, type, policy, and how to open it."""

    def __init__(self, size: int, ctype: str, policy: str, opener: Any, attachment: bool = False) -> None:
        self.size, self.ctype, self.policy, self.open, self.attachment = (
            size,
            ctype,
            policy,
            opener,
            attachment,
        )


def _site_file(store: ArtifactStore, rel: str) -> _Found | None:
    """A file of the built site (`_site/...`; a folder means its index.html)."""
    if rel == SITE_DIR or rel.endswith("/"):
        rel = rel.rstrip("/") + "/index.html"
    inside = rel.split("/", 1)[1]
    ctype = mimetypes.guess_type(rel)[0] or "application/octet-stream"
    site = store.site_files()  # a path outside it, or through a link, is refused (a 404)
    size = site.size_of(inside)
    if size is None:
        return None
    return _Found(size, ctype, SITE_POLICY, lambda: site.open(inside, "rb"))


def _version_file(store: ArtifactStore, parts: list[str]) -> _Found | None:
    """A recorded file of a committed version; stored active content goes out as a download."""
    kind, name, version, rel = parts[0], parts[1], parts[2], "/".join(parts[3:])
    if kind not in KINDS or not VERSION_RE.fullmatch(version):
        return None
    ref = ArtifactRef(kind, name, version)
    if not store.is_committed(ref):
        return None
    _, meta, _ = store.listed(ref, rel)  # FileNotListed (a 404): unlisted, or a link on a local store
    ctype = mimetypes.guess_type(rel)[0] or "application/octet-stream"
    vendored = vendor_files().get(rel)
    if vendored is not None:  # the viewer's own assets: from this package, whatever the version's copy says
        return _Found(vendored.stat().st_size, ctype, STORED_POLICY, lambda: open(vendored, "rb"))
    # anything else a version holds that a browser would run (scripts included) is a download
    return _Found(
        int(meta["size"]),
        ctype,
        STORED_POLICY,
        lambda: store.open_checked(ref, rel),  # bytes served are the recorded ones (CorruptFile: a 404)
        attachment=ctype in ACTIVE_TYPES,
    )


def _handler(
    store: ArtifactStore, timeout_s: float, header_deadline_s: float
) -> type[BaseHTTPRequestHandler]:
    class StoreFiles(BaseHTTPRequestHandler):
        server_version = "asd-dashboard"
        timeout = timeout_s  # per socket operation: a client that stops sending is dropped

        def setup(self) -> None:
            super().setup()
            # the whole request line and headers within the deadline, however slowly they trickle
            self._deadline = threading.Timer(header_deadline_s, self._too_slow)
            self._deadline.daemon = True
            self._deadline.start()

        def _too_slow(self) -> None:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def parse_request(self) -> bool:
            ok = super().parse_request()
            self._deadline.cancel()
            return ok

        def finish(self) -> None:
            self._deadline.cancel()
            super().finish()

        def _find(self, path: str) -> _Found | None:
            rel = posixpath.normpath(unquote(path).lstrip("/")) + ("/" if path.endswith("/") else "")
            parts = rel.rstrip("/").split("/")
            try:
                if parts[0] == SITE_DIR:
                    return _site_file(store, rel)
                if len(parts) >= 4 and not rel.endswith("/"):
                    return _version_file(store, parts)
            except (StoreError, OSError, ValueError):  # unsafe, missing, a folder, a name too long, damaged
                return None
            return None

        def _headers(self, status: HTTPStatus, policy: str = SITE_POLICY) -> None:
            self.send_response(status)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", policy)
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-cache")

        def _error(self, status: HTTPStatus) -> None:
            body = f"{status.value} {status.phrase}\n".encode()
            self._headers(status, "default-src 'none'")
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _send(self, body: bool) -> None:
            path = urlsplit(self.path).path
            if len(self.path) > MAX_PATH:
                self._error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if path in ("", "/", f"/{SITE_DIR}"):  # the site's pages link relative to _site/
                self._headers(HTTPStatus.FOUND)
                self.send_header("Location", f"/{SITE_DIR}/index.html")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            found = self._find(path)
            try:  # opened (and a version's file checked) before any header goes out
                src = found.open() if found is not None and body else None
            except (StoreError, OSError):
                found = None
            if found is None:
                self._error(HTTPStatus.NOT_FOUND)
                return
            self._headers(HTTPStatus.OK, found.policy)
            if found.attachment:  # stored HTML/SVG/scripts: shown as text to save, never run here
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header(
                    "Content-Disposition",
                    f'attachment; filename="{posixpath.basename(path)[-100:]}"'.encode(
                        "ascii", "replace"
                    ).decode(),
                )
            else:
                self.send_header("Content-Type", found.ctype)
            self.send_header("Content-Length", str(found.size))
            self.end_headers()
            if src is not None:
                with src:
                    _copy(src, self.wfile, found.size)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._send(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._send(False)

        def log_message(self, fmt: str, *args) -> None:
            pass

    return StoreFiles


def _copy(src: IO[bytes], dst: IO[bytes] | io.BufferedIOBase, size: int) -> None:
    """Stream `size` bytes in chunks (never the whole file in memory)."""
    left = size
    while left > 0:
        block = src.read(min(CHUNK, left))
        if not block:
            break
        dst.write(block)
        left -= len(block)


class DashboardServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        per_client: int,
    ) -> None:
        super().__init__(address, handler)
        self.max_connections, self.per_client = max_connections, per_client
        self._slots = threading.BoundedSemaphore(max_connections)
        self._by_client: dict[str, int] = {}
        self._lock = threading.Lock()

    def _take(self, client: str) -> bool:
        """A slot for one more connection from `client`, if both caps allow it."""
        with self._lock:
            if self._by_client.get(client, 0) >= self.per_client:
                return False
            if not self._slots.acquire(blocking=False):
                return False
            self._by_client[client] = self._by_client.get(client, 0) + 1
            return True

    def _give_back(self, client: str) -> None:
        with self._lock:
            left = self._by_client.pop(client, 1) - 1
            if left:
                self._by_client[client] = left
            self._slots.release()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._take(client_address[0]):  # full: a short 503, then the socket is closed
            with contextlib.suppress(OSError):  # a client already gone needs no answer
                request.settimeout(1)
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._give_back(client_address[0])

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug(
            "connection from %s ended with an error", client_address, exc_info=True
        )  # a client went away


def make_server(
    store: ArtifactStore,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_connections: int = 64,
    per_client: int = 16,
    timeout_s: float = 20.0,
    header_deadline_s: float = 10.0,
) -> DashboardServer:
    """The server (not started): at most `max_connections` at once, `per_client` from one address;
    `timeout_s` per socket operation, `header_deadline_s` for a whole request line and headers."""
    return DashboardServer(
        (host, port), _handler(store, timeout_s, header_deadline_s), max_connections, per_client
    )

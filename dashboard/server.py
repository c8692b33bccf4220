"""`asd dashboard serve`: the store's dashboard over HTTP on this machine (read-only).

Files are read through the store's filesystem (a local folder or S3 alike), so the pages' relative
links to the images in the store work. Only GET/HEAD of files inside the store root; a path that
leaves it, or names a folder, is a 404."""

from __future__ import annotations

import mimetypes
import posixpath
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from artifact_store import ArtifactStore, StoreError
from artifact_store.paths import check_relpath, local_target
from dashboard.build import SITE_DIR


def _handler(store: ArtifactStore) -> type[BaseHTTPRequestHandler]:
    class StoreFiles(BaseHTTPRequestHandler):
        server_version = "asd-dashboard"

        def _file(self) -> tuple[bytes, str] | None:
            raw = unquote(urlsplit(self.path).path)
            rel = posixpath.normpath(raw.lstrip("/"))
            try:
                if store.is_local:  # a link inside the store that points outside it is refused too
                    data = local_target(store.root, rel, "request").read_bytes()
                else:
                    data = store.fs.cat_file(store.path(check_relpath(rel, "request")))
            except (StoreError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
                return None
            return data, mimetypes.guess_type(rel)[0] or "application/octet-stream"

        def _send(self, body: bool) -> None:
            if urlsplit(self.path).path in ("", "/"):  # the site's pages link relative to _site/
                self.send_response(HTTPStatus.FOUND)
                self.send_header("Location", f"/{SITE_DIR}/index.html")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            found = self._file()
            if found is None:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            data, ctype = found
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._send(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._send(False)

        def log_message(self, fmt: str, *args) -> None:
            pass

    return StoreFiles


def make_server(store: ArtifactStore, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), _handler(store))

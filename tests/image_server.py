"""A real HTTP server on 127.0.0.1 that serves good images and every way a download goes wrong."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image


def jpeg_bytes(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class ImageServer:
    """Routes (query `delay=S` delays any route):
    /img/<seed>.jpg       200 image/jpeg (size from `w`,`h`, default 320x240)
    /octet/<seed>         200 application/octet-stream with a PNG (a good image)
    /missing.jpg          404
    /slow.jpg             sleeps `sleep` s (default 5) before answering
    /truncated.jpg        Content-Length of a whole JPEG, half of it sent, connection closed
    /html.jpg             200 text/html
    /flaky/<name>.jpg     503 for the first `fail` requests of that path (default 2), then an image
    /broken500.jpg        always 500
    /redirect             302 to the query's `to`
    /gzip2.jpg            an image gzip-encoded twice (Content-Encoding: gzip, gzip)
    /gzipbomb.jpg         `mb` MB (default 64) of zeros, gzip-encoded once
    /trickle              headers sent one byte every `every` s (default 0.2), never finished
    """

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                with server.lock:
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    server._serve(self)
                finally:
                    with server.lock:
                        server.active -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _send(
        self, h: BaseHTTPRequestHandler, status: int, ctype: str, body: bytes, length: int | None = None
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        h.wfile.write(body)

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        u = urlparse(h.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        path = u.path
        with self.lock:
            self.hits[path] += 1
            n = self.hits[path]
        time.sleep(float(q.get("delay", 0)))
        seed = sum(map(ord, path))
        w, h_ = int(q.get("w", 320)), int(q.get("h", 240))
        if path.startswith("/img/"):
            self._send(h, 200, "image/jpeg", jpeg_bytes(w, h_, seed))
        elif path.startswith("/octet/"):
            buf = io.BytesIO()
            Image.fromarray(np.full((h_, w, 3), seed % 255, np.uint8)).save(buf, format="PNG")
            self._send(h, 200, "application/octet-stream", buf.getvalue())
        elif path == "/slow.jpg":
            time.sleep(float(q.get("sleep", 5)))
            self._send(h, 200, "image/jpeg", jpeg_bytes(w, h_, seed))
        elif path == "/truncated.jpg":
            body = jpeg_bytes(w, h_, seed)
            self._send(h, 200, "image/jpeg", body[: len(body) // 2], length=len(body))
            h.close_connection = True
        elif path == "/html.jpg":
            self._send(h, 200, "text/html; charset=utf-8", b"<html><body>Not here</body></html>")
        elif path.startswith("/flaky/"):
            if n <= int(q.get("fail", 2)):
                self._send(h, 503, "text/plain", b"busy")
            else:
                self._send(h, 200, "image/jpeg", jpeg_bytes(w, h_, seed))
        elif path == "/broken500.jpg":
            self._send(h, 500, "text/plain", b"boom")
        elif path == "/redirect":
            h.send_response(302)
            h.send_header("Location", q["to"])
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif path in ("/gzip2.jpg", "/gzipbomb.jpg"):
            import gzip

            if path == "/gzip2.jpg":
                body, encoding = gzip.compress(gzip.compress(jpeg_bytes(w, h_, seed))), "gzip, gzip"
            else:
                body, encoding = gzip.compress(b"\0" * (int(q.get("mb", 64)) << 20), compresslevel=9), "gzip"
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Encoding", encoding)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        elif path == "/trickle":
            h.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(int(q.get("n", 200))):
                try:
                    h.wfile.write(b"X")
                    h.wfile.flush()
                except OSError:
                    break
                time.sleep(float(q.get("every", 0.2)))
            h.close_connection = True
        else:
            self._send(h, 404, "text/plain", b"not found")

"""The dashboard server against hostile and careless clients: only the site and committed files,
stored active content never run on the dashboard's origin, files streamed, slow and surplus
connections dropped, overlong paths refused without a traceback."""

from __future__ import annotations

import select
import socket
import threading
import time
import tracemalloc
import urllib.error
import urllib.request

import pytest

from artifact_store import ArtifactStore
from dashboard.build import build_site
from dashboard.server import make_server


@pytest.fixture
def served(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    w = store.new_version("generations", "g1")
    w.put_bytes("images/evil.html", b"<script>alert(document.domain)</script>")
    w.put_bytes("images/evil.svg", b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>")
    w.put_bytes("big.bin", bytes(range(256)) * (64 << 12))  # 64 MiB
    ref = w.commit(parents=[], params={}, summary={})
    pending = store.resume_or_new("generations", "g2", "hash")
    store.writer(pending).put_bytes("images/a.png", b"not yet committed")
    store.write_run_record("run-1", {"reads": [], "writes": []})
    build_site(store, thumb_px=32)
    servers = []

    def start(**kw):
        server = make_server(store, "127.0.0.1", 0, **kw)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield store, ref, pending, start
    for s in servers:
        s.shutdown()
        s.server_close()


def _get(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_only_the_site_and_committed_recorded_files_are_served(served):
    store, ref, pending, start = served
    base, _ = start()
    assert _get(f"{base}/_site/")[0] == 200 and b"Any-Size-Diffusion store" in _get(f"{base}/_site/")[2]
    assert _get(f"{base}/_site")[0] == 200  # redirected to the index
    status, headers, _ = _get(f"{base}/{ref.prefix}/big.bin", "HEAD")
    assert status == 200 and headers["Content-Length"] == str(64 << 20)
    for hidden in (
        f"/{pending.ref.prefix}/images/a.png",
        f"/{pending.ref.prefix}/_PENDING.json",
        f"/{ref.prefix}/_COMMIT.json",
        "/runs/run-1.json",
        f"/_catalog/generations/g1/{ref.version}.parquet",
        f"/{ref.prefix}/",
        f"/{ref.prefix}/images/nope.png",
    ):
        assert _get(base + hidden)[0] == 404, hidden


def test_every_response_is_nosniff_with_a_policy_and_stored_html_svg_are_downloads(served):
    store, ref, _, start = served
    base, _ = start()
    for page in ("/_site/index.html", f"/{ref.prefix}/big.bin", "/nope"):
        _, headers, _ = _get(base + page, "HEAD")
        assert headers["X-Content-Type-Options"] == "nosniff", page
        assert "default-src" in headers["Content-Security-Policy"], page
    for active in ("images/evil.html", "images/evil.svg"):
        status, headers, body = _get(f"{base}/{ref.prefix}/{active}")
        assert status == 200 and body.startswith(b"<")
        assert headers["Content-Type"].startswith("text/plain"), headers
        assert headers["Content-Disposition"].startswith("attachment"), headers
        assert headers["Content-Security-Policy"].startswith("sandbox"), headers


def test_files_are_streamed_not_read_whole(served):
    store, ref, _, start = served
    base, _ = start()
    tracemalloc.start()  # the server runs in this process: its allocations are traced too
    try:
        size = 0
        with urllib.request.urlopen(f"{base}/{ref.prefix}/big.bin", timeout=10) as r:
            while block := r.read(1 << 20):
                size += len(block)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == 64 << 20
    assert peak < 8 << 20, peak  # chunks in flight, never the 64 MiB file


def test_overlong_paths_are_414_and_the_server_keeps_serving(served, caplog):
    _, ref, _, start = served
    base, _ = start()
    assert _get(base + "/" + "a" * 5000)[0] == 414
    assert (
        _get(f"{base}/{ref.prefix}/" + "b" * 1500 + "/" + "c" * 300)[0] == 404
    )  # a name too long for the disk
    assert _get(f"{base}/_site/index.html")[0] == 200
    assert "Traceback" not in caplog.text


def test_slow_clients_time_out_and_surplus_connections_get_503(served):
    _, _, _, start = served
    base, server = start(max_connections=2, timeout_s=0.5)
    port = server.server_address[1]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    for s in slow:
        s.sendall(b"GET /_site/index.html HTTP/1.1\r\nHost: x\r\n")  # never finished
    time.sleep(0.2)
    extra = socket.create_connection(("127.0.0.1", port))
    extra.settimeout(5)
    assert extra.recv(100).startswith(b"HTTP/1.0 503")
    extra.close()
    for s in slow:  # the server drops them once their timeout passes
        s.settimeout(5)
        assert s.recv(100) == b""
        s.close()
    time.sleep(0.2)
    assert _get(f"{base}/_site/index.html")[0] == 200  # slots free again


def test_a_versions_scripts_never_run_and_the_viewer_script_comes_from_the_package(tmp_path):
    """A version's copy of the viewer's script, edited in the store at the same size, is not what
    the server sends (the package's is); any other script a version holds is a download."""
    from dashboard.viewer import vendor_files

    store = ArtifactStore(str(tmp_path / "store"))
    w = store.new_version("generations", "g")
    rel, vendored = next((r, p) for r, p in vendor_files().items() if r.endswith(".js"))
    w.put_file(rel, vendored)
    w.put_bytes("images/x.js", b"alert(document.domain)")
    ref = w.commit(parents=[], params={}, summary={})
    stored = tmp_path / "store" / ref.prefix / rel
    stored.write_bytes(b"/" * stored.stat().st_size)  # same size, other bytes
    server = make_server(store, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        status, headers, body = _get(f"{base}/{ref.prefix}/{rel}")
        assert status == 200 and body == vendored.read_bytes()
        assert "javascript" in headers["Content-Type"] and "Content-Disposition" not in headers
        status, headers, body = _get(f"{base}/{ref.prefix}/images/x.js")
        assert status == 200 and headers["Content-Disposition"].startswith("attachment"), headers
        assert headers["Content-Type"].startswith("text/plain"), headers
    finally:
        server.shutdown()
        server.server_close()


def test_a_version_file_changed_after_its_commit_is_not_served(served):
    """Served bytes are the recorded ones: a same-size edit of a committed file is a 404."""
    store, ref, _, start = served
    base, _ = start()
    path = store.path(ref.prefix, "images/evil.svg")
    data = store.fs.cat_file(path)
    store.fs.pipe_file(path, data[:-2] + b"!>")
    assert _get(f"{base}/{ref.prefix}/images/evil.svg")[0] == 404
    assert _get(f"{base}/{ref.prefix}/big.bin")[0] == 200  # the rest is served


def test_a_manifest_changed_after_its_commit_is_not_shown(tmp_path, caplog):
    """The builder reads a manifest only after it hashes to its record: an edited one (a forged
    row) is a warning and a note on its version's page, and the rest of the site builds; a row
    it cannot show is a warning naming it, and the rest of its page builds."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_manifests.schemas import GENERATIONS_MANIFEST

    store = ArtifactStore(str(tmp_path / "store"))
    row = {f.name: None for f in GENERATIONS_MANIFEST} | {
        "key": "k",
        "row": 0,
        "prompt": "a barn",
        "status": "ok",
    }
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row], schema=GENERATIONS_MANIFEST), out)
    refs = []
    for name in ("good", "forged"):
        w = store.new_version("generations", name)
        w.put_bytes("manifest.parquet", out.getvalue())
        refs.append(w.commit(parents=[], params={}, summary={"images_ok": 1}))
    forged = io.BytesIO()
    pq.write_table(
        pa.Table.from_pylist([row | {"prompt": "<script>x</script>"}], schema=GENERATIONS_MANIFEST), forged
    )
    store.fs.pipe_file(store.path(refs[1].prefix, "manifest.parquet"), forged.getvalue())
    build_site(store, thumb_px=32)
    pages = {p.name: p.read_text() for p in (tmp_path / "store" / "_site").rglob(f"{refs[1].version}*.html")}
    forged_page = next(t for t in pages.values() if "could not read this version" in t)
    assert "does not match its recorded sha256" in forged_page and "&lt;script&gt;x" not in forged_page
    assert "does not match its recorded sha256" in caplog.text
    good = next((tmp_path / "store" / "_site").rglob(f"{refs[0].version}*.html")).read_text()
    # the good version's one row names no image and no size: a warning naming it, the page built
    assert "1 manifest row(s) could not be shown" in good and "manifest row 0" in caplog.text


def test_a_client_trickling_headers_is_dropped_at_the_deadline_and_one_address_has_a_cap(served):
    """The socket timeout is per read: a client sending a header byte just inside it would hold
    its slot for ever; the whole request line and headers have a deadline. One address holds at
    most `per_client` connections, so one client cannot take every slot."""
    _, _, _, start = served
    base, server = start(max_connections=8, per_client=2, timeout_s=1.0, header_deadline_s=1.0)
    port = server.server_address[1]
    trickler = socket.create_connection(("127.0.0.1", port))
    trickler.sendall(b"GET /_site/index.html HTTP/1.1\r\n")
    t0, dropped = time.monotonic(), False
    while time.monotonic() - t0 < 5:
        try:
            trickler.sendall(b"X")  # a byte every 0.3 s: within the per-read timeout
        except OSError:
            dropped = True
            break
        time.sleep(0.3)
        readable, _, _ = select.select([trickler], [], [], 0)
        if readable and trickler.recv(100) == b"":  # closed by the server
            dropped = True
            break
    assert dropped and time.monotonic() - t0 < 3, time.monotonic() - t0
    trickler.close()
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    time.sleep(0.2)
    third = socket.create_connection(("127.0.0.1", port))
    third.settimeout(5)
    assert third.recv(100).startswith(b"HTTP/1.0 503")  # this address's cap, with slots left
    for s in (third, *held):
        s.close()
    time.sleep(1.5)
    assert _get(f"{base}/_site/index.html")[0] == 200

"""The store's dashboard: a static site from the catalog, and the server that shows it."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from artifact_store import ArtifactStore
from dashboard.build import build_site
from dashboard.server import make_server
from data_manifests.schemas import GENERATIONS_MANIFEST, METRICS

HOSTILE = "<script>alert('x')</script> a cat & \"friends\""


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _smooth_image(w: int, h: int, seam_at: int | None = None) -> np.ndarray:
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    img = np.concatenate([x * np.ones((h, 1, 1)), y * np.ones((1, w, 1)), 0.5 * np.ones((h, w, 1))], 2) * 200
    if seam_at is not None:
        img[:, seam_at:] += 40  # a hard vertical edge: what a visible tile seam looks like
    return np.clip(img, 0, 255).astype(np.uint8)


def _manifest_row(
    i: int, w: int, h: int, seam_x: list[int], status: str = "ok", prompt: str = "a cat"
) -> dict:
    return {
        "key": f"{i:06d}-{w}x{h}-abc",
        "row": i,
        "prompt": prompt,
        "width": w,
        "height": h,
        "seed": i,
        "status": status,
        "error": None if status == "ok" else "bad size",
        "image": f"images/{i:06d}-{w}x{h}-abc.png" if status == "ok" else None,
        "bucket": "128x128",
        "canvas_width": w,
        "canvas_height": h,
        "tile_px": 64,
        "fstd_tiles": 4,
        "seam_x": seam_x,
        "seam_y": [],
        "seconds": 1.5,
        "unet_evals": 10,
        "peak_memory_mb": 100.0,
        "device": "cpu",
        "worker": "host:1",
    }


@pytest.fixture
def populated_store(tmp_path):
    """A model (with a training log), a generations version (one image with a seam, one failed
    row with a hostile prompt) and two evaluations of it, committed as the stages would."""
    store = ArtifactStore(str(tmp_path / "store"))
    w = store.new_version("models", "m1")
    w.put_bytes("training_log.json", json.dumps({"loss": [1.0 / (i + 1) for i in range(50)]}).encode())
    model = w.commit(parents=[], params={"steps": 50}, summary={"steps": 50})
    w = store.new_version("generations", "g1")
    rows = [_manifest_row(0, 200, 120, [100]), _manifest_row(1, 96, 96, [], status="failed", prompt=HOSTILE)]
    w.put_bytes(rows[0]["image"], _png(_smooth_image(200, 120, seam_at=100)))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATIONS_MANIFEST), buf)
    w.put_bytes("manifest.parquet", buf.getvalue())
    gen = w.commit(parents=[model], params={"prompt": HOSTILE}, summary={"images_ok": 1})
    for kid in (0.3, 0.2):
        w = store.new_version("evaluations", "e1")
        buf = io.BytesIO()
        pq.write_table(
            pa.Table.from_pylist(
                [{"metric": "kid_patch", "value": kid, "status": "ok", "detail": HOSTILE}], schema=METRICS
            ),
            buf,
        )
        w.put_bytes("metrics.parquet", buf.getvalue())
        w.commit(parents=[gen], params={}, summary={"kid_patch": kid, "seam_score": 1.1})
    return store, model, gen


def test_site_lists_versions_with_lineage_gallery_and_trends(populated_store):
    store, model, gen = populated_store
    built = build_site(store, thumb_px=64)
    assert built.pages == 1 + 4  # index + one page per version
    index = store.fs.cat_file(store.path("_site", "index.html")).decode()
    assert str(gen) in index and str(model) in index
    assert "img/trends/m1.png" in index  # KID across the two evaluations of m1's generations
    page = store.fs.cat_file(store.path("_site", "v", "generations", "g1", f"{gen.version}.html")).decode()
    assert "200x120" in page and "FAILED" in page
    assert "<script>alert" not in page and "&lt;script&gt;" in page  # hostile prompt escaped
    assert f"models/m1@{model.version}" in page  # lineage links the model
    assert "../../../../generations/g1/" in page  # the full image, relative to the store root
    thumb = Image.open(
        io.BytesIO(
            store.fs.cat_file(
                store.path("_site", "img", "generations", "g1", gen.version, "000000-200x120-abc.png")
            )
        )
    )
    assert max(thumb.size) == 64
    heat = np.asarray(
        Image.open(
            io.BytesIO(
                store.fs.cat_file(
                    store.path(
                        "_site", "img", "generations", "g1", gen.version, "000000-200x120-abc.seams.png"
                    )
                )
            )
        ).convert("L")
    )
    assert heat.shape == (38, 64)
    col = 32  # the seam at x=100 of 200 lands in column 32 of 64: the brightest column of the heat-map
    assert heat[5:-5, col].mean() > 2 * np.median(heat[5:-5, :])
    model_page = store.fs.cat_file(store.path("_site", "v", "models", "m1", f"{model.version}.html")).decode()
    assert "loss.png" in model_page
    again = build_site(store, thumb_px=64)  # nothing changed: only the index is written again
    assert (again.pages, again.pages_unchanged, again.pictures_reused) == (1, 4, 0)
    w = store.new_version("evaluations", "e2")  # a new child of the generations version: its page changes
    buf = io.BytesIO()
    pq.write_table(
        pa.Table.from_pylist(
            [{"metric": "kid_patch", "value": 0.1, "status": "ok", "detail": ""}], schema=METRICS
        ),
        buf,
    )
    w.put_bytes("metrics.parquet", buf.getvalue())
    w.commit(parents=[gen], params={}, summary={"kid_patch": 0.1})
    third = build_site(store, thumb_px=64)  # pictures of immutable versions are made once
    assert (third.pages, third.pages_unchanged, third.pictures_reused) == (3, 3, 1)
    assert third.pictures_made == again.pictures_made  # the index's trend charts only
    assert (
        "e2@"
        in store.fs.cat_file(store.path("_site", "v", "generations", "g1", f"{gen.version}.html")).decode()
    )
    assert (
        "000000-200x120-abc.png" in store.fs.cat_file(store.path("_site", "index.html")).decode()
    )  # previews kept
    # a page edited in the store since it was written is rebuilt, not kept: the site is store data
    page_path = store.path("_site", "v", "models", "m1", f"{model.version}.html")
    store.fs.pipe_file(page_path, b"<script>alert(1)</script>")
    fourth = build_site(store, thumb_px=64)
    assert (fourth.pages, fourth.pages_unchanged) == (2, 4)
    assert b"<script>alert(1)" not in store.fs.cat_file(page_path)


def test_server_serves_the_store_and_nothing_outside(populated_store, tmp_path):
    store, _, gen = populated_store
    build_site(store, thumb_px=64)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    (tmp_path / "store" / "link-out.txt").symlink_to(secret)
    server = make_server(store, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urllib.request.urlopen(f"{base}/") as r:  # redirected to the index, so its relative links work
            assert r.status == 200 and b"Any-Size-Diffusion store" in r.read()
            assert r.url.endswith("/_site/index.html")
        with urllib.request.urlopen(
            f"{base}/generations/g1/{gen.version}/images/000000-200x120-abc.png"
        ) as r:
            assert r.headers["Content-Type"] == "image/png"
        for bad in ("/../secret.txt", "/%2e%2e/secret.txt", "/link-out.txt", "/_sitex", "//etc/passwd"):
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(base + bad)
            assert exc.value.code == 404, bad
    finally:
        server.shutdown()
        server.server_close()


def test_dashboard_cli_build(populated_store, capsys):
    from flows.cli import main

    store, _, _ = populated_store
    assert main(["dashboard", "build", "--store", store.url, "--thumb-px", "48"]) == 0
    assert "5 pages" in capsys.readouterr().out

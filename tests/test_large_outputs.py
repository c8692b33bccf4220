"""Large outputs: written from the (memory-mapped) pixels as they are encoded, a Deep Zoom pyramid
and an OpenSeadragon viewer page beside them, the manifest saying which, and the viewer zooming
to full resolution in a real headless Chromium, from the dashboard server and from file://."""

from __future__ import annotations

import io
import re
import threading
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from artifact_store import ArtifactStore
from asd_models.large_images import read_dzi, thumbnail_png, write_deep_zoom, write_png_stream, write_tiff
from tests.browser import Browser, chromium_path


def _pattern(h: int, w: int, path: Path | None = None) -> np.ndarray:
    out = (
        np.memmap(path, dtype=np.uint8, mode="w+", shape=(h, w, 3)) if path else np.empty((h, w, 3), np.uint8)
    )
    y, x = np.mgrid[0:h, 0:w]
    out[..., 0] = (x * 255 // max(1, w - 1)).astype(np.uint8)
    out[..., 1] = (y * 255 // max(1, h - 1)).astype(np.uint8)
    out[..., 2] = ((x // 37 + y // 23) % 2 * 200).astype(np.uint8)
    return out


def test_png_tiff_and_pyramid_come_from_a_memmap_unchanged(tmp_path):
    pixels = _pattern(700, 1100, tmp_path / "px.u8")
    buf = io.BytesIO()
    write_png_stream(pixels, buf)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), pixels)

    write_tiff(pixels, tmp_path / "o.tif")
    import tifffile

    with tifffile.TiffFile(tmp_path / "o.tif") as tif:
        page = tif.series[0].levels[0].pages[0]
        assert (
            page.is_tiled and page.tilewidth == 256 and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        )
        assert len(tif.series[0].levels) >= 2  # pyramidal
        assert np.array_equal(tif.series[0].levels[0].asarray(), pixels)

    dz = write_deep_zoom(pixels, tmp_path / "dz", "img")
    assert (dz.width, dz.height, dz.tile_size, dz.overlap, dz.format) == (1100, 700, 254, 1, "jpeg")
    assert read_dzi((tmp_path / "dz" / "img.dzi").read_bytes()) == dz
    levels = sorted(int(p.name) for p in (tmp_path / "dz" / "img_files").iterdir())
    assert levels == list(range(dz.levels)) and dz.levels == 12  # 1 px ... 2048 > 1100
    deepest = tmp_path / "dz" / "img_files" / str(dz.levels - 1)
    assert len(list(deepest.glob("*.jpeg"))) == 5 * 3  # ceil(1100/254) x ceil(700/254)
    with Image.open(deepest / "0_0.jpeg") as t:
        assert t.size == (255, 255)  # 254 + 1 px overlap on the inner sides
        assert np.abs(np.asarray(t, dtype=int)[:254, :254] - pixels[:254, :254].astype(int)).mean() < 6
    assert Image.open(io.BytesIO(thumbnail_png(buf.getvalue(), 64))).size == (64, 41)


def test_a_failing_destination_stops_the_png_with_its_own_error():
    class Full(io.RawIOBase):
        def write(self, b):
            raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space left"):
        write_png_stream(_pattern(300, 300), Full())
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        write_png_stream(np.zeros((10, 10), np.uint8), io.BytesIO())


@pytest.fixture(scope="module")
def large_generation(tmp_path_factory, commit_tiny_model, prefect_harness):
    """`asd generate` with a low large-image threshold: one large output (640x480), one small."""
    from flows.cli import main

    root = tmp_path_factory.mktemp("large")
    store_url = str(root / "store")
    commit_tiny_model(store_url)
    prompts = root / "p.jsonl"
    prompts.write_text(
        '{"prompt": "a wide valley", "width": 640, "height": 480, "seed": 1}\n'
        '{"prompt": "a small cat", "width": 96, "height": 96, "seed": 2}\n'
    )
    assert (
        main(
            [
                "--store",
                store_url,
                "generate",
                "--model",
                "tiny",
                "--name",
                "big",
                "--prompts",
                str(prompts),
                "--steps",
                "2",
                "--large-image-pixels",
                "100000",
            ]
        )
        == 0
    )
    tiff = main(
        [
            "--store",
            store_url,
            "generate",
            "--model",
            "tiny",
            "--name",
            "big-tiff",
            "--prompts",
            str(prompts),
            "--steps",
            "2",
            "--large-image-pixels",
            "100000",
            "--large-image-format",
            "tiff",
            "--no-deep-zoom",
        ]
    )
    assert tiff == 0
    store = ArtifactStore(store_url)
    return store, store.resolve("generations/big@latest"), store.resolve("generations/big-tiff@latest")


def _manifest(store, ref) -> list[dict]:
    return pl.read_parquet(io.BytesIO(store.read_bytes(ref, "manifest.parquet"))).sort("row").to_dicts()


def test_large_outputs_are_streamed_with_a_pyramid_and_a_viewer(large_generation):
    store, ref, tiff_ref = large_generation
    big, small = _manifest(store, ref)
    assert big["status"] == small["status"] == "ok"
    assert (big["image_format"], small["image_format"]) == ("png-stream", "png")
    assert big["deep_zoom"] == f"images/{big['key']}.dzi" and big["viewer"] == f"images/{big['key']}.html"
    assert small["deep_zoom"] is None and small["viewer"] is None
    assert big["peak_rss_mb"] > 100 and small["peak_rss_mb"] > 100
    assert Image.open(io.BytesIO(store.read_bytes(ref, big["image"]))).size == (640, 480)
    files = dict(store.iter_files(ref))
    assert "viewer/openseadragon.min.js" in files and "viewer/images/zoomin_rest.png" in files
    dz = read_dzi(store.read_bytes(ref, big["deep_zoom"]))
    assert (dz.width, dz.height) == (640, 480)
    assert (
        f"images/{big['key']}_files/{dz.levels - 1}/2_1.jpeg" in files
    )  # every pyramid tile is in the record
    assert store.verify(ref) == []
    page = store.read_bytes(ref, big["viewer"]).decode()
    assert "../viewer/openseadragon.min.js" in page and f'"Url": "{big["key"]}_files/"' in page
    assert "http" not in page.replace("http://schemas.microsoft.com/deepzoom/2008", "")  # no CDN, no network

    big_t, small_t = _manifest(store, tiff_ref)
    assert (big_t["image_format"], big_t["image"], big_t["deep_zoom"]) == (
        "tiff",
        f"images/{big_t['key']}.tif",
        None,
    )
    with Image.open(io.BytesIO(store.read_bytes(tiff_ref, big_t["image"]))) as im:
        assert im.size == (640, 480)
    assert "viewer/openseadragon.min.js" not in store.record(tiff_ref)["files"]


def test_dashboard_thumbnails_large_outputs_from_their_pyramid_and_links_the_viewer(large_generation):
    from dashboard.build import build_site

    store, ref, _ = large_generation
    build_site(store)
    big = _manifest(store, ref)[0]
    pages = list(Path(store.path("_site")).rglob(f"{ref.version}.html"))
    html = pages[0].read_text()
    assert f"zoom/{ref.prefix}/{big['key']}.html" in html and "open the zoomable viewer" in html
    thumb = next(Path(store.path("_site")).rglob(f"{big['key']}.png"))
    assert max(Image.open(thumb).size) <= 256


def _zoom_in_and_check(browser: Browser, url: str, shot: Path) -> dict:
    """Open the viewer, zoom to its maximum, wait for the deepest level; what loaded, what failed,
    and how much the screenshot varies (a blank canvas does not)."""
    browser.open(
        url,
        "window.asdViewer && asdViewer.world.getItemCount() > 0 && "
        "asdViewer.world.getItemAt(0).getFullyLoaded()",
        timeout_s=60,
    )
    levels = browser.evaluate("asdDeepZoom.levels")
    browser.evaluate(
        "asdViewer.viewport.zoomTo(asdViewer.viewport.getMaxZoom(), null, true);"
        "asdViewer.viewport.panTo(new OpenSeadragon.Point(0.7, 0.4), true); true"
    )
    browser.wait(
        f"asdTiles.deepest === {levels - 1} && asdViewer.world.getItemAt(0).getFullyLoaded()", timeout_s=60
    )
    stats = browser.evaluate(
        "({failed: asdTiles.failed, loaded: asdTiles.loaded, deepest: asdTiles.deepest})"
    )
    shown = np.asarray(Image.open(browser.screenshot(shot)).convert("RGB"), dtype=float)[
        :-40
    ]  # above the caption bar
    return {
        **stats,
        "levels": levels,
        "std": float(shown.std()),
        "zoom": browser.evaluate("asdViewer.viewport.getZoom()"),
    }


@pytest.mark.skipif(chromium_path() is None, reason="needs the chromium Debian package")
def test_viewer_zooms_to_full_resolution_in_chromium(large_generation, tmp_path):
    from dashboard.build import build_site
    from dashboard.server import make_server

    store, ref, _ = large_generation
    big = _manifest(store, ref)[0]
    build_site(store)
    server = make_server(store, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Browser(900, 700) as browser:  # the server runs the site's own zoom page, never a stored one
            base = f"http://127.0.0.1:{server.server_address[1]}"
            with urllib.request.urlopen(f"{base}/{ref.prefix}/{big['viewer']}") as r:
                assert r.headers["Content-Disposition"].startswith("attachment")
            url = f"{base}/_site/zoom/{ref.prefix}/{big['key']}.html"
            stats = _zoom_in_and_check(browser, url, tmp_path / "http.png")
            assert stats["failed"] == [] and stats["deepest"] == stats["levels"] - 1, stats
            assert stats["std"] > 10, stats  # the canvas shows the picture, not a blank
            statuses = browser.evaluate(
                "performance.getEntriesByType('resource')"
                ".filter(e => e.name.includes('_files/')).map(e => e.responseStatus)"
            )
            assert statuses and set(statuses) == {200}, statuses
            # the same page straight from the store folder (file://): tiles load as plain images
            local = Path(store.path(ref.prefix, big["viewer"])).resolve().as_uri()
            stats = _zoom_in_and_check(browser, local, tmp_path / "file.png")
            assert stats["failed"] == [] and stats["deepest"] == stats["levels"] - 1 and stats["std"] > 10, (
                stats
            )
    finally:
        server.shutdown()
        server.server_close()


def test_viewer_page_escapes_its_title():
    from asd_models.large_images import DeepZoom
    from dashboard.viewer import viewer_page

    page = viewer_page("<script>alert(1)</script>", DeepZoom(10, 10, 254, 1, "jpeg"), "k_files", "../viewer")
    assert "<script>alert(1)" not in page and "&lt;script&gt;" in page


def test_a_large_png_goes_to_s3_as_a_multipart_upload_while_it_is_encoded(s3_bucket, s3_server, tmp_path):
    """The streamed PNG reaches S3 in 16 MiB parts (the store's s3fs block size) as libvips
    encodes it: no whole file in memory or on local disk; the record's sha256 is the object's."""
    import boto3

    rng = np.random.default_rng(0)
    pixels = np.memmap(tmp_path / "px.u8", dtype=np.uint8, mode="w+", shape=(2400, 2600, 3))
    for y in range(0, 2400, 400):
        pixels[y : y + 400] = rng.integers(0, 255, (400, 2600, 3), dtype=np.uint8)  # incompressible: > 16 MiB
    store = ArtifactStore(s3_bucket)
    w = store.new_version("generations", "s3-big")
    with w.open("images/big.png") as f:
        write_png_stream(pixels, f)
    ref = w.commit()
    assert store.verify(ref) == []
    bucket, _, prefix = s3_bucket[len("s3://") :].partition("/")
    head = boto3.client("s3", endpoint_url=s3_server).head_object(
        Bucket=bucket, Key=f"{prefix}/{ref.prefix}/images/big.png"
    )
    assert head["ContentLength"] > 16 << 20 and head["ETag"].strip('"').endswith("-2")  # two parts
    with Image.open(io.BytesIO(store.read_bytes(ref, "images/big.png"))) as im:
        assert np.array_equal(np.asarray(im), pixels)


@pytest.mark.parametrize(
    "dzi, problem",
    [
        (b"<Image/>", "no <Size>"),
        (b"not xml", "not a Deep Zoom"),
        (b'<Image TileSize="254" Overlap="1" Format="jpeg"><Size Width="-3" Height="9"/></Image>', "Width"),
        (b'<Image Overlap="1" Format="jpeg"><Size Width="3" Height="9"/></Image>', "TileSize=None"),
        (
            b'<Image TileSize="254" Overlap="1" Format="../../x"><Size Width="3" Height="9"/></Image>',
            "Format",
        ),
    ],
)
def test_a_forged_dzi_is_refused_naming_the_field(dzi, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        read_dzi(dzi)

"""A zoomable viewer page for a Deep Zoom pyramid: OpenSeadragon (vendored from its npm package,
`vendor/openseadragon/VENDORED.md`) served from the same folder, no CDN.

The pyramid's descriptor is written into the page as an inline tile source, so the page makes
no XHR request: tiles load as plain images, which works from `file://` (a local store folder)
as well as from any static host or `asd dashboard serve`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from asd_models.large_images import DeepZoom

VENDOR = Path(__file__).resolve().parent / "vendor" / "openseadragon"
ASSETS_DIR = "viewer"  # in a generations version: viewer/openseadragon.min.js, viewer/images/*.png


def vendor_files() -> dict[str, Path]:
    """Relative path in a version -> vendored file, for every viewer asset."""
    files = {
        f"{ASSETS_DIR}/openseadragon.min.js": VENDOR / "openseadragon.min.js",
        f"{ASSETS_DIR}/LICENSE.txt": VENDOR / "LICENSE.txt",
    }
    for png in sorted((VENDOR / "images").glob("*.png")):
        files[f"{ASSETS_DIR}/images/{png.name}"] = png
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"OpenSeadragon assets missing from the installed package: {missing}")
    return files


def _script_json(value: object) -> str:
    return json.dumps(value).replace("</", "<\\/")  # safe inside <script>


def viewer_page(title: str, deep_zoom: DeepZoom, files_url: str, assets_url: str) -> str:
    """The page: `files_url` is the pyramid's `<name>_files/` folder and `assets_url` the viewer
    assets folder, both relative to the page."""
    options = {
        "id": "viewer",
        "prefixUrl": assets_url.rstrip("/") + "/images/",
        "drawer": "canvas",
        "showNavigator": True,
        "maxZoomPixelRatio": 4,
        "visibilityRatio": 0.5,
        "crossOriginPolicy": False,
        "tileSources": deep_zoom.tile_source(files_url.rstrip("/") + "/"),
    }
    t = html.escape(title)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>html,body{{margin:0;height:100%;background:#1e1e1e;color:#ddd;font:14px system-ui,sans-serif}}
#bar{{position:absolute;bottom:0;left:0;right:0;padding:6px 10px;background:rgba(0,0,0,.55);z-index:2}}
#viewer{{width:100%;height:100%}}</style></head>
<body><div id="bar">{t} &mdash; {deep_zoom.width}&times;{deep_zoom.height} px, {deep_zoom.levels} zoom levels
(scroll or pinch to zoom, drag to pan)</div><div id="viewer"></div>
<script src="{html.escape(assets_url.rstrip("/"))}/openseadragon.min.js"></script>
<script>
window.asdViewer = OpenSeadragon({_script_json(options)});
window.asdDeepZoom = {
        _script_json(
            {
                "width": deep_zoom.width,
                "height": deep_zoom.height,
                "levels": deep_zoom.levels,
                "tile_size": deep_zoom.tile_size,
            }
        )
    };
// what loaded (for monitoring and tests): tiles, the deepest level shown, tiles that failed
window.asdTiles = {{loaded: 0, deepest: -1, failed: []}};
asdViewer.addHandler("tile-loaded", function (e) {{
  asdTiles.loaded++; asdTiles.deepest = Math.max(asdTiles.deepest, e.tile.level);
}});
asdViewer.addHandler("tile-load-failed", function (e) {{
  asdTiles.failed.push((e.tile && e.tile.getUrl ? e.tile.getUrl() : "") + " " + (e.message || ""));
}});
</script></body></html>
"""

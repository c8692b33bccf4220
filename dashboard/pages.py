"""HTML of the dashboard: plain pages with relative links (they work from a local folder, S3
static hosting or `asd dashboard serve`). Every string from the store is escaped."""

from __future__ import annotations

import json
from html import escape
from typing import Any

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}table{border-collapse:collapse;font-size:13px}
td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}code{font-size:12px}.muted{color:#777}
.gallery{display:flex;flex-wrap:wrap;gap:14px}.card{border:1px solid #ddd;padding:8px;width:540px;font-size:12px}
.card img{max-width:260px;max-height:260px;vertical-align:top;margin-right:4px;background:#eee}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow-x:auto}
"""

# Sets data-images-loaded / data-images-total on <body> once the page has loaded: a check (by a
# person or a headless browser) that every picture on the page really decoded.
IMAGE_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
});
</script>"""


def e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def page(title: str, body: str, root: str) -> str:
    """`root`: the relative path from this page to the site's root (with a trailing slash, or '')."""
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)}</title>"
        f"<meta name=viewport content='width=device-width'><style>{CSS}</style></head><body>"
        f"<p class=muted><a href='{root}index.html'>asd dashboard</a></p><h1>{e(title)}</h1>{body}"
        f"{IMAGE_CHECK}</body></html>"
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    """Cells are HTML already (escape what comes from data with `e`)."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def link(href: str, text: Any) -> str:
    return f"<a href='{e(href)}'>{e(text)}</a>"


def pre_json(value: Any) -> str:
    return f"<pre>{e(json.dumps(value, indent=2, sort_keys=True, default=str))}</pre>"


def metric_pairs(metrics: dict[str, float] | list[Any] | None) -> list[tuple[str, float]]:
    """The catalog's metrics map as (name, value) pairs (a dict from polars, pairs from pyarrow)."""
    if isinstance(metrics, dict):
        return list(metrics.items())
    return [tuple(m) for m in metrics or []]


def metrics_text(metrics: dict[str, float] | list[Any] | None, limit: int = 4) -> str:
    items = [(k, v) for k, v in metric_pairs(metrics) if "/" not in k and v is not None][:limit]
    return ", ".join(f"{e(k)}={v:.4g}" for k, v in items)


def gallery_card(
    item: dict[str, Any], thumb: str, heat: str | None, full: str, viewer: str | None = None
) -> str:
    if item["status"] != "ok":
        return (
            f"<div class=card><b>{e(item['width'])}x{e(item['height'])}</b> FAILED<br>{e(item['prompt'])}"
            f"<br><span class=muted>{e(item['error'])}</span></div>"
        )
    heat_img = (
        f"<img src='{e(heat)}' alt='seam heat-map of {e(item['key'])}' title='seam heat-map'>"
        if heat
        else "<span class=muted>(too large for a heat-map)</span>"
    )
    zoom = f"<br><a class=zoom href='{e(viewer)}'>open the zoomable viewer</a>" if viewer else ""
    return (
        f"<div class=card><a href='{e(full)}'><img src='{e(thumb)}' alt='{e(item['key'])}'></a>{heat_img}"
        f"<br><b>{e(item['width'])}x{e(item['height'])}</b> px (exact), seed {e(item['seed'])}, "
        f"{e(round(item['seconds'] or 0, 1))} s, {e(item['unet_evals'])} UNet evals, {e(item['device'])}"
        f"{zoom}<br>{e(item['prompt'])}<br><span class=muted>{e(item['key'])}</span></div>"
    )

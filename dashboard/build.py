"""`asd dashboard build`: a static site in the store's `_site/`, built from the catalog.

index.html (every version by kind, metric trends per model), one page per version (its lineage,
what uses it, parameters; loss curve of a model, gallery of a generations version with thumbnails,
exact sizes and seam heat-maps, metrics of an evaluation). Pictures of a version are made once
(versions never change), pages are rewritten on every build."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from artifact_store import ArtifactRef, ArtifactStore, StoreError
from artifact_store.members import image_bytes
from artifact_store.refs import KINDS, SITE_DIR
from asd_models.large_images import read_dzi, thumbnail_png
from asd_models.seams import HEATMAP_MAX_PIXELS
from dashboard import figures
from dashboard.pages import e, gallery_card, link, metric_pairs, metrics_text, page, pre_json, table
from dashboard.viewer import ASSETS_DIR as VIEWER_ASSETS
from dashboard.viewer import viewer_page

TREND_METRICS = ("fid_patch", "kid_patch", "seam_score", "clip_score")
PAGE_ROOT = "../../../"  # from v/<kind>/<name>/<version>.html back to the site root
STORE_ROOT = "../../../../"  # ... and to the store root
FULL_COPY_MAX_BYTES = 4 << 20  # a gallery image inside a tar shard is copied into the site up to this size
BUILD_STATE = "build-state.json"  # per version page: what it was built from, and its gallery's previews
log = logging.getLogger("asd.dashboard")


def version_page(kind: str, name: str, version: str) -> str:
    return f"v/{kind}/{name}/{version}.html"


@dataclass
class SiteBuild:
    pages: int
    pictures_made: int
    pictures_reused: int
    index: str  # URI of index.html
    pages_unchanged: int = 0  # version pages whose inputs had not changed: neither rebuilt nor rewritten


class _Site:
    def __init__(self, store: ArtifactStore, thumb_px: int, max_images: int, prefect_ui: str | None) -> None:
        self.store, self.thumb_px, self.max_images, self.ui = store, thumb_px, max_images, prefect_ui
        self.files = store.site_files()
        self.pages = self.made = self.reused = self.unchanged = 0
        self.previews: dict[str, list[str]] = {}  # generations ref -> its first thumbnails (for the index)
        self.extra_pages: dict[
            str, str
        ] = {}  # zoom pages written for the version page being built: rel -> sha256

    def write(self, rel: str, data: bytes) -> None:
        self.files.write_atomic(rel, data)

    def existing(self, rel_dir: str) -> set[str]:
        return set(self.files.ls(rel_dir))

    def write_page(self, rel: str, title: str, body: str, root: str) -> str:
        """The page written; its sha256 (the build state keeps it: a page edited since is rebuilt)."""
        data = page(title, body, root).encode()
        self.write(rel, data)
        self.pages += 1
        return hashlib.sha256(data).hexdigest()

    def page_sha256(self, rel: str) -> str | None:
        try:
            return hashlib.sha256(self.files.read(rel)).hexdigest()
        except (OSError, StoreError):
            return None


def _read_state(store: ArtifactStore) -> dict[str, Any]:
    """What the last build made each version page from (nothing, when unreadable: all rebuilt)."""
    try:
        state = json.loads(store.site_files().read(BUILD_STATE))
    except (FileNotFoundError, ValueError, UnicodeDecodeError, StoreError):
        return {}
    return state if isinstance(state, dict) else {}


def _page_fingerprint(
    site: _Site, row: dict[str, Any], parents: dict[str, list[str]], children: dict[str, list[str]]
) -> str:
    """Everything a version page shows comes from these: its catalog row (versions are
    immutable), its lineage neighbours, the build's options and this code."""
    from artifact_store.writer import code_version

    blob = json.dumps(
        [
            row,
            sorted(parents.get(row["ref"], [])),
            sorted(children.get(row["ref"], [])),
            site.thumb_px,
            site.max_images,
            site.ui,
            code_version(),
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _catalog(store: ArtifactStore) -> pl.DataFrame:
    df = pl.DataFrame(store.catalog(rebuild=True))  # rows a killed writer missed are added first
    return df.sort("committed_at", descending=True) if df.height else df


def _lineage_html(
    ref: str, parents: dict[str, list[str]], root: str, depth: int = 0, seen: set | None = None
) -> str:
    seen = set() if seen is None else seen
    if ref in seen or depth > 20:
        return ""
    seen.add(ref)
    try:
        r = ArtifactRef.parse(ref)
        label = link(root + version_page(r.kind, r.name, r.version), ref) if ref in parents else e(ref)
    except StoreError:
        label = e(ref)  # a source folder, a hub model id: outside the store
    kids = "".join(_lineage_html(p, parents, root, depth + 1, seen) for p in parents.get(ref, []))
    return f"<li>{label}" + (f"<ul>{kids}</ul>" if kids else "") + "</li>"


def _pyramid_thumbnail(store: ArtifactStore, ref: ArtifactRef, dzi_rel: str, px: int) -> bytes:
    """The one-tile level of a Deep Zoom pyramid that fits `px` (the largest such), as PNG."""
    dz = read_dzi(store.read_checked(ref, dzi_rel))
    level = dz.levels - 1
    while level > 0 and -(-max(dz.width, dz.height) // 2 ** (dz.levels - 1 - level)) > min(px, dz.tile_size):
        level -= 1
    tile = store.read_checked(ref, f"{dzi_rel[: -len('.dzi')]}_files/{level}/0_0.{dz.format}")
    with Image.open(io.BytesIO(tile)) as im:
        out = io.BytesIO()
        im.convert("RGB").save(out, format="PNG")
    return out.getvalue()


def _zoom_page(site: _Site, ref: ArtifactRef, item: dict[str, Any]) -> str:
    """The site's own zoomable viewer of a large output (link from a version page), made from
    the version's `.dzi` by this code: the dashboard never runs a page stored in a version."""
    rel = f"zoom/{ref.kind}/{ref.name}/{ref.version}/{item['key']}.html"
    up = "../" * 5  # zoom/<kind>/<name>/<version>/ -> the store root
    files = f"{up}{ref.prefix}/{item['deep_zoom'][: -len('.dzi')]}_files"
    dz = read_dzi(site.store.read_checked(ref, item["deep_zoom"]))
    title = f"{item['key']} ({item['width']}x{item['height']})"
    data = viewer_page(title, dz, files, f"{up}{ref.prefix}/{VIEWER_ASSETS}").encode()
    site.write(rel, data)  # written with its version page, whatever was there
    site.extra_pages[rel] = hashlib.sha256(data).hexdigest()
    return f"{PAGE_ROOT}{rel}"


def _manifest_head(store: ArtifactStore, ref: ArtifactRef, n: int) -> tuple[list[dict[str, Any]], int, int]:
    """The first `n` rows of a generations manifest, its row count and how many are ok: the
    footer and the first row groups only (a million-image manifest is never read whole); the ok
    count from the commit summary where it has one."""
    with store.open_checked(ref, "manifest.parquet") as f:
        pf = pq.ParquetFile(f)
        total = pf.metadata.num_rows
        head: list[dict[str, Any]] = []
        for batch in pf.iter_batches(batch_size=max(1, min(n, 4096))):
            head += batch.to_pylist()[: n - len(head)]
            if len(head) >= n:
                break
    summary = store.record(ref).get("summary") or {}
    ok = summary.get("images_ok")
    if not isinstance(ok, int):  # an older version: counted from the manifest (its status column only)
        with store.open_checked(ref, "manifest.parquet") as f:
            ok = pc.sum(pc.equal(pq.read_table(f, columns=["status"]).column("status"), "ok")).as_py() or 0
    return head, total, ok


def _full_image_link(
    site: _Site, ref: ArtifactRef, item: dict[str, Any], pic_dir: str, have: set[str]
) -> str:
    """Where a gallery card's full-size link goes: the image's own file; for one inside a tar shard
    (webdataset layout), a copy in the site when it is small (the server serves files, not members),
    else the tar."""
    if not item.get("shard"):
        return f"{STORE_ROOT}{ref.prefix}/{item['image']}"
    if (item.get("shard_size") or 0) > FULL_COPY_MAX_BYTES:
        return f"{STORE_ROOT}{ref.prefix}/{item['shard']}"
    name = f"{item['key']}.full.png"
    if name not in have:
        site.write(f"{pic_dir}/{name}", image_bytes(site.store, ref, item))
        have.add(name)
    return f"{PAGE_ROOT}{pic_dir}/{name}"


def _generations_gallery(site: _Site, ref: ArtifactRef) -> str:
    store = site.store
    shown, n_rows, ok = _manifest_head(store, ref, site.max_images)
    pic_dir = f"img/{ref.kind}/{ref.name}/{ref.version}"
    have = site.existing(pic_dir)
    cards, bad = [], 0
    for item in shown:
        try:
            cards.append(_gallery_card(site, ref, item, pic_dir, have))
        except (StoreError, OSError, ValueError, TypeError, KeyError) as exc:  # one bad row, not the page
            bad += 1
            log.warning(
                "dashboard: %s, manifest row %r: %s: %s", ref, item.get("row"), type(exc).__name__, exc
            )
    more = (
        f"<p class=muted>showing {len(shown) - bad} of {n_rows} images (--max-images)</p>"
        if n_rows > len(shown) - bad
        else ""
    )
    if bad:
        more += f"<p><b>{bad} manifest row(s) could not be shown</b> (the build's log names them)</p>"
    return (
        f"<h2>Gallery</h2><p>{ok} rendered, {n_rows - ok} failed. Left: the image (click for full size); "
        "right: its seam heat-map (bright = abrupt change; cyan ticks = the sampler's unshifted tile "
        f"lines).</p>{more}<div class=gallery>{''.join(cards)}</div>"
    )


def _gallery_card(site: _Site, ref: ArtifactRef, item: dict[str, Any], pic_dir: str, have: set[str]) -> str:
    """One manifest row's card: its thumbnail and heat-map (made once), its links."""
    store = site.store
    thumb = heat = None
    if item["status"] == "ok":
        thumb_name, heat_name = f"{item['key']}.png", f"{item['key']}.seams.png"
        if thumb_name not in have:
            if item.get("deep_zoom"):  # a large output: the thumbnail from its pyramid, never the whole image
                t, h = _pyramid_thumbnail(store, ref, item["deep_zoom"], site.thumb_px), None
            elif item["width"] * item["height"] > HEATMAP_MAX_PIXELS:  # no pyramid: decoded in strips
                t, h = thumbnail_png(image_bytes(store, ref, item), site.thumb_px), None
            else:
                png = image_bytes(store, ref, item)
                t, h = figures.thumbnail_and_heatmap(
                    png, item["seam_x"] or [], item["seam_y"] or [], site.thumb_px
                )
            site.write(f"{pic_dir}/{thumb_name}", t)
            if h is not None:
                site.write(f"{pic_dir}/{heat_name}", h)
                have.add(heat_name)
            site.made += 1
        else:
            site.reused += 1
        thumb = f"{PAGE_ROOT}{pic_dir}/{thumb_name}"
        site.previews.setdefault(str(ref), []).append(f"{pic_dir}/{thumb_name}")
        heat = f"{PAGE_ROOT}{pic_dir}/{heat_name}" if heat_name in have else None
    full = _full_image_link(site, ref, item, pic_dir, have) if item["image"] else ""
    viewer = _zoom_page(site, ref, item) if item.get("deep_zoom") and item.get("viewer") else None
    return gallery_card(item, thumb or "", heat, full, viewer)


def _model_loss(site: _Site, ref: ArtifactRef) -> str:
    rel = f"img/{ref.kind}/{ref.name}/{ref.version}/loss.png"
    if "loss.png" not in site.existing(rel.rsplit("/", 1)[0]):
        try:
            losses = json.loads(site.store.read_checked(ref, "training_log.json"))["loss"]
        except (StoreError, FileNotFoundError, KeyError, ValueError):
            return "<p class=muted>no training log</p>"
        site.write(rel, figures.loss_curve(losses, f"ARAD loss of {ref}"))
        site.made += 1
    return f"<h2>Loss</h2><img src='{PAGE_ROOT}{rel}' alt='loss curve of {e(ref)}'>"


def _evaluation_metrics(site: _Site, ref: ArtifactRef) -> str:
    with site.store.open_checked(
        ref, "metrics.parquet"
    ) as f:  # one row per image too: only the summary is shown
        m = pl.scan_parquet(f).filter(~pl.col("metric").str.contains("/", literal=True)).collect()
        n_all = pq.ParquetFile(f).metadata.num_rows
    rows = [
        [e(r["metric"]), "" if r["value"] is None else f"{r['value']:.4g}", e(r["status"]), e(r["detail"])]
        for r in m.iter_rows(named=True)
    ]
    more = (
        f"<p class=muted>{n_all - m.height} per-image rows (seam_score/&lt;image&gt;) in metrics.parquet and "
        "the report</p>"
        if n_all > m.height
        else ""
    )
    return "<h2>Metrics</h2>" + table(["metric", "value", "status", "detail"], rows) + more


def _version_body(
    site: _Site, row: dict[str, Any], parents: dict[str, list[str]], children: dict[str, list[str]]
) -> str:
    ref = ArtifactRef.parse(row["ref"])
    run = row["flow_run_id"]
    run_cell = link(f"{site.ui.rstrip('/')}/runs/flow-run/{run}", run) if run and site.ui else e(run)
    facts = table(
        ["field", "value"],
        [
            ["committed", e(row["committed_at"])],
            ["size", f"{row['size_bytes'] / 1e6:.2f} MB in {row['file_count']} files"],
            ["flow run", run_cell],
            ["code version", e(row["code_version"])],
            ["location", f"<code>{e(row['uri'])}</code>"],
            ["summary", metrics_text(row["metrics"], limit=20)],
        ],
    )
    used_by = "".join(f"<li>{_ref_link(c, PAGE_ROOT)}</li>" for c in children.get(row["ref"], []))
    body = (
        facts
        + f"<h2>Lineage</h2><ul>{_lineage_html(row['ref'], parents, PAGE_ROOT)}</ul>"
        + (f"<h2>Used by</h2><ul>{used_by}</ul>" if used_by else "")
    )
    try:
        if ref.kind in ("generations", "upscales"):  # an upscale's manifest has every generation field
            body += _generations_gallery(site, ref)
        elif ref.kind == "models":
            body += _model_loss(site, ref)
        elif ref.kind == "evaluations":
            body += _evaluation_metrics(site, ref)
        body += "<h2>Parameters</h2>" + pre_json(site.store.record(ref).get("params"))
    except (StoreError, OSError, ValueError) as exc:  # a damaged version: say so on its page, build the rest
        log.warning("dashboard: %s: %s", ref, exc)
        body += f"<p><b>could not read this version:</b> {e(exc)}</p>"
    return body


def _ref_link(ref: str, root: str) -> str:
    r = ArtifactRef.parse(ref)
    return link(root + version_page(r.kind, r.name, r.version), ref)


def _previews(thumbs: list[str]) -> str:
    imgs = "".join(f"<img src='{e(t)}' alt='preview' style='height:56px;margin:2px'>" for t in thumbs[:4])
    return f"<div>{imgs}</div>" if imgs else ""


def _trends(site: _Site, df: pl.DataFrame, parents: dict[str, list[str]]) -> str:
    """Per model name: the metrics of every evaluation of its generations, across versions."""
    kinds = dict(zip(df["ref"].to_list(), df["kind"].to_list(), strict=True))
    by_model: dict[str, dict[str, list[tuple[datetime, float]]]] = {}
    for r in df.filter(pl.col("kind") == "evaluations").iter_rows(named=True):
        gens = [p for p in parents.get(r["ref"], []) if kinds.get(p) == "generations"]
        models = [p for g in gens for p in parents.get(g, []) if kinds.get(p) == "models"]
        for m in models:
            series = by_model.setdefault(ArtifactRef.parse(m).name, {})
            for k, v in metric_pairs(r["metrics"]):
                if k in TREND_METRICS and v is not None and v == v:
                    series.setdefault(k, []).append((r["committed_at"], v))
    out = []
    for model, series in sorted(by_model.items()):
        if not series:
            continue
        rel = f"img/trends/{model}.png"
        site.write(rel, figures.metric_trends(series, f"model {model}: evaluations over time"))
        site.made += 1
        out.append(f"<h3>{e(model)}</h3><img src='{rel}' alt='metric trends of {e(model)}'>")
    return "<h2>Metric trends</h2>" + ("".join(out) or "<p class=muted>no evaluations yet</p>")


def _unchanged(site: _Site, rel: str, fp: str, before: Any) -> bool:
    """A version page (and its zoom pages) may be kept: the last build made it from what it would
    be made from now (`fp`), and every page it wrote still hashes to what it wrote (an edited or
    removed page is rebuilt). A malformed state entry is "changed"."""
    if (
        not isinstance(before, dict)
        or before.get("fp") != fp
        or not isinstance(before.get("pages", {}), dict)
    ):
        return False
    pages = {rel: before.get("sha256"), **before.get("pages", {})}
    return all(isinstance(sha, str) and site.page_sha256(p) == sha for p, sha in pages.items())


def build_site(
    store: ArtifactStore, thumb_px: int = 256, max_images: int = 200, prefect_ui: str | None = None
) -> SiteBuild:
    """Build (or refresh) `_site/` of the store from its catalog."""
    site = _Site(store, thumb_px, max_images, prefect_ui)
    df = _catalog(store)
    parents = {r: list(p or []) for r, p in zip(df["ref"].to_list(), df["parents"].to_list(), strict=True)}
    children: dict[str, list[str]] = {}
    for r, ps in parents.items():
        for p in ps:
            children.setdefault(p, []).append(r)
    state = _read_state(store)
    built: dict[str, Any] = {}
    for row in df.iter_rows(named=True):
        rel = version_page(row["kind"], row["name"], row["version"])
        fp = _page_fingerprint(site, row, parents, children)
        before = state.get(rel)
        if isinstance(before, dict) and _unchanged(site, rel, fp, before):
            built[rel] = before  # nothing it shows changed, and its pages are the ones written: kept
            mine = f"img/{row['kind']}/{row['name']}/{row['version']}/"
            previews = [p for p in before.get("previews") or [] if isinstance(p, str) and p.startswith(mine)]
            if previews and all(".." not in p.split("/") for p in previews):  # the state is store data too
                site.previews[row["ref"]] = previews
            site.unchanged += 1
            continue
        site.extra_pages = {}
        sha = site.write_page(rel, row["ref"], _version_body(site, row, parents, children), PAGE_ROOT)
        built[rel] = {
            "fp": fp,
            "sha256": sha,
            "pages": site.extra_pages,
            "previews": site.previews.get(row["ref"], []),
        }
    site.write(BUILD_STATE, json.dumps(built, sort_keys=True).encode())
    sections = []
    for kind in sorted(KINDS, key=lambda k: (k != "generations", k != "evaluations", k)):
        sub = df.filter(pl.col("kind") == kind)
        if not sub.height:
            continue
        rows = [
            [
                link(version_page(r["kind"], r["name"], r["version"]), r["ref"]),
                e(r["committed_at"]),
                f"{r['file_count']}",
                f"{r['size_bytes'] / 1e6:.1f} MB",
                metrics_text(r["metrics"]) + _previews(site.previews.get(r["ref"], [])),
                "<br>".join(e(p) for p in r["parents"] or []),
            ]
            for r in sub.iter_rows(named=True)
        ]
        sections.append(
            f"<h2 id='{kind}'>{e(kind)} ({sub.height})</h2>"
            + table(["version", "committed", "files", "size", "summary", "parents"], rows)
        )
    intro = (
        f"<p>Store <code>{e(store.display_url)}</code>: {df.height} committed versions. Built "
        f"{datetime.now().astimezone().isoformat(timespec='seconds')}. The same catalog: "
        "<code>_catalog/*/*/*.parquet</code> (polars / DuckDB).</p>"
    )
    site.write_page(
        "index.html", "Any-Size-Diffusion store", intro + _trends(site, df, parents) + "".join(sections), ""
    )
    return SiteBuild(site.pages, site.made, site.reused, store.uri(SITE_DIR, "index.html"), site.unchanged)

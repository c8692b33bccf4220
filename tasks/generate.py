"""FSTD generation tasks: one task per shard of prompt rows, the model loaded once per worker
process, every image durable in the pending version as soon as it is rendered, and one commit
of the whole generations version at the end.

Exactly once: an image's key holds a hash of the model version, its prompt row and the render
settings; a finished image is `images/<key>.png` (`.tif` for a large output asked as TIFF, with its
Deep Zoom pyramid and viewer page beside it) plus `images/<key>.json` (its manifest row and the
files' sha256, written after them). A rerun of the same job resumes the same pending
version (`store.resume_or_new`) and renders only the images without their `.json`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from artifact_store import ArtifactRef, ArtifactStore, PendingVersion
from artifact_store.writer import fault_point
from asd_models.large_images import write_deep_zoom, write_png_stream, write_tiff
from asd_models.memory import peak_rss_mb, reset_peak_rss
from asd_models.seams import HEATMAP_MAX_PIXELS, seam_heatmap_rgb
from dashboard.viewer import ASSETS_DIR as VIEWER_ASSETS
from dashboard.viewer import vendor_files, viewer_page
from data_engine.prompts import read_prompts
from data_manifests.schemas import GENERATIONS_MANIFEST, STATUS_FAILED, STATUS_OK
from data_manifests.settings import GenerateSettings
from tasks.model_cache import cached_pipeline, model_loads
from tasks.runtime import commit_in_run, run_logger

_RENDERED_IN_PROCESS = [0]  # images this process rendered (the fault point counts them)


@dataclass(frozen=True)
class GenerationJob:
    """Everything a shard task needs, small and picklable (no prompt text: tasks read their
    rows from the stored prompts artifact, so a 100k-prompt job fits Prefect's parameter cap)."""

    store_url: str
    model: str  # resolved models/NAME@VERSION
    prompts: str  # resolved prompts/NAME@VERSION
    pending: PendingVersion
    settings: GenerateSettings


@dataclass
class ShardOutput:
    """What one shard task left in the pending version: manifest rows (failures included), the
    files with their sha256 and size, how many images it rendered now (not found done), and
    where it ran."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    rendered: int = 0
    worker: str = ""
    model_loads: int = 0


def image_identity(model: str, row: dict[str, Any], settings: GenerateSettings) -> str:
    """Hash of what decides an image's pixels: model version, prompt row, render settings."""
    fields = {k: row[k] for k in ("prompt", "negative_prompt", "width", "height", "seed", "steps", "guidance_scale",
                                  "strength")}
    blob = json.dumps({"model": model, "row": fields, "settings": settings.render_options()}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def image_key(row: dict[str, Any], identity: str) -> str:
    return f"{row['row']:06d}-{row['width']}x{row['height']}-{identity[:12]}"


def invalid_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {f.name: None for f in GENERATIONS_MANIFEST}
    out.update(key=f"{row['row']:06d}-invalid", row=row["row"], prompt=row.get("prompt"), width=row.get("width"),
               height=row.get("height"), seed=row.get("seed"), status=STATUS_FAILED,
               error=f"prompt row {row['row']}: {row['error']}")
    return out


def _packs(rows: list[dict[str, Any]], settings: GenerateSettings) -> list[list[dict[str, Any]]]:
    """Consecutive rows rendered together, up to `pack_max_pixels` output pixels (at least one)."""
    if not settings.pack:
        return [[r] for r in rows]
    packs: list[list[dict[str, Any]]] = []
    pixels = 0
    for r in rows:
        n = r["width"] * r["height"]
        if packs and pixels + n <= settings.pack_max_pixels:
            packs[-1].append(r)
            pixels += n
        else:
            packs.append([r])
            pixels = n
    return packs


@lru_cache(maxsize=2)
def _prompt_table(store_url: str, prompts_ref: str) -> pa.Table:
    """A prompts version, read once per worker process (versions are immutable)."""
    return read_prompts(ArtifactStore(store_url), prompts_ref)


def _peak_memory_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def _resumed(store: ArtifactStore, pending: PendingVersion, key: str, out: ShardOutput) -> bool:
    """Take an image a previous run finished (its .json exists) into `out`."""
    rel = f"images/{key}.json"
    if not store.exists(pending, rel):
        return False
    blob = store.read_pending(pending, rel)
    record = json.loads(blob)
    out.rows.append(record["row"])
    out.files[record["row"]["image"]] = record["file"]
    out.files.update(record.get("extra") or {})
    out.files[rel] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    return True


def _seam_heatmap_png(pixels: np.ndarray, xs: list[int], ys: list[int]) -> bytes | None:
    """The image's seam heat-map (`<key>.seams.png`; none for images over HEATMAP_MAX_PIXELS)."""
    from PIL import Image

    if pixels.shape[0] * pixels.shape[1] > HEATMAP_MAX_PIXELS:
        return None
    buf = io.BytesIO()
    Image.fromarray(seam_heatmap_rgb(np.asarray(pixels), xs, ys)).save(buf, format="PNG")
    return buf.getvalue()


def _write_image(writer: Any, key: str, pixels: np.ndarray, s: GenerateSettings) -> tuple[str, str, dict[str, Any]]:
    """The image file: (path, format, files written beside it). Outputs over
    `large_image_pixels` go from the (memory-mapped) pixels to the store as they are encoded,
    with a Deep Zoom pyramid and viewer page when `deep_zoom`; the rest are PNG via PIL."""
    from PIL import Image

    h, w, _ = pixels.shape
    if w * h <= s.large_image_pixels:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(pixels)).save(buf, format="PNG")
        rel = f"images/{key}.png"
        writer.put_bytes(rel, buf.getvalue())
        return rel, "png", {}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="asd-large-") as tmp:
        if s.large_image_format == "tiff":  # libvips seeks while writing a TIFF: a local file, then streamed up
            rel, fmt = f"images/{key}.tif", "tiff"
            write_tiff(pixels, Path(tmp) / "image.tif")
            writer.put_file(rel, Path(tmp) / "image.tif")
            (Path(tmp) / "image.tif").unlink()
        else:
            rel, fmt = f"images/{key}.png", "png-stream"
            with writer.open(rel) as f:
                write_png_stream(pixels, f)
        if s.deep_zoom:
            dz = write_deep_zoom(pixels, Path(tmp) / "dz", key)
            before = set(writer.files)
            writer.put_dir(Path(tmp) / "dz", prefix="images")
            page = viewer_page(f"{key} ({w}x{h})", dz, f"{key}_files", f"../{VIEWER_ASSETS}")
            writer.put_bytes(f"images/{key}.html", page.encode())
            extra = {k: writer.files[k] for k in set(writer.files) - before}
            extra[f"images/{key}.html"] = writer.files[f"images/{key}.html"]
    return rel, fmt, extra


def _render_pack(pipe: Any, pack: list[dict[str, Any]], job: GenerationJob, writer: Any, out: ShardOutput,
                 worker: str, logger: Any) -> None:
    import torch

    from asd_models.pipeline import RenderRequest

    s = job.settings
    reqs = [RenderRequest(r["prompt"], r["width"], r["height"], r["seed"], r["negative_prompt"] or "",
                          r["steps"] or s.steps, s.guidance_scale if r["guidance_scale"] is None else r["guidance_scale"],
                          r["strength"] or s.strength, s.noise_level) for r in pack]
    fstd = pipe.default_fstd(s.tile, s.tile_batch_size)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    reset_peak_rss()
    t0 = time.perf_counter()
    try:  # progress is per image (a log line each) and per job (the flow's artifact): no API calls per step
        results = pipe.generate_many(reqs, fstd, memmap_pixels=s.large_image_pixels)
        error = None
    except (ValueError, RuntimeError) as exc:
        results, error = [None] * len(pack), f"{type(exc).__name__}: {exc}"
    seconds = (time.perf_counter() - t0) / len(pack)
    peak = _peak_memory_mb(pipe.device)
    for r, res in zip(pack, results, strict=True):
        row = {f.name: None for f in GENERATIONS_MANIFEST}
        row.update(key=r["key"], row=r["row"], prompt=r["prompt"], width=r["width"], height=r["height"], seed=r["seed"],
                   seconds=seconds, peak_memory_mb=peak, device=str(pipe.device), worker=worker)
        if res is None or res.size != (r["width"], r["height"]):
            row.update(status=STATUS_FAILED, error=error or f"pipeline returned {res.size}")
            logger.error("%s failed: %s", r["key"], row["error"])
            out.rows.append(row)
            continue
        rel, fmt, extra = _write_image(writer, r["key"], res.pixels, s)
        meta = writer.files[rel]
        row.update(status=STATUS_OK, image=rel, bucket=res.bucket.name, canvas_width=res.canvas[0],
                   canvas_height=res.canvas[1], tile_px=res.tile_px, fstd_tiles=res.fstd_tiles,
                   seam_x=res.seam_lines["x"], seam_y=res.seam_lines["y"], unet_evals=res.unet_evals,
                   image_format=fmt, deep_zoom=f"images/{r['key']}.dzi" if f"images/{r['key']}.dzi" in extra else None,
                   viewer=f"images/{r['key']}.html" if f"images/{r['key']}.html" in extra else None)
        heat = _seam_heatmap_png(res.pixels, row["seam_x"], row["seam_y"])
        if heat is not None:  # beside the image: where its tile lines are and how they look
            extra[f"images/{r['key']}.seams.png"] = writer.put_bytes(f"images/{r['key']}.seams.png", heat)
        row["peak_rss_mb"] = peak_rss_mb()  # the pack's peak, encoding and pyramid included
        if pipe.device.type != "cuda":
            row["peak_memory_mb"] = row["peak_rss_mb"]
        record = json.dumps({"row": row, "file": meta, "extra": extra}, default=str).encode()
        out.files[rel] = meta
        out.files.update(extra)
        out.files[f"images/{r['key']}.json"] = writer.put_bytes(f"images/{r['key']}.json", record)  # after the image
        out.rows.append(row)
        out.rendered += 1
        _RENDERED_IN_PROCESS[0] += 1
        fault_point(f"after-image-{_RENDERED_IN_PROCESS[0]}")  # tests: a process killed after its N-th image
        logger.info("%s %dx%d ok in %.1f s (%d UNet evals, %s, %s, %s, peak RSS %.0f MB)", r["key"], r["width"],
                    r["height"], seconds, res.unet_evals, row["device"], worker, fmt, row["peak_rss_mb"])
        del res


@task(name="render-shard")
def render_shard(job: GenerationJob, start: int, stop: int) -> ShardOutput:
    """Render the valid prompt rows [start, stop) of the job into its pending version;
    images a previous run finished are taken as they are."""
    logger = run_logger()
    store = ArtifactStore(job.store_url)
    rows = [r for r in _prompt_table(job.store_url, job.prompts).slice(start, stop - start).to_pylist()
            if r["error"] is None]
    worker = f"{socket.gethostname()}:{os.getpid()}"
    out = ShardOutput(worker=worker)
    todo = []
    for r in rows:
        r["key"] = image_key(r, image_identity(job.model, r, job.settings))
        if not _resumed(store, job.pending, r["key"], out):
            todo.append(r)
    if todo:
        loads = model_loads()
        pipe = cached_pipeline(job.store_url, job.model, job.settings.upscaler, job.settings.device,
                               job.settings.dtype)
        out.model_loads = model_loads() - loads
        writer = store.writer(job.pending)
        for pack in _packs(todo, job.settings):
            _render_pack(pipe, pack, job, writer, out, worker, logger)
    logger.info("shard rows %d-%d: %d rendered, %d already done", start, stop, out.rendered, len(rows) - len(todo))
    return out


@task(name="commit-generations")
def commit_generations(job: GenerationJob, outputs: list[ShardOutput], parents: list[str],
                       params: dict[str, Any]) -> str:
    """Adopt the shards' files, write the generations manifest (invalid prompt rows included as
    failures), commit the version once."""
    store = ArtifactStore(job.store_url)
    writer = store.writer(job.pending)
    rows = [invalid_row(r) for r in read_prompts(store, job.prompts).to_pylist() if r["error"] is not None]
    for o in outputs:
        writer.add_files(o.files)
        rows += o.rows
    keys = [r["key"] for r in rows]
    if len(keys) != len(set(keys)):
        raise RuntimeError(f"{job.pending.ref}: an image appears twice in the manifest")
    rows.sort(key=lambda r: (r["row"], r["key"]))
    if any(r.get("viewer") for r in rows):  # the viewer pages' OpenSeadragon, once per version
        for rel, path in vendor_files().items():
            writer.put_file(rel, path)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATIONS_MANIFEST), buf)
    writer.put_bytes("manifest.parquet", buf.getvalue())
    ok = sum(r["status"] == STATUS_OK for r in rows)
    rendered = sum(o.rendered for o in outputs)
    loads: dict[str, int] = {}
    for o in outputs:
        loads[o.worker] = loads.get(o.worker, 0) + o.model_loads
    ref: ArtifactRef = commit_in_run(writer, parents=parents, params=params, summary={
        "images_ok": ok, "images_failed": len(rows) - ok, "images_rendered_by_this_run": rendered,
        "images_resumed": ok - rendered, "model_loads_by_worker": loads})
    return str(ref)

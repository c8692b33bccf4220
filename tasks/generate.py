"""The generate stage, in one place: its settings (and their adapter to the pipeline's
requests and sampler), its identity, and its build: one task per shard of prompt rows fanned
out on threads or Dask, the model loaded once per worker process, every image durable in the
pending version as soon as it is rendered, then the manifest; `run_stage` commits it once.

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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.futures import as_completed
from pydantic import model_validator

from artifact_store import ArtifactStore, PendingVersion
from artifact_store.faults import fault_point
from asd_models.large_images import write_deep_zoom, write_png_stream, write_tiff
from asd_models.memory import peak_rss_mb, peak_rss_window
from asd_models.samplers import SAMPLER_NAMES
from asd_models.seams import HEATMAP_MAX_PIXELS, seam_heatmap_rgb
from dashboard.viewer import ASSETS_DIR as VIEWER_ASSETS
from dashboard.viewer import vendor_files, viewer_page
from data_engine.prompts import read_prompts
from data_manifests.runtime import runtime
from data_manifests.schemas import GENERATIONS_MANIFEST, STATUS_FAILED, STATUS_OK
from data_manifests.settings import StageSettings, execution, output
from tasks.executors import gpu_annotation, task_runner_for
from tasks.job_plan import RATE_METRIC, plan_job
from tasks.model_cache import cached_pipeline, model_loads
from tasks.progress import Progress, publish_table
from tasks.runtime import run_logger
from tasks.stage import Built, Inputs, Stage, StageRun

if TYPE_CHECKING:
    from asd_models.pipeline import RenderRequest

MAX_PACK_PIXELS = 1 << 30  # a pack's latents, conditioning and decode stay far inside one GPU's memory
MAX_JOB_PIXELS = 64 << 30  # 64 gigapixels: ~64k images of 1024^2 (--max-job-pixels raises it)
_RENDERED_IN_PROCESS = [0]  # images this process rendered (the fault point counts them)


class GenerateSettings(StageSettings):
    """FSTD generation: how every prompt of a job is rendered."""

    steps: int = output(20, ge=1, le=1000, description="denoising steps (stage 1 and stage 2)")
    guidance_scale: float = output(5.0, ge=0, le=100, description="classifier-free guidance scale")
    strength: float = output(0.6, gt=0, le=1, description="how much stage 2 re-noises the enlarged image")
    sampler: Literal[SAMPLER_NAMES] = output(  # type: ignore[valid-type]
        "fstd", description="stage 2's tiled sampler (asd_models.samplers): fstd (ours), official (the ASD code's "
        "scheme), naive tiles, multidiffusion / mixture (50%-overlap windows), full (no tiles)")
    tile: int | None = output(None, ge=1, description="stage 2's tile in latent pixels (default: the UNet's "
                              "sample size; an upscaler uses its own)")
    offset_salt: int = output(0, ge=0, le=2**62, description="salt of FSTD's per-step grid offsets, shared by every "
                              "image of the job (so a pack shares its UNet input shapes)")
    tile_batch_size: int | None = execution(None, ge=1, description="tiles per UNet call (default: the sampler's own)")
    upscaler: str | None = output(
        None, description="stage 2 with an SD-x4-upscaler-style model (local folder, cached hub id or "
        "models/NAME@VERSION) instead of img2img with the same model",
    )
    noise_level: int = output(20, ge=0, le=1000, description="noise on the low-res image (upscaler stage 2)")
    device: str = execution("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                            description="auto (a GPU when there is one), cpu, cuda or cuda:N")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = output("auto", description="auto: fp16 on a GPU, fp32 on the CPU")
    shard_size: int | None = execution(None, ge=1, description="prompts per generation task (default: about 4 "
                                       "tasks per worker, equal in pixels x steps, at most 1000 rows each)")
    pack: bool = execution(True, description="images of a shard advance together, their tiles sharing UNet calls")
    pack_max_pixels: int = execution(16 << 20, ge=4096, le=MAX_PACK_PIXELS, description="output pixels rendered "
                                     "together at most (a larger image renders alone)")
    max_job_pixels: int = execution(MAX_JOB_PIXELS, ge=1, description="a job of more output pixels than this is "
                                    "refused before anything is written (raise it for a larger job)")
    executor: Literal["threads", "dask"] = execution(
        "threads", description="shard tasks in threads of this process, or on Dask worker processes (left at threads, "
        "$ASD_EXECUTOR decides)")
    workers: int = execution(1, ge=1, description="threads, or Dask worker processes of a local cluster")
    dask_address: str | None = execution(
        None, description="an existing Dask scheduler, e.g. tcp://host:8786 (unset: $ASD_DASK_ADDRESS, else a "
        "local cluster of `workers` processes)")
    retries: int = execution(2, ge=0, description="retries of a failed shard task (a lost worker, an error)")
    torch_threads: int | None = execution(None, ge=1, description="CPU threads of torch in each Dask worker "
                                          "(default: cores / workers)")
    large_image_pixels: int = output(
        64_000_000, ge=1, description="outputs above this many pixels are decoded into a memory-mapped file and "
        "written to the store as they are encoded (never held twice in memory), with a Deep Zoom pyramid")
    large_image_format: Literal["png", "tiff"] = output(
        "png", description="file of a large output: png (streamed; S3: a multipart upload) or tiff (tiled 256 px, "
        "deflate, pyramidal, BigTIFF past 3.5 GB; written to a local temporary file, then streamed up)")
    deep_zoom: bool = output(True, description="a DZI pyramid and a zoomable viewer page beside each large output")

    @model_validator(mode="after")
    def _tile_with_upscaler(self) -> GenerateSettings:
        if self.upscaler and self.tile is not None:
            raise ValueError("tile: an upscaler's stage 2 runs at that model's own sample size; leave tile unset "
                             "with upscaler")
        return self

    def render_request(self, row: dict[str, Any]) -> RenderRequest:
        """A prompt row as the pipeline's request (the row's own steps, guidance and strength win)."""
        from asd_models.pipeline import RenderRequest

        return RenderRequest(row["prompt"], row["width"], row["height"], row["seed"], row["negative_prompt"] or "",
                             row["steps"] or self.steps,
                             self.guidance_scale if row["guidance_scale"] is None else row["guidance_scale"],
                             row["strength"] or self.strength, self.noise_level)



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
    rendered_evals: int = 0  # UNet evaluations of the images rendered now, and their device seconds
    rendered_seconds: float = 0.0
    device_kind: str = ""  # cuda or cpu, where it rendered
    worker: str = ""
    model_loads: int = 0


def image_identity(model: str, row: dict[str, Any], settings: GenerateSettings) -> str:
    """Hash of what decides an image's pixels: model version, prompt row, render settings."""
    fields = {k: row[k] for k in ("prompt", "negative_prompt", "width", "height", "seed", "steps", "guidance_scale",
                                  "strength")}
    blob = json.dumps({"model": model, "row": fields, "settings": settings.identity()}, sort_keys=True,
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
    """Take an image a previous run finished into `out`, if its record (`images/<key>.json`) is
    readable, names only files of this key, and every file it names is in the store with its
    recorded sha256; anything else is "not done" (logged, rendered again): a rerun never trusts a
    truncated, edited or injected file it finds."""
    rel = f"images/{key}.json"
    if not store.exists(pending, rel):
        return False
    blob = store.read_pending(pending, rel)
    try:
        record = json.loads(blob)
        files = {record["row"]["image"]: record["file"], **(record.get("extra") or {})}
        why = _not_trusted(store, pending, key, files)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        why = f"unreadable ({type(exc).__name__}: {exc})"
    if why:
        run_logger().warning("%s of %s is not taken as done: %s; rendering it again", rel, pending.ref, why)
        return False
    out.rows.append(record["row"])
    out.files[record["row"]["image"]] = record["file"]
    out.files.update(record.get("extra") or {})
    out.files[rel] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    return True


def _not_trusted(store: ArtifactStore, pending: PendingVersion, key: str, files: dict[str, Any]) -> str | None:
    """Why a finished image's files cannot be taken as they are (None: they can)."""
    for rel, meta in files.items():
        if not rel.startswith(f"images/{key}.") and not rel.startswith(f"images/{key}_files/"):
            return f"it names {rel!r}, not a file of this image"
        try:
            data = store.read_pending(pending, rel)
        except FileNotFoundError:
            return f"{rel} is missing"
        if hashlib.sha256(data).hexdigest() != meta["sha256"] or len(data) != meta["size"]:
            return f"{rel} does not match its recorded sha256"
    return None


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
                 worker: str, logger: Any) -> Callable[[], None]:
    """Render one pack on the device; the host work that follows (PNG encode, seam heat-map,
    uploads, the per-image record) is returned as a function, for the shard to run while the
    device renders the next pack."""
    import torch

    s = job.settings
    reqs = [s.render_request(r) for r in pack]
    sampler = pipe.default_sampler(s.sampler, s.tile, s.tile_batch_size, s.offset_salt)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    window = peak_rss_window()  # correct with other threads rendering in this process; closed by `store`
    pack_peak = window.__enter__()
    t0 = time.perf_counter()
    try:  # progress is per image (a log line each) and per job (the flow's artifact): no API calls per step
        results = pipe.generate_many(reqs, sampler, memmap_pixels=s.large_image_pixels)
        error = None
    except (ValueError, RuntimeError) as exc:
        results, error = [None] * len(pack), f"{type(exc).__name__}: {exc}"
    except BaseException:
        window.__exit__(None, None, None)
        raise
    seconds = (time.perf_counter() - t0) / len(pack)
    peak = _peak_memory_mb(pipe.device)

    def store() -> None:
        try:
            for r, res in zip(pack, results, strict=True):
                _store_image(r, res, error, seconds, peak, pack_peak, pipe.device, job, writer, out, worker, logger)
        finally:
            window.__exit__(None, None, None)

    return store


def _store_image(r: dict[str, Any], res: Any, error: str | None, seconds: float, peak: float,
                 pack_peak: Callable[[], float], device: Any, job: GenerationJob, writer: Any, out: ShardOutput,
                 worker: str, logger: Any) -> None:
    """One rendered image into the pending version: its file, heat-map, then its record."""
    s = job.settings
    row = {f.name: None for f in GENERATIONS_MANIFEST}
    row.update(key=r["key"], row=r["row"], prompt=r["prompt"], width=r["width"], height=r["height"], seed=r["seed"],
               seconds=seconds, peak_memory_mb=peak, device=str(device), worker=worker)
    if res is None or res.size != (r["width"], r["height"]):
        row.update(status=STATUS_FAILED, error=error or f"pipeline returned {res.size}")
        logger.error("%s failed: %s", r["key"], row["error"])
        out.rows.append(row)
        return
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
    row["peak_rss_mb"] = pack_peak()  # the pack's peak, encoding and pyramid included
    if device.type != "cuda":
        row["peak_memory_mb"] = row["peak_rss_mb"]
    record = json.dumps({"row": row, "file": meta, "extra": extra}, default=str).encode()
    out.files[rel] = meta
    out.files.update(extra)
    out.files[f"images/{r['key']}.json"] = writer.put_bytes(f"images/{r['key']}.json", record)  # after the image
    out.rows.append(row)
    out.rendered += 1
    out.rendered_evals += res.unet_evals
    out.rendered_seconds += seconds
    _RENDERED_IN_PROCESS[0] += 1
    fault_point(f"after-image-{_RENDERED_IN_PROCESS[0]}")  # tests: a process killed after its N-th image
    logger.info("%s %dx%d ok in %.1f s (%d UNet evals, %s, %s, %s, peak RSS %.0f MB)", r["key"], r["width"],
                r["height"], seconds, res.unet_evals, row["device"], worker, fmt, row["peak_rss_mb"])


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
        out.device_kind = pipe.device.type
        writer = store.writer(job.pending)
        # the host work of a pack (encode, heat-map, uploads) runs while the device renders the next;
        # at most one pack waits for it, so memory holds two packs at most
        with ThreadPoolExecutor(1, thread_name_prefix="asd-store") as host:
            storing: Future | None = None
            for pack in _packs(todo, job.settings):
                store_pack = _render_pack(pipe, pack, job, writer, out, worker, logger)
                if storing is not None:
                    storing.result()
                storing = host.submit(store_pack)
            if storing is not None:
                storing.result()
    logger.info("shard rows %d-%d: %d rendered, %d already done", start, stop, out.rendered, len(rows) - len(todo))
    return out


MAX_SHARD_ROWS = 1000


def plan_shards(costs: list[int], shard_size: int | None, workers: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of the shard tasks, largest first. `shard_size` given: that many
    rows each. Else about 4 shards per worker (so a straggler or a lost worker costs little),
    at most `MAX_SHARD_ROWS` rows each, cut where the running cost (pixels x steps) crosses
    equal shares, so mixed sizes do not leave workers idle behind one heavy shard."""
    n_rows = len(costs)
    if n_rows == 0:
        return []
    if shard_size:
        ranges = [(i, min(n_rows, i + shard_size)) for i in range(0, n_rows, shard_size)]
    else:
        n = min(n_rows, max(4 * workers, -(-n_rows // MAX_SHARD_ROWS)))
        weights = costs if sum(costs) else [1] * n_rows
        ranges, start, acc, remaining = [], 0, 0, sum(weights)
        for i, c in enumerate(weights):
            left = n - len(ranges)  # shards still to make, the open one included
            if i > start and left > 1 and (acc + c / 2 > remaining / left  # this row would overfill the share
                                           or n_rows - i < left  # every shard left needs a row
                                           or i - start >= MAX_SHARD_ROWS):
                ranges.append((start, i))
                start, remaining, acc = i, remaining - acc, 0
            acc += c
        ranges.append((start, n_rows))
    return sorted(ranges, key=lambda r: -sum(costs[r[0]:r[1]]))


def adopt_shards(job: GenerationJob, writer: Any, outputs: list[ShardOutput]) -> list[dict[str, Any]]:
    """Adopt the shards' files into the version and write its manifest (invalid prompt rows
    included as failures); the manifest rows."""
    store = ArtifactStore(job.store_url)
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
    return rows


@flow(name="asd-generate-shards", log_prints=True)
def render_shards_flow(job: GenerationJob, ranges: list[tuple[int, int]], total: int) -> list[ShardOutput]:
    """The fan-out: one task per shard of prompt rows, on the task runner the job's settings
    chose (threads or Dask), retried when a task fails or its worker is lost. Progress (images
    done, tiles/s, ETA) is updated as shards finish."""
    logger = get_run_logger()
    shard_task = render_shard.with_options(retries=job.settings.retries, retry_delay_seconds=2)
    with gpu_annotation(job.settings):
        futures = [shard_task.submit(job, start, stop) for start, stop in ranges]
    position = {id(f): i for i, f in enumerate(futures)}
    outputs: dict[int, ShardOutput] = {}
    t0 = time.monotonic()
    with Progress("generate images", total=max(1, total), unit="img") as progress:
        for future in as_completed(futures):
            outputs[position[id(future)]] = out = future.result()
            done = sum(len(o.rows) for o in outputs.values())
            rendered = sum(o.rendered for o in outputs.values())
            evals = sum(r["unet_evals"] or 0 for o in outputs.values() for r in o.rows)
            elapsed = time.monotonic() - t0
            eta = elapsed / rendered * (total - done) if rendered else float("nan")
            progress.update(min(done, progress.total))
            progress.note(f"{evals / max(elapsed, 1e-9):.1f} UNet evals/s, ETA {eta:.0f} s")
            logger.info("shard done on %s: %d images (%d rendered now); %d/%d in all", out.worker, len(out.rows),
                        out.rendered, done, total)
    return [outputs[i] for i in range(len(futures))]


GENERATIONS_TABLE_ROWS = 1000  # rows of the UI table; the manifest has them all


@dataclass(frozen=True)
class Generate(Stage):
    """A stored prompt manifest rendered at its exact sizes by a model version. Resumable: a
    rerun of the same job after a kill renders only the images that are not finished."""

    flow: ClassVar[str] = "asd-generate"
    output_param: ClassVar[str] = "generations"
    prompts_param: ClassVar[str] = "prompts_ref"  # the flow parameter that takes a prompt manifest
    kind: ClassVar[str] = "generations"
    resumable: ClassVar[bool] = True
    builds_in_task: ClassVar[bool] = False  # it fans out over shard tasks of its own
    model_ref: str
    prompts_ref: str
    settings: GenerateSettings = GenerateSettings()

    def resolve(self, store: ArtifactStore) -> Inputs:
        model = str(store.resolve(self.model_ref))
        prompts = str(store.resolve(self.prompts_ref if self.prompts_ref.startswith("prompts/")
                                    else f"prompts/{self.prompts_ref}"))
        refs = {"model": model, "prompts": prompts}
        if self.settings.upscaler and self.settings.upscaler.startswith("models/"):  # a stored upscaler: a parent too
            refs["upscaler"] = str(store.resolve(self.settings.upscaler))
        settings = self.pinned(refs)
        plan = plan_job(store, model, read_prompts(store, prompts), settings)
        plan.check()  # before any version is started
        return Inputs(reads=[model, prompts], parents=list(refs.values()), refs=refs,
                      identity={**refs, "settings": settings.identity()}, extra={"plan": plan})

    def pinned(self, refs: dict[str, str]) -> GenerateSettings:
        """The settings the shard tasks get: a stored upscaler pinned to its version, and where
        the settings keep the default executor (threads) or Dask address (none), the run's
        environment's (`$ASD_EXECUTOR`, `$ASD_DASK_ADDRESS`), read here, where the run starts."""
        env = runtime()
        update = {"upscaler": refs["upscaler"]} if "upscaler" in refs else {}
        for name in ("executor", "dask_address"):
            if getattr(self.settings, name) == GenerateSettings.model_fields[name].default and getattr(env, name):
                update[name] = getattr(env, name)
        return self.settings.model_copy(update=update) if update else self.settings

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        model, prompts = inputs.refs["model"], inputs.refs["prompts"]
        s = self.pinned(inputs.refs)
        table = read_prompts(run.store, prompts)
        n_rows = table.num_rows
        plan = inputs.extra["plan"]
        publish_table("job-plan", plan.table(), f"the plan of {run.pending.ref}")
        for line in plan.lines():
            run.logger.info("plan: %s", line)
        costs = [0 if e is not None else w * h * (st or s.steps) for w, h, st, e in zip(
            *(table.column(c).to_pylist() for c in ("width", "height", "steps", "error")), strict=True)]
        ranges = plan_shards(costs, s.shard_size, s.workers)
        job = GenerationJob(run.store.url, model, prompts, run.pending, s)
        run.logger.info("rendering %d prompt rows of %s in %d shard(s) with %s (%s executor) into %s", n_rows,
                        prompts, len(ranges), model, s.executor, run.pending.ref)
        outputs = render_shards_flow.with_options(task_runner=task_runner_for(s))(job, ranges, n_rows)
        rows = adopt_shards(job, run.writer, outputs)
        ok = sum(r["status"] == STATUS_OK for r in rows)
        rendered = sum(o.rendered for o in outputs)
        evals = sum(o.rendered_evals for o in outputs)
        seconds = sum(o.rendered_seconds for o in outputs)
        kinds = {o.device_kind for o in outputs if o.rendered}
        rate = {RATE_METRIC.format(kinds.pop()): evals / seconds} if evals and seconds and len(kinds) == 1 else {}
        loads: dict[str, int] = {}
        for o in outputs:
            loads[o.worker] = loads.get(o.worker, 0) + o.model_loads
        return Built(params={"prompts": prompts, **s.model_dump()},
                     summary={"images_ok": ok, "images_failed": len(rows) - ok, "images_rendered_by_this_run": rendered,
                              "images_resumed": ok - rendered, "model_loads_by_worker": loads,
                              "unet_evals_planned": plan.unet_evals, "output_pixels": plan.pixels, **rate},
                     extra={"rows": rows})

    def publish(self, store: ArtifactStore, ref: str, built: Built | None) -> None:
        if built is None:
            return
        gen = store.resolve(ref)
        table = [{"key": r["key"], "prompt": r["prompt"][:80] if r["prompt"] else None,
                  "size": f"{r['width']}x{r['height']}", "status": r["status"], "seconds": round(r["seconds"] or 0, 2),
                  "unet_evals": r["unet_evals"], "uri": store.file_uri(gen, r["image"]) if r["image"] else r["error"]}
                 for r in built.extra["rows"]]
        shown = table[:GENERATIONS_TABLE_ROWS]
        more = f" (the first {len(shown)} of {len(table)} images; all: manifest.parquet)" if len(table) > len(shown) else ""
        publish_table("generations", shown, f"generations {ref}{more}")
        slowest = sorted((t for t in table if t["status"] == "ok"), key=lambda t: -t["seconds"])[:10]
        publish_table("slowest-images", slowest, f"the slowest images of {ref}")

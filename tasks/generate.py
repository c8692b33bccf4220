"""The generate stage, in one place: its settings (and their adapter to the pipeline's
requests and sampler), its identity, and its build: one task per shard of prompt rows fanned
out on threads or Dask (at most a few per worker in flight), the model loaded once per worker
process, images durable in the pending version chunk by chunk, then the manifest and file list
streamed from the chunks' fragments; `run_stage` commits it once.

Exactly once: an image's key holds a hash of the model version, its prompt row and the render
settings; a finished image is `images/<key>.png` (`.tif` for a large output asked as TIFF, with its
Deep Zoom pyramid and viewer page beside it) and its seam heat-map, listed with their sha256 in
its chunk's fragment (`tasks.fragments`), written once every image of the chunk is. A rerun of
the same job resumes the same pending version (`store.resume_or_new`, under its lease) and
renders only the images no intact fragment lists. The flow carries fragment references and
counts, never rows: its memory and Prefect's work do not grow with the number of images."""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from artifact_store import ArtifactStore
from artifact_store.faults import counted_point
from artifact_store.members import image_uri
from asd_models.memory import peak_rss_window
from data_engine.prompts import read_prompts
from data_manifests.schemas import GENERATIONS_MANIFEST, STATUS_FAILED, STATUS_OK
from tasks.executors import fan_out, task_runner_for, with_run_environment
from tasks.fragments import (
    Compacted,
    chunk_ranges,
    compact,
    finished_entries,
    list_fragments,
    write_fragment,
)
from tasks.generate_settings import (
    GenerateSettings,
    GenerationJob,
    ShardResult,
    image_identity,
    image_key,
    invalid_row,
)
from tasks.image_parallel import SharedRender, render_shared
from tasks.job_plan import RATE_METRIC, plan_job
from tasks.model_cache import cached_pipeline, model_loads
from tasks.outputs import add_viewer_assets, store_rendered, tar_members, write_shard_tar
from tasks.progress import Progress, publish_table
from tasks.render import packs, peak_memory_mb, pinned_to, stored_model_refs
from tasks.runtime import run_logger
from tasks.stage import Built, Inputs, Stage, StageRun


@dataclass
class _Chunk:
    """A chunk of a shard's rows on its way to its fragment: entries so far, images still to store,
    and whether its images go into a tar (the webdataset layout)."""

    start: int
    stop: int
    entries: list[dict[str, Any]]
    left: int
    tar: bool = False


@lru_cache(maxsize=2)
def _prompt_table(store_url: str, prompts_ref: str) -> pa.Table:
    """A prompts version, read once per worker process (versions are immutable)."""
    return read_prompts(ArtifactStore(store_url), prompts_ref)


def _shared_render(job: GenerationJob, reqs: list[Any], pipe: Any) -> SharedRender:
    """A pack as `--image-parallel` ranks render it: each loads the job's model as this worker
    did, on its own device (a GPU each, or CPU threads split between them)."""
    import torch

    s = job.settings
    return SharedRender(
        load=functools.partial(
            cached_pipeline, job.store_url, job.model, s.upscaler, dtype=s.dtype, lora=tuple(s.lora)
        ),
        sampler_for=s.sampler_on,
        requests=reqs,
        memmap_pixels=s.large_image_pixels,
        device=pipe.device.type,
        threads=max(1, torch.get_num_threads() // s.image_parallel),
    )


def _render_pack(
    pipe: Any,
    pack: list[dict[str, Any]],
    job: GenerationJob,
    stored: Callable[[dict, dict], None],
    writer: Any,
    worker: str,
) -> Callable[[], None]:
    """Render one pack on the device; the host work that follows (PNG encode, seam heat-map,
    uploads) is returned as a function, for the shard to run while the device renders the next;
    `stored(row, entry)` is called as each image is written."""
    import torch

    s = job.settings
    reqs = [s.render_request(r) for r in pack]
    sampler = s.sampler_on(pipe)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    window = peak_rss_window()  # correct with other threads rendering in this process; closed by `store`
    pack_peak = window.__enter__()
    t0 = time.perf_counter()
    results: list[Any]
    try:  # progress is per shard (a log line each) and per job (the flow's artifact): no API calls per step
        if s.image_parallel > 1:
            results = render_shared(_shared_render(job, reqs, pipe), s.image_parallel)
        else:
            results = pipe.generate_many(reqs, sampler, memmap_pixels=s.large_image_pixels)
        error = None
    except (ValueError, RuntimeError) as exc:
        results, error = [None] * len(pack), f"{type(exc).__name__}: {exc}"
    except BaseException:
        window.__exit__(None, None, None)
        raise
    seconds = (time.perf_counter() - t0) / len(pack)
    peak = peak_memory_mb(pipe.device)

    def store() -> None:
        try:
            for r, res in zip(pack, results, strict=True):
                entry = _store_image(
                    r, res, error, seconds, peak, pack_peak, pipe.device, job, writer, worker
                )
                stored(r, entry)
        finally:
            window.__exit__(None, None, None)

    return store


def _store_image(
    r: dict[str, Any],
    res: Any,
    error: str | None,
    seconds: float,
    peak: float,
    pack_peak: Callable[[], float],
    device: Any,
    job: GenerationJob,
    writer: Any,
    worker: str,
) -> dict[str, Any]:
    """One rendered image into the pending version (its file and heat-map, or its members waiting
    for the chunk's tar in the webdataset layout); its fragment entry (manifest row plus the
    files it wrote)."""
    s = job.settings
    row: dict[str, Any] = {f.name: None for f in GENERATIONS_MANIFEST}
    row.update(
        key=r["key"],
        row=r["row"],
        prompt=r["prompt"],
        width=r["width"],
        height=r["height"],
        seed=r["seed"],
        seconds=seconds,
        peak_memory_mb=peak,
        device=str(device),
        worker=worker,
        files=[],
    )
    if res is None or res.size != (r["width"], r["height"]):
        row.update(status=STATUS_FAILED, error=error or f"pipeline returned {res.size}")
        run_logger().error("%s failed: %s", r["key"], row["error"])
        return row
    h, w, _ = res.pixels.shape
    if (
        s.layout == "webdataset" and w * h <= s.large_image_pixels
    ):  # into the chunk's tar, when it is complete
        row["_members"] = tar_members(row, r["key"], res)
    else:
        store_rendered(writer, row, r["key"], res, s)
    row["peak_rss_mb"] = pack_peak()  # the pack's peak, encoding and pyramid included
    if device.type != "cuda":
        row["peak_memory_mb"] = row["peak_rss_mb"]
    run_logger().debug(
        "%s %dx%d ok in %.1f s (%d UNet evals, %s, %s)",
        r["key"],
        r["width"],
        r["height"],
        seconds,
        res.unet_evals,
        row["device"],
        row["image_format"],
    )
    return row


JOB_FIELDS = ("key", "prompt", "width", "height", "seed")  # what the job decides of an image's row


@task(name="render-shard", cache_policy=NO_CACHE)
def render_shard(job: GenerationJob, start: int, stop: int) -> ShardResult:
    """Render the valid prompt rows [start, stop) of the job into its pending version, chunk by
    chunk, each chunk's fragment written once its images are; images a previous run finished
    (their fragment reads and their files check out) are taken as they are."""
    logger = run_logger()
    store = ArtifactStore(job.store_url)
    rows = [
        {**r, "index": start + i}
        for i, r in enumerate(
            _prompt_table(job.store_url, job.prompts).slice(start, stop - start).to_pylist()
        )
        if r["error"] is None
    ]
    worker = f"{socket.gethostname()}:{os.getpid()}"
    out = ShardResult(worker=worker)
    for r in rows:  # "index": position in the prompts table (chunks cut there); "row": the prompt file's row
        r["key"] = image_key(r, image_identity(job.model, r, job.settings))
    expected = {r["row"]: {k: r[k] for k in JOB_FIELDS} for r in rows}
    existing = list_fragments(store, job.pending)
    taken, read = (
        finished_entries(store, job.pending, existing, expected, start, stop) if existing else ({}, {})
    )
    chunks: dict[int, _Chunk] = {}
    todo = []
    for a, b in chunk_ranges(start, stop, job.settings.chunk_rows):
        mine = [r for r in rows if a <= r["index"] < b]
        if not mine:
            continue
        done = [taken[r["row"]] for r in mine if r["row"] in taken]
        was = read.get(existing.get((a, b), ""))
        if len(done) == len(mine) and was is not None and was.holds_exactly(done):
            out.fragments.append(was.ref(existing[(a, b)], a, b))  # the chunk's fragment, as it is
            out.ok += len(done)
            continue
        tar = job.settings.layout == "webdataset"
        if tar:  # a tar is written whole: images of another chunking's tars are rendered again
            done = [e for e in done if not e.get("shard")]
        chunks[a] = _Chunk(a, b, done, len(mine) - len(done), tar)
        kept = {e["row"] for e in done}
        todo += [r for r in mine if r["row"] not in kept]
        out.ok += len(done)
        if not chunks[a].left:  # all taken, from fragments of another chunking: one fragment for this chunk
            out.fragments.append(write_fragment(store, job.pending, a, b, done))

    def stored(r: dict[str, Any], entry: dict[str, Any]) -> None:
        chunk = chunks[next(a for a, c in chunks.items() if c.start <= r["index"] < c.stop)]
        chunk.entries.append(entry)
        chunk.left -= 1
        if entry["status"] == STATUS_OK:
            out.ok += 1
            out.rendered += 1
            out.rendered_evals += entry["unet_evals"] or 0
            out.rendered_seconds += entry["seconds"] or 0.0
        else:
            out.failed += 1
        if chunk.left == 0:  # the chunk's durability point (its tar first, in the webdataset layout)
            if chunk.tar:
                write_shard_tar(writer, chunk.entries)
            out.fragments.append(write_fragment(store, job.pending, chunk.start, chunk.stop, chunk.entries))
        counted_point("after-image")  # tests: a process killed after its N-th image

    if todo:
        loads = model_loads()
        s = job.settings
        pipe = cached_pipeline(job.store_url, job.model, s.upscaler, s.device, s.dtype, tuple(s.lora))
        out.model_loads = model_loads() - loads
        out.device_kind = pipe.device.type
        writer = store.writer(job.pending)
        # the host work of a pack (encode, heat-map, uploads) runs while the device renders the next;
        # at most one pack waits for it, so memory holds two packs at most
        with ThreadPoolExecutor(1, thread_name_prefix="asd-store") as host:
            storing: Future | None = None
            for pack in packs(todo, job.settings):
                store_pack = _render_pack(pipe, pack, job, stored, writer, worker)
                if storing is not None:
                    storing.result()
                storing = host.submit(store_pack)
            if storing is not None:
                storing.result()
    logger.info(
        "shard rows %d-%d on %s: %d rendered, %d already done, %d failed, %d fragment(s)",
        start,
        stop,
        worker,
        out.rendered,
        out.ok - out.rendered,
        out.failed,
        len(out.fragments),
    )
    return out


def adopt_shards(job: GenerationJob, writer: Any, results: list[ShardResult]) -> Compacted:
    """Stream the shards' fragments into the version's manifest and file list (invalid prompt
    rows included as failures)."""
    store = ArtifactStore(job.store_url)
    table = read_prompts(store, job.prompts)
    invalid = [invalid_row(r) for r in table.filter(pc.is_valid(table.column("error"))).to_pylist()]
    refs = [f for r in results for f in r.fragments]
    done = compact(store, job.pending, writer, refs, invalid)
    if done.has_viewer:
        add_viewer_assets(writer)
    return done


@flow(name="asd-generate-shards", log_prints=True)
def render_shards_flow(job: GenerationJob, ranges: list[tuple[int, int]]) -> list[ShardResult]:
    """The fan-out: one task per shard of prompt rows (`ranges`, from the job's plan: a few per
    worker, so the flow's parameters stay small whatever its size), at most
    `MAX_IN_FLIGHT_PER_WORKER` per live worker in flight, on the task runner the job's settings
    chose (threads or Dask), retried when a task fails or its worker is lost. Progress (images
    done, UNet evals/s, ETA) is updated as shards finish, from running totals."""
    logger = get_run_logger()
    total = sum(b - a for a, b in ranges)
    shard_task = render_shard.with_options(retries=job.settings.retries, retry_delay_seconds=2)
    results: dict[int, ShardResult] = {}
    done = rendered = evals = 0
    t0 = time.monotonic()
    submit = lambda item: shard_task.submit(job, *item[1])  # noqa: E731
    with Progress("generate images", total=max(1, total), unit="img") as progress:
        for (i, (a, b)), out in fan_out(submit, enumerate(ranges), job.settings, annotate=True):
            results[i] = out
            done += b - a
            rendered += out.rendered
            evals += out.rendered_evals
            elapsed = time.monotonic() - t0
            eta = elapsed / rendered * (total - done) if rendered else float("nan")
            progress.update(min(done, progress.total))
            progress.note(f"{evals / max(elapsed, 1e-9):.1f} UNet evals/s, ETA {eta:.0f} s")
            logger.info(
                "shard %d/%d done on %s: %d ok (%d rendered now), %d failed; %d/%d rows in all",
                len(results),
                len(ranges),
                out.worker,
                out.ok,
                out.rendered,
                out.failed,
                done,
                total,
            )
    return [results[i] for i in range(len(ranges))]


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
        prompts = str(
            store.resolve(
                self.prompts_ref if self.prompts_ref.startswith("prompts/") else f"prompts/{self.prompts_ref}"
            )
        )
        refs = {"model": model, "prompts": prompts, **stored_model_refs(store, self.settings)}
        settings = self.pinned(refs)
        plan = plan_job(store, model, read_prompts(store, prompts), settings)
        plan.check()  # before any version is started
        return Inputs(
            reads=[model, prompts],
            parents=list(refs.values()),
            refs=refs,
            identity={**refs, "settings": settings.identity()},
            extra={"plan": plan},
        )

    def pinned(self, refs: dict[str, str]) -> GenerateSettings:
        """The settings the shard tasks get: a stored upscaler and the adapters pinned to their
        versions, and where the settings keep the default executor (threads) or Dask address
        (none), the run's environment's (`$ASD_EXECUTOR`, `$ASD_DASK_ADDRESS`), read here, where
        the run starts."""
        return with_run_environment(self.settings, pinned_to(self.settings, refs))

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        model, prompts = inputs.refs["model"], inputs.refs["prompts"]
        s = self.pinned(inputs.refs)
        plan = inputs.extra["plan"]
        publish_table("job-plan", plan.table(), f"the plan of {run.pending.ref}")
        for line in plan.lines():
            run.logger.info("plan: %s", line)
        job = GenerationJob(run.store.url, model, prompts, run.pending, s)
        run.logger.info(
            "rendering %d images of %s with %s (%s executor) into %s",
            plan.images,
            prompts,
            model,
            s.executor,
            run.pending.ref,
        )
        ranges = plan.shard_ranges(s.shard_size, s.workers)
        results = render_shards_flow.with_options(task_runner=task_runner_for(s))(job, ranges)
        done = adopt_shards(job, run.writer, results)
        rendered = sum(o.rendered for o in results)
        evals = sum(o.rendered_evals for o in results)
        seconds = sum(o.rendered_seconds for o in results)
        kinds = {o.device_kind for o in results if o.rendered}
        rate = (
            {RATE_METRIC.format(kinds.pop()): evals / seconds}
            if evals and seconds and len(kinds) == 1
            else {}
        )
        loads: dict[str, int] = {}
        for o in results:
            loads[o.worker] = loads.get(o.worker, 0) + o.model_loads
        return Built(
            params={"prompts": prompts, **s.model_dump()},
            summary={
                "images_ok": done.ok,
                "images_failed": done.failed,
                "images_rendered_by_this_run": rendered,
                "images_resumed": done.ok - rendered,
                "model_loads_by_worker": loads,
                "unet_evals_planned": plan.unet_evals,
                "output_pixels": plan.pixels,
                **rate,
            },
            extra={
                "head": done.head,
                "slowest": [r for _, _, r in sorted(done.slowest, reverse=True)],
                "rows": done.ok + done.failed,
            },
        )

    def publish(self, store: ArtifactStore, ref: str, built: Built | None) -> None:
        if built is None:
            return
        gen = store.resolve(ref)

        def shown(r: dict[str, Any]) -> dict[str, Any]:
            return {
                "key": r["key"],
                "prompt": r["prompt"][:80] if r["prompt"] else None,
                "size": f"{r['width']}x{r['height']}",
                "status": r["status"],
                "seconds": round(r["seconds"] or 0, 2),
                "unet_evals": r["unet_evals"],
                "uri": image_uri(store, gen, r) if r["image"] else r["error"],
            }

        head, n = built.extra["head"], built.extra["rows"]
        more = f" (the first {len(head)} of {n} images; all: manifest.parquet)" if n > len(head) else ""
        publish_table("generations", [shown(r) for r in head], f"generations {ref}{more}")
        publish_table(
            "slowest-images", [shown(r) for r in built.extra["slowest"]], f"the slowest images of {ref}"
        )

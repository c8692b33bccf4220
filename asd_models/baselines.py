"""Baselines with the same denoiser interface as FSTD (`tiled_sample`).

- naive: the unshifted non-overlapping grid every step (seams expected);
- MultiDiffusion (Bar-Tal et al. 2023): overlapping windows, predictions averaged. With a
  deterministic scheduler step (DDIM, eta 0) the step is linear in the noise, so averaging the
  windows' noise equals averaging their x_{t-1}, as the paper does;
- Mixture of Diffusers (Jiménez 2023): overlapping windows, Gaussian-weighted noise;
- full: the whole latent as one tile (only where it fits in memory).
"""

from __future__ import annotations

from typing import Any

import torch

from asd_models.fstd import FSTDConfig, fstd_sample, tiled_sample
from asd_models.tiling import grid_boxes, overlap_boxes

METHODS = ("fstd", "naive", "multidiffusion", "mixture", "full")


def sample_with(
    method: str,
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    tile: int = 64,
    stride: int | None = None,
    tile_batch_size: int = 8,
    generator: torch.Generator | None = None,
    fstd: FSTDConfig | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Sample with one of METHODS; `stride` is the window stride of the overlap baselines
    (default tile/2, i.e. 50% overlap)."""
    _, _, H, W = latents.shape
    stride = stride or tile // 2
    if method == "fstd":
        cfg = fstd or FSTDConfig(tile=tile, tile_batch_size=tile_batch_size)
        return fstd_sample(unet, scheduler, latents, timesteps, cond, uncond, guidance_scale, cfg, generator,
                           **kwargs)[0]
    if method == "naive":
        boxes = grid_boxes(H, W, tile, 0, 0, "cropped")
        weighting = "uniform"
    elif method == "multidiffusion":
        boxes = overlap_boxes(H, W, tile, stride)
        weighting = "uniform"
    elif method == "mixture":
        boxes = overlap_boxes(H, W, tile, stride)
        weighting = "gaussian"
    elif method == "full":
        boxes = [(0, 0, H, W)]
        weighting = "uniform"
    else:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    return tiled_sample(unet, scheduler, latents, timesteps, cond, uncond, guidance_scale, lambda i: boxes,
                        tile_batch_size, weighting, generator, **kwargs)


def unet_evals_per_step(method: str, height: int, width: int, tile: int = 64, stride: int | None = None,
                        fstd: FSTDConfig | None = None) -> float:
    """UNet tile evaluations per step (without CFG); FSTD averaged over its shifted steps."""
    stride = stride or tile // 2
    if method == "fstd":
        cfg = fstd or FSTDConfig(tile=tile)
        g = torch.Generator().manual_seed(0)
        from asd_models.fstd import step_offset

        counts = [len(grid_boxes(height, width, cfg.tile, *step_offset(i, cfg, g), cfg.mode, cfg.min_piece))
                  for i in range(20)]
        return sum(counts) / len(counts)
    if method == "naive":
        return len(grid_boxes(height, width, tile, 0, 0, "cropped"))
    if method in ("multidiffusion", "mixture"):
        return len(overlap_boxes(height, width, tile, stride))
    if method == "full":
        return 1
    raise ValueError(f"unknown method {method!r}")

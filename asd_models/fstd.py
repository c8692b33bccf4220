"""FSTD: Fast Seamless Tiled Diffusion (implicit overlap).

Per denoising step the latent is cut into a non-overlapping grid of tiles (the cost of naive
tiling), but the grid shifts by a random offset between steps, so a tile border never stays
in one place long enough to leave a seam. Predicted noise of the tiles is fused with
Gaussian weights and a single global scheduler step is taken, so any diffusers scheduler
works unchanged. Memory follows the tile, not the latent.

All state (step counter, offsets, RNG) lives in the call: the same seed gives the same image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from asd_models.tiling import gaussian_weights, grid_boxes

ProgressFn = Callable[[int, int, int, int], None]  # step, total_steps, tiles_done, tiles_in_step


@dataclass(frozen=True)
class FSTDConfig:
    """tile / shift_range in latent pixels; shift_range None means half a tile."""

    tile: int = 64
    shift_range: int | None = None
    reset_every: int = 4
    tile_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise ValueError(f"FSTD tile must be >= 1 latent pixel, got {self.tile}")
        if self.shift_range is not None and not 0 <= self.shift_range <= self.tile:
            raise ValueError(f"FSTD shift_range must be in [0, tile={self.tile}], got {self.shift_range}")
        if self.reset_every < 1:
            raise ValueError(f"FSTD reset_every must be >= 1, got {self.reset_every}")
        if self.tile_batch_size < 1:
            raise ValueError(f"FSTD tile_batch_size must be >= 1, got {self.tile_batch_size}")


def step_offset(step: int, cfg: FSTDConfig, generator: torch.Generator) -> tuple[int, int]:
    """Grid shift (dy, dx) for one step: none on the first step and on every k-th step."""
    r = cfg.tile // 2 if cfg.shift_range is None else cfg.shift_range
    if step == 0 or step % cfg.reset_every == 0 or r == 0:
        return 0, 0
    dy, dx = torch.randint(0, r, (2,), generator=generator).tolist()
    return dy, dx


@torch.no_grad()
def predict_noise_tiled(
    unet: torch.nn.Module,
    latent_in: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    boxes: list[tuple[int, int, int, int]],
    tile_batch_size: int,
    on_tiles: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Noise prediction over the whole latent from tiles, fused with Gaussian weights.

    latent_in: 1 x C x H x W (already scaled for the scheduler, with any conditioning channels).
    cond / uncond: 1 x L x D text embeddings; classifier-free guidance runs in the same batch.
    """
    _, _, H, W = latent_in.shape
    out_channels = unet.config.out_channels
    fused = torch.zeros(1, out_channels, H, W, dtype=torch.float32, device=latent_in.device)
    weight_sum = torch.zeros(1, 1, H, W, dtype=torch.float32, device=latent_in.device)
    cfg = uncond is not None and guidance_scale != 1.0
    for i in range(0, len(boxes), tile_batch_size):
        batch = boxes[i : i + tile_batch_size]
        n = len(batch)
        tiles = torch.cat([latent_in[:, :, y : y + h, x : x + w] for y, x, h, w in batch])
        if cfg:
            model_in = torch.cat([tiles, tiles])
            text = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
        else:
            model_in, text = tiles, cond.expand(n, -1, -1)
        eps = unet(model_in, t, encoder_hidden_states=text).sample.float()
        if cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        h, w = batch[0][2], batch[0][3]
        wmap = gaussian_weights(h, w).to(eps.device)
        for (y, x, _, _), e in zip(batch, eps, strict=True):
            fused[:, :, y : y + h, x : x + w] += e * wmap
            weight_sum[:, :, y : y + h, x : x + w] += wmap
        if on_tiles:
            on_tiles(n)
    return fused / weight_sum


@torch.no_grad()
def fstd_sample(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    config: FSTDConfig = FSTDConfig(),
    generator: torch.Generator | None = None,
    condition: torch.Tensor | None = None,
    progress: ProgressFn | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Denoise `latents` over `timesteps` with FSTD; returns the latents and the offsets used.

    `scheduler` must already have `set_timesteps` called (timesteps may be a tail of them, for
    img2img). `condition` (1 x c x H x W) is concatenated to the latent channels for
    upscaler-style UNets. A latent no larger than the tile is sampled as one tile, which is
    plain full-latent sampling.
    """
    if latents.shape[0] != 1:
        raise ValueError(f"fstd_sample takes one latent at a time, got batch {latents.shape[0]}")
    _, _, H, W = latents.shape
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    offsets: list[tuple[int, int]] = []
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        dy, dx = step_offset(i, config, generator)
        offsets.append((dy, dx))
        boxes = grid_boxes(H, W, config.tile, dy, dx)
        latent_in = scheduler.scale_model_input(latents, t)
        if condition is not None:
            latent_in = torch.cat([latent_in, condition.to(latent_in.dtype)], dim=1)
        done = 0

        def on_tiles(n: int, _i: int = i, _nb: int = len(boxes)) -> None:
            nonlocal done
            done += n
            if progress:
                progress(_i, total, done, _nb)

        eps = predict_noise_tiled(
            unet, latent_in, t, cond, uncond, guidance_scale, boxes, config.tile_batch_size, on_tiles
        )
        latents = scheduler.step(eps.to(latents.dtype), t, latents, generator=generator).prev_sample
    return latents, offsets

"""FSTD: Fast Seamless Tiled Diffusion (implicit overlap), and the tiled sampling loop that every
sampler shares (`asd_models.samplers` names them).

Per denoising step the latent is cut into a non-overlapping grid of tiles (the cost of naive
tiling), but the grid shifts by a random offset between steps, so a tile border never stays
in one place long enough to leave a seam. Predicted noise of the tiles is fused with
Gaussian weights and a single global scheduler step is taken, so any diffusers scheduler
works unchanged. Memory follows the tile, not the latent.

All state (step counter, offsets, RNG, previous prediction) lives in the call: the same seed
gives the same image, and nothing carries over from one image to the next.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch

from asd_models.families.base import (
    Conditioning,
    Place,
    UNetCall,
    as_conditioning,
    as_denoiser,
    cat_conditioning,
)
from asd_models.image_share import ImageShare, assign, current_share
from asd_models.memory import release_free_heap
from asd_models.tiling import Box, gaussian_weights, grid_boxes, uniform_weights

ProgressFn = Callable[[int, int, int, int], None]  # step, total_steps, tiles_done, tiles_in_step
GRID_MODES = ("cropped", "edge-tile", "official")
# How cropped pieces grow (with real neighbouring latent) before the UNet runs them:
#   exact     to the UNet's size multiple only: the least area; every new shape is free on a CPU
#   bucketed  to half a tile, a tile or a tile and a quarter: at most 3 x 3 shapes a job, so CUDA
#             graphs, compiled kernels and cuDNN plans are built once (about 71% of the input is
#             useful at 1024^2, 84% at 2048^2: area a CPU pays for and a GPU's shapes save)
PIECE_SHAPES = ("exact", "bucketed")


def piece_shapes_for(device: torch.device | str) -> str:
    """The piece shapes that cost least on `device`: bucketed where a new shape costs (CUDA), exact
    elsewhere (`bench.fstd --quick`: exact pieces are what made FSTD as fast as naive tiles on a CPU)."""
    return "bucketed" if torch.device(device).type == "cuda" else "exact"


@dataclass(frozen=True)
class FSTDConfig:
    """FSTD settings, in latent pixels.

    tile: grid period. shift_range: offsets are drawn in [0, shift_range) (None: the whole
    tile for "cropped", half a tile otherwise, as the official code). reset_every: every k-th
    step uses no shift (0 = never). shift_first_step: shift step 0 too (safe when every
    position is covered: "cropped" and "edge-tile"; the official scheme never does, it has no
    previous prediction for its uncovered strip). offset_multiple: offsets are multiples of
    this (None: 2, or 1 for a UNet that takes any size). Odd offsets leave seams (1.08x the
    full-latent seam score on a 2-level UNet vs 1.01x with even ones); offsets on the UNet's own
    down-sampling lattice do too on deep UNets: a 4-level UNet (lattice 8) scored 1.04-1.20x
    with offsets in steps of 8 and 0.99-1.03x in steps of 2 (`bench.fstd_family`), since every
    grid line then falls on a boundary 4x less often. Pieces are grown with real context to the
    UNet's size multiple, so any even offset runs.
    size_multiple: the UNet's size multiple (None: read from the UNet by `for_unet`,
    which every sampler calls); a cropped tile whose side is not a multiple runs with real
    neighbouring latent as context, grown to the next multiple, and only its own area is kept.
    mode: see `grid_boxes`. min_piece: in "cropped" mode, an edge piece thinner than this joins
    its neighbour (None: a quarter tile; 0: never). Thin edge pieces were the worst lines on
    models the sampler was not tuned on.
    salt: None: each latent draws its offsets from its own generator; an int: the offsets of a
    step depend on (salt, step) alone, so every image of a job shifts alike and the pieces of
    same-size images share their shapes (and UNet calls) in a pack.
    pieces: how cropped pieces grow before the UNet runs them (`PIECE_SHAPES`); None: chosen
    from the UNet's device by `for_unet` (`piece_shapes_for`).
    """

    tile: int = 64
    shift_range: int | None = None
    reset_every: int = 0
    tile_batch_size: int = 8
    mode: str = "cropped"
    offset_multiple: int | None = None
    shift_first_step: bool = True
    size_multiple: int | None = None
    min_piece: int | None = None
    salt: int | None = None
    pieces: str | None = None

    def __post_init__(self) -> None:
        if self.min_piece is None:
            object.__setattr__(self, "min_piece", self.tile // 4)
        if self.offset_multiple is None and self.size_multiple is not None:
            object.__setattr__(self, "offset_multiple", min(2, self.size_multiple))
        if self.tile < 1:
            raise ValueError(f"FSTD tile must be >= 1 latent pixel, got {self.tile}")
        if self.shift_range is not None and not 0 <= self.shift_range <= self.tile:
            raise ValueError(f"FSTD shift_range must be in [0, tile={self.tile}], got {self.shift_range}")
        if self.reset_every < 0:
            raise ValueError(f"FSTD reset_every must be >= 0 (0 = never), got {self.reset_every}")
        if self.tile_batch_size < 1:
            raise ValueError(f"FSTD tile_batch_size must be >= 1, got {self.tile_batch_size}")
        if self.mode not in GRID_MODES:
            raise ValueError(f"FSTD mode must be one of {GRID_MODES}, got {self.mode!r}")
        if self.offset_multiple is not None and (
            self.offset_multiple < 1 or self.tile % self.offset_multiple
        ):
            raise ValueError(
                f"FSTD tile {self.tile} must be a multiple of offset_multiple {self.offset_multiple}"
            )
        if self.size_multiple is not None and (self.size_multiple < 1 or self.tile % self.size_multiple):
            raise ValueError(
                f"FSTD tile {self.tile} must be a multiple of the UNet's size multiple {self.size_multiple}"
            )
        if self.pieces is not None and self.pieces not in PIECE_SHAPES:
            raise ValueError(f"FSTD pieces must be one of {PIECE_SHAPES}, got {self.pieces!r}")
        if self.mode == "official" and self.shift_first_step:
            raise ValueError("the official scheme never shifts the first step (shift_first_step=False)")

    @classmethod
    def official(cls, tile: int = 64, tile_batch_size: int = 8) -> FSTDConfig:
        """The official ASD-upscale scheme: offsets in [0, tile/2), every 4th step unshifted,
        clamped tiles, the uncovered strip filled with the previous prediction."""
        return cls(
            tile=tile,
            shift_range=tile // 2,
            reset_every=4,
            tile_batch_size=tile_batch_size,
            mode="official",
            offset_multiple=1,
            shift_first_step=False,
        )

    def for_unet(self, unet: torch.nn.Module) -> FSTDConfig:
        """This config on `unet`: size_multiple filled in from the UNet's down-sampling levels
        when not given (offset_multiple then defaults to 2), the piece shapes from its device; a
        tile or size multiple off the UNet's lattice is refused (the UNet would fail on it or
        leave seams)."""
        m = unet_size_multiple(unet)
        size = self.size_multiple if self.size_multiple is not None else m
        offset = self.offset_multiple if self.offset_multiple is not None else min(2, size)
        pieces = self.pieces or piece_shapes_for(next(unet.parameters()).device)
        if self.tile % m or size % m:
            raise ValueError(
                f"FSTD tile {self.tile} and size_multiple {size} must be multiples of this UNet's "
                f"size multiple {m} (2 ** its {m.bit_length() - 1} down-sampling levels)"
            )
        if (size, offset, pieces) == (self.size_multiple, self.offset_multiple, self.pieces):
            return self
        return replace(self, size_multiple=size, offset_multiple=offset, pieces=pieces)


def img2img_start(steps: int, strength: float) -> int:
    """The first of `steps` timesteps an image re-noised to `strength` is denoised from (at least
    one step is always left): stage 2 runs `steps - img2img_start(steps, strength)` steps."""
    return min(int(round(steps * (1 - strength))), steps - 1)


def unet_size_multiple(unet: Any) -> int:  # a diffusers model: its `config` is not typed
    """Latent sizes a UNet takes are multiples of this: 2 ** (its down-sampling levels); a
    transformer's, its patch size."""
    patch = getattr(unet.config, "patch_size", None)
    if patch is not None:  # a transformer: one token covers a patch of latent pixels
        return int(patch)
    n = getattr(unet, "num_upsamplers", None)
    if n is None:
        n = len(unet.config.block_out_channels) - 1
    return 2 ** int(n)


def step_offset(step: int, cfg: FSTDConfig, generator: torch.Generator) -> tuple[int, int]:
    """Grid shift (dy, dx) for one step: none on every k-th step, nor on the first step unless
    `shift_first_step`. Drawn from `generator`, or from (cfg.salt, step) when the config has a
    salt (the same shift for every latent of a job)."""
    r = (
        cfg.shift_range
        if cfg.shift_range is not None
        else (cfg.tile if cfg.mode == "cropped" else cfg.tile // 2)
    )
    m = cfg.offset_multiple or 1  # None: a config not yet put on a UNet's lattice (`for_unet`)
    choices = max(1, r // m)
    if step == 0 and not cfg.shift_first_step:
        return 0, 0
    if (step and cfg.reset_every and step % cfg.reset_every == 0) or r < m:
        return 0, 0
    if cfg.salt is not None:
        generator = torch.Generator().manual_seed((cfg.salt * 1_000_003 + step) % 2**63)
    dy, dx = (torch.randint(0, choices, (2,), generator=generator) * m).tolist()
    return dy, dx


@dataclass
class TiledJob:
    """One latent being denoised with tiles: its inputs and its running state.

    `boxes_for_step(i)` gives the tiles of step i (FSTD's shifted grid, naive tiles, overlapping
    windows, or one box for the whole latent). Several jobs (several images) advance together
    in `sample_jobs`, so tiles of one shape from different images share a UNet call."""

    latents: torch.Tensor  # 1 x C x H x W
    scheduler: Any  # its own instance, `set_timesteps` already called: schedulers hold state
    timesteps: torch.Tensor
    cond: Conditioning  # the family's conditioning of the prompt (a bare tensor: SD's text states)
    uncond: Conditioning | None
    guidance_scale: float
    boxes_for_step: Callable[[int], list[Box]]
    generator: torch.Generator | None = None
    weighting: str = "gaussian"
    condition: torch.Tensor | None = None  # 1 x c x H x W concatenated to the latent channels
    unet_kwargs: dict[str, Any] | None = None  # per-image tensors (e.g. class_labels = noise level)
    size_multiple: int = 1
    progress: ProgressFn | None = None
    run_sizes: tuple[int, ...] = ()  # side lengths pieces grow to (with real context): few shapes
    partition: bool = False  # every step's boxes tile the latent exactly once: no weights, no gaps
    covers_all: bool = False  # every step's boxes cover every position (no previous prediction needed)
    step: int = 0
    previous: torch.Tensor | None = None
    unet_tiles: int = 0  # tiles run through the UNet so far (x2 with guidance)
    boxes_this_step: int = 0  # progress within the current step
    tiles_done: int = 0

    def __post_init__(self) -> None:  # a bare tensor given as either is SD's text states
        self.cond = as_conditioning(self.cond)
        self.uncond = None if self.uncond is None else as_conditioning(self.uncond)

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)

    @property
    def use_cfg(self) -> bool:
        return self.uncond is not None and self.guidance_scale != 1.0


@dataclass
class _Tile:
    job: TiledJob
    box: Box
    ry: int
    rx: int
    latent_in: torch.Tensor
    t: torch.Tensor


def run_side(length: int, limit: int, size_multiple: int, run_sizes: tuple[int, ...]) -> int:
    """The side a piece of `length` runs at: the smallest of `run_sizes` that holds it (else the
    next multiple of the UNet's size multiple), never more than the latent's side `limit`."""
    grown = next((s for s in run_sizes if s >= length), -(-length // size_multiple) * size_multiple)
    return min(limit, grown)


def _run_box(
    box: Box, H: int, W: int, size_multiple: int, run_sizes: tuple[int, ...] = ()
) -> tuple[int, int, int, int]:
    """The box grown with real neighbouring latent to its run shape, kept inside the latent:
    (ry, rx, rh, rw)."""
    y, x, h, w = box
    rh, rw = run_side(h, H, size_multiple, run_sizes), run_side(w, W, size_multiple, run_sizes)
    return max(0, min(y, H - rh)), max(0, min(x, W - rw)), rh, rw


@torch.no_grad()
def sample_jobs(model: Any, jobs: list[TiledJob], tile_batch_size: int = 8) -> list[TiledJob]:
    """Denoise every job to its last timestep. Each round, every unfinished job takes one step:
    its pieces are cut and grown to their run shapes, pieces of one run shape from all jobs go
    through the UNet in batches of `tile_batch_size` (each with its own timestep, text and
    conditioning, guidance in the same batch), each job's predictions are fused (written
    straight into place when its boxes partition the latent; else weighted, positions no box
    covered taking the job's previous prediction), and each job takes one step of its own
    scheduler. No step waits for the device: timesteps and weights live on it, and coverage is
    known from the geometry. One job gives the same result as sampling it alone. `model`: a
    family's `Denoiser` (each piece told its place in the whole latent), or a bare UNet."""
    denoiser = as_denoiser(model)
    dtype = denoiser.dtype
    device_times = {id(j): j.timesteps.to(j.latents.device) for j in jobs}  # once, not per UNet call
    while active := [j for j in jobs if not j.done]:
        tiles_by_shape: dict[tuple[int, int, int], list[_Tile]] = defaultdict(list)
        acc: dict[int, _Fusion] = {}
        for j in active:
            t = j.timesteps[j.step]
            # a flow-matching scheduler's input is the latent itself (it has no scale_model_input)
            scale = getattr(j.scheduler, "scale_model_input", None)
            latent_in = scale(j.latents, t) if scale is not None else j.latents
            if j.condition is not None:
                latent_in = torch.cat([latent_in, j.condition.to(latent_in)], dim=1)
            _, _, H, W = latent_in.shape
            boxes = j.boxes_for_step(j.step)
            t_dev = device_times[id(j)][j.step]
            for box in boxes:
                ry, rx, rh, rw = _run_box(box, H, W, j.size_multiple, j.run_sizes)
                tiles_by_shape[(latent_in.shape[1], rh, rw)].append(_Tile(j, box, ry, rx, latent_in, t_dev))
            acc[id(j)] = _Fusion(denoiser.out_channels, H, W, latent_in.device, weighted=not j.partition)
            j.boxes_this_step, j.tiles_done = len(boxes), 0
        share = current_share()
        if share is not None:  # this process runs its share of the pieces (image_share)
            tiles_by_shape = _my_share(tiles_by_shape, share)
        for (_c, rh, rw), group in tiles_by_shape.items():
            for i in range(0, len(group), tile_batch_size):
                _predict_batch(denoiser, group[i : i + tile_batch_size], rh, rw, dtype, acc)
        for j in active:
            if share is not None:  # each position was written by one rank: the sum is the whole
                acc[id(j)].all_reduce(share)
            eps = j.previous = acc[id(j)].noise(j.previous, j.partition or j.covers_all)
            t = j.timesteps[j.step]
            j.latents = j.scheduler.step(
                eps.to(j.latents.dtype), t, j.latents, generator=j.generator
            ).prev_sample
            j.step += 1
            if j.done:  # a finished job keeps only its latents (a large one is decoded next)
                j.previous = None
        del acc, tiles_by_shape, eps
        if any(
            j.latents.device.type == "cpu" for j in active
        ):  # this round's freed tensors back to the system
            release_free_heap()
    return jobs


def _my_share(
    tiles_by_shape: dict[tuple[int, int, int], list[_Tile]], share: ImageShare
) -> dict[tuple[int, int, int], list[_Tile]]:
    """The pieces this rank runs (`assign`, by run area); the others' are counted as run (a job's
    UNet evaluations are the whole image's, whichever rank made them)."""
    every = [(shape, tile) for shape, group in tiles_by_shape.items() for tile in group]
    owners = assign([rh * rw for (_c, rh, rw), _ in every], share.world)
    mine: dict[tuple[int, int, int], list[_Tile]] = defaultdict(list)
    for (shape, tile), owner in zip(every, owners, strict=True):
        if owner == share.rank:
            mine[shape].append(tile)
        else:
            tile.job.unet_tiles += 2 if tile.job.use_cfg else 1
    return mine


class _Fusion:
    """One job's noise prediction of a step, assembled from its pieces."""

    def __init__(self, channels: int, H: int, W: int, device: torch.device, weighted: bool) -> None:
        self.fused = torch.zeros(1, channels, H, W, dtype=torch.float32, device=device)
        self.weight_sum = torch.zeros(1, 1, H, W, dtype=torch.float32, device=device) if weighted else None

    def add(self, eps: torch.Tensor, box: Box, weighting: str) -> None:
        y, x, h, w = box
        if self.weight_sum is None:  # a partition: each position is written once, weights cancel
            self.fused[:, :, y : y + h, x : x + w] = eps
            return
        wmap = _weights(weighting, h, w, eps.device)
        self.fused[:, :, y : y + h, x : x + w] += eps * wmap
        self.weight_sum[:, :, y : y + h, x : x + w] += wmap

    def all_reduce(self, share: ImageShare) -> None:
        """Every rank's pieces summed: the prediction (and weights) of all of them, on every rank."""
        share.all_reduce(self.fused)
        if self.weight_sum is not None:
            share.all_reduce(self.weight_sum)

    def noise(self, previous: torch.Tensor | None, covered: bool) -> torch.Tensor:
        """The fused noise; positions no box covered take `previous` (checked on the device only
        when there is no previous prediction and the geometry does not promise coverage)."""
        if self.weight_sum is None:
            return self.fused
        eps = self.fused / self.weight_sum.clamp_min(1e-30)
        if covered:
            return eps
        if previous is None:
            if not bool((self.weight_sum > 0).all()):
                raise RuntimeError(
                    "tiles leave positions uncovered and there is no previous prediction to fill them"
                )
            return eps
        return torch.where(self.weight_sum > 0, eps, previous)


@lru_cache(maxsize=256)
def _weights(weighting: str, h: int, w: int, device: torch.device) -> torch.Tensor:
    """A tile's weight map on the device, made once per shape."""
    return (gaussian_weights if weighting == "gaussian" else uniform_weights)(h, w).to(device)


def _predict_batch(
    denoiser: UNetCall, batch: list[_Tile], rh: int, rw: int, dtype: torch.dtype, acc: dict[int, _Fusion]
) -> None:
    """One denoiser call over pieces of one run shape (from any jobs), each told its place in
    its whole latent; fuse each into its job. Guidance is combined for the whole batch in one
    operation."""
    inputs: list[torch.Tensor] = []
    conds: list[Conditioning] = []
    places: list[Place] = []
    times: list[torch.Tensor] = []
    extras: defaultdict[str, list[torch.Tensor]] = defaultdict(list)
    scales: list[float] = []
    cfg = all(tile.job.use_cfg for tile in batch)
    for tile in batch:
        j = tile.job
        crop = tile.latent_in[:, :, tile.ry : tile.ry + rh, tile.rx : tile.rx + rw]
        copies = 2 if j.use_cfg else 1
        inputs += [crop] * copies
        conds += [j.uncond, j.cond] if j.uncond is not None and j.use_cfg else [j.cond]
        H, W = tile.latent_in.shape[-2:]
        places += [(tile.ry, tile.rx, rh, rw, H, W)] * copies
        times += [tile.t.reshape(1)] * copies
        scales.append(j.guidance_scale)
        for k, v in (j.unet_kwargs or {}).items():
            extras[k] += [v.reshape(-1)[:1]] * copies
    device = batch[0].latent_in.device
    model_in = torch.cat(inputs).to(dtype)
    cond = cat_conditioning(conds, device, dtype)
    kwargs = {k: torch.cat(v).to(device) for k, v in extras.items()}
    eps = denoiser(model_in, torch.cat(times), cond, places, **kwargs).float()
    if cfg:  # pairs (uncond, cond) -> uncond + g * (cond - uncond), every tile at once
        pairs = eps.unflatten(0, (len(batch), 2))
        g = torch.tensor(scales, dtype=eps.dtype).to(device, non_blocking=True).view(-1, 1, 1, 1)
        eps = pairs[:, 0] + g * (pairs[:, 1] - pairs[:, 0])
    pos = 0
    for tile in batch:
        j = tile.job
        if cfg:
            e = eps[pos]
            pos += 1
        elif j.use_cfg:
            e = eps[pos] + j.guidance_scale * (eps[pos + 1] - eps[pos])
            pos += 2
        else:
            e = eps[pos]
            pos += 1
        j.unet_tiles += 2 if j.use_cfg else 1
        y, x, h, w = tile.box
        acc[id(j)].add(
            e[:, y - tile.ry : y - tile.ry + h, x - tile.rx : x - tile.rx + w], tile.box, j.weighting
        )
        j.tiles_done += 1
        if j.progress:
            j.progress(j.step, len(j.timesteps), j.tiles_done, j.boxes_this_step)


def fstd_boxes(
    height: int, width: int, config: FSTDConfig, generator: torch.Generator, offsets: list[tuple[int, int]]
) -> Callable[[int], list[Box]]:
    """FSTD's boxes for each step of a height x width latent; the drawn offsets go to `offsets`."""

    def boxes_for_step(i: int) -> list[Box]:
        dy, dx = step_offset(i, config, generator)
        offsets.append((dy, dx))
        return grid_boxes(height, width, config.tile, dy, dx, config.mode, config.min_piece or 0)

    return boxes_for_step

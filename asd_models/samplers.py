"""Tiled samplers as named plug-ins: one class per method, each saying only which boxes every
step denoises and how their predictions are weighted. They all run through one loop
(`asd_models.fstd.sample_jobs`), so the pipeline, the benches and `asd generate --sampler`
accept any of them, and a new method is one class here (added to `SAMPLERS`) plus its test.

    fstd            FSTD (ours): the non-overlapping grid shifted by a random offset every step
    official        FSTD as the official ASD code does it (every 4th step unshifted, clamped tiles)
    naive           the unshifted non-overlapping grid every step (seams expected)
    multidiffusion  overlapping windows, predictions averaged (Bar-Tal et al. 2023)
    mixture         overlapping windows, Gaussian-weighted (Mixture of Diffusers, Jiménez 2023)
    full            the whole latent as one box (plain sampling, where it fits in memory)

All sizes are latent pixels. With a deterministic scheduler step (DDIM, eta 0) the step is
linear in the noise, so averaging the windows' noise equals averaging their x_{t-1}, as
MultiDiffusion does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from asd_models.families.base import Conditioning, as_conditioning
from asd_models.fstd import FSTDConfig, TiledJob, fstd_boxes, sample_jobs, unet_size_multiple
from asd_models.tiling import Box, grid_boxes, overlap_boxes


class BoxPlan:
    """The boxes of every step of one latent, counting the tiles handed out (what a sampler
    ran through the UNet, without guidance's second copy)."""

    def __init__(self, boxes_for_step: Callable[[int], list[Box]]) -> None:
        self._boxes_for_step = boxes_for_step
        self.tiles = 0

    def __call__(self, step: int) -> list[Box]:
        boxes = self._boxes_for_step(step)
        self.tiles += len(boxes)
        return boxes


class TiledSampler:
    """What every sampler declares: its `name` (the CLI's choice), its `weighting` of tile
    predictions ("uniform" or "gaussian"), `tile`, `tile_batch_size` (tiles per UNet call) and
    `size_multiple` (the UNet's lattice; filled in by `on_unet`), the boxes of each step, and
    their geometry: `partition` (every step's boxes tile the latent exactly once), `covers_all`
    (no position is ever left to the previous prediction) and `run_sizes` (the side lengths
    pieces grow to with real context, so a job runs few UNet input shapes)."""

    name: ClassVar[str]
    weighting: ClassVar[str] = "uniform"
    partition: ClassVar[bool] = False
    covers_all: ClassVar[bool] = True
    options: ClassVar[dict[str, type]] = {}  # the method's own knobs (`with_options`), by name and type
    tile: int
    tile_batch_size: int
    size_multiple: int | None

    @classmethod
    def make(
        cls, tile: int, tile_batch_size: int = 8, size_multiple: int | None = None, salt: int | None = None
    ) -> TiledSampler:
        """The method with its default settings at this tile (the one constructor shape the
        pipeline and the benches use); `salt`: a job-level salt for methods that draw offsets."""
        raise NotImplementedError

    @property
    def run_sizes(self) -> tuple[int, ...]:
        return ()

    def with_options(self, **given: str | int) -> TiledSampler:
        """The same method with its own knobs set (`options`; values given as text are converted);
        a knob it does not have, or a value it refuses, is a ValueError naming both."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(f"{k} ({t.__name__})" for k, t in self.options.items()) or "none"
            raise ValueError(f"sampler {self.name} has no option {unknown[0]!r}; its options: {known}")
        values = {}
        for k, v in given.items():
            try:
                values[k] = self.options[k](v)
            except ValueError:
                raise ValueError(
                    f"sampler {self.name}: option {k} must be {self.options[k].__name__}, got {v!r}"
                ) from None
        return self._replace_options(values) if values else self

    def _replace_options(self, values: dict[str, Any]) -> TiledSampler:
        return replace(self, **values)  # type: ignore[type-var]  # replace() on a dataclass subclass typed as the base

    def with_pieces(self, pieces: str | None) -> TiledSampler:
        """The same sampler with its cropped pieces grown `pieces` (`asd_models.fstd.PIECE_SHAPES`;
        None: from the UNet's device); a method whose boxes are all full size has none to grow."""
        return self

    @property
    def piece_shapes(self) -> str:
        """How this sampler's pieces grow before the UNet runs them (`asd_models.fstd.PIECE_SHAPES`):
        recorded with every image it renders."""
        return "bucketed" if self.run_sizes else "exact"

    def job(
        self,
        latents: torch.Tensor,
        scheduler: Any,
        timesteps: torch.Tensor,
        cond: Conditioning | torch.Tensor,
        uncond: Conditioning | torch.Tensor | None,
        guidance_scale: float,
        generator: torch.Generator,
        **kwargs: Any,
    ) -> tuple[TiledJob, BoxPlan]:
        """One latent as a job of the shared loop (`sample_jobs`) with this sampler's boxes and
        geometry, and the plan that counts its tiles; `kwargs`: condition, unet_kwargs, progress."""
        _, _, height, width = latents.shape
        plan = self.boxes(height, width, generator)
        job = TiledJob(
            latents,
            scheduler,
            timesteps,
            as_conditioning(cond),
            None if uncond is None else as_conditioning(uncond),
            guidance_scale,
            plan,
            generator,
            self.weighting,
            size_multiple=self.size_multiple or 1,
            run_sizes=self.run_sizes,
            partition=self.partition,
            covers_all=self.covers_all,
            **kwargs,
        )
        return job, plan

    def on_unet(self, unet: torch.nn.Module) -> TiledSampler:
        """This sampler on `unet`'s lattice: size_multiple filled in; a tile off it refused."""
        m = unet_size_multiple(unet)
        size = self.size_multiple if self.size_multiple is not None else m
        if self.tile % m or size % m:
            raise ValueError(
                f"{self.name}: tile {self.tile} and size_multiple {size} must be multiples of this "
                f"UNet's size multiple {m}"
            )
        return self if size == self.size_multiple else replace(self, size_multiple=size)  # type: ignore[type-var]  # replace() on a dataclass subclass typed as the base

    def at_tile(self, tile: int, size_multiple: int | None) -> TiledSampler:
        """The same method at another tile (stage 2 with an upscaler runs at its UNet's size)."""
        return replace(self, tile=tile, size_multiple=size_multiple)  # type: ignore[type-var]  # replace() on a dataclass subclass typed as the base

    def boxes(self, height: int, width: int, generator: torch.Generator) -> BoxPlan:
        """The boxes of each step for a height x width latent (randomness from `generator`)."""
        raise NotImplementedError

    def evals_per_step(self, height: int, width: int, steps: int = 20) -> float:
        """UNet tile evaluations per step without guidance, averaged over `steps` steps."""
        plan = self.boxes(height, width, torch.Generator().manual_seed(0))
        return sum(len(plan(i)) for i in range(steps)) / steps


@dataclass(frozen=True)
class FSTD(TiledSampler):
    """Fast Seamless Tiled Diffusion: see `FSTDConfig` for every knob of the shifted grid."""

    name: ClassVar[str] = "fstd"
    weighting: ClassVar[str] = "gaussian"
    options: ClassVar[dict[str, type]] = {
        "mode": str,
        "shift_range": int,
        "reset_every": int,
        "min_piece": int,
        "offset_multiple": int,
    }
    config: FSTDConfig = FSTDConfig()

    def _replace_options(self, values: dict[str, Any]) -> FSTD:
        if values.get("mode") == "official":  # that grid has no previous prediction for step 0's strip
            values = {**values, "shift_first_step": False}
        return replace(self, config=replace(self.config, **values))

    @classmethod
    def make(
        cls, tile: int, tile_batch_size: int = 8, size_multiple: int | None = None, salt: int | None = None
    ) -> FSTD:
        return cls(
            FSTDConfig(tile=tile, tile_batch_size=tile_batch_size, size_multiple=size_multiple, salt=salt)
        )

    def with_pieces(self, pieces: str | None) -> FSTD:
        """The same sampler with its pieces grown `pieces` (None: from the UNet's device)."""
        return replace(self, config=replace(self.config, pieces=pieces))

    @property
    def partition(self) -> bool:  # type: ignore[override]  # a field of the base, derived here from config
        return self.config.mode == "cropped"

    @property
    def covers_all(self) -> bool:  # type: ignore[override]  # a field of the base, derived here from config
        return self.config.mode != "official"

    @property
    def run_sizes(self) -> tuple[int, ...]:
        """With bucketed pieces (`FSTDConfig.pieces`), cropped pieces (a quarter tile to a tile and a
        quarter, thin ones merged) grow to half a tile, a tile or a tile and a quarter: at most 3 x 3
        UNet input shapes a job. Exact pieces grow to the UNet's size multiple only."""
        if self.config.mode != "cropped" or self.config.pieces != "bucketed":
            return ()
        m, t = self.config.size_multiple or 1, self.config.tile
        return tuple(sorted({-(-s // m) * m for s in (t // 2, t, t + t // 4)}))

    @property
    def tile(self) -> int:  # type: ignore[override]  # a field of the base, derived here from config
        return self.config.tile

    @property
    def tile_batch_size(self) -> int:  # type: ignore[override]  # a field of the base, derived here from config
        return self.config.tile_batch_size

    @property
    def size_multiple(self) -> int | None:  # type: ignore[override]  # a field of the base, derived here from config
        return self.config.size_multiple

    def on_unet(self, unet: torch.nn.Module) -> FSTD:
        cfg = self.config.for_unet(unet)
        return self if cfg is self.config else replace(self, config=cfg)

    def at_tile(self, tile: int, size_multiple: int | None) -> FSTD:
        c = self.config  # the shift range and the thin-piece limit scale with the tile
        shift = None if c.shift_range is None else c.shift_range * tile // c.tile
        return replace(
            self, config=replace(c, tile=tile, size_multiple=size_multiple, shift_range=shift, min_piece=None)
        )

    def boxes(self, height: int, width: int, generator: torch.Generator) -> BoxPlan:
        return BoxPlan(fstd_boxes(height, width, self.config, generator, []))


@dataclass(frozen=True)
class Official(FSTD):
    """FSTD as the official ASD-upscale code: offsets in [0, tile/2), every 4th step and the
    first unshifted, full-size clamped tiles, the uncovered strip from the previous prediction."""

    name: ClassVar[str] = "official"
    options: ClassVar[dict[str, type]] = {}  # the published scheme as it is
    config: FSTDConfig = FSTDConfig.official()

    @classmethod
    def make(
        cls, tile: int, tile_batch_size: int = 8, size_multiple: int | None = None, salt: int | None = None
    ) -> Official:
        return cls(
            replace(FSTDConfig.official(tile, tile_batch_size), size_multiple=size_multiple, salt=salt)
        )


@dataclass(frozen=True)
class Naive(TiledSampler):
    """The unshifted grid, edge tiles cropped, every step: the cost of FSTD, seams at the lines."""

    name: ClassVar[str] = "naive"
    partition: ClassVar[bool] = True
    tile: int = 64
    tile_batch_size: int = 8
    size_multiple: int | None = None

    @classmethod
    def make(
        cls, tile: int, tile_batch_size: int = 8, size_multiple: int | None = None, salt: int | None = None
    ) -> Naive:
        return cls(tile, tile_batch_size, size_multiple)

    def boxes(self, height: int, width: int, generator: torch.Generator) -> BoxPlan:
        boxes = grid_boxes(height, width, self.tile, 0, 0, "cropped")
        return BoxPlan(lambda step: boxes)


@dataclass(frozen=True)
class MultiDiffusion(TiledSampler):
    """Windows of `tile` every `stride` (default: tile/2, 50% overlap), the last clamped to the
    edge, predictions averaged."""

    name: ClassVar[str] = "multidiffusion"
    options: ClassVar[dict[str, type]] = {"stride": int}
    tile: int = 64
    tile_batch_size: int = 8
    size_multiple: int | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.stride is not None and not 1 <= self.stride <= self.tile:
            raise ValueError(f"{self.name}: stride must be in [1, tile={self.tile}], got {self.stride}")

    @classmethod
    def make(
        cls, tile: int, tile_batch_size: int = 8, size_multiple: int | None = None, salt: int | None = None
    ) -> MultiDiffusion:
        return cls(tile, tile_batch_size, size_multiple)

    def boxes(self, height: int, width: int, generator: torch.Generator) -> BoxPlan:
        boxes = overlap_boxes(height, width, self.tile, self.stride or max(1, self.tile // 2))
        return BoxPlan(lambda step: boxes)


@dataclass(frozen=True)
class Mixture(MultiDiffusion):
    """MultiDiffusion's windows with Gaussian weights peaking at each window's centre."""

    name: ClassVar[str] = "mixture"
    weighting: ClassVar[str] = "gaussian"


@dataclass(frozen=True)
class Full(TiledSampler):
    """The whole latent as one box each step (the reference: no tiles, no seams)."""

    name: ClassVar[str] = "full"
    partition: ClassVar[bool] = True
    tile: int = 64
    tile_batch_size: int = 1
    size_multiple: int | None = None

    @classmethod
    def make(
        cls, tile: int, tile_batch_size: int = 8, size_multiple: int | None = None, salt: int | None = None
    ) -> Full:
        return cls(tile, tile_batch_size, size_multiple)

    def boxes(self, height: int, width: int, generator: torch.Generator) -> BoxPlan:
        return BoxPlan(lambda step: [(0, 0, height, width)])


SAMPLERS: dict[str, type[TiledSampler]] = {
    cls.name: cls for cls in (FSTD, Official, Naive, MultiDiffusion, Mixture, Full)
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)


def parse_sampler_options(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (what `--sampler-options` takes) as a dict; a malformed item is a ValueError."""
    out: dict[str, str] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"sampler options are k=v pairs separated by commas, got {item!r}")
        if key.strip() in out:
            raise ValueError(f"sampler option {key.strip()!r} is given twice")
        out[key.strip()] = value.strip()
    return out


def sampler_named(
    name: str, tile: int, tile_batch_size: int = 8, size_multiple: int | None = None, salt: int | None = None
) -> TiledSampler:
    """The sampler called `name` with its defaults at this tile; an unknown name says the known ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLER_NAMES)}")
    return SAMPLERS[name].make(tile, tile_batch_size, size_multiple, salt)


@torch.no_grad()
def sample_with(
    sampler: TiledSampler,
    unet: torch.nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning | torch.Tensor,
    uncond: Conditioning | torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Denoise one latent (1 x C x H x W) with `sampler` (put on the UNet's lattice) through the
    shared loop; `kwargs`: condition, unet_kwargs, progress (see `TiledJob`)."""
    if latents.shape[0] != 1:
        raise ValueError(f"tiled sampling takes one latent per job, got batch {latents.shape[0]}")
    sampler = sampler.on_unet(unet)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    job, _ = sampler.job(latents, scheduler, timesteps, cond, uncond, guidance_scale, generator, **kwargs)
    return sample_jobs(unet, [job], sampler.tile_batch_size)[0].latents

"""What the pipeline is asked (`RenderRequest`: one image) and what it gives back
(`AnySizeResult`), and the shape of its progress callbacks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from asd_models.buckets import Bucket

MIN_SIDE, MAX_SIDE = 64, 16384


# image index, stage name, step, total steps, tiles done in this step, tiles in this step
BatchProgress = Callable[[int, str, int, int, int, int], None]


# stage name, step, total steps, tiles done in this step, tiles in this step
PipelineProgress = Callable[[str, int, int, int, int], None]


@dataclass(frozen=True)
class RenderRequest:
    """One image to render."""

    prompt: str
    width: int
    height: int
    seed: int = 0
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 5.0
    strength: float = 0.6  # how far stage 2 re-noises the enlarged image (img2img path)
    noise_level: int = 20  # noise on the low-res condition (upscaler path)


@dataclass
class AnySizeResult:
    pixels: np.ndarray  # height x width x 3 uint8 (memory-mapped for outputs over the memmap threshold)
    bucket: Bucket
    canvas: tuple[int, int]  # (width, height) in pixels that stage 2 denoised
    tile_px: int
    seam_lines: dict[str, list[int]] = field(default_factory=dict)  # unshifted grid lines, final coords
    fstd_tiles: int = 0  # tiles FSTD ran through the UNet over all stage-2 steps
    unet_evals: int = 0  # UNet samples evaluated for this image, both stages (guidance counts twice)
    piece_shapes: str = (
        "exact"  # how stage 2's pieces grew before the UNet ran them (asd_models.fstd.PIECE_SHAPES)
    )

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    @property
    def image(self) -> Image.Image:
        """The pixels as a PIL image: a copy (PIL keeps RGB as 4 bytes a pixel), so not for
        outputs too large to hold twice; write those from `pixels` (`asd_models.large_images`)."""
        return Image.fromarray(np.asarray(self.pixels))

"""How an upscale keeps its input: the round-trip measure, and the fixes that enforce it.

An enlarged image keeps its input when, downscaled back to the input's size, it is the input.
`roundtrip` measures that (SSIM of the grey images, and the colour cast). The fixes are named
plug-ins (`FIDELITY`), applied to an output in place:

- `backproject` (Irani & Peleg's iterative back-projection, the classic super-resolution
  constraint): the output's own downscale is compared with the input, and the difference,
  enlarged (bicubic), is added back; repeated. Everything the input holds (structure and colour,
  up to its Nyquist frequency) comes from the input; only the detail above it, which the input
  cannot hold, comes from the model. A VAE that blurs or shifts colours, or a strength that
  lets the model wander, then changes texture, never the picture.
- `none`: the model's output as it is.

Outputs may be memory-mapped (large ones): the correction is added one channel and one band of
rows at a time, and only the downscale and one enlarged channel of float32 are ever held.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from asd_models.images import input_view

BACKPROJECT_ITERATIONS = 3
_ROWS = 1024  # rows a band of the in-place update holds


def _shrunk(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`pixels` area-averaged to `size` (w, h), as float32."""
    return np.asarray(Image.fromarray(np.asarray(pixels)).resize(size, Image.Resampling.BOX), dtype=np.float32)


def back_project(pixels: np.ndarray, original: Image.Image, iterations: int = BACKPROJECT_ITERATIONS) -> np.ndarray:
    """`pixels` (H x W x 3 uint8, an output showing `original`'s `input_view`), corrected in
    place so that its downscale to the input is the input (see the module doc)."""
    height, width, _ = pixels.shape
    view = input_view(original.convert("RGB"), width, height)
    ref = np.asarray(view, dtype=np.float32)
    for _ in range(iterations):
        residual = ref - _shrunk(pixels, view.size)
        for c in range(3):
            up = np.asarray(Image.fromarray(np.ascontiguousarray(residual[..., c])).resize(
                (width, height), Image.Resampling.BICUBIC))
            for y in range(0, height, _ROWS):
                band = pixels[y:y + _ROWS, :, c].astype(np.float32) + up[y:y + _ROWS]
                pixels[y:y + _ROWS, :, c] = np.clip(np.rint(band), 0, 255)
    return pixels


def keep_as_it_is(pixels: np.ndarray, original: Image.Image) -> np.ndarray:
    return pixels


FIDELITY: dict[str, Callable[[np.ndarray, Image.Image], np.ndarray]] = {
    "backproject": back_project,
    "none": keep_as_it_is,
}
FIDELITY_NAMES: tuple[str, ...] = tuple(FIDELITY)


def roundtrip(pixels: np.ndarray, original: Any) -> tuple[float, float]:
    """How much of the input an output keeps: the output downscaled (area) to the part of the
    input it shows (`input_view`: all of it unless the output's aspect differs), against that
    part: SSIM of the grey images, and the mean |difference| of the RGB channel means (a colour
    cast), in 0..255."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    height, width = pixels.shape[:2]
    view = input_view(original.convert("RGB"), width, height)
    back, orig = _shrunk(pixels, view.size), np.asarray(view, dtype=np.float32)
    grey = [torch.from_numpy(a @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[None, None] for a in (back, orig)]
    score = float(ssim(grey[0], grey[1], data_range=255.0))
    color = float(np.abs(back.reshape(-1, 3).mean(0) - orig.reshape(-1, 3).mean(0)).mean())
    return score, color

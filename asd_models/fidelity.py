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

Outputs may be memory-mapped (large ones): the output is read and corrected one channel and one
band of rows at a time (the downscale by an exact area average, the enlargement on the whole
image's grid, so bands join without a trace); beyond a band, only input-sized arrays are held.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from asd_models.images import input_view

if TYPE_CHECKING:
    import torch

BACKPROJECT_ITERATIONS = 3
_ROWS = 512  # output rows a band holds


def area_shrunk_channel(pixels: np.ndarray, c: int, size: tuple[int, int]) -> np.ndarray:
    """Channel `c` of `pixels` (H x W x 3, perhaps memory-mapped) area-averaged to `size`
    (w, h) <= (W, H): each small pixel the mean of the big area it covers, fractional edges
    included; read `_ROWS` rows at a time (columns by prefix sums, rows shared between the one or
    two small rows they fall in)."""
    height, width = pixels.shape[:2]
    w, h = size
    edges = np.arange(w + 1, dtype=np.float64) * width / w
    xi = np.minimum(np.floor(edges).astype(np.int64), width)
    fx = np.where(xi < width, edges - xi, 0.0)
    out = np.zeros((h, w), np.float64)
    for y0 in range(0, height, _ROWS):
        band = np.asarray(pixels[y0 : y0 + _ROWS, :, c], dtype=np.float64)
        prefix = np.zeros((band.shape[0], width + 1))
        np.cumsum(band, axis=1, out=prefix[:, 1:])
        integral = prefix[:, xi] + fx * band[:, np.minimum(xi, width - 1)]
        sums = np.diff(integral, axis=1)  # each small column's span of every row of the band
        ys = np.arange(y0, y0 + band.shape[0])
        j = ys * h // height  # the small row a big row starts in
        first = np.minimum(ys + 1, (j + 1) * height / h) - ys  # how much of the big row falls in it
        np.add.at(out, j, sums * first[:, None])
        rest = first < 1 - 1e-9  # the remainder falls in the next small row
        np.add.at(out, np.minimum(j[rest] + 1, h - 1), sums[rest] * (1 - first[rest])[:, None])
    return (out * (w * h / (width * height))).astype(np.float32)


def enlarged_rows(small: torch.Tensor, width: int, height: int, y0: int, y1: int) -> np.ndarray:
    """Rows [y0, y1) of `small` (1 x 1 x h x w float32) enlarged to width x height, bicubic, on
    the whole image's pixel grid (a band equals the same rows of the whole enlargement)."""
    import torch
    import torch.nn.functional as F

    gx = (torch.arange(width, dtype=torch.float64) + 0.5) / width * 2 - 1
    gy = (torch.arange(y0, y1, dtype=torch.float64) + 0.5) / height * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None].float()
    return F.grid_sample(small, grid, mode="bicubic", padding_mode="border", align_corners=False)[
        0, 0
    ].numpy()


def back_project(
    pixels: np.ndarray, original: Image.Image, iterations: int = BACKPROJECT_ITERATIONS
) -> np.ndarray:
    """`pixels` (H x W x 3 uint8, an output showing `original`'s `input_view`, perhaps
    memory-mapped), corrected in place so that its downscale to the input is the input (see the
    module doc). Memory: the input's size in float32 twice, and one band of rows."""
    height, width, _ = pixels.shape
    view = input_view(original.convert("RGB"), width, height)
    if view.width > width or view.height > height:
        raise ValueError(
            f"back-projection enlarges: the output {width}x{height} is smaller than its input "
            f"{view.width}x{view.height}"
        )
    ref = np.asarray(view)
    import torch

    with torch.no_grad():
        for _ in range(iterations):
            for c in range(3):
                residual = ref[..., c].astype(np.float32) - area_shrunk_channel(pixels, c, view.size)
                small = torch.from_numpy(residual)[None, None]
                for y in range(0, height, _ROWS):
                    y1 = min(height, y + _ROWS)
                    band = pixels[y:y1, :, c].astype(np.float32) + enlarged_rows(small, width, height, y, y1)
                    pixels[y:y1, :, c] = np.clip(np.rint(band), 0, 255)
    return pixels


def keep_as_it_is(pixels: np.ndarray, original: Image.Image) -> np.ndarray:
    return pixels


FIDELITY: dict[str, Callable[[np.ndarray, Image.Image], np.ndarray]] = {
    "backproject": back_project,
    "none": keep_as_it_is,
}
FIDELITY_NAMES: tuple[str, ...] = tuple(FIDELITY)


def roundtrip(pixels: np.ndarray, original: Any) -> tuple[float, float]:
    """How much of the input an output keeps: the output downscaled (an exact area average) to
    the part of the input it shows (`input_view`: all of it unless the output's aspect differs),
    against that part: SSIM of the grey images, and the mean |difference| of the RGB channel
    means (a colour cast), in 0..255."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    height, width = pixels.shape[:2]
    view = input_view(original.convert("RGB"), width, height)
    back = np.stack([area_shrunk_channel(pixels, c, view.size) for c in range(3)], axis=2)
    orig = np.asarray(view, dtype=np.float32)
    grey = [
        torch.from_numpy(a @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[None, None]
        for a in (back, orig)
    ]
    value = ssim(grey[0], grey[1], data_range=255.0)
    assert isinstance(value, torch.Tensor)  # one image pair: one value, not (map, value)
    score = float(value)
    color = float(np.abs(back.reshape(-1, 3).mean(0) - orig.reshape(-1, 3).mean(0)).mean())
    return score, color

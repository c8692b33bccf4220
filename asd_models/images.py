"""Image geometry helpers: resize to cover and crop, never stretching."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image


def cover_size(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int]:
    """Smallest size with the source aspect ratio that covers dst_w x dst_h."""
    scale = max(dst_w / src_w, dst_h / src_h)
    return max(dst_w, round(src_w * scale)), max(dst_h, round(src_h * scale))


def center_crop_box(w: int, h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int]:
    left = (w - dst_w) // 2
    top = (h - dst_h) // 2
    return left, top, left + dst_w, top + dst_h


def random_crop_box(w: int, h: int, dst_w: int, dst_h: int, rng: random.Random) -> tuple[int, int, int, int]:
    left = rng.randint(0, w - dst_w)
    top = rng.randint(0, h - dst_h)
    return left, top, left + dst_w, top + dst_h


def resize_cover_crop(
    img: Image.Image,
    dst_w: int,
    dst_h: int,
    rng: random.Random | None = None,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Resize to cover dst (keeping aspect), then crop: centred, or at a random place when
    `rng` is given. Returns the image and the crop box in resized coordinates
    (left, top, right, bottom)."""
    cw, ch = cover_size(img.width, img.height, dst_w, dst_h)
    resized = img.resize((cw, ch), resample) if (cw, ch) != img.size else img
    box = center_crop_box(cw, ch, dst_w, dst_h) if rng is None else random_crop_box(cw, ch, dst_w, dst_h, rng)
    return resized.crop(box), box


def pil_to_tensor_m11(img: Image.Image):
    """PIL RGB -> float tensor 1x3xHxW in [-1, 1]."""
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def tensor_m11_to_pil(t) -> Image.Image:
    """Float tensor 1x3xHxW (or 3xHxW) in [-1, 1] -> PIL RGB."""
    if t.ndim == 4:
        t = t[0]
    arr = ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


class CoverCanvas:
    """Stage 2's canvas of `source`: `width` x `height` pixels whose `box` (default: all of them)
    shows `source` exactly as `resize_cover_crop(source, box width, box height)` does (resized to
    cover the box, centred), and whose margin goes on with the rest of the cover and, past the
    source's edges, its mirror image: what the tiled sampler sees around the box, which is all
    that is kept. `scale` > 1 makes the canvas that many times coarser than the box's grid (the
    x4 upscaler's low-res image: the box in output pixels, the canvas in low-res ones).

    Pixels are made per region on request (bicubic from the source), so a 16384^2 canvas costs no
    more memory than one tile; `whole()` is the canvas in one tensor (the small-output path).
    Source and regions: 1 x 3 x h x w float tensors in [-1, 1]. A source much larger than the
    canvas needs (the upscaler's low-res image of a large input) is to be shrunk first,
    antialiased: `shrunk_for`."""

    def __init__(
        self,
        source,
        width: int,
        height: int,
        box: tuple[float, float, float, float] | None = None,
        scale: float = 1.0,
    ) -> None:
        self.source = source
        _, _, sh, sw = source.shape
        x0, y0, x1, y1 = box or (0.0, 0.0, width * scale, height * scale)
        self.k = max((x1 - x0) / sw, (y1 - y0) / sh)  # box pixels per source pixel
        # source coordinate (edges 0..sw) of box-grid coordinate x: (x - x0) / k + cx
        self.x0, self.y0 = x0, y0
        self.cx, self.cy = (sw - (x1 - x0) / self.k) / 2, (sh - (y1 - y0) / self.k) / 2
        self.scale = scale
        self.shape = (1, source.shape[1], height, width)

    def _sample(self, ys, xs):
        """Canvas at pixel-centre coordinates `ys` x `xs` (1-d float tensors, canvas pixels)."""
        import torch
        import torch.nn.functional as F

        _, _, sh, sw = self.source.shape
        u = (
            xs * self.scale - self.x0
        ) / self.k + self.cx  # align_corners=False: -1/+1 = the source's outer edges
        v = (ys * self.scale - self.y0) / self.k + self.cy
        grid = torch.stack(torch.meshgrid(u / sw * 2 - 1, v / sh * 2 - 1, indexing="xy"), dim=-1)[None]
        out = F.grid_sample(
            self.source.float(),
            grid.to(self.source.device, torch.float32),
            mode="bicubic",
            padding_mode="reflection",
            align_corners=False,
        )
        return out.clamp(-1, 1).to(self.source.dtype)

    def region(self, y0: int, y1: int, x0: int, x1: int):
        """Canvas pixels [y0, y1) x [x0, x1)."""
        import torch

        return self._sample(
            torch.arange(y0, y1, dtype=torch.float64) + 0.5, torch.arange(x0, x1, dtype=torch.float64) + 0.5
        )

    def whole(self):
        _, _, h, w = self.shape
        return self.region(0, h, 0, w)

    def resized(self, height: int, width: int):
        """The whole canvas at height x width (small: for statistics)."""
        import torch

        _, _, H, W = self.shape
        return self._sample(
            (torch.arange(height, dtype=torch.float64) + 0.5) * H / height,
            (torch.arange(width, dtype=torch.float64) + 0.5) * W / width,
        )


def shrunk_for(
    image: Image.Image,
    width: int,
    height: int,
    box: tuple[float, float, float, float] | None = None,
    scale: float = 1.0,
) -> Image.Image:
    """`image`, shrunk (LANCZOS, antialiased) to the resolution a `CoverCanvas` of these
    arguments samples it at, when that is smaller than the image; else the image itself
    (bicubic sampling enlarges well, but aliases when it shrinks)."""
    x0, y0, x1, y1 = box or (0.0, 0.0, width * scale, height * scale)
    k = max((x1 - x0) / image.width, (y1 - y0) / image.height) / scale  # canvas pixels per image pixel
    if k >= 1:
        return image
    return image.resize(
        (max(1, math.ceil(image.width * k)), max(1, math.ceil(image.height * k))), Image.Resampling.LANCZOS
    )


def input_view(image: Image.Image, width: int, height: int) -> Image.Image:
    """The part of `image` an output of `width` x `height` shows (`CoverCanvas`'s box: the image
    centre-cropped to the output's aspect ratio), at the image's own resolution."""
    k = max(width / image.width, height / image.height)
    w, h = min(image.width, max(1, round(width / k))), min(image.height, max(1, round(height / k)))
    return image.crop(center_crop_box(image.width, image.height, w, h)) if (w, h) != image.size else image

"""Image geometry helpers: resize to cover and crop, never stretching."""

from __future__ import annotations

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
    img: Image.Image, dst_w: int, dst_h: int, rng: random.Random | None = None,
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
    """`resize_cover_crop(source, width, height)` without ever holding the result: pixels are
    made per region on request (bicubic from the small source), so a 16384^2 canvas costs no
    more memory than one tile. Source and regions: 1 x 3 x h x w float tensors in [-1, 1]."""

    def __init__(self, source, width: int, height: int) -> None:
        self.source = source
        _, _, sh, sw = source.shape
        self.cover = cover_size(sw, sh, width, height)
        self.left, self.top, _, _ = center_crop_box(*self.cover, width, height)
        self.shape = (1, source.shape[1], height, width)

    def _sample(self, ys, xs):
        """Canvas at pixel-centre coordinates `ys` x `xs` (1-d float tensors, canvas pixels)."""
        import torch
        import torch.nn.functional as F

        gy = (ys + self.top) / self.cover[1] * 2 - 1  # grid_sample, align_corners=False: -1/+1 = outer edges
        gx = (xs + self.left) / self.cover[0] * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None].to(self.source.device)
        out = F.grid_sample(self.source.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
        return out.clamp(-1, 1).to(self.source.dtype)

    def region(self, y0: int, y1: int, x0: int, x1: int):
        """Canvas pixels [y0, y1) x [x0, x1)."""
        import torch

        return self._sample(torch.arange(y0, y1) + 0.5, torch.arange(x0, x1) + 0.5)

    def resized(self, height: int, width: int):
        """The whole canvas at height x width (small: for statistics)."""
        import torch

        _, _, H, W = self.shape
        return self._sample((torch.arange(height) + 0.5) * H / height, (torch.arange(width) + 0.5) * W / width)

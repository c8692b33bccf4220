"""What an upscale keeps of its input: stage 2's canvas shows the input exactly where the output
is cut (any aspect, any pixel multiple, the x4 upscaler's low-res grid), and back-projection makes
an output's downscale its input while keeping the detail finer than the input holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from asd_models.fidelity import FIDELITY, back_project, roundtrip
from asd_models.images import CoverCanvas, input_view, pil_to_tensor_m11, resize_cover_crop, shrunk_for
from tests.helpers import smooth_image


def _picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth waves with detail down to single pixels."""
    g = smooth_image(seed, max(w, h)).astype(np.float32)[:h, :w, 0]
    g = g + np.random.default_rng(seed).normal(0, 15, g.shape)
    return Image.fromarray(np.stack([g, 255 - g, (g * 0.5 + 60)], axis=2).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("size", "canvas", "box"),
    [
        ((90, 60), (256, 192), (28, 36, 228, 156)),  # the same aspect (2.22x), a 64-px multiple's margin
        ((90, 60), (192, 128), (16, 4, 176, 124)),  # a wider output: the image's top and bottom cut
        ((50, 80), (128, 128), (12, 0, 116, 128)),  # a taller image in a wider box
    ],
)
def test_canvas_box_shows_the_image_as_cover_crop_and_mirrors_past_its_edges(size, canvas, box):
    img = _picture(*size)
    c = CoverCanvas(pil_to_tensor_m11(img), *canvas, box=box)
    whole = c.whole()
    x0, y0, x1, y1 = box
    inside = whole[:, :, y0:y1, x0:x1]
    ref = pil_to_tensor_m11(resize_cover_crop(img, x1 - x0, y1 - y0, resample=Image.Resampling.BICUBIC)[0])
    assert (inside - ref).abs().mean() < 0.03  # bicubic either way (kernels and rounding differ slightly)
    # left of the box, where the image ends, its mirror image: pixel box-1-j is pixel box+j
    k = max((x1 - x0) / size[0], (y1 - y0) / size[1])
    if abs(size[0] * k - (x1 - x0)) < 1 and x0 >= 6:
        left = whole[:, :, y0:y1, x0 - 6 : x0].flip(-1)
        assert (left - whole[:, :, y0:y1, x0 : x0 + 6]).abs().mean() < 0.03
    assert torch.equal(c.region(10, 40, 20, 90), whole[:, :, 10:40, 20:90])


def test_upscaler_low_res_canvas_is_the_box_on_a_coarser_grid():
    """The x4 upscaler's condition: the canvas in low-res pixels whose box (in output pixels,
    at any offset) is the image: the low-res box region is the image shrunk to the box / 4."""
    img = _picture(120, 80)
    box, f = (8, 4, 248, 164), 4  # the output 240x160 in a 256x176 canvas: low-res 64x44, box 60x40 at (2, 1)
    src = shrunk_for(img, 64, 44, box, f)
    assert src.size == (60, 40)  # antialiased first: bicubic sampling would alias a 2x shrink
    low = CoverCanvas(pil_to_tensor_m11(src), 64, 44, box, scale=f).whole()
    ref = pil_to_tensor_m11(img.resize((60, 40), Image.Resampling.LANCZOS))
    assert low.shape == (1, 3, 44, 64) and (low[:, :, 1:41, 2:62] - ref).abs().mean() < 0.03


def test_input_view_is_the_part_an_output_shows():
    img = _picture(300, 200)
    assert input_view(img, 600, 400) is img
    assert input_view(img, 640, 360).size == (300, 169)  # 16:9 of a 3:2 image: its top and bottom cut
    assert input_view(img, 400, 400).size == (200, 200)


def _enlarged_with_detail(
    small: Image.Image, width: int, height: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """What a model might make of `small`: enlarged, blurred, its colours shifted, with fine
    texture added. Returns the output and the texture (finer than `small` can hold)."""
    rng = np.random.default_rng(seed)
    big = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    blurred = np.asarray(
        Image.fromarray(big.astype(np.uint8))
        .resize((width // 4, height // 4))
        .resize((width, height), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    yy, xx = np.mgrid[:height, :width]
    texture = (
        12 * np.sin(xx * 2.6 + rng.uniform(0, 6)) * np.sin(yy * 2.3)
    )  # ~0.4 cycles/px: above the input's
    out = blurred * 0.9 + np.array([20, -15, 10]) + texture[..., None]
    return np.clip(out, 0, 255).astype(np.uint8), texture


def test_back_projection_makes_the_downscale_the_input_and_keeps_finer_detail():
    small = _picture(80, 60, seed=3)
    out, texture = _enlarged_with_detail(small, 160, 120)
    before = roundtrip(out, small)
    assert before[0] < 0.9 and before[1] > 5  # blurred and shifted: a different picture
    fixed = back_project(out.copy(), small)
    ssim, color = roundtrip(fixed, small)
    assert ssim > 0.98 and color < 0.5
    high = fixed.astype(np.float32).mean(2) - np.asarray(
        Image.fromarray(fixed)
        .resize((80, 60), Image.Resampling.BOX)
        .resize((160, 120), Image.Resampling.BICUBIC),
        dtype=np.float32,
    ).mean(2)
    assert np.corrcoef(high[8:-8, 8:-8].ravel(), texture[8:-8, 8:-8].ravel())[0, 1] > 0.8  # the detail stays
    assert FIDELITY["none"](out, small) is out


def test_back_projection_of_a_memory_mapped_output_equals_the_in_memory_one(tmp_path):
    small = _picture(70, 50, seed=5)
    out, _ = _enlarged_with_detail(small, 210, 150)
    mapped = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.uint8, shape=out.shape)
    mapped[:] = out
    back_project(mapped, small)
    assert np.array_equal(np.asarray(mapped), back_project(out.copy(), small))


def test_back_projection_of_an_output_of_another_aspect_uses_the_part_it_shows():
    small = _picture(120, 80, seed=7)
    view = input_view(small, 200, 200)  # the centre 80x80
    out, _ = _enlarged_with_detail(view, 200, 200)
    fixed = back_project(out.copy(), small)
    assert roundtrip(fixed, small)[0] > 0.98
    assert roundtrip(fixed, view)[0] == pytest.approx(roundtrip(fixed, small)[0])


def _area_mean(ch: np.ndarray, w: int, h: int) -> np.ndarray:
    """The exact area average, pixel by pixel (slow; the reference)."""
    H, W = ch.shape
    out = np.zeros((h, w))
    for j in range(h):
        for i in range(w):
            y0, y1, x0, x1 = j * H / h, (j + 1) * H / h, i * W / w, (i + 1) * W / w
            acc = 0.0
            for y in range(int(y0), int(np.ceil(y1))):
                for x in range(int(x0), int(np.ceil(x1))):
                    acc += (min(y + 1, y1) - max(y, y0)) * (min(x + 1, x1) - max(x, x0)) * ch[y, x]
            out[j, i] = acc / ((y1 - y0) * (x1 - x0))
    return out


@pytest.mark.parametrize(("big", "small"), [((53, 41), (20, 17)), ((50, 40), (50, 13)), ((64, 32), (32, 16))])
def test_band_wise_area_shrink_is_the_exact_area_average(big, small, monkeypatch):
    import asd_models.fidelity as fidelity

    monkeypatch.setattr(fidelity, "_ROWS", 7)  # bands that cut the small rows anywhere
    px = np.random.default_rng(1).integers(0, 256, (big[1], big[0], 3), dtype=np.uint8)
    got = fidelity.area_shrunk_channel(px, 1, small)
    assert np.abs(got - _area_mean(px[..., 1].astype(float), *small)).max() < 1e-3


def test_enlarged_bands_join_without_a_trace():
    from asd_models.fidelity import enlarged_rows

    small = torch.rand(1, 1, 30, 40, generator=torch.Generator().manual_seed(0))
    whole = enlarged_rows(small, 400, 300, 0, 300)
    assert np.array_equal(
        whole,
        np.concatenate([enlarged_rows(small, 400, 300, 0, 113), enlarged_rows(small, 400, 300, 113, 300)]),
    )
    assert (
        np.abs(
            whole - torch.nn.functional.interpolate(small, size=(300, 400), mode="bicubic")[0, 0].numpy()
        ).max()
        < 1e-4
    )


def test_back_projection_refuses_to_shrink():
    with pytest.raises(ValueError, match="smaller than its input"):
        back_project(np.zeros((40, 40, 3), np.uint8), _picture(80, 80))

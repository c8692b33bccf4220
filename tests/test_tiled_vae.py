"""Tiled VAE: exact sizes, crop windows, memory-mapped output, GroupNorm statistics shared by
all tiles (a planted per-tile tone shift would otherwise appear)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asd_models.loading import load_components
from asd_models.seams import seam_score
from asd_models.tiled_vae import tiled_decode, tiled_encode


@pytest.fixture(scope="module")
def vae(tiny_model_dir):
    return load_components(tiny_model_dir).vae.eval()


def test_decode_shape_crop_and_memmap(vae, tmp_path):
    z = torch.randn(1, 4, 20, 30, generator=torch.Generator().manual_seed(0))
    full = tiled_decode(vae, z, tile=8)
    assert full.shape == (160, 240, 3) and full.dtype == np.uint8
    crop = (13, 7, 13 + 201, 7 + 97)
    out = np.memmap(tmp_path / "o.u8", dtype=np.uint8, mode="w+", shape=(97, 201, 3))
    tiled_decode(vae, z, tile=8, out=out, crop=crop)
    assert np.array_equal(np.asarray(out), full[7 : 7 + 97, 13 : 13 + 201])


@torch.no_grad()
def test_shared_groupnorm_statistics_match_whole_image_decode(vae):
    """With statistics from the whole latent and enough padding, tiles agree with one pass
    far better than tiles that normalise themselves (what causes tone shifts)."""
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.5
    z[:, :, :, 8:] += 1.5  # tiles with very different content statistics
    whole = ((vae.decode(z / vae.config.scaling_factor).sample[0].clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0)
    whole = whole.round().byte().numpy().astype(float)
    ours = tiled_decode(vae, z, tile=8, pad=16, estimate_size=16).astype(float)
    per_tile = np.zeros_like(whole)
    for y in (0, 8):
        for x in (0, 8):
            t = vae.decode(z[:, :, y : y + 8, x : x + 8] / vae.config.scaling_factor).sample[0]
            per_tile[y * 8 : y * 8 + 64, x * 8 : x * 8 + 64] = (
                ((t.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
            )
    err_ours = np.abs(ours - whole).mean()
    err_naive = np.abs(per_tile - whole).mean()
    assert err_ours < 0.5 * err_naive
    assert seam_score(ours, [64], [64]) < seam_score(per_tile, [64], [64])


@torch.no_grad()
def test_encode_matches_untiled_within_tolerance(vae):
    img = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = tiled_encode(vae, img, tile=32, pad=32, estimate_size=128)
    ref = vae.encode(img).latent_dist.mean * vae.config.scaling_factor
    assert z.shape == ref.shape == (1, 4, 12, 16)
    assert (z - ref).abs().mean() < 0.25 * ref.abs().mean()
    with pytest.raises(ValueError, match="multiples of 8"):
        tiled_encode(vae, img[:, :, :, : 130 - 5])


@torch.no_grad()
def test_small_latents_go_through_whole(vae):
    z = torch.randn(1, 4, 12, 20, generator=torch.Generator().manual_seed(3))
    whole = ((vae.decode(z / vae.config.scaling_factor).sample[0].clamp(-1, 1) + 1) * 127.5).round().byte()
    out = tiled_decode(vae, z, tile=8, whole_below=12 * 20, crop=(5, 3, 105, 83))
    assert np.array_equal(out, whole.permute(1, 2, 0).numpy()[3:83, 5:105])


@torch.no_grad()
def test_encode_of_a_lazy_canvas_equals_encode_of_the_same_pixels_made_whole(vae):
    """A CoverCanvas (stage 2 of very large outputs) is enlarged tile by tile as the encoder asks:
    the latents are those of the same canvas held whole, and its pixels track PIL's resize."""
    from PIL import Image

    from asd_models.images import CoverCanvas, pil_to_tensor_m11, resize_cover_crop

    src = Image.fromarray((np.random.default_rng(3).random((24, 40, 3)) * 255).astype(np.uint8))
    canvas = CoverCanvas(pil_to_tensor_m11(src), 200, 96)  # cover 200x120, centre crop 96 rows
    whole = canvas.region(0, 96, 0, 200)
    assert whole.shape == (1, 3, 96, 200) and torch.equal(
        canvas.region(10, 50, 33, 120), whole[:, :, 10:50, 33:120]
    )
    ref = pil_to_tensor_m11(resize_cover_crop(src, 200, 96, resample=Image.Resampling.BICUBIC)[0])
    assert (whole - ref).abs().mean() < 0.05  # bicubic either way (kernels differ slightly)
    lazy = tiled_encode(vae, canvas, tile=32, pad=16, estimate_size=256)  # statistics from the whole canvas
    eager = tiled_encode(vae, whole, tile=32, pad=16, estimate_size=256)
    assert lazy.shape == (1, 4, 12, 25) and torch.allclose(lazy, eager, atol=1e-5)
    lazy = tiled_encode(vae, canvas, tile=32, pad=16, estimate_size=64)  # from a resample, not an area mean
    eager = tiled_encode(vae, whole, tile=32, pad=16, estimate_size=64)
    assert (lazy - eager).abs().mean() < 0.25 * eager.abs().mean()


@torch.no_grad()
def test_release_heap_trims_after_every_tile_and_changes_no_pixel(vae, monkeypatch):
    """`release_heap` (large outputs on the CPU) trims glibc's heap after each of the 3 x 4
    tiles, and only then; the pixels are exactly those of the run without it."""
    import asd_models.tiled_vae as tiled_vae

    calls = []
    monkeypatch.setattr(tiled_vae, "release_free_heap", lambda: calls.append(1) or True)
    z = torch.randn(1, 4, 20, 30, generator=torch.Generator().manual_seed(4))
    released = tiled_decode(vae, z, tile=8, release_heap=True)
    assert len(calls) == 12
    assert np.array_equal(released, tiled_decode(vae, z, tile=8)) and len(calls) == 12


def test_concurrent_calls_on_one_vae_give_the_pixels_of_sequential_ones(vae):
    """Two threads decoding and encoding large images on one shared VAE (a cached pipeline with
    `--executor threads --workers 2`): each call's GroupNorm statistics stay its own, and the
    VAE's modules are never patched."""
    from concurrent.futures import ThreadPoolExecutor

    latents = [
        torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(s)) * (1 + 2 * s) for s in (0, 1)
    ]
    images = [
        torch.rand(1, 3, 192, 320, generator=torch.Generator().manual_seed(s)) * (2 - s) - 1 for s in (0, 1)
    ]

    def work(i: int) -> tuple[np.ndarray, torch.Tensor]:
        return tiled_decode(vae, latents[i], tile=8), tiled_encode(vae, images[i], tile=64, estimate_size=96)

    alone = [work(i) for i in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            together = list(pool.map(work, [0, 1]))
            for (a_img, a_lat), (t_img, t_lat) in zip(alone, together, strict=True):
                assert np.array_equal(a_img, t_img)
                assert torch.equal(a_lat, t_lat)
    assert not any("forward" in vars(m) for m in vae.modules())  # nothing patched onto the shared modules

"""FSTD sampler and the two-stage pipeline on the tiny model (random weights: shapes,
determinism and geometry only; quality is measured on a trained model in the flow test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from asd_models.fstd import FSTDConfig, step_offset
from asd_models.loading import ModelNotFoundError, load_components
from asd_models.pipeline import AnySizePipeline, RenderRequest
from asd_models.samplers import FSTD, sample_with


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    return load_components(tiny_model_dir)


def test_offsets_reset_on_first_and_every_kth_step():
    cfg = FSTDConfig(tile=16, reset_every=4, shift_range=8, offset_multiple=2, shift_first_step=False)
    g = torch.Generator().manual_seed(0)
    offs = [step_offset(i, cfg, g) for i in range(40)]
    assert all(offs[i] == (0, 0) for i in range(0, 40, 4))
    assert all(0 <= d < 8 and d % 2 == 0 for o in offs for d in o)
    assert len({o for o in offs}) > 5


def test_first_step_never_shifted_where_a_strip_would_be_uncovered():
    """The official scheme (and any config that asks) keeps step 0 unshifted: it has no
    previous prediction for the strip. Full-coverage grids may shift it (the default)."""
    for seed in range(5):
        for cfg in (FSTDConfig.official(tile=16), FSTDConfig(tile=16, shift_first_step=False)):
            g = torch.Generator().manual_seed(seed)
            assert step_offset(0, cfg, g) == (0, 0)
            assert any(step_offset(i, cfg, g) != (0, 0) for i in range(1, 10))
    with pytest.raises(ValueError, match="never shifts the first step"):
        FSTDConfig(tile=16, mode="official")
    g = torch.Generator().manual_seed(0)
    assert any(step_offset(0, FSTDConfig(tile=16), g) != (0, 0) for _ in range(10))


@pytest.mark.parametrize(
    "method", ["fstd", "fstd-edge", "official", "naive", "multidiffusion", "mixture", "full"]
)
def test_every_sampler_shapes_determinism_no_nan(components, method):
    from asd_models.samplers import FSTD, sample_with, sampler_named

    sampler = (
        FSTD(FSTDConfig(tile=8, mode="edge-tile", size_multiple=2, tile_batch_size=5))
        if method == "fstd-edge"
        else sampler_named(method, 8, 5)
    )

    def run():
        sched = DDIMScheduler.from_config(components.scheduler.config)
        sched.set_timesteps(4)
        x = torch.randn(1, 4, 20, 38, generator=torch.Generator().manual_seed(3))
        return sample_with(
            sampler,
            components.unet,
            sched,
            x,
            sched.timesteps,
            torch.ones(1, 77, 32),
            torch.zeros(1, 77, 32),
            2.0,
            generator=torch.Generator().manual_seed(4),
        )

    a, b = run(), run()
    assert a.shape == (1, 4, 20, 38)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_official_scheme_fills_the_uncovered_strip_with_the_previous_prediction(components):
    from types import SimpleNamespace

    from asd_models.fstd import TiledJob, sample_jobs
    from asd_models.tiling import grid_boxes

    boxes = grid_boxes(16, 24, 8, 3, 5, "official")
    covered = torch.zeros(16, 24, dtype=torch.bool)
    for y, x, h, w in boxes:
        covered[y : y + h, x : x + w] = True
    assert not covered[:3].any() and not covered[:, :5].any() and covered[3:, 5:].all()

    class EpsAsSample:  # the step returns the fused noise itself
        def scale_model_input(self, x, t):
            return x

        def step(self, eps, t, latents, generator=None):
            return SimpleNamespace(prev_sample=eps)

    def fused(previous):
        job = TiledJob(
            torch.randn(1, 4, 16, 24),
            EpsAsSample(),
            torch.tensor([500]),
            torch.zeros(1, 77, 32),
            None,
            1.0,
            lambda i: boxes,
            previous=previous,
        )
        return sample_jobs(components.unet, [job], 4)[0].latents

    previous = torch.full((1, 4, 16, 24), 7.0)
    eps = fused(previous)
    assert torch.equal(eps[:, :, :3], previous[:, :, :3]) and torch.equal(
        eps[:, :, :, :5], previous[:, :, :, :5]
    )
    assert not torch.equal(eps[:, :, 3:, 5:], previous[:, :, 3:, 5:])
    with pytest.raises(RuntimeError, match="uncovered"):
        fused(None)


def test_cropped_grid_is_a_partition_with_naive_cost():
    from asd_models.tiling import cropped_segments, grid_boxes

    for length, tile, off in [(128, 64, 0), (128, 64, 24), (135, 16, 6), (7, 16, 4)]:
        segs = cropped_segments(length, tile, off)
        assert sum(n for _, n in segs) == length and segs[0][0] == 0
        assert all(a + n == b for (a, n), (b, _) in zip(segs[:-1], segs[1:], strict=True))
    boxes = grid_boxes(128, 128, 64, 16, 40, "cropped")
    assert sum(h * w for _, _, h, w in boxes) == 128 * 128
    assert len(grid_boxes(128, 128, 64)) == 4
    # what FSTD runs: the unshifted grid's 4 tiles, or 9 cropped pieces once the grid is shifted
    assert (
        len(grid_boxes(128, 128, 64, 0, 0, "cropped", 16))
        + len(grid_boxes(128, 128, 64, 16, 40, "cropped", 16))
        == 13
    )


def test_thin_edge_pieces_join_their_neighbour_and_the_grid_stays_a_partition():
    from asd_models.tiling import cropped_segments

    assert cropped_segments(135, 64, 0, min_piece=16) == [(0, 64), (64, 71)]  # a 7-row sliver joins
    assert cropped_segments(135, 64, 60, min_piece=16) == [(0, 60), (60, 75)]
    assert cropped_segments(135, 64, 4, min_piece=16) == [(0, 68), (68, 67)]  # both ends thin
    for length in range(65, 300, 7):
        for off in range(0, 64, 6):
            segs = cropped_segments(length, 64, off, min_piece=16)
            assert sum(n for _, n in segs) == length
            assert all(a + n == b for (a, n), (b, _) in zip(segs[:-1], segs[1:], strict=True))
            assert len(segs) == 1 or min(n for _, n in segs) >= 16


def test_same_seed_same_latents_and_state_not_kept_between_calls(components):
    sched = DDIMScheduler.from_config(components.scheduler.config)
    sched.set_timesteps(5)
    cond = torch.randn(1, 77, 32)

    def run(seed: int):
        x = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(seed))
        return sample_with(
            FSTD(FSTDConfig(tile=16, tile_batch_size=3)),
            components.unet,
            sched,
            x,
            sched.timesteps,
            cond,
            cond * 0,
            3.0,
            torch.Generator().manual_seed(seed),
        )

    a, b = run(1), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(2))
    assert torch.isfinite(a).all()


def test_one_tile_equals_plain_full_latent_sampling(components):
    """With the tile as big as the latent, FSTD is exactly the ordinary sampling loop."""
    sched = DDIMScheduler.from_config(components.scheduler.config)
    sched.set_timesteps(4)
    cond, unc = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = sample_with(
        FSTD(FSTDConfig(tile=16)), components.unet, sched, x.clone(), sched.timesteps, cond, unc, 2.0
    )
    ref = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            e = components.unet(torch.cat([ref, ref]), t, encoder_hidden_states=torch.cat([unc, cond])).sample
            eu, ec = e.chunk(2)
            ref = sched.step(eu + 2.0 * (ec - eu), t, ref).prev_sample
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(1000, 300), (333, 777), (64, 64), (130, 70)])
def test_pipeline_returns_exactly_the_requested_size(tiny_model_dir, size):
    pipe = AnySizePipeline.from_pretrained(tiny_model_dir)
    res = pipe(
        "a cat", *size, num_inference_steps=3, seed=0, sampler=FSTD(FSTDConfig(tile=16, tile_batch_size=16))
    )
    assert res.image.size == size
    cw, ch = res.canvas
    assert cw >= size[0] and ch >= size[1] and cw % 16 == 0 and ch % 16 == 0
    # the stage-1 bucket is the one nearest the requested ratio
    assert abs(res.bucket.width / res.bucket.height - size[0] / size[1]) <= abs(1 - size[0] / size[1]) + 1e-9


def test_upscaler_stage_gives_exact_sizes(tiny_model_dir, tmp_path):
    from asd_models.tiny_model import build_tiny_upscaler_components, save_upscaler_components

    up = save_upscaler_components(build_tiny_upscaler_components(), tmp_path / "x4")
    pipe = AnySizePipeline.from_pretrained(tiny_model_dir, upscaler=up)
    for size in [(1000, 300), (333, 777)]:
        res = pipe(
            "a cat", *size, num_inference_steps=2, seed=0, sampler=FSTD(FSTDConfig(tile=16, size_multiple=2))
        )
        assert res.image.size == size
        assert res.canvas[0] % 8 == 0 and res.tile_px == 32 * 4
        assert np.isfinite(np.asarray(res.image, dtype=float)).all()


def test_missing_upscaler_parts_are_named(tiny_model_dir):
    from asd_models.loading import load_upscaler_components

    with pytest.raises(ModelNotFoundError, match="low_res_scheduler"):
        load_upscaler_components(tiny_model_dir)


def test_very_large_outputs_decode_into_a_file(tiny_model_dir, monkeypatch):
    pipe = AnySizePipeline.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(pipe, "memmap_pixels", 100_000)
    made = []
    import asd_models.pipeline as pipeline_module

    real = pipeline_module.output_array
    monkeypatch.setattr(
        pipeline_module, "output_array", lambda w, h, m: made.append(real(w, h, m)) or made[-1]
    )
    import asd_models.tiled_vae as tiled_vae

    trims = []  # the decode of a memory-mapped output gives its freed heap back (release_heap)
    monkeypatch.setattr(tiled_vae, "release_free_heap", lambda: trims.append(1) or True)
    stages = []
    res = pipe.generate_many(
        [RenderRequest("a cat", 600, 400, steps=1)],
        FSTD(FSTDConfig(tile=16, size_multiple=2)),
        on_stage=stages.append,
    )[0]
    assert stages == ["arad", "canvas", "fstd", "decode", "done"]
    assert res.size == (600, 400) and res.image.size == (600, 400)
    assert isinstance(made[0], np.memmap) and made[0].shape == (400, 600, 3)
    assert res.pixels is made[0]  # the result is the file's pages, not a copy
    assert not Path(made[0].filename).exists()  # no file left behind in the temp folder
    assert trims, "the large output's decode did not trim the heap"
    trims.clear()
    # the threshold can also be given per call (the generate task passes its large_image_pixels)
    small = pipe.generate_many(
        [RenderRequest("a cat", 600, 400, steps=1)],
        FSTD(FSTDConfig(tile=16, size_multiple=2)),
        memmap_pixels=10**9,
    )[0]
    assert len(made) == 2 and not isinstance(made[1], np.memmap) and not trims
    assert (
        np.abs(small.pixels.astype(int) - res.pixels.astype(int)).mean() < 12
    )  # canvas made per tile: same picture


def test_pipeline_rejects_bad_sizes_and_strength(tiny_model_dir):
    pipe = AnySizePipeline.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="width must be an integer in \\[64, 16384\\]"):
        pipe("x", 10, 100)
    with pytest.raises(ValueError, match="strength"):
        pipe("x", 128, 128, strength=0)


def test_missing_model_folder_names_what_was_expected(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match="lacks .*vae/config.json.*stable-diffusion-2-1-base"):
        load_components(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_components(tmp_path / "nope")


def test_uncached_hub_id_is_named_and_never_downloaded():
    with pytest.raises(
        ModelNotFoundError, match="'someone/not-a-cached-model' is not in the local Hugging Face cache"
    ):
        load_components("someone/not-a-cached-model")


def test_fstd_takes_its_lattice_from_the_unet_and_refuses_a_contradicting_config(components):
    """A library user sampling with FSTD(FSTDConfig()) gets the UNet's own size multiple
    (not a fixed 8) and even offsets; a tile off the UNet's lattice is refused."""
    from asd_models.fstd import unet_size_multiple

    unet = components.unet
    m = unet_size_multiple(unet)
    assert m == 2 ** (len(unet.config.block_out_channels) - 1)
    cfg = FSTDConfig(tile=16).for_unet(unet)
    assert (cfg.size_multiple, cfg.offset_multiple) == (m, 2)
    assert FSTDConfig(tile=16, size_multiple=4).for_unet(unet).size_multiple == 4  # a coarser lattice is fine
    with pytest.raises(ValueError, match="size multiple"):
        FSTDConfig(tile=15, size_multiple=1).for_unet(unet)
    assert FSTDConfig.official(tile=16).for_unet(unet).offset_multiple == 1  # the paper's scheme, on purpose

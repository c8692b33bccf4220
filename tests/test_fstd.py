"""FSTD sampler and the two-stage pipeline on the tiny model (random weights: shapes,
determinism and geometry only; quality is measured on a trained model in the flow test)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from asd_models.fstd import FSTDConfig, fstd_sample, step_offset
from asd_models.loading import ModelNotFoundError, load_components
from asd_models.pipeline import AnySizePipeline


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    return load_components(tiny_model_dir)


def test_offsets_reset_on_first_and_every_kth_step():
    cfg = FSTDConfig(tile=16, reset_every=4)
    g = torch.Generator().manual_seed(0)
    offs = [step_offset(i, cfg, g) for i in range(12)]
    assert offs[0] == offs[4] == offs[8] == (0, 0)
    assert all(0 <= d < 8 for o in offs for d in o)
    assert any(o != (0, 0) for o in offs)


def test_same_seed_same_latents_and_state_not_kept_between_calls(components):
    sched = DDIMScheduler.from_config(components.scheduler.config)
    sched.set_timesteps(5)
    cond = torch.randn(1, 77, 32)

    def run(seed: int):
        x = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(seed))
        return fstd_sample(components.unet, sched, x, sched.timesteps, cond, cond * 0, 3.0,
                           FSTDConfig(tile=16, tile_batch_size=3), torch.Generator().manual_seed(seed))

    a, offs_a = run(1)
    b, offs_b = run(1)
    assert torch.equal(a, b) and offs_a == offs_b
    assert not torch.equal(a, run(2)[0])
    assert torch.isfinite(a).all()


def test_one_tile_equals_plain_full_latent_sampling(components):
    """With the tile as big as the latent, FSTD is exactly the ordinary sampling loop."""
    sched = DDIMScheduler.from_config(components.scheduler.config)
    sched.set_timesteps(4)
    cond, unc = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ours, _ = fstd_sample(components.unet, sched, x.clone(), sched.timesteps, cond, unc, 2.0, FSTDConfig(tile=16))
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
    res = pipe("a cat", *size, num_inference_steps=3, seed=0, fstd=FSTDConfig(tile=16, tile_batch_size=16))
    assert res.image.size == size
    cw, ch = res.canvas
    assert cw >= size[0] and ch >= size[1] and cw % 16 == 0 and ch % 16 == 0
    # the stage-1 bucket is the one nearest the requested ratio
    assert abs(res.bucket.width / res.bucket.height - size[0] / size[1]) <= abs(1 - size[0] / size[1]) + 1e-9


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
    with pytest.raises(ModelNotFoundError, match="'someone/not-a-cached-model' is not in the local Hugging Face cache"):
        load_components("someone/not-a-cached-model")

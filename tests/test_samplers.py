"""The named samplers: each one's boxes per step and its weighting, checked against window sets
and fused predictions computed by hand; the table the CLI chooses from."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from asd_models.fstd import TiledJob, sample_jobs
from asd_models.samplers import (
    FSTD,
    SAMPLER_NAMES,
    Full,
    Mixture,
    MultiDiffusion,
    Naive,
    Official,
    sampler_named,
)
from asd_models.tiling import gaussian_weights


def boxes_of(sampler, h, w, steps=6, seed=0):
    plan = sampler.boxes(h, w, torch.Generator().manual_seed(seed))
    return [plan(i) for i in range(steps)], plan


def covered_once(boxes, h, w) -> bool:
    count = torch.zeros(h, w, dtype=torch.int)
    for y, x, bh, bw in boxes:
        count[y : y + bh, x : x + bw] += 1
    return bool((count == 1).all())


def test_window_sets_by_hand():
    steps, plan = boxes_of(Naive(tile=8), 20, 38)
    rows, cols = [(0, 8), (8, 8), (16, 4)], [(0, 8), (8, 8), (16, 8), (24, 8), (32, 6)]
    assert all(
        s == [(y, x, h, w) for y, h in rows for x, w in cols] for s in steps
    )  # the same grid every step
    assert plan.tiles == 6 * 15
    steps, _ = boxes_of(MultiDiffusion(tile=8), 20, 38)  # stride 4 (50%), last window clamped to the edge
    assert steps[0] == [(y, x, 8, 8) for y in (0, 4, 8, 12) for x in (0, 4, 8, 12, 16, 20, 24, 28, 30)]
    assert all(s == steps[0] for s in steps)
    assert boxes_of(MultiDiffusion(tile=8, stride=8), 16, 16)[0][0] == [
        (0, 0, 8, 8),
        (0, 8, 8, 8),
        (8, 0, 8, 8),
        (8, 8, 8, 8),
    ]
    assert boxes_of(Mixture(tile=8), 20, 38)[0] == boxes_of(MultiDiffusion(tile=8), 20, 38)[0]
    assert boxes_of(Full(), 20, 38)[0][3] == [(0, 0, 20, 38)]
    official, _ = boxes_of(Official.make(8), 20, 38)
    assert official[0] == [(y, x, 8, 8) for y in (0, 8, 12) for x in (0, 8, 16, 24, 30)]  # step 0: no shift
    assert official[4] == official[0]  # every 4th step unshifted too


def test_fstd_steps_are_shifted_partitions():
    steps, plan = boxes_of(FSTD.make(8, size_multiple=2), 20, 38, steps=12)
    assert all(covered_once(s, 20, 38) for s in steps)
    assert len({tuple(s) for s in steps}) > 3  # the grid moves between steps
    assert plan.tiles == sum(len(s) for s in steps)
    assert steps == boxes_of(FSTD.make(8, size_multiple=2), 20, 38, steps=12)[0]  # the generator decides them


def test_evals_per_step():
    assert Naive(tile=8).evals_per_step(20, 38) == 15
    assert MultiDiffusion(tile=8).evals_per_step(20, 38) == 36
    assert Full().evals_per_step(20, 38) == 1
    assert 15 <= FSTD.make(8, size_multiple=2).evals_per_step(20, 38) <= 24


class PositionUNet(torch.nn.Module):
    """A stand-in denoiser whose 'noise' is each position's column within the box it was given,
    so the fused prediction shows which windows covered a position and with what weights."""

    num_upsamplers = 0

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(out_channels=1)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, encoder_hidden_states=None, **kwargs):
        cols = torch.arange(x.shape[-1], dtype=torch.float32).expand_as(x[:, :1])
        return SimpleNamespace(sample=cols.clone())


class EpsAsSample:
    """A scheduler whose step returns the fused noise itself."""

    def scale_model_input(self, x, t):
        return x

    def step(self, eps, t, latents, generator=None):
        return SimpleNamespace(prev_sample=eps)


def fused_row(sampler, width: int) -> list[float]:
    plan = sampler.boxes(8, width, torch.Generator().manual_seed(0))
    job = TiledJob(
        torch.zeros(1, 1, 8, width),
        EpsAsSample(),
        torch.tensor([1]),
        torch.zeros(1, 1, 1),
        None,
        1.0,
        plan,
        weighting=sampler.weighting,
    )
    return sample_jobs(PositionUNet(), [job], 4)[0].latents[0, 0, 0].tolist()


def test_fused_predictions_by_hand():
    # windows at x = 0 and 4 (tile 8, stride 4): columns 4-7 average the two windows' local columns
    assert fused_row(MultiDiffusion(tile=8), 12) == [0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7]
    g = gaussian_weights(8, 8)[0].tolist()
    want = [float(x) for x in range(4)]
    want += [(g[x] * x + g[x - 4] * (x - 4)) / (g[x] + g[x - 4]) for x in range(4, 8)]
    want += [float(x - 4) for x in range(8, 12)]
    assert fused_row(Mixture(tile=8), 12) == pytest.approx(want, abs=1e-5)
    assert fused_row(Naive(tile=8), 12) == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert fused_row(Full(), 12) == list(range(12))


def test_the_table_is_what_the_cli_offers():
    from flows.cli import build_parser
    from tasks.generate import GenerateSettings

    assert set(GenerateSettings.model_fields["sampler"].annotation.__args__) == set(SAMPLER_NAMES)
    for name in SAMPLER_NAMES:
        assert sampler_named(name, 16).name == name
        args = build_parser().parse_args(
            ["generate", "--model", "m", "--prompt", "x", "--size", "64x64", "--sampler", name]
        )
        assert args.sampler == name
    with pytest.raises(ValueError, match="unknown sampler 'nope': expected one of fstd, official"):
        sampler_named("nope", 16)


def test_pipeline_renders_with_any_sampler(tiny_model_dir):
    from asd_models.pipeline import AnySizePipeline, RenderRequest

    pipe = AnySizePipeline.from_pretrained(tiny_model_dir)
    for name in ("naive", "multidiffusion"):
        res = pipe.generate_many(
            [RenderRequest("a cat", 200, 120, steps=2, strength=1.0)], pipe.default_sampler(name, tile=8)
        )[0]
        assert res.size == (200, 120)
        h, w = res.canvas[1] // 8, res.canvas[0] // 8
        assert res.fstd_tiles == 2 * len(pipe.default_sampler(name, tile=8).boxes(h, w, torch.Generator())(0))


def test_sampler_options_reach_the_boxes_and_refuse_what_a_method_lacks():
    """`--sampler-options` sets a method's own knobs (MultiDiffusion's stride, FSTD's grid mode):
    the boxes change; a knob another method has, or a bad value, is one clear error."""
    from asd_models.samplers import parse_sampler_options

    md = sampler_named("multidiffusion", 8).with_options(**parse_sampler_options("stride=8"))
    assert boxes_of(md, 16, 16)[0][0] == [(0, 0, 8, 8), (0, 8, 8, 8), (8, 0, 8, 8), (8, 8, 8, 8)]
    edge = sampler_named("fstd", 8, size_multiple=2).with_options(mode="edge-tile")
    assert all(
        b[2:] == (8, 8) for s in boxes_of(edge, 20, 38)[0] for b in s
    )  # full tiles, overlapping at the edge
    assert sampler_named("fstd", 8).with_options(mode="official").config.shift_first_step is False
    with pytest.raises(ValueError, match="has no option 'stride'"):
        sampler_named("fstd", 8).with_options(stride="4")
    with pytest.raises(ValueError, match="must be int"):
        md.with_options(stride="wide")
    with pytest.raises(ValueError, match="k=v"):
        parse_sampler_options("stride")


def test_piece_shapes_follow_the_device_unless_asked():
    """Exact pieces (the size multiple only) on a CPU UNet, bucketed run sizes when asked (CUDA's
    default); exact pieces run no more area than the latent."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D",) * 2,
        cross_attention_dim=8,
        norm_num_groups=4,
    )
    cpu = FSTD.make(16).on_unet(unet)
    assert cpu.piece_shapes == "exact" and cpu.run_sizes == ()
    bucketed = FSTD.make(16).with_pieces("bucketed").on_unet(unet)
    assert bucketed.piece_shapes == "bucketed" and bucketed.run_sizes == (8, 16, 20)
    assert Naive(tile=16).with_pieces("bucketed").piece_shapes == "exact"  # full tiles: nothing to grow

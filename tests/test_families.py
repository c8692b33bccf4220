"""Model families as plug-ins: each family's tiny model, saved by its diffusers pipeline's own
`save_pretrained` and loaded through the real `from_pretrained` path, renders odd sizes exactly,
the same alone and packed; every FSTD piece is told its global place; a folder missing a
component, naming an unknown pipeline or holding pickled weights is one clear error; ARAD
training runs on every family."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from asd_models.families import FAMILIES, TINY, family_named, save_tiny
from asd_models.families.base import Denoiser, ModelNotFoundError
from asd_models.loading import load_components
from asd_models.pipeline import AnySizePipeline, RenderRequest

FAMILY_NAMES = sorted(TINY)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: save_tiny(name, root / name) for name in FAMILY_NAMES}


def test_every_family_has_a_tiny_model():
    assert set(TINY) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_saved_family_loads_as_itself_and_renders_odd_sizes_exactly(tiny_dirs, family):
    pipe = AnySizePipeline.from_pretrained(tiny_dirs[family])
    assert pipe.c.family.name == family
    requests = [
        RenderRequest("a red cat", 150, 90, seed=1, steps=2),
        RenderRequest("a blue dog", 97, 211, seed=2, steps=3, strength=0.8),
    ]
    sampler = pipe.default_sampler(tile_batch_size=16)
    packed = pipe.generate_many(requests, sampler)
    assert [r.size for r in packed] == [(150, 90), (97, 211)]
    for req, p in zip(requests, packed, strict=True):
        alone = pipe.generate_many([req], sampler)[0]
        diff = np.abs(alone.pixels.astype(np.int16) - p.pixels.astype(np.int16))
        assert diff.mean() < 0.5 and diff.max() <= 8, (family, diff.mean(), diff.max())


class EchoTimeIds(torch.nn.Module):
    """A stand-in SDXL UNet that records the added time ids each piece is given."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(out_channels=4, sample_size=8, block_out_channels=(8, 16))
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[float, ...]] = []

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, **kwargs):
        self.seen += [tuple(r.tolist()) for r in added_cond_kwargs["time_ids"]]
        return SimpleNamespace(sample=torch.zeros_like(x))


@pytest.mark.parametrize("tile_crops", ["offset", "constant"])
def test_every_sdxl_piece_is_told_its_global_place(tiny_dirs, tile_crops):
    from dataclasses import replace

    from asd_models.fstd import FSTDConfig, TiledJob, sample_jobs
    from asd_models.samplers import FSTD

    c = load_components(tiny_dirs["sdxl"])
    c.family = replace(c.family, tile_crops=tile_crops)
    unet = EchoTimeIds()
    f = c.vae_scale_factor
    H, W = 24, 40
    sampler = FSTD(FSTDConfig(tile=8, size_multiple=2))
    plan = sampler.boxes(H, W, torch.Generator().manual_seed(0))
    boxes = plan(0)
    cond = {"text": torch.zeros(1, 77, 64), "pooled": torch.zeros(1, 32)}

    class Identity:
        def scale_model_input(self, x, t):
            return x

        def step(self, eps, t, latents, generator=None):
            return SimpleNamespace(prev_sample=latents)

    job = TiledJob(torch.zeros(1, 4, H, W), Identity(), torch.tensor([1]), cond, None, 1.0, lambda i: boxes)
    sample_jobs(Denoiser(c, unet), [job], 64)
    assert len(unet.seen) == len(boxes)
    want = set()
    for y, x, h, w in boxes:  # pieces run at their own size here (exact pieces on the CPU)
        ry, rx = y, x
        if tile_crops == "offset":
            want.add((H * f, W * f, ry * f, rx * f, h * f, w * f))
        else:
            want.add((h * f, w * f, 0, 0, h * f, w * f))
    got = set(unet.seen)
    assert got == want, got ^ want
    if tile_crops == "offset":
        assert len({(r[2], r[3]) for r in got}) == len(boxes)  # no two pieces claim one place


class EchoPositions(torch.nn.Module):
    """A stand-in SD3 transformer around the tiny model's own patch embedding with its
    projection zeroed, so what the embedding returns for a piece is the piece's positions."""

    def __init__(self, transformer):
        super().__init__()
        import copy

        self.config = SimpleNamespace(out_channels=16, sample_size=8, patch_size=2)
        self.pos_embed = copy.deepcopy(transformer.pos_embed)
        torch.nn.init.zeros_(self.pos_embed.proj.weight)
        torch.nn.init.zeros_(self.pos_embed.proj.bias)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        self.seen += list(self.pos_embed(hidden_states))
        return (torch.zeros_like(hidden_states),)


@pytest.mark.parametrize("mode", ["global", "local"])
def test_every_sd3_piece_gets_the_positions_of_its_place(tiny_dirs, mode):
    """Each FSTD piece's position embeddings are the window at its place of the embeddings SD3's
    own pipeline gives the whole latent ("global"), or a whole image's of the piece's size
    ("local", the ablation); a whole latent is the model's own, untouched."""
    from dataclasses import replace

    from asd_models.families.sd3 import place_aware
    from asd_models.fstd import FSTDConfig, TiledJob, sample_jobs
    from asd_models.samplers import FSTD

    c = load_components(tiny_dirs["sd3"])
    c.family = replace(c.family, tile_positions=mode)
    echo = EchoPositions(c.unet)
    place_aware(echo)
    H, W = 24, 40
    boxes = FSTD(FSTDConfig(tile=8, size_multiple=2)).boxes(H, W, torch.Generator().manual_seed(0))(0)
    cond = {"text": torch.zeros(1, 77 + 256, 64), "pooled": torch.zeros(1, 64)}

    class Identity:
        def step(self, eps, t, latents, generator=None):
            return SimpleNamespace(prev_sample=latents)

    job = TiledJob(
        torch.zeros(1, 16, H, W), Identity(), torch.tensor([1.0]), cond, None, 1.0, lambda i: boxes
    )
    sample_jobs(Denoiser(c, echo), [job], 64)
    assert len(echo.seen) == len(boxes)
    embed = echo.pos_embed
    whole = embed.cropped_pos_embed(H, W).reshape(H // 2, W // 2, -1)
    for y, x, h, w in boxes:
        if mode == "global":
            want = whole[y // 2 : (y + h) // 2, x // 2 : (x + w) // 2].reshape(-1, whole.shape[-1])
        else:
            want = embed.cropped_pos_embed(h, w)[0]
        assert any(got.shape == want.shape and torch.equal(got, want) for got in echo.seen), (y, x, h, w)
    # a whole latent: the model's own embedding
    echo.seen.clear()
    echo(torch.zeros(1, 16, H, W), None, None, None, False)
    assert torch.equal(echo.seen[0], embed.cropped_pos_embed(H, W)[0])


class EchoImageIds(torch.nn.Module):
    """A stand-in FLUX transformer that records the rotary image ids each call gets."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(out_channels=None, patch_size=1, guidance_embeds=True)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, torch.Tensor]] = []

    def forward(self, hidden_states, img_ids, guidance, **kwargs):
        assert guidance is not None
        self.seen.append((hidden_states.shape[0], img_ids))
        return (torch.zeros_like(hidden_states),)


@pytest.mark.parametrize("mode", ["global", "local"])
def test_every_flux_piece_gets_the_rotary_ids_of_its_place(tiny_dirs, mode):
    """Each FLUX piece's tokens carry the (0, row, column) ids of their place in the whole packed
    latent ("global", as FLUX's pipeline ids the whole image), or from (0, 0) ("local")."""
    from dataclasses import replace

    from asd_models.fstd import FSTDConfig, TiledJob, sample_jobs
    from asd_models.samplers import FSTD

    c = load_components(tiny_dirs["flux"])
    c.family = replace(c.family, tile_positions=mode)
    echo = EchoImageIds()
    H, W = 24, 40
    boxes = FSTD(FSTDConfig(tile=8, size_multiple=2)).boxes(H, W, torch.Generator().manual_seed(0))(0)
    cond = {"text": torch.zeros(1, 512, 32), "pooled": torch.zeros(1, 32), "guidance": torch.ones(1)}

    class Identity:
        def step(self, eps, t, latents, generator=None):
            return SimpleNamespace(prev_sample=latents)

    job = TiledJob(
        torch.zeros(1, 16, H, W), Identity(), torch.tensor([1.0]), cond, None, 1.0, lambda i: boxes
    )
    sample_jobs(Denoiser(c, echo), [job], 64)
    got = sorted((tuple(ids[0].tolist()), tuple(ids[-1].tolist())) for _, ids in echo.seen)
    if mode == "global":
        want = sorted(((0.0, y / 2, x / 2), (0.0, (y + h) / 2 - 1, (x + w) / 2 - 1)) for y, x, h, w in boxes)
        assert got == want and sum(n for n, _ in echo.seen) == len(boxes)
    else:
        assert all(first == (0.0, 0.0, 0.0) for first, _ in got)
        assert sum(n for n, _ in echo.seen) == len(boxes)  # one call per piece shape, not per place


def test_a_flow_matching_schedule_is_shifted_for_the_whole_latent(tiny_dirs):
    """The SD3-class scheduler: flow-matching Euler with the model's shift; img2img noises by
    interpolation; the training target is the velocity."""
    c = load_components(tiny_dirs["sd3"])
    family = c.family
    sched = family.sampling_scheduler(c, 4, (32, 48))
    assert type(sched).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert sched.timesteps[0] > 900 and float(sched.sigmas[-1]) == 0.0
    # FLUX: the shift grows with the whole image's token count (one schedule for all its tiles)
    flux = load_components(tiny_dirs["flux"])
    small = flux.family.sampling_scheduler(flux, 4, (32, 32)).sigmas[1]
    large = flux.family.sampling_scheduler(flux, 4, (256, 256)).sigmas[1]
    assert float(large) > float(small)
    x0, noise = torch.ones(1, 16, 4, 4), torch.zeros(1, 16, 4, 4)
    t = sched.timesteps[2:3]
    sigma = float(sched.sigmas[2])
    assert torch.allclose(family.noised(sched, x0, noise, t), x0 * (1 - sigma))
    noisy, ts, target = family.training_example(c, x0, noise, torch.Generator().manual_seed(0))
    assert torch.equal(target, noise - x0) and 0 < float(ts[0]) < 1000


def test_a_folder_missing_a_component_names_it(tiny_dirs, tmp_path):
    broken = tmp_path / "sdxl"
    shutil.copytree(tiny_dirs["sdxl"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(
        ModelNotFoundError, match=r"lacks text_encoder_2/config\.json.*stable-diffusion-xl-base"
    ):
        load_components(broken)


def test_an_unknown_pipeline_class_is_named(tiny_dirs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_dirs["sd"], other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV99Pipeline"}))
    with pytest.raises(ModelNotFoundError, match="'KandinskyV99Pipeline', which no model family here takes"):
        load_components(other)


def test_pickled_weights_are_refused_never_unpickled(tiny_dirs, tmp_path, monkeypatch):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dirs["sd"], pickled)
    unet = load_components(pickled).unet
    for f in (pickled / "unet").glob("*.safetensors"):
        f.unlink()
    unet.save_pretrained(pickled / "unet", safe_serialization=False)
    assert list((pickled / "unet").glob("*.bin"))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickled checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelNotFoundError, match="never unpickles"):
        load_components(pickled)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_arad_training_steps_on_every_family(tiny_dirs, family):
    from asd_models.arad_training import AradTrainer
    from tasks.train import TrainSettings

    c = load_components(tiny_dirs[family])
    before = {k: v.clone() for k, v in c.unet.state_dict().items()}
    cfg = TrainSettings(
        steps=2, batch_size=2, grad_accum=1, learning_rate=1e-3, warmup_steps=0
    ).train_config()
    trainer = AradTrainer(c, cfg)
    gen = torch.Generator().manual_seed(0)

    channels = c.vae.config.latent_channels

    def batches():
        while True:
            yield {
                "latents": torch.randn(2, channels, 8, 12, generator=gen),
                "captions": ["a cat", ""],
                "keys": ["a", "b"],
            }

    losses = trainer.train(batches())
    assert len(losses) == 2 and all(np.isfinite(losses))
    after = trainer.final_unet().state_dict()
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)


def test_family_names_are_checked():
    with pytest.raises(ValueError, match="model family 'flux2'"):
        family_named("flux2")


@pytest.mark.slow
def test_the_whole_pipeline_on_a_tiny_sdxl(tmp_path):
    """ingest -> tiny SDXL base (built in code, VAE fitted) -> ARAD -> generate at odd sizes ->
    evaluate, then upscale the generations: every stage on the SDXL family."""
    import io

    import polars as pl
    from PIL import Image

    from artifact_store import ArtifactStore
    from data_manifests.demo import materialize_demo_photos
    from data_manifests.settings import PromptSpec
    from flows.pipeline_flow import asd_pipeline
    from flows.stages import upscale_flow
    from tasks.evaluate import EvaluateSettings
    from tasks.generate import GenerateSettings
    from tasks.ingest import IngestSettings
    from tasks.train import TrainSettings
    from tasks.upscale import UpscaleSettings

    store_url = str(tmp_path / "store")
    sizes = [(301, 157), (96, 211)]
    refs = asd_pipeline(
        source=str(materialize_demo_photos(tmp_path / "photos")),
        prompts=[
            PromptSpec(prompt="a red barn", width=w, height=h, seed=i) for i, (w, h) in enumerate(sizes)
        ],
        name="xl",
        ingest=IngestSettings(bucket_base=128, bucket_step=16),
        train=TrainSettings(base_model="tiny", tiny_family="sdxl", vae_steps=10, steps=6, batch_size=4),
        generate=GenerateSettings(steps=3),
        evaluate=EvaluateSettings(patch_size=64, patches_per_image=2),
        store_url=store_url,
    )
    store = ArtifactStore(store_url)
    base = next(p for p in store.record(refs.model)["parents"] if p.startswith("models/"))
    assert store.record(base)["params"]["family"] == "sdxl"
    manifest = pl.read_parquet(io.BytesIO(store.read_bytes(refs.generations, "manifest.parquet")))
    assert manifest["status"].to_list() == ["ok", "ok"]
    for r in manifest.iter_rows(named=True):
        with store.open(refs.generations, r["image"]) as f:
            assert Image.open(f).size == (r["width"], r["height"])
    assert store.record(refs.evaluation)["summary"]
    up = upscale_flow(refs.generations, refs.model, "xl-2x", UpscaleSettings(scale=1.5, steps=2), store_url)
    rows = pl.read_parquet(io.BytesIO(store.read_bytes(up, "manifest.parquet")))
    assert rows["status"].to_list() == ["ok", "ok"]
    assert sorted(zip(rows["width"], rows["height"], strict=True)) == sorted(
        (round(w * 1.5), round(h * 1.5)) for w, h in sizes
    )

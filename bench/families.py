"""FSTD on every model family, side by side: each family's denoiser shape (the SD-shaped bench
UNet of `bench.fstd`; the same UNet made SDXL-shaped: pooled text and the six added time ids; a
small SD3-shaped MMDiT with learned positions, trained with flow matching), trained briefly on
smooth synthetic latents with its family's own conditioning and objective (SDXL and SD3: random
64x64 crops of 128x128 fields, told where they were cut: crop ids, position embeddings), then
sampled through the family's own call and schedule (`asd_models.families`: every FSTD piece told
its place) with full-latent sampling, FSTD, naive tiles and MultiDiffusion at a 1024^2-class and
a 2048x1024-class latent.

    python -m bench.families [--quick] [--json PATH] [--steps 10] [--train-steps 150] [--repeat 1]

Seam score: mean |gradient| of the final latent across the unshifted tile-grid lines over the
median across the other lines (1.0 = seamless; a patch transformer's against its other patch
borders); tile 64 latent. The ablations sample FSTD with
each piece told its place in the whole image (the default) and as a picture of its own size:
SDXL's crop ids ("offset" against "constant"), SD3's positions ("global" against "local"). Targets (issue "The models
users already have"): FSTD seam <= 1.05x the full latent's, naive clearly worse; FSTD >= 2x
faster than MultiDiffusion at 2048x1024. --quick: fewer training steps and one size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import replace

from bench.fstd import (
    CACHE,
    TILE,
    UNET_CONFIG,
    bench_sampler,
    latent_seam_score,
    smooth_latents,
    trained_unet,
)
from bench.report import table, write_json

SIZES = [(128, 128), (128, 256)]  # latent (height, width): 1024^2- and 2048x1024-class at 8 px a latent
METHODS = ["full", "fstd", "naive", "multidiffusion"]
TIME_DIM = 8
# each family's tile-conditioning ablation: (the family's field, the value against its default)
ABLATIONS = {
    "sdxl": ("tile_crops", "constant"),
    "sd3": ("tile_positions", "local"),
    "flux": ("tile_positions", "local"),
}
FLOW_MATCHING = ("sd3", "flux")  # patch transformers: tile lines compared with their other patch borders
SD3_CONFIG = {
    "sample_size": 64,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 128,
}
FLUX_CONFIG = {
    "patch_size": 1,
    "in_channels": 16,  # 4 latent channels packed 2x2
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": [4, 6, 6],
}


def family_unet(family: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    if family == "sd3":
        return SD3Transformer2DModel(**SD3_CONFIG), dict(SD3_CONFIG)
    if family == "flux":
        return FluxTransformer2DModel(**FLUX_CONFIG), dict(FLUX_CONFIG)
    config = dict(UNET_CONFIG)
    if family == "sdxl":
        config.update(
            cross_attention_dim=64,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_DIM,
            projection_class_embeddings_input_dim=32 + 6 * TIME_DIM,
        )
    return UNet2DConditionModel(**config), config


def components(family: str, unet):
    """The family's components around `unet` (no text encoders: the bench's conditioning is
    given directly), so sampling goes through the family's own call."""
    from asd_models.families import family_named
    from asd_models.families.base import ModelComponents
    from asd_models.tiny_model import build_tiny_components

    tiny = build_tiny_components()
    scheduler = tiny["scheduler"]
    if family == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    if family == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return ModelComponents(unet, tiny["vae"], None, None, scheduler, "bench", family_named(family))


def conditioning(family: str, n: int, unet):
    import torch

    if family in FLOW_MATCHING:
        return {"text": torch.zeros(n, 77, 32), "pooled": torch.zeros(n, 32)}
    cond = {"text": torch.zeros(n, 77, unet.config.cross_attention_dim)}
    if family == "sdxl":
        cond["pooled"] = torch.zeros(n, 32)
    return cond


def trained(family: str, steps: int):
    """The family's bench UNet trained on smooth latents (cached under bench/.cache)."""
    import torch

    from asd_models.families.base import whole

    if family == "sd":  # the SD-shaped bench UNet of bench.fstd, trained the same way: one cache
        return trained_unet(steps)[0]
    unet, config = family_unet(family)
    key = hashlib.sha256(json.dumps([config, steps, "families-1"]).encode()).hexdigest()[:12]
    folder = CACHE / f"family-{family}-{key}"
    if (folder / "config.json").is_file():
        return type(unet).from_pretrained(folder).eval()
    torch.manual_seed(0)
    unet, _ = family_unet(family)
    c = components(family, unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(steps):
        if family in ABLATIONS:  # random 64x64 crops of 128x128 fields, placed where they were cut
            fields = smooth_latents(8, 128, gen)
            offs = torch.randint(0, 65, (8, 2), generator=gen).tolist()
            x0 = torch.stack([f[:, y : y + 64, x : x + 64] for f, (y, x) in zip(fields, offs, strict=True)])
            places = [(y, x, 64, 64, 128, 128) for y, x in offs]
        else:
            x0 = smooth_latents(8, 64, gen)
            places = whole(x0)
        noise = torch.randn(x0.shape, generator=gen)
        noisy, t, target = c.family.training_example(c, x0, noise, gen)  # the family's objective
        pred = c.family.predict(c, unet, noisy, t, conditioning(family, 8, unet), places)
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(
                f"  training {family}: step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    unet.save_pretrained(folder)
    return unet.eval()


def sample(family: str, unet, method: str, h: int, w: int, steps: int, ablated: bool = False):
    """One arm: the family's own schedule for the whole latent, FSTD or a baseline; `ablated`:
    the family's tile conditioning set to its ablation (`ABLATIONS`)."""
    import torch

    from asd_models.families.base import Denoiser
    from asd_models.fstd import sample_jobs

    c = components(family, unet)
    if ablated:
        field, value = ABLATIONS[family]
        c.family = replace(c.family, **{field: value})
    sched = c.family.sampling_scheduler(c, steps, (h, w))
    latents = c.family.start_latents(
        sched, torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(0))
    )
    sampler = bench_sampler(method, 8, unet, c.unet_multiple)
    job, _ = sampler.job(
        latents,
        sched,
        sched.timesteps,
        conditioning(family, 1, unet),
        None,
        1.0,
        torch.Generator().manual_seed(1),
    )
    t0 = time.perf_counter()
    out = sample_jobs(Denoiser(c), [job], sampler.tile_batch_size)[0].latents
    return out, time.perf_counter() - t0


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer training steps, the 2048x1024 class only")
    ap.add_argument("--json", default="bench/results/families.json")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps")
    ap.add_argument(
        "--train-steps", type=int, default=None, help="default 150 (as bench.fstd; 50 with --quick)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every arm; the median time is kept")
    ap.add_argument("--families", default="sd,sdxl,sd3,flux")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    train_steps = args.train_steps or (50 if args.quick else 150)
    sizes = SIZES[1:] if args.quick else SIZES
    rows = []
    for family in args.families.split(","):
        unet = trained(family, train_steps)
        arms = [(m, False) for m in METHODS] + ([("fstd", True)] if family in ABLATIONS else [])
        for h, w in sizes:
            for method, ablated in arms:
                times, out = [], None
                sample(
                    family, unet, method, h, w, 1, ablated
                )  # untimed: first calls at a shape build kernels
                for _ in range(args.repeat):
                    out, seconds = sample(family, unet, method, h, w, args.steps, ablated)
                    times.append(seconds)
                times.sort()
                rows.append(
                    {
                        "family": family,
                        "method": f"{method} ({'='.join(ABLATIONS[family])})" if ablated else method,
                        "latent": f"{h}x{w}",
                        "pixels": f"{w * 8}x{h * 8}",
                        "seconds": round(times[len(times) // 2], 2),
                        # a transformer's tile lines against its other patch borders
                        "seam": round(latent_seam_score(out, TILE, 2 if family in FLOW_MATCHING else 1), 4),
                        "finite": bool(torch.isfinite(out).all()),
                    }
                )
                print(
                    f"  {family} {rows[-1]['method']} {w * 8}x{h * 8}: {rows[-1]['seconds']} s, seam {rows[-1]['seam']}",
                    file=sys.stderr,
                    flush=True,
                )
    for r in rows:
        same = {x["method"]: x for x in rows if (x["family"], x["latent"]) == (r["family"], r["latent"])}
        r["seam_over_full"] = round(r["seam"] / same["full"]["seam"], 3)
        r["md_over_this"] = round(same["multidiffusion"]["seconds"] / r["seconds"], 2)
    print(
        f"\nbench.families: tile {TILE} latent, {args.steps} steps (DDIM; SD3, FLUX: flow-matching Euler), no CFG, denoisers trained "
        f"{train_steps} steps on smooth latents, {os.cpu_count()} CPU threads\n"
    )
    table(
        rows,
        {
            "family": "{family}",
            "method": "{method}",
            "size (px)": "{pixels}",
            "seconds": "{seconds}",
            "MultiDiffusion / this": "{md_over_this}",
            "seam": "{seam}",
            "seam / full": "{seam_over_full}",
        },
    )
    write_json(args.json, {"train_steps": train_steps, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()

"""FSTD on every model family, side by side: each family's UNet shape (the SD-shaped bench UNet
of `bench.fstd`, and the same UNet made SDXL-shaped: pooled text and the six added time ids),
trained briefly on smooth synthetic latents with its family's own conditioning (SDXL: random
64x64 crops of 128x128 fields, with their original size, crop offset and target size, as SDXL
trains), then sampled through the family's own call (`asd_models.families`: every FSTD piece
told its place) with full-latent sampling, FSTD, naive tiles and MultiDiffusion at a
1024^2-class and a 2048x1024-class latent.

    python -m bench.families [--quick] [--json PATH] [--steps 10] [--train-steps 150] [--repeat 1]

Seam score: mean |gradient| of the final latent across the unshifted tile-grid lines over the
median across the other lines (1.0 = seamless); tile 64 latent. The SDXL ablation samples FSTD
with every piece's crop ids at its offset in the whole image ("offset", the default) and with
each piece as an uncropped picture of its own size ("constant"). Targets (issue "The models
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


def family_unet(family: str):
    from diffusers import UNet2DConditionModel

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
    return ModelComponents(unet, tiny["vae"], None, None, tiny["scheduler"], "bench", family_named(family))


def conditioning(family: str, n: int, unet):
    import torch

    cond = {"text": torch.zeros(n, 77, unet.config.cross_attention_dim)}
    if family == "sdxl":
        cond["pooled"] = torch.zeros(n, 32)
    return cond


def trained(family: str, steps: int):
    """The family's bench UNet trained on smooth latents (cached under bench/.cache)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from asd_models.families.base import whole

    if family == "sd":  # the SD-shaped bench UNet of bench.fstd, trained the same way: one cache
        return trained_unet(steps)[0]
    unet, config = family_unet(family)
    key = hashlib.sha256(json.dumps([config, steps, "families-1"]).encode()).hexdigest()[:12]
    folder = CACHE / f"family-{family}-{key}"
    if (folder / "config.json").is_file():
        return UNet2DConditionModel.from_pretrained(folder).eval()
    torch.manual_seed(0)
    unet, _ = family_unet(family)
    c = components(family, unet)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(steps):
        if family == "sdxl":  # random 64x64 crops of 128x128 fields, placed where they were cut
            fields = smooth_latents(8, 128, gen)
            offs = torch.randint(0, 65, (8, 2), generator=gen).tolist()
            x0 = torch.stack([f[:, y : y + 64, x : x + 64] for f, (y, x) in zip(fields, offs, strict=True)])
            places = [(y, x, 64, 64, 128, 128) for y, x in offs]
        else:
            x0 = smooth_latents(8, 64, gen)
            places = whole(x0)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (8,), generator=gen)
        pred = c.family.predict(
            c, unet, sched.add_noise(x0, noise, t), t, conditioning(family, 8, unet), places
        )
        loss = torch.nn.functional.mse_loss(pred, noise)
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


def sample(family: str, unet, method: str, h: int, w: int, steps: int, tile_crops: str = "offset"):
    import torch
    from diffusers import DDIMScheduler

    from asd_models.families.base import Denoiser
    from asd_models.fstd import sample_jobs

    c = components(family, unet)
    if family == "sdxl":
        c.family = replace(c.family, tile_crops=tile_crops)
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sched.set_timesteps(steps)
    latents = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(0))
    sampler = bench_sampler(method, 8, unet)
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
    ap.add_argument("--families", default="sd,sdxl")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    train_steps = args.train_steps or (50 if args.quick else 150)
    sizes = SIZES[1:] if args.quick else SIZES
    rows = []
    for family in args.families.split(","):
        unet = trained(family, train_steps)
        arms = [(m, "offset") for m in METHODS] + ([("fstd", "constant")] if family == "sdxl" else [])
        for h, w in sizes:
            for method, crops in arms:
                times, out = [], None
                sample(family, unet, method, h, w, 1, crops)  # untimed: first calls at a shape build kernels
                for _ in range(args.repeat):
                    out, seconds = sample(family, unet, method, h, w, args.steps, crops)
                    times.append(seconds)
                times.sort()
                rows.append(
                    {
                        "family": family,
                        "method": method if crops == "offset" else f"{method} (crops constant)",
                        "latent": f"{h}x{w}",
                        "pixels": f"{w * 8}x{h * 8}",
                        "seconds": round(times[len(times) // 2], 2),
                        "seam": round(latent_seam_score(out, TILE), 4),
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
        f"\nbench.families: tile {TILE} latent, {args.steps} DDIM steps, no CFG, UNets trained "
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

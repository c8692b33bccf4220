"""FSTD vs naive tiles, MultiDiffusion, Mixture of Diffusers, diffusers' panorama pipeline and
full-latent sampling, side by side with the same UNet in one run.

    python -m bench.fstd [--quick] [--unet small|medium] [--json PATH]

Each (method, size) runs in its own subprocess, so its peak RSS is its own.

--unet small (default): the tiny SD-shaped UNet (1M parameters, its config is printed), first
trained for a few minutes on smooth synthetic latents (cached under bench/.cache): a random
UNet shows no seams at all, so seam scores need a denoiser that has learned something. On it
a UNet call costs little more than its overhead, so the times say how FSTD's piece shapes
cost in calls.

--unet medium: a compute-bound UNet (3 levels, attention on the lower two, 2 layers per
block, 25M parameters; a 64x64 tile is ~0.2 s on 2 cores), the regime of an SD-sized UNet
where cost follows area. It is untrained (random weights), so it reports time and memory
only: its seam scores would mean nothing and are left out.

Seam score: mean |gradient| of the final latent across the unshifted tile-grid lines over the
median across all other lines (1.0 = seamless). No classifier-free guidance (same cost ratio
for every method).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from asd_models.memory import peak_rss_mb

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
MEDIUM_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [64, 128, 256],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 256,
    "attention_head_dim": 32,
    "norm_num_groups": 32,
}
TILE = 64  # latent pixels = 512 px
SIZES_QUICK = [(1024, 1024), (2048, 1024)]
SIZES_FULL = SIZES_QUICK + [(4096, 4096)]
METHODS = ["fstd", "fstd-bucketed", "naive", "multidiffusion", "mixture", "diffusers_panorama", "full"]
# "fstd" runs as the pipeline runs it on this device (exact pieces on a CPU); "fstd-bucketed" grows its
# pieces to the GPU's few run sizes, side by side, so the cost of that shape discipline here is in view


def bench_sampler(method: str, tile_batch_size: int, unet, size_multiple: int | None = None):
    """The sampler a bench arm runs, on `unet` (on its lattice, or the family's `size_multiple`)."""
    from asd_models.samplers import sampler_named

    name, _, pieces = method.partition("-")
    sampler = sampler_named(name, TILE, tile_batch_size, size_multiple)
    return sampler.with_pieces(pieces or None).on_unet(unet)


def smooth_latents(n: int, size: int, gen, max_freq: float = 3.0):
    """Smooth random fields (a few waves up to `max_freq` per side per channel), unit-ish variance."""
    import torch

    y = torch.linspace(0, 1, size).view(1, 1, size, 1)
    x = torch.linspace(0, 1, size).view(1, 1, 1, size)
    out = torch.zeros(n, 4, size, size)
    for _ in range(4):
        fy, fx = (
            torch.rand(n, 4, 1, 1, generator=gen) * max_freq,
            torch.rand(n, 4, 1, 1, generator=gen) * max_freq,
        )
        ph = torch.rand(n, 4, 1, 1, generator=gen) * 6.283
        out += torch.sin(6.283 * (fy * y + fx * x) + ph) * (torch.rand(n, 4, 1, 1, generator=gen) + 0.3)
    return out / out.flatten(1).std(dim=1).view(n, 1, 1, 1)


def trained_unet(train_steps: int):
    """The bench UNet, trained on smooth latents (cached by config and steps)."""
    import torch
    from diffusers import UNet2DConditionModel

    key = hashlib.sha256(json.dumps([UNET_CONFIG, train_steps]).encode()).hexdigest()[:12]
    folder = CACHE / f"unet-{key}"
    if (folder / "config.json").is_file():
        return UNet2DConditionModel.from_pretrained(folder), folder
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    fit_denoiser(unet, lambda gen: smooth_latents(8, 64, gen), train_steps, seed=0, label="bench UNet")
    unet.save_pretrained(folder)
    return unet.eval(), folder


def fit_denoiser(unet, make_batch, steps: int, seed: int, label: str, log_every: int = 50) -> None:
    """Train `unet` in place with the noise-prediction loss on batches `make_batch(generator)`
    (empty text conditioning, AdamW 1e-3, SD's scaled-linear DDPM schedule)."""
    import torch
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        x0 = make_batch(gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
        cond = torch.zeros(x0.shape[0], 77, unet.config.cross_attention_dim)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x0, noise, t), t, cond).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0:
            print(
                f"  training {label}: step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )


def unet_multiple(config: dict | None = None) -> int:
    return 2 ** (len((config or UNET_CONFIG)["block_out_channels"]) - 1)


def medium_unet():
    """The compute-bound bench UNet, random weights (seed 0), saved once under bench/.cache."""
    import torch
    from diffusers import UNet2DConditionModel

    key = hashlib.sha256(json.dumps(MEDIUM_UNET_CONFIG).encode()).hexdigest()[:12]
    folder = CACHE / f"unet-medium-{key}"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        UNet2DConditionModel(**MEDIUM_UNET_CONFIG).save_pretrained(folder)
    return folder


def latent_seam_score(latents, tile: int, period: int = 1) -> float:
    """The seam score of a latent at the unshifted tile lines; `period`: a patch transformer's
    token side (its latents carry a faint pattern at patch borders, so tile lines are compared
    with the other patch borders only)."""
    import numpy as np

    from asd_models.seams import seam_score

    img = latents[0].float().mean(dim=0).numpy()
    h, w = img.shape
    xs = [k * tile for k in range(1, math.ceil(w / tile)) if k * tile < w]
    ys = [k * tile for k in range(1, math.ceil(h / tile)) if k * tile < h]
    return seam_score(np.asarray(img), xs, ys, period)


def worst_line(latents) -> float:
    """Largest mean |gradient| across any single line over the median line (method-blind)."""
    import numpy as np

    img = latents[0].float().mean(dim=0).numpy()
    col = np.abs(np.diff(img, axis=1)).mean(axis=0)
    row = np.abs(np.diff(img, axis=0)).mean(axis=1)
    return float(max(col.max() / np.median(col), row.max() / np.median(row)))


def run_one(
    method: str,
    width: int,
    height: int,
    steps: int,
    unet_dir: str,
    tile_batch_size: int,
    warmup_steps: int = 3,
) -> dict:
    """Worker: one method at one size; prints a JSON object."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from asd_models.samplers import sample_with

    torch.set_num_threads(os.cpu_count() or 1)
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    H, W = height // 8, width // 8
    cond = torch.zeros(1, 77, unet.config.cross_attention_dim)
    latents = torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(0))
    sampler = None if method == "diffusers_panorama" else bench_sampler(method, tile_batch_size, unet)

    def sample(x, n_steps: int):
        sched.set_timesteps(n_steps)
        if method == "diffusers_panorama":
            return run_panorama(unet, sched, x, n_steps, width, height, cond)
        out = sample_with(
            sampler,
            unet,
            sched,
            x,
            sched.timesteps,
            cond,
            None,
            1.0,
            generator=torch.Generator().manual_seed(1),
        )
        return out, sampler.evals_per_step(H, W)

    # untimed warm-up (every method alike): first calls at a new tile shape build kernels, which a
    # long-running worker pays once
    sample(torch.randn(latents.shape, generator=torch.Generator().manual_seed(9)), min(steps, warmup_steps))
    t0 = time.perf_counter()
    out, evals = sample(latents, steps)
    seconds = time.perf_counter() - t0
    return {
        "method": method,
        "width": width,
        "height": height,
        "steps": steps,
        "unet_evals_per_step": evals,
        "piece_shapes": sampler.piece_shapes if sampler else "exact",
        "seconds": round(seconds, 3),
        "peak_rss_mb": peak_rss_mb(),
        "seam_score": round(latent_seam_score(out, TILE), 4),
        "worst_line": round(worst_line(out), 3),
        "finite": bool(torch.isfinite(out).all()),
    }


def run_panorama(unet, sched, latents, steps: int, width: int, height: int, cond):
    """diffusers' own StableDiffusionPanoramaPipeline (window 64, stride 8: its defaults)."""
    from diffusers import AutoencoderKL, StableDiffusionPanoramaPipeline

    from asd_models.tiny_model import build_tiny_components

    tiny = build_tiny_components()
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    pipe = StableDiffusionPanoramaPipeline(
        vae=vae,
        text_encoder=tiny["text_encoder"],
        tokenizer=tiny["tokenizer"],
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    views = len(pipe.get_views(height, width))
    out = pipe(
        prompt_embeds=cond,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=1.0,
        latents=latents,
        output_type="latent",
        view_batch_size=8,
    ).images
    return out, views


def _fmt(seam: float | None) -> str:
    return "n/a" if seam is None else f"{seam:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1024x1024 and 2048x1024 only")
    ap.add_argument(
        "--unet",
        choices=["small", "medium"],
        default="small",
        help="small: tiny trained UNet (seams, per-call cost); medium: compute-bound random 25M UNet (time)",
    )
    ap.add_argument(
        "--json", default=None, help="default bench/results/fstd.json (fstd-medium.json for --unet medium)"
    )
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 10 small, 3 medium)")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--tile-batch-size", type=int, default=8)
    ap.add_argument(
        "--panorama-max-pixels",
        type=int,
        default=None,
        help="skip diffusers' panorama above this size (its stride-8 cost explodes; default 2048x1024, "
        "1024x1024 for --unet medium)",
    )
    ap.add_argument(
        "--full-max-pixels", type=int, default=2048 * 1024, help="skip full-latent sampling above this"
    )
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated arms (default all: {','.join(METHODS)}); fstd and naive are always run",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every arm, interleaved; each arm's median time "
        "is reported (this machine is noisy: one round can be 50%% off)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_one(**json.loads(args.worker))))
        return

    medium = args.unet == "medium"
    args.steps = args.steps or (3 if medium else 10)
    args.panorama_max_pixels = args.panorama_max_pixels or (1024 * 1024 if medium else 2048 * 1024)
    args.json = args.json or f"bench/results/fstd{'-medium' if medium else ''}.json"
    if medium:
        unet_dir, config = medium_unet(), MEDIUM_UNET_CONFIG
        trained = "random weights (time and memory only: no seam scores)"
    else:
        (_, unet_dir), config = trained_unet(args.train_steps), UNET_CONFIG
        trained = f"trained {args.train_steps} steps on smooth latents"
    sizes = SIZES_QUICK if args.quick else SIZES_FULL
    print(
        f"UNet ({args.unet}): {json.dumps(config)}, {trained}; tile {TILE} latent ({TILE * 8} px), FSTD cropped "
        f"grid, offsets in steps of 2; overlap baselines stride {TILE // 2} (50%), panorama stride 8; "
        f"{args.steps} DDIM steps, no CFG, {os.cpu_count()} CPU threads"
    )
    methods = [m for m in METHODS if m in {"fstd", "naive", *args.methods.split(",")}]
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}: expected some of {','.join(METHODS)}")
    jobs = [(m, w, h, args.steps) for w, h in sizes for m in methods]
    if not args.quick and not medium:
        jobs.append(("fstd", 8192, 8192, 1))  # memory at 8192^2 (one step)
    runs: dict[tuple, list[dict]] = {}
    skipped: list[dict] = []
    for round_no, (method, w, h, steps) in ((i, j) for i in range(args.repeat) for j in jobs):
        if method == "diffusers_panorama" and w * h > args.panorama_max_pixels:
            if round_no == 0:
                skipped.append(
                    {"method": method, "width": w, "height": h, "reason": "stride-8 cost: hours on this CPU"}
                )
            continue
        if method == "full" and w * h > args.full_max_pixels:
            if round_no == 0:
                skipped.append(
                    {
                        "method": method,
                        "width": w,
                        "height": h,
                        "reason": "attention over the whole latent does not fit in memory",
                    }
                )
            continue
        spec = json.dumps(
            {
                "method": method,
                "width": w,
                "height": h,
                "steps": steps,
                "unet_dir": str(unet_dir),
                "tile_batch_size": args.tile_batch_size,
                "warmup_steps": 1 if medium else 3,
            }
        )
        proc = subprocess.run(
            [sys.executable, "-m", "bench.fstd", "--worker", spec],
            capture_output=True,
            text=True,
            cwd=HERE.parent,
        )
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"bench worker failed: {method} {w}x{h}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if medium:  # a random UNet's latent says nothing about seams
            r["seam_score"] = r["worst_line"] = None
        runs.setdefault((method, w, h, steps), []).append(r)
        print(
            f"  round {round_no + 1}: {method:18s} {w}x{h}: {r['seconds']:.1f} s, {r['unet_evals_per_step']:.1f} "
            f"evals/step, {r['peak_rss_mb']:.0f} MB, seam {_fmt(r['seam_score'])}",
            flush=True,
        )
    results = []
    for arm in runs.values():  # the median round of each arm (same pixels every round: a seeded sampler)
        arm.sort(key=lambda r: r["seconds"])
        results.append({**arm[len(arm) // 2], "seconds_rounds": [r["seconds"] for r in arm]})

    speedup = {}
    for w, h in sizes:
        by = {r["method"]: r for r in results if (r["width"], r["height"], r["steps"]) == (w, h, args.steps)}
        f = by["fstd"]["seconds"]
        s = {
            f"over_{m}": round(by[m]["seconds"] / f, 2)
            for m in ("multidiffusion", "mixture", "diffusers_panorama")
            if m in by
        }
        s["time_over_naive"] = round(f / by["naive"]["seconds"], 3)
        if "fstd-bucketed" in by:
            s["bucketed_time_over_exact"] = round(by["fstd-bucketed"]["seconds"] / f, 3)
        if "full" in by and not medium:
            s["seam_over_full"] = round(by["fstd"]["seam_score"] / by["full"]["seam_score"], 3)
            if "fstd-bucketed" in by:
                s["bucketed_seam_over_full"] = round(
                    by["fstd-bucketed"]["seam_score"] / by["full"]["seam_score"], 3
                )
        speedup[f"{w}x{h}"] = s

    print(f"\n{'method':18s} {'size':>10s} {'evals/step':>10s} {'seconds':>9s} {'peak MB':>8s} {'seam':>7s}")
    for r in results:
        print(
            f"{r['method']:18s} {r['width']:>5d}x{r['height']:<5d}{r['unet_evals_per_step']:>9.1f} "
            f"{r['seconds']:>9.2f} {r['peak_rss_mb']:>8.0f} {_fmt(r['seam_score']):>7s}"
        )
    for s in skipped:
        print(f"{s['method']:18s} {s['width']:>5d}x{s['height']:<5d} skipped: {s['reason']}")
    print("\nspeedup (FSTD's speed over each; time_over_naive = FSTD time / naive time):")
    for size, s in speedup.items():
        print(f"  {size}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
    out = {
        "unet": args.unet,
        "repeat": args.repeat,
        "unet_config": config,
        "train_steps": None if medium else args.train_steps,
        "tile": TILE,
        "steps": args.steps,
        "results": results,
        "skipped": skipped,
        "speedup": speedup,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

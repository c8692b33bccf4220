"""FSTD design choices side by side: the cost and the seam score of each way to handle the
strip a shifted grid leaves at the edge, and of the every-k-th-step reset.

    python -m bench.fstd_variants [--json PATH]

Same trained bench UNet, latents, steps and warm-up as `bench.fstd`, in one process.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    from diffusers import DDIMScheduler

    from asd_models.fstd import FSTDConfig
    from asd_models.samplers import FSTD, Full, Naive, sample_with
    from bench.fstd import TILE, latent_seam_score, trained_unet, unet_multiple, worst_line

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="bench/results/fstd_variants.json")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--train-steps", type=int, default=150)
    args = ap.parse_args()
    unet, _ = trained_unet(args.train_steps)
    m = unet_multiple()
    variants = {
        "cropped (default)": FSTDConfig(tile=TILE, size_multiple=m),
        "cropped, step 0 unshifted": FSTDConfig(tile=TILE, size_multiple=m, shift_first_step=False),
        "cropped, reset every 4th": FSTDConfig(
            tile=TILE, size_multiple=m, reset_every=4, shift_first_step=False
        ),
        "cropped, offsets on 8-px lattice": FSTDConfig(tile=TILE, size_multiple=m, offset_multiple=8),
        "edge-tile": FSTDConfig(tile=TILE, size_multiple=m, mode="edge-tile"),
        "official (strip = previous eps)": FSTDConfig.official(tile=TILE),
    }
    results = []
    for width, height in [(1024, 1024), (2048, 1024)]:
        H, W = height // 8, width // 8
        samplers = {name: FSTD(cfg) for name, cfg in variants.items()} | {
            "full": Full(TILE),
            "naive": Naive(TILE),
        }
        for name, sampler in samplers.items():
            scores, seconds, worst = [], [], []
            for seed in (0, 1):
                sched = DDIMScheduler(
                    beta_schedule="scaled_linear",
                    beta_start=0.00085,
                    beta_end=0.012,
                    clip_sample=False,
                    set_alpha_to_one=False,
                    steps_offset=1,
                )
                x = torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(seed))
                sched.set_timesteps(2)
                sample_with(sampler, unet, sched, x, sched.timesteps, torch.zeros(1, 77, 32))
                sched.set_timesteps(args.steps)
                t0 = time.perf_counter()
                out = sample_with(
                    sampler,
                    unet,
                    sched,
                    x,
                    sched.timesteps,
                    torch.zeros(1, 77, 32),
                    generator=torch.Generator().manual_seed(1),
                )
                seconds.append(time.perf_counter() - t0)
                scores.append(latent_seam_score(out, TILE))
                worst.append(worst_line(out))
            r = {
                "variant": name,
                "width": width,
                "height": height,
                "seconds": round(sum(seconds) / 2, 3),
                "seam_score": round(sum(scores) / 2, 4),
                "worst_line": round(sum(worst) / 2, 3),
            }
            results.append(r)
            print(
                f"{width}x{height} {name:34s} {r['seconds']:7.2f} s  seam {r['seam_score']:.3f}  "
                f"worst line {r['worst_line']:.2f}",
                flush=True,
            )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"steps": args.steps, "results": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""The generation pipeline at Stable Diffusion 2.1 size on a GPU (randomly initialised: speed and
memory do not depend on the weights; the pictures are noise and are not looked at).

    python -m bench.generate_gpu --json bench/results/generate_gpu.json     # on a CUDA machine
    python -m bench.generate_gpu --size tiny                                # dry run on a CPU

Components: `bench.train_gpu`'s SD-2.1-base-shaped UNet (865 M), SD's VAE and a 23-layer CLIP
text model, saved with `save_pretrained` and loaded through `AnySizePipeline.from_pretrained`
(the path real checkpoints take), then `.to(device, fp16)`; the VAE stays fp32 (force_upcast,
as SD's). Per size: seconds per image with guidance (stage 1 at the nearest 512 bucket, stage 2
FSTD at the exact size, tiled VAE), UNet samples/s, peak GPU memory; and 4 images of 1024^2
packed into one `generate_many` call against one at a time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SIZES = {"sd21": [1024, 2048, 4096], "tiny": [128, 256]}


def build_pipeline(size: str, folder: Path, device: torch.device, dtype: torch.dtype):
    from asd_models.pipeline import AnySizePipeline
    from asd_models.tiny_model import save_components
    from bench.train_gpu import components

    c = components(size)
    save_components(
        {
            "unet": c.unet,
            "vae": c.vae,
            "text_encoder": c.text_encoder,
            "tokenizer": c.tokenizer,
            "scheduler": c.scheduler,
        },
        folder,
    )
    del c
    return AnySizePipeline.from_pretrained(folder).to(device, dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(pipe, reqs, steps: int, device: torch.device) -> dict:
    sampler = pipe.default_sampler()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    results = pipe.generate_many(reqs, sampler)
    sync(device)
    seconds = time.perf_counter() - t0
    evals = sum(r.unet_evals for r in results)
    return {
        "seconds": round(seconds, 3),
        "seconds_per_image": round(seconds / len(reqs), 3),
        "unet_samples_per_s": round(evals / seconds, 1),
        "unet_evals": evals,
        "fstd_tiles": sum(r.fstd_tiles for r in results),
        "tile_batch_size": sampler.tile_batch_size,
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "sizes_ok": all(r.image.size == (q.width, q.height) for r, q in zip(results, reqs, strict=True)),
    }


def main() -> None:
    from asd_models.devices import resolve_device
    from asd_models.pipeline import RenderRequest

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size", choices=sorted(SIZES), default="sd21", help="sd21: SD-2.1-base-sized; tiny: a dry run"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per stage")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pipe = build_pipeline(args.size, Path(tmp) / "model", device, dtype)
        print(
            f"built and loaded {args.size} pipeline on {pipe.device} ({pipe.dtype}) in "
            f"{time.perf_counter() - t0:.1f} s; UNet {sum(p.numel() for p in pipe.c.unet.parameters()) / 1e6:.0f} M"
        )
        warm = SIZES[args.size][0]
        run_one(
            pipe, [RenderRequest("warm-up", warm, warm, steps=2, guidance_scale=args.guidance)], 2, device
        )
        for side in SIZES[args.size]:
            req = RenderRequest(
                "a lighthouse at dusk", side, side, seed=1, steps=args.steps, guidance_scale=args.guidance
            )
            # first call: every new tile shape pays its one-time kernel selection; second: steady state
            cold = run_one(pipe, [req], args.steps, device)
            row = {
                "config": f"{side}x{side}",
                **run_one(pipe, [req], args.steps, device),
                "cold_seconds": cold["seconds"],
            }
            rows.append(row)
            print(row, flush=True)
        side = SIZES[args.size][0]
        reqs = [
            RenderRequest(f"prompt {i}", side, side, seed=i, steps=args.steps, guidance_scale=args.guidance)
            for i in range(4)
        ]
        pipe.generate_many(reqs, pipe.default_sampler())  # warm the packed shapes too
        alone = [run_one(pipe, [r], args.steps, device) for r in reqs]
        packed = run_one(pipe, reqs, args.steps, device)
        alone_s = sum(a["seconds"] for a in alone)
        rows.append(
            {
                "config": f"4 x {side}^2 one at a time",
                "seconds": round(alone_s, 3),
                "seconds_per_image": round(alone_s / 4, 3),
            }
        )
        rows.append(
            {
                "config": f"4 x {side}^2 packed",
                **packed,
                "speedup_vs_one_at_a_time": round(alone_s / packed["seconds"], 2),
            }
        )
        print(rows[-2], rows[-1], sep="\n", flush=True)
    print(
        "\n| config | s/image | first call s | UNet samples/s | peak GPU GB | tile batch |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['config']} | {r['seconds_per_image']} | {r.get('cold_seconds', '')} | "
            f"{r.get('unet_samples_per_s', '')} | {r.get('peak_gpu_memory_gb', '')} | {r.get('tile_batch_size', '')} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        info = {
            "device": str(device),
            "dtype": str(dtype),
            "size": args.size,
            "steps": args.steps,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        }
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

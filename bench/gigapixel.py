"""Gigapixel outputs: seconds and peak resident memory per stage at 4096^2, 8192^2 and 16384^2.

    python -m bench.gigapixel [--sizes 4096,8192,16384] [--steps 4] [--json PATH]

Each size runs in its own process (its peak RSS is its own). The model is the tiny SD-shaped one
built in code (random weights: time and memory do not depend on them), saved and loaded through
`from_pretrained`. Stages: stage 1 (ARAD at the nearest bucket), canvas (stage 2's enlarged
canvas, made and encoded tile by tile), FSTD steps, decode (tiled VAE into a memory-mapped
array), encode (PNG streamed to a file) and pyramid (Deep Zoom tiles). The peak of each stage is
measured from its start (/proc/self/clear_refs), and includes the pages of the memory-mapped
output the process has touched, which the kernel counts as resident.

Target: peak RSS at 16384^2 <= 1.5 x peak RSS at 4096^2 + the 16384^2 output array (768 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ["arad", "canvas", "fstd", "decode", "encode", "pyramid"]


def model_dir() -> Path:
    from asd_models.tiny_model import build_tiny_components, save_components

    folder = HERE / ".cache" / "tiny-gigapixel"
    if not (folder / "model_index.json").is_file():
        save_components(build_tiny_components(seed=0), folder)
    return folder


def run_one(size: int, steps: int, model: str) -> dict:
    """Worker: one size, every stage timed with its own peak RSS."""
    import torch

    from asd_models.large_images import write_deep_zoom, write_png_stream
    from asd_models.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
    from asd_models.pipeline import AnySizePipeline, RenderRequest

    torch.set_num_threads(os.cpu_count() or 1)
    pipe = AnySizePipeline.from_pretrained(model)
    stages: dict[str, dict[str, float]] = {}
    current = {"name": None, "t0": 0.0}

    def on_stage(name: str) -> None:
        now = time.perf_counter()
        if current["name"]:
            stages[current["name"]] = {"seconds": round(now - current["t0"], 2), "peak_rss_mb": peak_rss_mb()}
        if name != "done":
            reset_peak_rss()
            current.update(name=name, t0=time.perf_counter())

    base = current_rss_mb()
    res = pipe.generate_many(
        [RenderRequest("a gigapixel valley", size, size, seed=0, steps=steps)],
        on_stage=on_stage,
        memmap_pixels=64_000_000,
    )[0]
    with tempfile.TemporaryDirectory(prefix="asd-gigapixel-") as tmp:
        on_stage("encode")
        with open(Path(tmp) / "out.png", "wb") as f:
            write_png_stream(res.pixels, f)
        on_stage("pyramid")
        write_deep_zoom(res.pixels, Path(tmp) / "dz", "out")
        on_stage("done")
        png_mb = (Path(tmp) / "out.png").stat().st_size / 2**20
        tiles = sum(1 for _ in (Path(tmp) / "dz" / "out_files").rglob("*.jpeg"))
    return {
        "size": size,
        "steps": steps,
        "model_rss_mb": base,
        "stages": stages,
        "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
        "output_array_mb": round(size * size * 3 / 2**20, 1),
        "memmapped": size * size > 64_000_000,
        "png_mb": round(png_mb, 1),
        "dzi_tiles": tiles,
        "fstd_tiles": res.fstd_tiles,
        "seconds": round(sum(s["seconds"] for s in stages.values()), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096,8192,16384", help="square output sides, pixels")
    ap.add_argument(
        "--steps", type=int, default=4, help="denoising steps (stage 2 runs strength 0.6 of them)"
    )
    ap.add_argument("--json", default="bench/results/gigapixel.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_one(**json.loads(args.worker))))
        return
    model = model_dir()
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        spec = json.dumps({"size": size, "steps": args.steps, "model": str(model)})
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "bench.gigapixel", "--worker", spec],
            capture_output=True,
            text=True,
            cwd=HERE.parent,
        )
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"bench worker failed at {size}x{size}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        _write(
            args.json, args.steps, results, None
        )  # after every size: a long run stopped early keeps its rows
        print(
            f"  {size}x{size}: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
            f"({time.time() - t0:.0f} s with start-up)",
            flush=True,
        )
    print(
        f"\n{'size':>12s} "
        + " ".join(f"{s + ' s':>10s} {s + ' MB':>11s}" for s in STAGES)
        + f" {'peak MB':>8s} {'array MB':>8s}"
    )
    for r in results:
        cells = " ".join(
            f"{r['stages'][s]['seconds']:>10.1f} {r['stages'][s]['peak_rss_mb']:>11.0f}" for s in STAGES
        )
        print(
            f"{r['size']:>5d}x{r['size']:<6d} {cells} {r['peak_rss_mb']:>8.0f} {r['output_array_mb']:>8.0f}"
        )
    target = None
    by = {r["size"]: r for r in results}
    if 4096 in by and 16384 in by:
        limit = 1.5 * by[4096]["peak_rss_mb"] + by[16384]["output_array_mb"]
        target = {
            "peak_16384_mb": by[16384]["peak_rss_mb"],
            "limit_mb": round(limit, 1),
            "met": by[16384]["peak_rss_mb"] <= limit,
        }
        print(
            f"\ntarget: peak RSS at 16384^2 {target['peak_16384_mb']:.0f} MB <= 1.5 x peak at 4096^2 + output "
            f"array = {limit:.0f} MB: {'met' if target['met'] else 'NOT met'}"
        )
    _write(args.json, args.steps, results, target)
    print(f"wrote {args.json}")


def _write(path: str, steps: int, results: list[dict], target: dict | None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"steps": steps, "results": results, "target": target}, indent=2))


if __name__ == "__main__":
    main()

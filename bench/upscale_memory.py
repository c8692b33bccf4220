"""Peak memory of a large upscale, as the model draws it and back-projected: one demo photo
(centre square of `--side`) enlarged `--scale` times through the memory-mapped path, each arm in a
fresh process (peak RSS is a process's high-water mark), the demo's model (bench.upscale's).

    python -m bench.upscale_memory [--side 1024 --scale 8 --steps 2] [--json bench/results/upscale-memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

from bench.report import child_arm, table, write_json

ARMS = ("none", "backproject")


def arm(fidelity: str, side: int, scale: int, steps: int) -> dict:
    """One upscale in this process: seconds, and peak RSS before and after."""
    from artifact_store import ArtifactStore
    from asd_models.pipeline import AnySizePipeline, RenderRequest
    from bench.upscale import STORE, centre_square, photos, trained_model
    from tasks.model_cache import local_model_dir

    pipe = AnySizePipeline.from_pretrained(local_model_dir(ArtifactStore(str(STORE)), trained_model()))
    image = centre_square(photos()[0], side)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = pipe.upscale_many(
        [RenderRequest("a photo", side * scale, side * scale, seed=0, steps=steps, strength=0.3)],
        [image],
        fidelity=fidelity,
    )[0]
    return {
        "fidelity": fidelity,
        "output": f"{side * scale}x{side * scale}",
        "seconds": time.perf_counter() - t0,
        "memory_mapped": type(res.pixels).__name__ == "memmap",
        "peak_rss_mb_before": before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--scale", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one arm, in a child process
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    if args.arm:
        print(json.dumps(arm(args.arm, args.side, args.scale, args.steps)))
        return
    rows = [
        child_arm(
            "bench.upscale_memory",
            "--arm",
            fidelity,
            "--side",
            str(args.side),
            "--scale",
            str(args.scale),
            "--steps",
            str(args.steps),
        )
        for fidelity in ARMS
    ]
    print(
        f"\none {args.side}^2 photo -> {args.side * args.scale}^2, {args.steps} steps, each arm in its own process\n"
    )
    table(
        rows,
        {
            "fidelity": "{fidelity}",
            "memory-mapped": "{memory_mapped}",
            "s": "{seconds:.1f}",
            "peak RSS MB": "{peak_rss_mb:.0f}",
            "vs none": lambda r: f"{r['peak_rss_mb'] - rows[0]['peak_rss_mb']:+.0f} MB",
        },
    )
    write_json(args.json, rows)


if __name__ == "__main__":
    main()

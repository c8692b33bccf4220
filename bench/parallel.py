"""One image by one process and by two (`--image-parallel 2`, gloo), each process one thread, on
the CPU: wall time, speed-up and peak RSS per process, and whether the pixels are the same.

    python -m bench.parallel [--width 2560] [--height 2048] [--steps 4] [--json PATH]

The default size is 2048^2-class and just past the size up to which the pipeline runs the VAE on
the whole latent (256^2 latent pixels: its mid-block attention is global, so that decode cannot
be split without changing the image); above it the canvas encode and the decode are tiled and
split between the ranks like the denoising.

The model is the tiny SD model built in code (random weights: time and memory do not depend on
them). Every arm runs in a fresh process; the two-process arm's time includes starting its ranks
and loading the model in each (what a job pays per pack). Pieces run one a call in both arms
(`tile_batch_size=1`), so the pixels must be equal bit for bit.

Target (issue "One image across every GPU"): two processes of one thread >= 1.7x one process of
one thread on a 2048^2-class image, identical pixels.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from bench.report import child_arm, table, write_json


def _peak_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def arm(kind: str, folder: str, width: int, height: int, steps: int, out: str) -> dict:
    import functools

    import numpy as np
    import torch

    from asd_models.pipeline import AnySizePipeline
    from asd_models.render_request import RenderRequest
    from tasks.image_parallel import SharedRender, pipeline_from_folder, render_shared

    torch.set_num_threads(1)
    reqs = [RenderRequest("a harbour at dusk", width, height, seed=1, steps=steps)]
    sampler_for = functools.partial(AnySizePipeline.default_sampler, tile_batch_size=1)
    t0 = time.perf_counter()
    if kind == "one":
        pipe = AnySizePipeline.from_pretrained(folder)
        res = pipe.generate_many(reqs, sampler_for(pipe), memmap_pixels=1 << 40)[0]
    else:
        spec = SharedRender(functools.partial(pipeline_from_folder, folder), sampler_for, reqs, 1 << 40)
        res = render_shared(spec, int(kind))[0]
    seconds = time.perf_counter() - t0
    np.save(out, np.asarray(res.pixels))
    ranks = _peak_mb(resource.RUSAGE_CHILDREN) if kind != "one" else None
    return {
        "processes": 1 if kind == "one" else int(kind),
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(ranks if ranks is not None else _peak_mb(resource.RUSAGE_SELF), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2560, help="the image's width in pixels")
    ap.add_argument("--height", type=int, default=2048, help="the image's height in pixels")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps")
    ap.add_argument("--json", default="bench/results/parallel.json")
    ap.add_argument("--arm", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        kind, folder, width, height, steps, out = args.arm
        print(json.dumps(arm(kind, folder, int(width), int(height), int(steps), out)))
        return
    import numpy as np

    from asd_models.families import save_tiny

    with tempfile.TemporaryDirectory(prefix="asd-bench-parallel-") as tmp:
        folder = save_tiny("sd", Path(tmp) / "model")
        rows = []
        for kind in ("one", "2"):
            out = str(Path(tmp) / f"{kind}.npy")
            size = (str(args.width), str(args.height))
            rows.append(child_arm("bench.parallel", "--arm", kind, str(folder), *size, str(args.steps), out))
        same = bool(np.array_equal(np.load(Path(tmp) / "one.npy"), np.load(Path(tmp) / "2.npy")))
    for r in rows:
        r["speedup"] = round(rows[0]["seconds"] / r["seconds"], 2)
        r["same_pixels"] = same if r["processes"] > 1 else True
    table(
        rows,
        {
            "processes (1 thread each)": "{processes}",
            "seconds": "{seconds}",
            "speed-up": "{speedup}",
            "peak RSS per process (MB)": "{peak_rss_mb}",
            "same pixels": "{same_pixels}",
        },
    )
    write_json(args.json, {"width": args.width, "height": args.height, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()

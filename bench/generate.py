"""The generation job on this machine: threads vs Dask worker processes, packed vs one image at
a time, model loads per worker, and images rendered twice after a SIGKILL and rerun.

    python -m bench.generate [--prompts 32] [--steps 4] --json bench/results/generate.json

The model is the tiny SD-shaped one, randomly initialised (speed does not depend on the
weights; the pictures are not looked at), stored as `models/tiny` in a temporary store. The
prompt manifest has 32 prompts at mixed sizes from 512 to 1920 px. Each executor row is one
`asd-generate` flow run from scratch (wall time includes starting the Dask cluster and loading
the model in each worker). Packing is measured on the pipeline: 16 prompts at 512x512, one
`generate_many` call against 16 calls.
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

SIZES = [(512, 512), (768, 512), (1024, 576), (1920, 1080), (640, 960), (1280, 720), (512, 1024), (1536, 640)]
ROOT = Path(__file__).resolve().parent.parent


def make_store(tmp: Path, n_prompts: int) -> tuple[str, Path]:
    import polars as pl

    from artifact_store import ArtifactStore
    from asd_models.tiny_model import build_tiny_components, save_components

    store_url = str(tmp / "store")
    folder = save_components(build_tiny_components(seed=0), tmp / "tiny")
    w = ArtifactStore(store_url).new_version("models", "tiny")
    w.put_dir(folder)
    w.commit()
    sizes = [SIZES[i % len(SIZES)] for i in range(n_prompts)]
    prompts = tmp / "prompts.parquet"
    pl.DataFrame(
        {
            "prompt": [f"a picture number {i}" for i in range(n_prompts)],
            "width": [s[0] for s in sizes],
            "height": [s[1] for s in sizes],
            "seed": list(range(n_prompts)),
        }
    ).write_parquet(prompts)
    return store_url, prompts


def run_flow(store_url: str, prompts_ref: str, name: str, **settings) -> dict:
    from artifact_store import ArtifactStore
    from flows.stages import generate_flow
    from tasks.generate import GenerateSettings

    t0 = time.perf_counter()
    ref = generate_flow("models/tiny", prompts_ref, name, GenerateSettings(**settings), store_url, rerun=True)
    seconds = time.perf_counter() - t0
    summary = ArtifactStore(store_url).record(ref)["summary"]
    loads = summary["model_loads_by_worker"]
    return {
        "seconds": round(seconds, 2),
        "images": summary["images_ok"],
        "images_per_s": round(summary["images_ok"] / seconds, 3),
        "workers": len(loads),
        "model_loads": sum(loads.values()),
        "max_loads_per_worker": max(loads.values()),
    }


def packing(steps: int, n: int = 16) -> dict:
    from asd_models.pipeline import AnySizePipeline, RenderRequest
    from asd_models.tiny_model import build_tiny_components, save_components

    with tempfile.TemporaryDirectory() as tmp:
        pipe = AnySizePipeline.from_pretrained(
            save_components(build_tiny_components(seed=0), Path(tmp) / "m")
        )
    sampler = pipe.default_sampler(tile_batch_size=64)
    reqs = [RenderRequest(f"prompt {i}", 512, 512, seed=i, steps=steps) for i in range(n)]
    pipe.generate_many(reqs[:2], sampler)  # warm-up
    t0 = time.perf_counter()
    for r in reqs:
        pipe.generate_many([r], sampler)
    alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.generate_many(reqs, sampler)
    packed = time.perf_counter() - t0
    return {
        "one_at_a_time_images_per_s": round(n / alone, 3),
        "packed_images_per_s": round(n / packed, 3),
        "speedup": round(alone / packed, 2),
    }


def kill_and_rerun(store_url: str, prompts: Path, steps: int, kill_after: int, tmp: Path) -> dict:
    from artifact_store import ArtifactStore

    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "--store",
        store_url,
        "generate",
        "--model",
        "tiny",
        "--name",
        "killed",
        "--prompts",
        str(prompts),
        "--steps",
        str(steps),
        "--shard-size",
        "4",
    ]
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home")}
    first = subprocess.run(
        cmd,
        env={**env, "ASD_FAULT_AT": f"after-image-{kill_after}"},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if second.returncode != 0:
        raise RuntimeError(second.stderr[-2000:])
    if first.returncode != -9:
        raise RuntimeError(f"the first run was not killed (exit {first.returncode}): {first.stderr[-1000:]}")
    summary = ArtifactStore(store_url).record(second.stdout.strip().splitlines()[-1])["summary"]
    rendered = kill_after + summary["images_rendered_by_this_run"]
    return {
        "killed_exit_code": first.returncode,
        "images_before_kill": kill_after,
        "rendered_by_rerun": summary["images_rendered_by_this_run"],
        "images_ok": summary["images_ok"],
        "rendered_twice": rendered - summary["images_ok"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--parts", default="executors,packing,kill", help="which measurements (comma-separated)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        os.environ["ASD_CACHE"] = str(Path(tmp) / "cache")
        store_url, prompt_file = make_store(Path(tmp), args.prompts)
        from data_engine.prompts import prompt_table
        from tasks.prompts import store_prompts

        ref = store_prompts(store_url, prompt_table(prompt_file), "bench", "bench")
        common = {"steps": args.steps, "shard_size": 4}
        if "executors" in parts:
            rows.update(executor_rows(store_url, ref, common))
        for name, r in rows.items():
            print(f"{name:28s} {r}", flush=True)
        pack = packing(args.steps) if "packing" in parts else {}
        print(f"packing, 16 x 512^2: {pack}", flush=True)
        kill = kill_and_rerun(store_url, prompt_file, args.steps, 8, Path(tmp)) if "kill" in parts else {}
        print(f"SIGKILL after 8 images, then rerun: {kill}", flush=True)
    report(rows, pack, kill, args)


def executor_rows(store_url: str, ref: str, common: dict) -> dict[str, dict]:
    rows = {"threads, 1 worker": run_flow(store_url, ref, "threads", executor="threads", workers=1, **common)}
    # one torch thread per worker (Dask's default of one thread per worker process): fan-out scaling
    rows["dask, 1 worker process"] = run_flow(
        store_url, ref, "dask1", executor="dask", workers=1, torch_threads=1, **common
    )
    rows["dask, 2 worker processes"] = run_flow(
        store_url, ref, "dask2", executor="dask", workers=2, torch_threads=1, **common
    )
    return rows


def report(rows: dict, pack: dict, kill: dict, args: argparse.Namespace) -> None:
    one, two = rows.get("dask, 1 worker process"), rows.get("dask, 2 worker processes")
    ratios = {
        "dask_2_vs_1_workers": round(two["images_per_s"] / one["images_per_s"], 2) if one and two else None,
        "packing_speedup_16x512": pack.get("speedup"),
        "rendered_twice_after_kill": kill.get("rendered_twice"),
    }
    print(
        "\n| config | images | s | images/s | workers | model loads (max per worker) |\n|---|---|---|---|---|---|"
    )
    for name, r in rows.items():
        print(
            f"| {name} | {r['images']} | {r['seconds']} | {r['images_per_s']} | {r['workers']} | "
            f"{r['model_loads']} ({r['max_loads_per_worker']}) |"
        )
    if pack:
        print(f"| 16 x 512^2 one at a time | 16 | | {pack['one_at_a_time_images_per_s']} | | |")
        print(f"| 16 x 512^2 packed | 16 | | {pack['packed_images_per_s']} | | |")
    print(f"\nratios: {ratios}  (targets: 2 workers >= 1.7x one; packing >= 1.5x; 0 rendered twice)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "prompts": args.prompts,
                    "steps": args.steps,
                    "rows": rows,
                    "packing": pack,
                    "kill_and_rerun": kill,
                    "ratios": ratios,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

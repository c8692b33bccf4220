"""Data-stage throughput: images per second and peak RSS, one process vs all cores, plus
polars bucketing of a 10-million-row manifest.

    python -m bench.ingest [--json PATH] [--images 2000] [--rows 10000000]

The folder holds generated photo-like JPEGs (smooth colour fields with texture, quality 90)
of 1-3 MP, sides 500-3000 px, aspect ratios log-uniform in 1:3.5..3.5:1 (cached under
bench/.cache). Each configuration runs in its own process on a fresh local store, so its
peak RSS is its own (`ru_maxrss` of the ingesting process; decode workers are separate spawned
processes that hold one image at a time).
The "flat memory" check runs the one-process configuration on a quarter of the folder too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


def _make_jpeg(args: tuple[Path, int]) -> None:
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    area = float(np.exp(rng.uniform(np.log(1.0e6), np.log(3.0e6))))
    ratio = float(np.exp(rng.uniform(-np.log(3.5), np.log(3.5))))
    w = int(np.clip(round(np.sqrt(area * ratio)), 500, 3000))
    h = int(np.clip(round(np.sqrt(area / ratio)), 500, 3000))
    field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    texture = rng.normal(0, 6, (256, 256, 1))
    arr = np.asarray(field, dtype=np.float32) + np.tile(texture, (h // 256 + 1, w // 256 + 1, 3))[:h, :w]
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
    path.with_suffix(".txt").write_text(f"generated photo {seed}, {w}x{h}")


def jpeg_folder(n: int) -> Path:
    folder = CACHE / f"ingest-jpegs-{n}"
    done = folder.with_name(folder.name + ".complete")  # outside: the folder is the input
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"img{i:05d}.jpg", i) for i in range(n)]
    print(f"generating {n} JPEGs in {folder} (once) ...", file=sys.stderr, flush=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_make_jpeg, jobs, chunksize=16))
    done.write_text("ok")
    return folder


def subset(folder: Path, n: int) -> Path:
    """The first `n` images of `folder`, as symlinks (same files, smaller input)."""
    out = CACHE / f"{folder.name}-first{n}"
    marker = out.with_name(out.name + ".complete")
    if not marker.is_file():
        out.mkdir(parents=True, exist_ok=True)
        for p in sorted(folder.glob("img*.jpg"))[:n]:
            for q in (p, p.with_suffix(".txt")):
                if not (out / q.name).exists():
                    (out / q.name).symlink_to(q)
        marker.write_text("ok")
    return out


def child(folder: str, workers: int, resample: str) -> None:
    """One ingest into a fresh store; prints one JSON line."""
    from artifact_store import ArtifactStore
    from tasks.ingest import IngestSettings, ingest

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        t0 = time.perf_counter()
        ref = ingest(tmp, [folder], "bench", IngestSettings(workers=workers, resample=resample))
        seconds = time.perf_counter() - t0
        from artifact_store import ArtifactStore

        summary = ArtifactStore(tmp).record(ref)["summary"]
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "ok": summary["samples_ok"], "failed": summary["samples_failed"],
                      "rss_main_mb": me}))


def run_child(folder: Path, workers: int, resample: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.ingest", "--child", str(folder), str(workers), resample],
                         capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def bucketing(rows: int) -> dict:
    import polars as pl

    from asd_models.buckets import asd_buckets
    from bench.bucketing import bucket_frame, bucket_stats

    rng = np.random.default_rng(0)
    df = pl.DataFrame({"original_width": rng.integers(64, 8000, rows, dtype=np.int32),
                       "original_height": rng.integers(64, 8000, rows, dtype=np.int32)})
    t0 = time.perf_counter()
    stats = bucket_stats(bucket_frame(df, asd_buckets(512, 64)))
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "buckets": stats.height}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    cores = len(os.sched_getaffinity(0))
    folder = jpeg_folder(args.images)
    quarter = subset(folder, args.images // 4)
    mp = [p.stat().st_size for p in sorted(folder.glob("img*.jpg"))]
    results = []
    for label, src, workers, resample in (
        ("1 process", folder, 1, "bilinear"), (f"{cores} processes", folder, cores, "bilinear"),
        (f"{cores} processes, bicubic", folder, cores, "bicubic"), ("1 process, 1/4 input", quarter, 1, "bilinear"),
    ):
        r = run_child(src, workers, resample)
        n = r["ok"] + r["failed"]
        results.append({"config": label, "images": n, "workers": workers, **r, "images_per_s": n / r["seconds"]})
    b = bucketing(args.rows)
    print(f"\ningest of generated 1-3 MP JPEGs (mean file {np.mean(mp) / 1e6:.2f} MB), {cores} cores, default options "
          "(ASD 512 table, draft decoding, bilinear, JPEG q95)\n")
    print("| config | images | s | images/s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} | "
              f"{r['rss_main_mb']:.0f} |")
    print(f"\nspeed-up {results[1]['images_per_s'] / results[0]['images_per_s']:.2f}x on {cores} cores; "
          f"RSS at 4x the input: {results[0]['rss_main_mb'] / results[3]['rss_main_mb']:.2f}x")
    print(f"polars bucketing of {b['rows']:,} rows: {b['seconds']:.2f} s ({b['buckets']} buckets)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"ingest": results, "bucketing": b, "cores": cores}, indent=2))


if __name__ == "__main__":
    main()

"""Evaluation fanned out over Dask workers: one worker against two, on the same images.

    python -m bench.evaluate [--images 200] [--json bench/results/evaluate.json]

A dataset of `--images // 2` photo-like pictures and a generations version of `--images` 256x256
pictures with tile seams (no seam scores in its manifest, as an older version: every image is
decoded and scored) are written once; then the evaluate stage runs with the whole set as its
sample (`--sample` = images: every image decoded, seam-scored, 8 patches each through the
TF-Inception) on a LocalCluster of 1 worker with 1 thread, 1 worker with every core, and 2
workers with cores / 2 threads each. Prints seconds, images/s and the ratio to 1 worker x 1
thread, and checks that every run gives the same FID/KID. The flows report to a real Prefect
server started for the run (`bench.prefect_server`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _picture(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:n].astype(float)
    field = (
        100
        + 40 * np.sin(x / (9 + seed % 7)) * np.cos(y / 17)
        + 20 * np.sin((x + y) / 7)
        + rng.normal(0, 3, (n, n))
    )
    return np.stack([field, field * 0.9 + 10, field * 0.8 + 20], axis=2)


def build(root: Path, n: int) -> tuple[str, str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from artifact_store import ArtifactStore
    from data_manifests.schemas import GENERATIONS_MANIFEST
    from tasks.ingest import IngestSettings, ingest

    store_url = str(root / "store")
    folder = root / "real"
    folder.mkdir(parents=True)
    for i in range(max(2, n // 2)):
        Image.fromarray(_picture(1000 + i, 256).clip(0, 255).astype(np.uint8)).save(folder / f"r{i}.png")
        (folder / f"r{i}.txt").write_text(f"real {i}")
    data = ingest(store_url, [str(folder)], "real", IngestSettings(bucket_base=128, bucket_step=16))
    w = ArtifactStore(store_url).new_version("generations", "fake")
    rows = []
    for i in range(n):
        arr = _picture(i, 256)
        arr[:, 128:] += 20
        key = f"{i:06d}-256x256-bench"
        w.put_bytes(f"images/{key}.png", _png(arr))
        row = {f.name: None for f in GENERATIONS_MANIFEST}
        row.update(
            key=key,
            row=i,
            prompt=f"picture {i}",
            width=256,
            height=256,
            seed=i,
            status="ok",
            image=f"images/{key}.png",
            seam_x=[128],
            seam_y=[],
            tile_px=128,
        )
        rows.append(row)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATIONS_MANIFEST), buf)
    w.put_bytes("manifest.parquet", buf.getvalue())
    return store_url, str(w.commit()), data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from distributed import LocalCluster

    from bench.prefect_server import prefect_server
    from flows.stages import evaluate_flow
    from tasks.evaluate import EvaluateSettings

    cores = len(os.sched_getaffinity(0))
    configs = [
        ("1 worker x 1 thread", 1, 1),
        (f"1 worker x {cores} threads", 1, cores),
        (f"2 workers x {max(1, cores // 2)} thread(s)", 2, max(1, cores // 2)),
    ]
    results = []
    with tempfile.TemporaryDirectory(prefix="asd-bench-eval-") as tmp, prefect_server():
        store_url, gen, data = build(Path(tmp), args.images)
        for label, workers, threads in configs:
            env = {
                "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads),
                "ASD_TORCH_THREADS": str(threads),
            }
            with LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, env=env
            ) as cluster:
                settings = EvaluateSettings(
                    sample=args.images,
                    executor="dask",
                    dask_address=cluster.scheduler_address,
                    workers=workers,
                    batch_rows=16,
                )
                t0 = time.perf_counter()
                ref = evaluate_flow(gen, data, f"bench-{workers}-{threads}", settings, store_url, rerun=True)
                seconds = time.perf_counter() - t0
            from artifact_store import ArtifactStore

            summary = ArtifactStore(store_url).record(ref)["summary"]
            results.append(
                {
                    "config": label,
                    "workers": workers,
                    "threads": threads,
                    "seconds": seconds,
                    "images_per_s": args.images / seconds,
                    "fid_patch": summary.get("fid_patch"),
                    "kid_patch": summary.get("kid_patch"),
                }
            )
    base = results[0]["seconds"]
    print(f"\nevaluate, {args.images} generated 256x256 images (all in the sample), {cores} cores\n")
    print("| config | s | images/s | vs 1 worker x 1 thread | FID (patch) | KID (patch) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['config']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} | {base / r['seconds']:.2f}x | "
            f"{r['fid_patch']:.4f} | {r['kid_patch']:.5f} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "images": args.images}, indent=2))


if __name__ == "__main__":
    main()

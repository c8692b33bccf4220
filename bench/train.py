"""ARAD training throughput on the CPU: the streaming bucketed shard loader vs an in-memory
baseline, to show the loader is not the bottleneck.

    python -m bench.train [--json PATH] [--steps 60] [--images 240]
    python -m bench.train --processes 2 [--steps 30]   # data-parallel: N processes vs one, same cores

Data: generated photo-like images in three aspect ratios, ingested once (bench/.cache) at the
demo's bucket size (ASD table, base 128, step 16). Model: the tiny SD-shaped components built
in code (UNet 2 levels, VAE factor 8; weights random: throughput does not depend on them).
Every configuration runs in its own process (its own peak RSS) with batch 8, EMA on, fp32,
and is timed over `--steps` optimizer steps after 5 untimed warm-up steps.

| config | what feeds the trainer |
|---|---|
| in-memory | every image decoded to a tensor up front, the same NovelAI draw in memory |
| stream | `make_loader` over the store's shards, decoding in the training process |
| stream, 2 workers | the same with 2 DataLoader worker processes |
| stream, cached latents | the same, each image VAE-encoded once |
| loader only | `make_loader` alone (no model), 0 and 2 workers |

`--processes N` compares instead one training process using every core (and one using one
rank's share of them) with N processes under torchrun (DDP, gloo on the CPU, cores / N threads
each, batch 8 per rank, so N x 8 samples a step), streaming from the store: samples/s of each
and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
CONFIGS = [
    "in-memory",
    "stream",
    "stream, 2 workers",
    "stream, cached latents",
    "loader only",
    "loader only, 2 workers",
]


def dataset(n: int) -> tuple[str, str]:
    from PIL import Image

    from artifact_store import ArtifactStore
    from tasks.ingest import IngestSettings, ingest

    root = CACHE / f"train-data-{n}"
    store_url = str(root / "store")
    store = ArtifactStore(store_url)
    if store.list_versions("datasets", "bench"):
        return store_url, str(store.list_versions("datasets", "bench")[-1])
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = [(384, 384), (512, 288), (288, 512)][i % 3]
        field = Image.fromarray(rng.integers(0, 255, (4, 6, 3), dtype=np.uint8)).resize(
            (w, h), Image.Resampling.BICUBIC
        )
        arr = np.asarray(field, dtype=np.float32) + rng.normal(0, 8, (h, w, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"b{i:04d}.jpg", quality=90)
        (folder / f"b{i:04d}.txt").write_text(f"a generated picture number {i}")
    ref = ingest(
        store_url, [str(folder)], "bench", IngestSettings(bucket_base=128, bucket_step=16, workers=2)
    )
    return store_url, ref


def child(config: str, steps: int, n: int) -> dict:
    import torch

    from artifact_store import ArtifactStore
    from asd_models.arad_loader import LoaderConfig, make_loader
    from asd_models.arad_training import AradTrainer
    from asd_models.images import pil_to_tensor_m11
    from asd_models.loading import load_components
    from asd_models.tiny_model import build_tiny_components, save_components
    from data_engine.dataset_reader import StoreOpener, dataset_buckets, read_bucket_samples
    from tasks.train import TrainSettings

    world = int(os.environ.get("WORLD_SIZE", "1"))
    threads = os.environ.get("BENCH_TORCH_THREADS")  # default: every process shares the same cores
    torch.set_num_threads(int(threads) if threads else max(1, len(os.sched_getaffinity(0)) // world))
    store_url, ref = dataset(n)
    store = ArtifactStore(store_url)
    buckets = dataset_buckets(store, store.resolve(ref))
    workers = 2 if "2 workers" in config else 0
    bs, warm = 8, 5
    if config.startswith("loader only"):
        it = iter(
            make_loader(
                buckets, StoreOpener(store_url, ref), LoaderConfig(batch_size=bs), num_workers=workers
            )
        )
        for _ in range(warm):
            next(it)
        t0 = time.perf_counter()
        samples = sum(len(next(it)["keys"]) for _ in range(steps))
        seconds = time.perf_counter() - t0
    else:
        base = CACHE / "tiny-base"
        if not (base / "model_index.json").is_file():
            save_components(build_tiny_components(seed=0), base)
        c = load_components(base)
        cfg = TrainSettings(
            steps=steps + warm, batch_size=bs, ema_decay=0.9999, cache_latents="cached" in config
        ).train_config()
        trainer = AradTrainer(c, cfg)
        if config == "in-memory":
            data = read_bucket_samples(store, ref)
            pixels = {b: torch.cat([pil_to_tensor_m11(img) for img, _ in items]) for b, items in data.items()}
            caps = {b: [cap for _, cap in items] for b, items in data.items()}

            def batches():
                for b, idx in bucket_batches({b: len(v) for b, v in caps.items()}, bs, 0):
                    yield {
                        "bucket": b,
                        "pixels": pixels[b][idx],
                        "captions": [caps[b][i] for i in idx],
                        "keys": [f"{b}/{i}" for i in idx],
                    }

            it = batches()
        else:
            it = iter(
                make_loader(
                    buckets, StoreOpener(store_url, ref), LoaderConfig(batch_size=bs), num_workers=workers
                )
            )
        counted = []

        def counting():
            for batch in it:
                counted.append(len(batch["captions"]))
                yield batch

        stream = counting()
        trainer.train(stream, until_step=warm)
        done_warm = len(counted)
        trainer.accelerator.wait_for_everyone()
        t0 = time.perf_counter()
        trainer.train(stream)
        trainer.accelerator.wait_for_everyone()
        seconds = time.perf_counter() - t0
        samples = sum(counted[done_warm:]) * world  # every rank draws as many
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "config": config,
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "peak_rss_mb": rss,
        "processes": world,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--processes", type=int, default=0, help="compare N data-parallel processes with one")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        out = child(args.child, args.steps, args.images)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(out))
        return
    dataset(args.images)  # build once, outside the timed processes
    if args.processes:
        data_parallel(args)
        return
    results = []
    for config in CONFIGS:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.train",
                "--child",
                config,
                "--steps",
                str(args.steps),
                "--images",
                str(args.images),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        if out.returncode:
            raise SystemExit(f"{config} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]["samples_per_s"]
    print(
        f"\nARAD training throughput, tiny model, batch 8, {args.steps} steps, {len(os.sched_getaffinity(0))} cores\n"
    )
    print("| config | samples | s | samples/s | vs in-memory | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['config']} | {r['samples']} | {r['seconds']:.1f} | {r['samples_per_s']:.1f} | "
            f"{r['samples_per_s'] / base:.2f}x | {r['peak_rss_mb']:.0f} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "steps": args.steps}, indent=2))


def data_parallel(args: argparse.Namespace) -> None:
    """One process on every core, and one process on one rank's share of the cores, against
    `--processes` DDP processes on the same cores."""
    from bench.harness import free_port

    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // args.processes)
    runs = []
    for n, threads in ((1, cores), (1, share), (args.processes, share)):
        launcher = (
            []
            if n == 1
            else [
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(n),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(free_port()),
            ]
        )
        cmd = [
            sys.executable,
            *launcher,
            "-m",
            "bench.train",
            "--child",
            "stream",
            "--steps",
            str(args.steps),
            "--images",
            str(args.images),
        ]
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env={**os.environ, "TQDM_DISABLE": "1", "BENCH_TORCH_THREADS": str(threads)},
        )
        if out.returncode:
            raise SystemExit(f"{n} process(es) failed:\n{out.stderr[-3000:]}")
        runs.append({**json.loads(out.stdout.strip().splitlines()[-1]), "threads": threads})
    print(
        f"\nARAD data-parallel training, tiny model, batch 8 per process, {args.steps} steps, {cores} cores\n"
    )
    print(
        "| processes | threads each | samples | s | samples/s | vs 1 process, all cores | vs 1 process, 1 share |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['processes']} | {r['threads']} | {r['samples']} | {r['seconds']:.1f} | {r['samples_per_s']:.1f} | "
            f"{r['samples_per_s'] / runs[0]['samples_per_s']:.2f}x | {r['samples_per_s'] / runs[1]['samples_per_s']:.2f}x |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"data_parallel": runs, "steps": args.steps}, indent=2))


def bucket_batches(counts: dict[str, int], batch_size: int, seed: int) -> Iterator[tuple[str, list[int]]]:
    """In-memory twin of the shard loader's drawing scheme: endless (bucket, sample indices)
    batches, every batch from one bucket, buckets drawn in proportion to their remaining
    samples each epoch; a bucket's last partial batch is kept as a smaller batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    names = sorted(b for b, n in counts.items() if n > 0)
    if not names:
        raise ValueError("no samples in any bucket")
    while True:
        remaining = {}
        for b in names:
            idx = list(range(counts[b]))
            rng.shuffle(idx)
            remaining[b] = idx
        while any(remaining.values()):
            live = [b for b in names if remaining[b]]
            b = rng.choices(live, weights=[len(remaining[x]) for x in live])[0]
            batch, remaining[b] = remaining[b][:batch_size], remaining[b][batch_size:]
            yield b, batch


if __name__ == "__main__":
    main()

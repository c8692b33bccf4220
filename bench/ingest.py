"""Data-stage throughput: images per second of the partitioned ingest on 1 thread, N threads
and N Dask workers, against the code before it (`--baseline`: one process and its N-process
decode pool), with every run's manifest compared row for row and the new runs' shards byte for
byte; the time and peak RSS of planning a 10-million-row URL list (Parquet and CSV); polars
bucketing of a 10-million-row manifest.

    python -m bench.ingest [--json PATH] [--images 2000] [--baseline /path/to/old/checkout]

The folder holds generated photo-like JPEGs (smooth colour fields with texture, quality 90)
of 1-3 MP, sides 500-3000 px, aspect ratios log-uniform in 1:3.5..3.5:1 (cached under
bench/.cache). Each configuration runs in its own process on a fresh local store (peak RSS:
`ru_maxrss` of that driver process; Dask workers are processes of their own), after the
temporary Prefect server is up; "existing scheduler" starts a LocalCluster before the clock, as
a cluster that is already running, "started by the run" counts its start.
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
ROOT = HERE.parent
CACHE = HERE / ".cache"


def _make_jpeg(args: tuple[Path, int]) -> None:
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    area = float(np.exp(rng.uniform(np.log(1.0e6), np.log(3.0e6))))
    ratio = float(np.exp(rng.uniform(-np.log(3.5), np.log(3.5))))
    w = int(np.clip(round(np.sqrt(area * ratio)), 500, 3000))
    h = int(np.clip(round(np.sqrt(area / ratio)), 500, 3000))
    field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC
    )
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


def child(code: str, folder: str, settings: str, store: str, address_workers: int) -> None:
    """One ingest by the code at `code` into `store`; prints one JSON line. `address_workers`
    > 0: a LocalCluster of that many workers is started first and passed as `dask_address` (an
    existing scheduler, as on a cluster). The Prefect server is started before the clock."""
    sys.path.insert(0, code)
    from prefect import flow

    from artifact_store import ArtifactStore
    from tasks.ingest import IngestSettings, ingest

    flow(name="bench-warm-up")(lambda: None)()  # the temporary Prefect server, outside the timing
    opts = json.loads(settings)
    cluster = None
    if address_workers:
        from distributed import Client, LocalCluster

        from tasks.executors import current_api_url, keep_worker_heap

        keep_worker_heap()  # as task_runner_for starts its local clusters
        cluster = LocalCluster(
            n_workers=address_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={"PREFECT_API_URL": current_api_url() or ""},
        )
        with Client(cluster) as client:  # a running cluster's workers have their modules loaded
            client.run(lambda: __import__("tasks.ingest"))
        opts.update(executor="dask", dask_address=cluster.scheduler_address)
    t0 = time.perf_counter()
    ref = ingest(store, [folder], "bench", IngestSettings(**opts))
    seconds = time.perf_counter() - t0
    if cluster is not None:
        cluster.close()
    st = ArtifactStore(store)
    summary = st.record(ref)["summary"]
    tars = {k: v["sha256"] for k, v in st.iter_files(ref) if k.endswith(".tar")}
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "ok": summary["samples_ok"],
                "failed": summary["samples_failed"],
                "rss_main_mb": me,
                "ref": str(ref),
                "tars": tars,
            }
        )
    )


def run_child(code: Path, folder: Path, settings: dict, store: Path, address_workers: int = 0) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            str(code),
            str(folder),
            json.dumps(settings),
            str(store),
            str(address_workers),
        ],
        capture_output=True,
        text=True,
        cwd=str(code),
        env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(code)},
    )
    if out.returncode:
        raise SystemExit(f"ingest child failed ({settings}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


MANIFEST_COLS = [
    "key",
    "source",
    "status",
    "failed_stage",
    "bucket",
    "sha256",
    "width",
    "height",
    "crop_left",
    "crop_top",
]


def manifest(store: Path, ref: str):
    """The rows that must agree between runs, in key order."""
    import polars as pl

    sys.path.insert(0, str(ROOT))
    from artifact_store import ArtifactStore

    data = ArtifactStore(str(store)).read_bytes(ref, "manifest.parquet")
    import io

    return pl.read_parquet(io.BytesIO(data)).select(MANIFEST_COLS).sort("key")


def plan_child(path: str) -> None:
    """Plan the URL list at `path` (no download): prints time and peak RSS of this process,
    which does nothing else (the list is written by the parent)."""
    sys.path.insert(0, str(ROOT))
    from artifact_store import ArtifactStore
    from data_engine.partitions import plan_partitions
    from data_engine.sources import open_source
    from tasks.ingest import IngestSettings

    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        source = open_source(path, None, IngestSettings().source_options())
        t0 = time.perf_counter()
        fingerprint = source.fingerprint()
        t1 = time.perf_counter()
        parts = plan_partitions([source], 1000, ArtifactStore(str(Path(tmp) / "store")), "datasets/bench/v")
        t2 = time.perf_counter()
        hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
        print(
            json.dumps(
                {
                    "format": Path(path).suffix[1:],
                    "partitions": len(parts),
                    "rows": sum(p.inputs or 0 for p in parts),
                    "fingerprint_s": t1 - t0,
                    "plan_s": t2 - t1,
                    "peak_rss_mb": hwm / 1024,
                    "list_mb": Path(path).stat().st_size / 1e6,
                    "fingerprint": fingerprint[:12],
                }
            )
        )


def url_list(rows: int, fmt: str) -> Path:
    """A synthetic URL list of `rows` rows, written once (bench/.cache)."""
    path = CACHE / f"urls-{rows}.{fmt}"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"writing a {rows:,}-row {fmt} URL list (once) ...", file=sys.stderr, flush=True)
        tmp = path.with_suffix(f".partial.{fmt}")
        tmp.unlink(missing_ok=True)
        write_url_list(tmp, rows)
        tmp.rename(path)
    return path


def write_url_list(path: Path, rows: int) -> None:
    """A synthetic list of `rows` loopback URLs with captions, written a million rows at a time."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    step = 1_000_000
    writer = None
    for a in range(0, rows, step):
        ids = np.arange(a, min(rows, a + step))
        table = pa.table(
            {
                "url": [f"http://127.0.0.1:8000/img/{i}.jpg?w=640&h=480" for i in ids],
                "caption": [f"a synthetic photo number {i}, with a caption of ordinary length" for i in ids],
            }
        )
        if path.suffix == ".parquet":
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
        else:
            with open(path, "ab") as f:
                pacsv.write_csv(table, f, write_options=pacsv.WriteOptions(include_header=a == 0))
    if writer is not None:
        writer.close()


def bucketing(rows: int) -> dict:
    import polars as pl

    from asd_models.buckets import asd_buckets
    from bench.bucketing import bucket_frame, bucket_stats

    rng = np.random.default_rng(0)
    df = pl.DataFrame(
        {
            "original_width": rng.integers(64, 8000, rows, dtype=np.int32),
            "original_height": rng.integers(64, 8000, rows, dtype=np.int32),
        }
    )
    t0 = time.perf_counter()
    stats = bucket_stats(bucket_frame(df, asd_buckets(512, 64)))
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "buckets": stats.height}


def plan_lists(rows: int) -> list[dict]:
    plans = []
    for fmt in ("parquet", "csv") if rows else ():
        path = url_list(rows, fmt)
        print(f"planning {path.name} ...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--plan-child", str(path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=str(ROOT),
        )
        plans.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return plans


def print_plans(plans: list[dict]) -> None:
    print("\n| URL list | rows | MB | fingerprint s | plan s | partitions | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for p in plans:
        print(
            f"| {p['format']} | {p['rows']:,} | {p['list_mb']:.0f} | {p['fingerprint_s']:.1f} | {p['plan_s']:.1f} | "
            f"{p['partitions']} | {p['peak_rss_mb']:.0f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows of the bucketing check")
    ap.add_argument(
        "--plan-rows", type=int, default=10_000_000, help="rows of the URL list planned (0: skip)"
    )
    ap.add_argument("--partition-inputs", type=int, default=100)
    ap.add_argument(
        "--baseline",
        default=None,
        help="a checkout of the code before partitioned ingest (its 2-process decode pool is the reference)",
    )
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--plan-child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--only-plan", action="store_true", help="only the URL-list planning (its rows of --json replaced)"
    )
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], args.child[3], int(args.child[4]))
        return
    if args.plan_child:
        plan_child(args.plan_child)
        return
    if args.only_plan:
        plans = plan_lists(args.plan_rows)
        print_plans(plans)
        if args.json:
            doc = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
            Path(args.json).write_text(json.dumps({**doc, "plan": plans}, indent=2))
        return
    cores = len(os.sched_getaffinity(0))
    folder = jpeg_folder(args.images)
    mp = [p.stat().st_size for p in sorted(folder.glob("img*.jpg"))]
    part = {"partition_inputs": args.partition_inputs}
    configs: list[tuple[str, Path, dict, int]] = []
    if args.baseline:
        configs.append(("base: 1 process", Path(args.baseline), {"workers": 1}, 0))
        configs.append((f"base: {cores}-process pool", Path(args.baseline), {"workers": cores}, 0))
    configs += [
        ("1 thread", ROOT, {**part, "workers": 1}, 0),
        (f"{cores} threads", ROOT, {**part, "workers": cores}, 0),
        (f"{cores} Dask workers (existing scheduler)", ROOT, {**part, "workers": cores}, cores),
        (
            f"{cores} Dask workers (LocalCluster started by the run)",
            ROOT,
            {**part, "workers": cores, "executor": "dask"},
            0,
        ),
    ]
    results, manifests = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        for i, (label, code, settings, address_workers) in enumerate(configs):
            store = Path(tmp) / f"store{i}"
            print(f"{label} ...", file=sys.stderr, flush=True)
            r = run_child(code, folder, settings, store, address_workers)
            manifests[label] = manifest(store, r["ref"])
            n = r["ok"] + r["failed"]
            results.append(
                {
                    "config": label,
                    "images": n,
                    **{k: v for k, v in r.items() if k != "tars"},
                    "images_per_s": n / r["seconds"],
                    "shards": len(r["tars"]),
                    "_tars": r["tars"],
                }
            )
    first = manifests[results[0]["config"]]
    ref_pool = next((r for r in results if "pool" in r["config"]), None)
    new = [r for r in results if not r["config"].startswith("base")]
    for r in results:
        r["manifest_equal"] = manifests[r["config"]].equals(first)
        r["shards_equal_1_thread"] = (
            r["_tars"] == new[0]["_tars"] if not r["config"].startswith("base") else None
        )
        r["vs_pool"] = r["images_per_s"] / ref_pool["images_per_s"] if ref_pool else None
    for r in results:
        del r["_tars"]
    plans = plan_lists(args.plan_rows)
    b = bucketing(args.rows)
    print(
        f"\ningest of {args.images} generated 1-3 MP JPEGs (mean file {np.mean(mp) / 1e6:.2f} MB), {cores} cores, "
        f"default options (ASD 512 table, draft decoding, bilinear, JPEG q95), partition_inputs "
        f"{args.partition_inputs}\n"
    )
    print(
        "| config | images | s | images/s | vs base pool | peak RSS MB (driver) | shards | manifest = first row | "
        "shards = 1 thread |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        vs = f"{r['vs_pool']:.2f}x" if r["vs_pool"] else "-"
        same = "-" if r["shards_equal_1_thread"] is None else ("yes" if r["shards_equal_1_thread"] else "NO")
        print(
            f"| {r['config']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} | {vs} | "
            f"{r['rss_main_mb']:.0f} | {r['shards']} | {'yes' if r['manifest_equal'] else 'NO'} | {same} |"
        )
    if plans:
        print_plans(plans)
    print(f"\npolars bucketing of {b['rows']:,} rows: {b['seconds']:.2f} s ({b['buckets']} buckets)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        if not plans and Path(args.json).is_file():  # --plan-rows 0: the planning rows measured before stay
            plans = json.loads(Path(args.json).read_text()).get("plan", [])
        Path(args.json).write_text(
            json.dumps(
                {
                    "ingest": results,
                    "plan": plans,
                    "bucketing": b,
                    "cores": cores,
                    "partition_inputs": args.partition_inputs,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

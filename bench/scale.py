"""A million images: the generation job and the store at scale, with a stand-in renderer.

    python -m bench.scale --sizes 10000,100000 [--s3] [--baseline TREE] --json bench/results/scale.json

The renderer is replaced by a stand-in that returns a fixed 64x64 picture at once (no UNet):
everything else is the real thing: the `asd-generate` flow and its shard tasks, PNG encoding,
seam heat-maps, the store's writes, the commit, and the readers. Every step runs in a fresh
process (`--child`), so its peak RSS is its own. `--baseline TREE` runs the same steps with the
code of another checkout (e.g. `git worktree add /tmp/base <commit>`), side by side. `--s3`
runs on moto's S3 server in this process and counts the requests each step makes.

Steps, for each size N: a fresh job (time, flow peak RSS, commit record / manifest / file-list
sizes); a job killed at N/2 images, then `gc` with it abandoned and the rerun that resumes it;
a cold open of one file in a fresh process; `ls` and the reuse lookup; `verify` (full, and
`--shallow` where the code has it); a dashboard build; the evaluate stage (a sample of 200). Slopes per image are fitted over the
sizes and extrapolated to 10M.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.harness import S3Requests

ROOT = Path(__file__).resolve().parent.parent
SIDE = 64
WDS_CHUNK_ROWS = 64  # --layout webdataset: images a tar (two writes a chunk: its tar and its fragment)


# -- child steps: each in its own process, printing one JSON line --------------------------------


def _stub_pipeline() -> None:
    """Replace the model with a stand-in renderer (a fixed picture; no UNet)."""
    import numpy as np
    import torch

    import tasks.generate as gen
    from asd_models.buckets import Bucket
    from asd_models.render_request import AnySizeResult

    pixels = (np.indices((SIDE, SIDE)).sum(0) % 256).astype(np.uint8)[..., None].repeat(3, 2)

    class Stand:
        device = torch.device("cpu")

        def default_sampler(self, *a: Any, **k: Any) -> Any:
            return self  # the stand-in is its own sampler: it takes any options and ignores them

        def with_options(self, **k: Any) -> Any:
            return self

        def generate_many(self, reqs: list[Any], sampler: Any, **k: Any) -> list[AnySizeResult]:
            return [
                AnySizeResult(
                    pixels.copy(), Bucket(SIDE, SIDE), (SIDE, SIDE), SIDE, {"x": [32], "y": []}, 1, 2
                )
                for _ in reqs
            ]

    gen.cached_pipeline = lambda *a, **k: Stand()


def _rss_mb() -> float:
    """This process's own peak resident memory: VmHWM, which starts afresh at exec (ru_maxrss
    keeps the high-water mark of the parent it was forked from: the driver's, once it has read a
    large manifest)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []  # Linux only
    hwm = [int(line.split()[1]) for line in lines if line.startswith("VmHWM:")]
    return hwm[0] / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_setup(store_url: str, n: int) -> dict[str, Any]:
    import polars as pl

    from artifact_store import ArtifactStore
    from data_engine.prompts import prompt_table
    from tasks.prompts import store_prompts

    store = ArtifactStore(store_url)
    w = store.new_version("models", "stand")
    w.put_bytes("unet/config.json", json.dumps({"sample_size": 8, "block_out_channels": [32, 64]}).encode())
    w.put_bytes("vae/config.json", json.dumps({"block_out_channels": [32, 64, 64, 64]}).encode())
    model = str(w.commit())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.parquet"
        pl.DataFrame(
            {
                "prompt": [f"picture {i}" for i in range(n)],
                "width": [SIDE] * n,
                "height": [SIDE] * n,
                "seed": list(range(n)),
            }
        ).write_parquet(path)
        prompts = store_prompts(store.url, prompt_table(path), "scale", "bench")
    return {"model": model, "prompts": prompts, **child_real(store_url)}


def child_real(store_url: str) -> dict[str, Any]:
    """A small dataset of real images (20 of 64x64), for the evaluate step."""
    import numpy as np
    from PIL import Image

    from tasks.ingest import IngestSettings, ingest

    with tempfile.TemporaryDirectory() as tmp:
        real = Path(tmp)
        for i in range(20):
            arr = (np.indices((SIDE, SIDE)).sum(0) * (i + 1) % 256).astype(np.uint8)
            Image.fromarray(np.stack([arr, arr.T, 255 - arr], 2)).save(real / f"r{i}.png")
            (real / f"r{i}.txt").write_text(f"real {i}")
        return {
            "data": ingest(store_url, [str(real)], "real", IngestSettings(bucket_base=SIDE, bucket_step=16))
        }


def child_evaluate(store_url: str, gen: str, data: str) -> dict[str, Any]:
    """The evaluate stage on the job's images: a fixed sample of 200 for FID/KID (one 32 px patch
    each), seam scores of every image (from the manifest where the code stores them)."""
    from flows.stages import evaluate_flow
    from tasks.evaluate import EvaluateSettings

    t0 = time.perf_counter()
    evaluate_flow(
        gen,
        data,
        "scale",
        EvaluateSettings(sample=200, patch_size=32, patches_per_image=1),
        store_url,
        rerun=True,
    )  # measured afresh, never reused
    return {"seconds": time.perf_counter() - t0, "rss_mb": _rss_mb()}


def child_job(store_url: str, model: str, prompts: str, name: str, layout: str = "files") -> dict[str, Any]:
    _stub_pipeline()
    from flows.stages import generate_flow
    from tasks.generate import GenerateSettings

    fields = GenerateSettings.model_fields
    kw: dict[str, Any] = {"steps": 1, "workers": 2}
    if "max_job_pixels" in fields:
        kw["max_job_pixels"] = 1 << 40
    if layout != "files":
        kw["layout"] = layout
        kw["chunk_rows"] = WDS_CHUNK_ROWS
    t0 = time.perf_counter()
    ref = generate_flow(model, prompts, name, GenerateSettings(**kw), store_url)
    return {"ref": ref, "seconds": time.perf_counter() - t0, "rss_mb": _rss_mb()}


def child_open(store_url: str, ref: str, rel: str, member: list[int] | None = None) -> dict[str, Any]:
    from artifact_store import ArtifactStore

    t0 = time.perf_counter()
    store = ArtifactStore(store_url)
    data = (
        store.read_range(ref, rel, member[0], member[0] + member[1]) if member else store.read_bytes(ref, rel)
    )
    return {"seconds": time.perf_counter() - t0, "rss_mb": _rss_mb(), "bytes": len(data)}


def child_ls(store_url: str, name: str) -> dict[str, Any]:
    from artifact_store import ArtifactStore

    store = ArtifactStore(store_url)
    t0 = time.perf_counter()
    versions = store.list_versions("generations", name)
    for v in versions:
        rec = store.record(v)
        rec.get("file_count", len(rec["files"]))
    t_ls = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.find_by_input_hash("generations", name, "no-such-hash")
    return {
        "ls_seconds": t_ls,
        "lookup_seconds": time.perf_counter() - t0,
        "versions": len(versions),
        "rss_mb": _rss_mb(),
    }


def child_verify(store_url: str, ref: str, shallow: bool) -> dict[str, Any]:
    from artifact_store import ArtifactStore

    store = ArtifactStore(store_url)
    t0 = time.perf_counter()
    try:
        problems = store.verify(ref, shallow=True) if shallow else store.verify(ref)
    except TypeError:
        return {"skipped": "no shallow verify in this code"}
    return {"seconds": time.perf_counter() - t0, "problems": len(problems), "rss_mb": _rss_mb()}


def child_gc(store_url: str) -> dict[str, Any]:
    from artifact_store import ArtifactStore

    t0 = time.perf_counter()
    found = ArtifactStore(store_url).gc(grace_s=0)
    return {"seconds": time.perf_counter() - t0, "found": len(found), "rss_mb": _rss_mb()}


def child_dashboard(store_url: str) -> dict[str, Any]:
    from artifact_store import ArtifactStore
    from dashboard.build import build_site

    t0 = time.perf_counter()
    build_site(ArtifactStore(store_url), thumb_px=64, max_images=50)
    return {"seconds": time.perf_counter() - t0, "rss_mb": _rss_mb()}


def child_sizes(store_url: str, ref: str) -> dict[str, Any]:
    from artifact_store import ArtifactStore

    store = ArtifactStore(store_url)
    rec = store.record(ref)
    record_bytes = store.record_size(ref)
    lists = sum(p["size"] for p in rec.get("file_lists") or [])
    return {
        "record_bytes": record_bytes,
        "manifest_bytes": rec["files"]["manifest.parquet"]["size"],
        "file_list_bytes": lists,
        "files": rec.get("file_count", len(rec["files"])),
    }


CHILDREN = {
    "evaluate": child_evaluate,
    "real": child_real,
    "setup": child_setup,
    "job": child_job,
    "open": child_open,
    "ls": child_ls,
    "verify": child_verify,
    "gc": child_gc,
    "dashboard": child_dashboard,
    "sizes": child_sizes,
}


# -- the driver ---------------------------------------------------------------------------------


def run_child(
    tree: Path, env: dict[str, str], step: str, *args: Any, expect_kill: bool = False
) -> dict[str, Any]:
    me = str(Path(__file__).resolve())  # this script, run with `tree`'s code first on the path
    cmd = [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(tree)!r}); sys.argv = sys.argv[1:]; "
        f"exec(compile(open({me!r}).read(), {me!r}, 'exec'), {{'__name__': '__main__', '__file__': {me!r}}})",
        "bench.scale",
        "--child",
        step,
        *[json.dumps(a) for a in args],
    ]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        # files, not pipes: a server the child started must not keep this process waiting
        proc = subprocess.run(cmd, cwd=tree, env=env, stdout=out_f, stderr=err_f, text=True, timeout=6 * 3600)
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    wall = time.perf_counter() - t0
    if expect_kill:
        return {"seconds": wall, "killed": proc.returncode == -9}
    if proc.returncode != 0:
        raise RuntimeError(f"{step} failed ({proc.returncode}):\n{stderr[-3000:]}")
    out = json.loads(stdout.strip().splitlines()[-1])
    out.setdefault("wall", wall)
    return out


def bench_tree(
    label: str,
    tree: Path,
    n: int,
    s3: bool,
    requests: S3Requests | None,
    base_env: dict[str, str],
    layout: str = "files",
    skip: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"asd-scale-{label}-{n}-"))
    env = {
        **base_env,
        "PREFECT_HOME": str(tmp / "prefect"),
        "ASD_CACHE": str(tmp / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    if s3:
        import boto3

        bucket = f"scale-{label}-{n}".lower()
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        client.create_bucket(Bucket=bucket)
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        url = f"s3://{bucket}/store"
    else:
        url = str(tmp / "store")
    row: dict[str, Any] = {
        "code": label if layout == "files" else f"{label} ({layout})",
        "images": n,
        "store": "s3" if s3 else "folder",
    }

    def step(name: str, *args: Any, **kw: Any) -> dict[str, Any]:
        before = requests.snapshot() if requests else {}
        out = run_child(tree, env, name, *args, **kw)
        if requests:
            out["requests"] = requests.since(before, requests.snapshot())
        print(f"  {label} {n} {name}: {json.dumps(out)[:300]}", flush=True)
        return out

    ids = step("setup", url, n)
    job_args = [layout] if layout != "files" else []
    row["job"] = step("job", url, ids["model"], ids["prompts"], "scale", *job_args)
    ref = row["job"]["ref"]
    row["sizes"] = step("sizes", url, ref)
    row["open"] = step("open", url, ref, "manifest.parquet")
    import pyarrow.parquet as pq

    from artifact_store import ArtifactStore

    with ArtifactStore(url).open(ref, "manifest.parquet") as f:  # this code reads either layout
        pf = pq.ParquetFile(f)
        cols = [c for c in ("image", "shard", "shard_offset", "shard_size") if c in pf.schema_arrow.names]
        middle = pf.read(columns=cols).slice(n // 2, 1).to_pylist()[0]
    if middle.get("shard"):  # a member of a tar shard: one ranged read
        row["open_image"] = step(
            "open", url, ref, middle["shard"], [middle["shard_offset"], middle["shard_size"]]
        )
    else:
        row["open_image"] = step("open", url, ref, middle["image"])
    row["ls"] = step("ls", url, "scale")
    if "verify" not in skip:
        row["verify"] = step("verify", url, ref, False)
    row["verify_shallow"] = step("verify", url, ref, True)
    row["dashboard"] = step("dashboard", url)
    if "evaluate" not in skip:
        row["evaluate"] = step("evaluate", url, ref, ids["data"])
    if "resume" not in skip:  # a job killed half-way, gc while it is abandoned, the rerun that resumes it
        env_kill = {**env, "ASD_FAULT_AT": f"after-image-{n // 2}"}
        env, saved = env_kill, env
        row["killed"] = step("job", url, ids["model"], ids["prompts"], "resume", *job_args, expect_kill=True)
        env = saved
        row["gc"] = step("gc", url)
        row["resume"] = step("job", url, ids["model"], ids["prompts"], "resume", *job_args)
    return row


def fit(rows: list[dict[str, Any]], path: tuple[str, ...]) -> tuple[float, float] | None:
    """Least-squares seconds = a + b * images over the sizes measured: (a, b)."""
    pts = []
    for r in rows:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, int | float):
            pts.append((r["images"], float(v)))
    if len(pts) < 2:
        return None
    xs, ys = zip(*pts, strict=True)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in pts) / max(1e-12, sum((x - mx) ** 2 for x in xs))
    return my - b * mx, b


METRICS = [
    ("job s", ("job", "seconds")),
    ("job RSS MB", ("job", "rss_mb")),
    ("record KB", ("sizes", "record_bytes")),
    ("manifest KB", ("sizes", "manifest_bytes")),
    ("open image s", ("open_image", "seconds")),
    ("open image RSS MB", ("open_image", "rss_mb")),
    ("ls s", ("ls", "ls_seconds")),
    ("lookup s", ("ls", "lookup_seconds")),
    ("verify s", ("verify", "seconds")),
    ("verify shallow s", ("verify_shallow", "seconds")),
    ("gc s", ("gc", "seconds")),
    ("resume s", ("resume", "seconds")),
    ("dashboard s", ("dashboard", "seconds")),
    ("dashboard RSS MB", ("dashboard", "rss_mb")),
    ("evaluate s", ("evaluate", "seconds")),
    ("evaluate RSS MB", ("evaluate", "rss_mb")),
]


def table(rows: list[dict[str, Any]]) -> str:
    def get(r: dict[str, Any], path: tuple[str, ...]) -> Any:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, float | int) and path[-1].endswith("bytes"):
            return f"{v / 1024:.0f}"
        return f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v))

    head = ["code", "store", "images", *[m for m, _ in METRICS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join([r["code"], r["store"], str(r["images"]), *[get(r, p) for _, p in METRICS]])
            + " |"
        )
    for label in sorted({r["code"] for r in rows}):
        for store in sorted({r["store"] for r in rows}):
            sub = [r for r in rows if r["code"] == label and r["store"] == store]
            fits = []
            for m, p in METRICS:
                f = fit(sub, p)
                if f and not p[-1].endswith("bytes"):
                    unit = "MB" if m.endswith("MB") else "s"
                    at_10m = f[0] + f[1] * 1e7
                    largest = max(r["images"] for r in sub)
                    if abs(f[1] * largest) < 0.2 * abs(f[0] + f[1] * largest):  # within noise of flat
                        fits.append(f"{m}: flat (~{f[0] + f[1] * largest:.3g} {unit})")
                    else:
                        fits.append(f"{m}: {f[1] * 1e3:+.3g} {unit}/1k images, 10M -> {at_10m:.3g} {unit}")
            if fits:
                lines.append(f"\nfitted ({label}, {store}): " + "; ".join(fits))
    if any(r.get("job", {}).get("requests") for r in rows):
        lines.append("\nS3 requests by step:")
        for r in rows:
            if r["store"] == "s3":
                reqs = {
                    k: r[k].get("requests")
                    for k in (
                        "job",
                        "open_image",
                        "ls",
                        "verify",
                        "verify_shallow",
                        "gc",
                        "resume",
                        "dashboard",
                    )
                    if isinstance(r.get(k), dict)
                }
                lines.append(f"- {r['code']} {r['images']}: {json.dumps(reqs)}")
    return "\n".join(lines)


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        step, args = sys.argv[i + 1], [json.loads(a) for a in sys.argv[i + 2 :]]
        if step in (
            "setup",
            "job",
            "evaluate",
            "real",
        ):  # they run flows (the readers import no Prefect: their RSS is their own)
            from flows.server_guard import tie_temporary_server_to_this_process

            tie_temporary_server_to_this_process()  # Prefect's temporary server ends with this process
        print(json.dumps(CHILDREN[step](*args)), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000", help="images per job, comma-separated")
    ap.add_argument("--s3", action="store_true", help="on moto's S3 server, counting requests")
    ap.add_argument("--baseline", help="another checkout to run side by side (e.g. a git worktree)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument(
        "--layout",
        default="files",
        choices=["files", "webdataset", "both"],
        help="the new code's output layout (both: one row each); a baseline runs its own",
    )
    ap.add_argument(
        "--skip", default="", help="steps to leave out, comma-separated (e.g. verify,resume at 1M)"
    )
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    env = dict(os.environ)
    requests = None
    if args.s3:
        from moto.server import ThreadedMotoServer

        from bench.harness import S3Requests, free_port

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        env.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        os.environ.update(
            {
                k: env[k]
                for k in (
                    "AWS_ENDPOINT_URL",
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                    "AWS_DEFAULT_REGION",
                )
            }
        )
        requests = S3Requests()
    trees = [("new", ROOT)] + ([("base", Path(args.baseline).resolve())] if args.baseline else [])
    rows = []
    layouts = ["files", "webdataset"] if args.layout == "both" else [args.layout]
    skip = frozenset(x for x in args.skip.split(",") if x)
    for n in sizes:
        for label, tree in trees:
            for layout in layouts if label == "new" else ["files"]:
                rows.append(bench_tree(label, tree, n, args.s3, requests, env, layout, skip))
    text = table(rows)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "table": text}, indent=2, default=str))


if __name__ == "__main__":
    main()

"""`asd`: the command line. Each subcommand runs a flow or reads the store."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torchvision-fallback chatter
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _quiet_library_bars() -> None:
    """Weight loading bars of diffusers/transformers say nothing to a pipeline user."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()

DEMO_INGEST = {"bucket_base": 128, "bucket_step": 16, "min_side": 64}
DEMO_TRAIN = {"base_model": "tiny", "vae_steps": 400, "steps": 1000, "batch_size": 8, "learning_rate": 1e-3,
              "cache_latents": True, "ema_decay": 0.999, "checkpoint_every": 0}
QUICK_TRAIN = {"base_model": "tiny", "vae_steps": 20, "steps": 20, "batch_size": 4, "learning_rate": 1e-3,
               "cache_latents": True, "checkpoint_every": 0}
DEMO_GENERATE = {"steps": 20, "guidance_scale": 4.0, "strength": 0.6, "shard_size": 3}


def _ref(text: str, kind: str) -> str:
    """Accept NAME, NAME@VERSION or KIND/NAME@VERSION."""
    return text if text.startswith(f"{kind}/") else f"{kind}/{text}"


def _print_metrics(store, ref: str) -> None:
    import polars as pl

    df = pl.read_parquet(io.BytesIO(store.read_bytes(ref, "metrics.parquet")))
    df = df.filter(~pl.col("metric").str.contains("/"))
    with pl.Config(tbl_rows=50, fmt_str_lengths=90, tbl_width_chars=160, tbl_hide_dataframe_shape=True):
        print(df)


def cmd_demo(args: argparse.Namespace) -> int:
    from data_manifests.demo import demo_prompts, materialize_demo_photos
    from flows.params import EvaluateSettings, GenerateSettings, IngestSettings, PromptSpec, TrainSettings
    from flows.pipeline_flow import asd_pipeline
    from tasks.store import ArtifactStore

    store = ArtifactStore(args.store)
    print(f"asd demo: store {store.url}", flush=True)
    with tempfile.TemporaryDirectory(prefix="asd-demo-photos-") as tmp:
        folder = materialize_demo_photos(Path(tmp) / "photos")
        prompts = [PromptSpec(**p) for p in demo_prompts()]
        if args.quick:
            prompts = [PromptSpec(prompt=p.prompt, width=p.width // 4 + 64, height=p.height // 4 + 64, seed=p.seed)
                       for p in prompts[:3]]
        refs = asd_pipeline(
            source=str(folder), prompts=prompts, name=args.name,
            ingest=IngestSettings(**DEMO_INGEST),
            train=TrainSettings(**(QUICK_TRAIN if args.quick else DEMO_TRAIN)),
            generate=GenerateSettings(**{**DEMO_GENERATE, **({"steps": 6} if args.quick else {})}),
            evaluate=EvaluateSettings(patch_size=64 if args.quick else 96),
            store_url=store.url, rerun=args.rerun,
        )
    print("\nCommitted versions (the evaluation and everything it descends from):")
    stages = {v: k for k, v in refs.model_dump().items()}
    for rec in store.lineage(refs.evaluation):
        print(f"  {stages.get(rec['ref'], ''):12s} {rec['ref']}")
    import polars as pl

    manifest = pl.read_parquet(io.BytesIO(store.read_bytes(refs.generations, "manifest.parquet")))
    gen = store.resolve(refs.generations)
    print("\nGenerated images:")
    for r in manifest.iter_rows(named=True):
        where = store.file_uri(gen, r["image"]) if r["image"] else f"FAILED: {r['error']}"
        print(f"  {r['width']:>5d}x{r['height']:<5d} {where}")
    print(f"\nMetrics ({refs.evaluation}):")
    _print_metrics(store, refs.evaluation)
    if args.quick:
        print("\n(--quick: the model is barely trained; these numbers mean nothing.)")
    return 0


def _local_or_url(spec: str) -> str:
    """Local paths become absolute (flows may run elsewhere); URLs and patterns stay as given."""
    if "://" in spec:
        return spec
    return str(Path(spec).expanduser().resolve()) if "{" not in spec else str(Path(spec).expanduser().absolute())


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows.params import IngestSettings
    from flows.stages import ingest_flow
    from tasks.ingest_sources import open_source
    from tasks.store import s3_storage_options

    values = {name: getattr(args, name) for name in IngestSettings.model_fields if getattr(args, name) is not None}
    settings = IngestSettings(**values)
    for spec in args.source:  # a typo or an unreadable list fails here, in one line, before any flow run
        try:
            open_source(_local_or_url(spec), s3_storage_options(), settings.url_col, settings.caption_col)
        except (OSError, ValueError) as exc:
            print(f"asd ingest: {exc}", file=sys.stderr)
            return 2
    ref = ingest_flow([_local_or_url(s) for s in args.source], args.dataset, settings, args.store, args.rerun,
                      args.retry_failed)
    _print_ingest_summary(ref, args.store)
    return 0


def _print_ingest_summary(ref: str, store_url: str | None) -> None:
    from tasks.store import ArtifactStore

    store = ArtifactStore(store_url)
    summary = store.record(ref).get("summary", {})
    print(ref)
    print(f"  {summary.get('samples_ok', 0)} ok, {summary.get('samples_failed', 0)} failed "
          f"{summary.get('failed_by_stage') or ''}, {summary.get('reused', 0)} reused from the previous version")
    for bucket, n in (summary.get("buckets") or {}).items():
        print(f"  {bucket:>10s}: {n}")


def _add_settings_arguments(parser: argparse.ArgumentParser, model, aliases: dict | None = None) -> None:
    """One --flag per pydantic field (defaults and help from the model: defined once)."""
    for name, field in model.model_fields.items():
        flag = ["--" + name.replace("_", "-"), *(aliases or {}).get(name, [])]
        if field.annotation is bool:
            parser.add_argument(*flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{field.description or ''} (default {field.default})")
            continue
        kind = {int: int, float: float}.get(field.annotation, None)
        if kind is None and str(field.annotation) in ("int | None",):
            kind = int
        parser.add_argument(*flag, dest=name, type=kind or str, default=None,
                            help=f"{field.description or ''} (default {field.default})")


def cmd_train(args: argparse.Namespace) -> int:
    from flows.params import TrainSettings
    from flows.stages import train_flow

    values = {name: getattr(args, name) for name in TrainSettings.model_fields if getattr(args, name) is not None}
    settings = TrainSettings(**values)
    ref = train_flow(_ref(args.dataset, "datasets"), args.model, settings, args.store, args.rerun, args.resume)
    from tasks.store import ArtifactStore

    summary = ArtifactStore(args.store).record(ref).get("summary", {})
    print(ref)
    print(f"  loss {summary.get('loss_first', float('nan')):.4f} -> {summary.get('loss_last', float('nan')):.4f} "
          f"over {summary.get('steps')} steps ({summary.get('weights')} weights)")
    return 0


def _load_prompts(args: argparse.Namespace) -> list:
    import polars as pl

    from flows.params import PromptSpec

    if args.prompts:
        p = args.prompts
        df = (pl.read_ndjson(p) if p.endswith(".jsonl") else pl.read_csv(p) if p.endswith(".csv")
              else pl.read_parquet(p))
        return [PromptSpec(**r) for r in df.iter_rows(named=True)]
    if not args.prompt or not args.size:
        raise SystemExit("asd generate: give --prompts FILE, or --prompt TEXT with one or more --size WxH")
    out = []
    for s in args.size:
        w, _, h = s.lower().partition("x")
        out.append(PromptSpec(prompt=args.prompt, width=int(w), height=int(h), seed=args.seed))
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    from flows.params import GenerateSettings
    from flows.stages import generate_flow

    settings = GenerateSettings(steps=args.steps, guidance_scale=args.guidance_scale, strength=args.strength,
                                tile=args.tile, shard_size=args.shard_size, upscaler=args.upscaler,
                                noise_level=args.noise_level)
    print(generate_flow(_ref(args.model, "models"), _load_prompts(args), args.name, settings, args.store, args.rerun))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.params import EvaluateSettings
    from flows.stages import evaluate_flow
    from tasks.store import ArtifactStore

    ref = evaluate_flow(_ref(args.generations, "generations"), _ref(args.dataset, "datasets"), args.name,
                        EvaluateSettings(), args.store, args.rerun)
    print(ref)
    _print_metrics(ArtifactStore(args.store), ref)
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from tasks.store import ArtifactStore

    store = ArtifactStore(args.store)
    if args.store_cmd == "ls":
        found = False
        for kind, name in store.list_artifacts():
            for ref in store.list_versions(kind, name):
                rec = store.record(ref)
                size = sum(f["size"] for f in rec["files"].values())
                print(f"{ref}  {len(rec['files'])} files  {size / 1e6:.2f} MB  parents: {', '.join(rec['parents']) or '-'}")
                found = True
        if not found:
            print(f"(no committed versions in {store.url})")
        return 0
    if args.store_cmd == "show":
        rec = store.record(args.ref)
        shown = {k: v for k, v in rec.items() if k != "files"}
        shown["files"] = rec["files"] if args.files else {k: v["size"] for k, v in rec["files"].items()}
        print(json.dumps(shown, indent=2, default=str))
        print("\nLineage:")
        _print_lineage(store, str(store.resolve(args.ref)), full=args.lineage)
        return 0
    if args.store_cmd == "lineage":
        ref, rel = store.locate(args.file)
        rec = store.record(ref)
        meta = rec["files"][rel]
        print(f"{args.file}\n  is {rel} of {ref} (sha256 {meta['sha256']}, {meta['size']} bytes"
              + (f", S3 VersionId {meta['version_id']}" if meta.get("version_id") else "") + ")")
        print(f"  committed {rec['committed_at']} by flow run {rec.get('flow_run_id') or '-'}, "
              f"code {rec.get('code_version')}")
        print("\nMade from:")
        _print_lineage(store, str(ref), full=True)
        return 0
    if args.store_cmd == "gc":
        found = store.gc(_duration_s(args.grace), delete=args.delete)
        verb = "removed" if args.delete else "would remove (pass --delete)"
        for path in found:
            print(f"{verb}: {path}")
        print(f"{len(found)} leftover(s) of uncommitted versions older than {args.grace}")
        return 0
    if args.store_cmd == "catalog":
        import polars as pl

        table = store.catalog(rebuild=args.rebuild)
        if args.output:
            import pyarrow.parquet as pq

            pq.write_table(table, args.output)
            print(f"wrote {table.num_rows} rows to {args.output}")
            return 0
        df = pl.from_arrow(table).select("ref", "committed_at", "size_bytes", "file_count", "parents", "flow_run_id")
        with pl.Config(tbl_rows=200, fmt_str_lengths=70, tbl_width_chars=200, tbl_hide_dataframe_shape=True):
            print(df)
        print(f"catalog: {store.uri('_catalog')}/*/*/*.parquet ({table.num_rows} versions)")
        return 0
    if args.store_cmd == "verify":
        refs = args.refs or [str(r) for k, n in store.list_artifacts() for r in store.list_versions(k, n)]
        bad = 0
        for r in refs:
            problems = store.verify(r)
            if problems:
                bad += 1
                for p in problems:
                    print(f"MISMATCH {p}")
            else:
                print(f"ok {store.resolve(r)}")
        return 1 if bad else 0
    return 2


def _duration_s(text: str) -> float:
    """'90s', '30m', '24h', '7d' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise SystemExit(f"asd: bad duration {text!r}: use e.g. 90s, 30m, 24h, 7d") from None


def _print_lineage(store, ref: str, full: bool) -> None:
    """The version and its parents as a tree, down to the source folders the data came from."""
    for rec in store.lineage(ref):
        pad = "  " * (rec["depth"] + 1)
        if "missing" in rec:
            print(f"{pad}{rec['ref']}  (MISSING: {rec['missing']})")
            continue
        extra = f"  run {rec.get('flow_run_id') or '-'}  code {rec.get('code_version')}" if full else ""
        print(f"{pad}{rec['ref']}{extra}")
        source = (rec.get("params") or {}).get("source")
        if source and not rec.get("parents"):
            print(f"{pad}  source: {source}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asd", description="Any-Size-Diffusion pipeline (Prefect 3)")
    p.add_argument("--store", default=None, help="artifact store URL (default: $ASD_STORE or ./asd-store)")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="run the whole pipeline on the packaged demo photos")
    d.add_argument("--name", default="demo")
    d.add_argument("--quick", action="store_true", help="tiny training and small sizes (smoke test)")
    d.add_argument("--rerun", action="store_true", help="redo stages even if finished work exists")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser(
        "ingest", help="ingest folders, URL lists and WebDataset/img2dataset shards into a bucketed dataset",
        description="SOURCE: a folder of images with captions (sidecar .txt/.caption or metadata.jsonl/csv/"
        "parquet), a URL list (.parquet/.csv/.tsv/.jsonl/.txt with url and caption columns; http(s)://, "
        "s3://, file:// URLs) or shards (a .tar, a {00000..00009}.tar pattern, a folder of .tar, local or s3://).",
    )
    i.add_argument("source", nargs="+")
    i.add_argument("--dataset", required=True)
    i.add_argument("--rerun", action="store_true", help="process everything again (no reuse)")
    i.add_argument("--retry-failed", action="store_true", help="download again the rows whose download failed")
    from flows.params import IngestSettings

    _add_settings_arguments(i, IngestSettings)
    i.set_defaults(func=cmd_ingest)

    t = sub.add_parser("train", help="ARAD fine-tuning on a dataset version")
    t.add_argument("--dataset", required=True, help="NAME, NAME@VERSION or datasets/NAME@VERSION")
    t.add_argument("--model", required=True, help="name of the model artifact to write")
    t.add_argument("--rerun", action="store_true", help="train again even if this exact model exists")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint of the same dataset, base model and settings")
    from flows.params import TrainSettings

    _add_settings_arguments(t, TrainSettings, aliases={"learning_rate": ["--lr"]})
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="render prompts at any size with FSTD")
    g.add_argument("--model", required=True)
    g.add_argument("--name", default="generations")
    g.add_argument("--prompts", help="JSONL/CSV/Parquet with prompt, width, height, seed")
    g.add_argument("--prompt")
    g.add_argument("--size", action="append", help="WxH, repeatable")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance-scale", type=float, default=5.0)
    g.add_argument("--strength", type=float, default=0.6)
    g.add_argument("--tile", type=int, default=None, help="FSTD tile in latent pixels (default: UNet sample size)")
    g.add_argument("--upscaler", default=None,
                   help="stage 2 with an SD-x4-upscaler-style model (folder, cached hub id or models/NAME@VERSION)")
    g.add_argument("--noise-level", type=int, default=20)
    g.add_argument("--shard-size", type=int, default=100)
    g.add_argument("--rerun", action="store_true")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", help="FID/KID/CLIP/seam scores of a generations version")
    e.add_argument("--generations", required=True)
    e.add_argument("--dataset", required=True)
    e.add_argument("--name", default="evaluation")
    e.add_argument("--rerun", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("store", help="inspect the artifact store")
    ssub = s.add_subparsers(dest="store_cmd", required=True)
    ssub.add_parser("ls", help="list committed versions")
    sh = ssub.add_parser("show", help="commit record and lineage of a version")
    sh.add_argument("ref")
    sh.add_argument("--files", action="store_true", help="show sha256 of every file")
    sh.add_argument("--lineage", action="store_true", help="flow runs and code versions in the parent tree")
    ln = ssub.add_parser("lineage", help="which version produced this file, and from what")
    ln.add_argument("file", help="a path or URI of a file inside the store")
    gc = ssub.add_parser("gc", help="leftovers of uncommitted versions (killed writers)")
    gc.add_argument("--grace", default="24h", help="only older than this (default 24h)")
    gc.add_argument("--delete", action="store_true", help="remove them (default: only list)")
    cat = ssub.add_parser("catalog", help="one row per committed version (Parquet, for dashboards)")
    cat.add_argument("--rebuild", action="store_true", help="add rows missing for committed versions")
    cat.add_argument("--output", help="write the whole catalog to this Parquet file")
    v = ssub.add_parser("verify", help="re-hash files; exit 1 on any mismatch")
    v.add_argument("refs", nargs="*", help="references (default: every committed version)")
    s.set_defaults(func=cmd_store)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tasks.store import StoreError

    _quiet_library_bars()
    try:
        return args.func(args)
    except StoreError as exc:
        print(f"asd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

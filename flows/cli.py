"""`asd`: the command line. Each subcommand runs a flow or reads the store.

Stage flags are generated from the stage's settings model (`flows.settings_cli`). Every user
mistake is one line, `asd: <what> (<where>)`, and exit code 2, before any work starts."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torchvision-fallback chatter
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from data_manifests.settings import (  # noqa: E402 - the environment above must be set first
    EvaluateSettings,
    GenerateSettings,
    IngestSettings,
    PromptSpec,
    TrainSettings,
)
from flows.settings_cli import add_settings_arguments, settings_from_args  # noqa: E402

USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user gave: printed as one line, exit code 2."""


def _quiet_library_bars() -> None:
    """Weight loading bars of diffusers/transformers say nothing to a pipeline user."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


# The demo's settings: small data, a tiny model trained for about two minutes.
DEMO_INGEST = IngestSettings(bucket_base=128, bucket_step=16, min_side=64)
DEMO_TRAIN = TrainSettings(base_model="tiny", vae_steps=400, steps=1000, batch_size=8, learning_rate=1e-3,
                           cache_latents=True, ema_decay=0.999, checkpoint_every=0)
QUICK_TRAIN = TrainSettings(base_model="tiny", vae_steps=20, steps=20, batch_size=4, learning_rate=1e-3,
                            cache_latents=True, checkpoint_every=0)
DEMO_GENERATE = GenerateSettings(steps=20, guidance_scale=4.0, strength=0.6, shard_size=3)


def _ref(text: str, kind: str) -> str:
    """Accept NAME, NAME@VERSION or KIND/NAME@VERSION; checked before any work."""
    from artifact_store import ArtifactRef

    ref = text if text.startswith(f"{kind}/") else f"{kind}/{text}"
    ArtifactRef.parse(ref)
    return ref


def _print_metrics(store, ref: str) -> None:
    import polars as pl

    df = pl.read_parquet(io.BytesIO(store.read_bytes(ref, "metrics.parquet")))
    df = df.filter(~pl.col("metric").str.contains("/"))
    with pl.Config(tbl_rows=50, fmt_str_lengths=90, tbl_width_chars=160, tbl_hide_dataframe_shape=True):
        print(df)


def cmd_demo(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore, check_name
    from data_manifests.demo import demo_prompts, materialize_demo_photos
    from flows.pipeline_flow import asd_pipeline

    check_name(args.name)
    store = ArtifactStore(args.store)
    print(f"asd demo: store {store.display_url}", flush=True)
    with tempfile.TemporaryDirectory(prefix="asd-demo-photos-") as tmp:
        folder = materialize_demo_photos(Path(tmp) / "photos")
        prompts = [PromptSpec(**p) for p in demo_prompts()]
        if args.quick:
            prompts = [PromptSpec(prompt=p.prompt, width=p.width // 4 + 64, height=p.height // 4 + 64, seed=p.seed)
                       for p in prompts[:3]]
        refs = asd_pipeline(
            source=str(folder), prompts=prompts, name=args.name, ingest=DEMO_INGEST,
            train=QUICK_TRAIN if args.quick else DEMO_TRAIN,
            generate=DEMO_GENERATE.model_copy(update={"steps": 6}) if args.quick else DEMO_GENERATE,
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
    from artifact_store import check_name, redact_url, s3_storage_options
    from data_engine.engine import source_options
    from data_engine.sources import open_source
    from flows.stages import ingest_flow

    check_name(args.dataset)
    settings = settings_from_args(IngestSettings, args)
    for spec in args.source:  # a typo or an unreadable list fails here, in one line, before any flow run
        try:
            open_source(_local_or_url(spec), s3_storage_options(), source_options(settings))
        except (OSError, ValueError) as exc:
            raise UserError(f"source {redact_url(spec)!r}: {exc}") from exc
    ref = ingest_flow([_local_or_url(s) for s in args.source], args.dataset, settings, args.store, args.rerun,
                      args.retry_failed)
    _print_ingest_summary(ref, args.store)
    return 0


def _print_ingest_summary(ref: str, store_url: str | None) -> None:
    from artifact_store import ArtifactStore

    summary = ArtifactStore(store_url).record(ref).get("summary", {})
    print(ref)
    print(f"  {summary.get('samples_ok', 0)} ok, {summary.get('samples_failed', 0)} failed "
          f"{summary.get('failed_by_stage') or ''}, {summary.get('reused', 0)} reused from the previous version")
    for bucket, n in (summary.get("buckets") or {}).items():
        print(f"  {bucket:>10s}: {n}")


def cmd_train(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore, check_name
    from flows.stages import train_flow

    check_name(args.model)
    settings = settings_from_args(TrainSettings, args)
    ref = train_flow(_ref(args.dataset, "datasets"), args.model, settings, args.store, args.rerun, args.resume)
    summary = ArtifactStore(args.store).record(ref).get("summary", {})
    print(ref)
    print(f"  loss (mean of the first / last 10% of steps) {summary.get('loss_first10pct_mean', float('nan')):.4f} -> "
          f"{summary.get('loss_last10pct_mean', float('nan')):.4f} over {summary.get('steps')} steps "
          f"({summary.get('weights')} weights)")
    return 0


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080); anything else is a one-line user error."""
    w, sep, h = text.strip().lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise UserError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1920x1080")
    return int(w), int(h)


def prompts_from_args(args: argparse.Namespace):
    """The prompts of `asd generate`: an existing `prompts/NAME@VERSION` reference, or a
    validated table from a file (bad rows stay in it, reported as failed images) or from
    --prompt with --size. A file that cannot be read, or a bad --size, is a user error."""
    from pydantic import ValidationError

    from data_engine.prompts import PromptFileError, prompt_table, validate_rows

    if args.prompts:
        if args.prompt or args.size:
            raise UserError("give either --prompts FILE or --prompt TEXT with --size WxH, not both")
        if args.prompts.startswith("prompts/"):
            return _ref(args.prompts, "prompts")
        try:
            table = prompt_table(args.prompts)
        except PromptFileError as exc:
            raise UserError(str(exc)) from None
        bad = [(r, e) for r, e in zip(table.column("row").to_pylist(), table.column("error").to_pylist(),
                                      strict=True) if e]
        for row, error in bad[:10]:
            print(f"asd generate: prompt row {row} will not be rendered: {error}", file=sys.stderr)
        return table
    if not args.prompt or not args.size:
        raise UserError("give --prompts FILE, or --prompt TEXT with one or more --size WxH")
    rows = []
    for s in args.size:
        w, h = parse_size(s)
        try:
            rows.append(PromptSpec(prompt=args.prompt, width=w, height=h, seed=args.seed).model_dump())
        except ValidationError as exc:
            err = exc.errors()[0]
            raise UserError(f"--size {s}: {err['loc'][0]} {err['msg']}" if err["loc"][0] in ("width", "height")
                            else f"--{err['loc'][0]}: {err['msg']}") from None
    return validate_rows(rows, "--prompt")


def cmd_generate(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore, check_name
    from data_engine.prompts import commit_prompts
    from flows.stages import generate_flow

    check_name(args.name)
    model = _ref(args.model, "models")
    settings = settings_from_args(GenerateSettings, args)
    prompts = prompts_from_args(args)
    store = ArtifactStore(args.store)
    store.resolve(model)  # a missing model is named before the prompts are stored
    if not isinstance(prompts, str):
        prompts = str(commit_prompts(store, prompts, args.name, args.prompts or "--prompt"))
    print(generate_flow(model, prompts, args.name, settings, store.url, args.rerun))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore, check_name
    from flows.stages import evaluate_flow

    check_name(args.name)
    settings = settings_from_args(EvaluateSettings, args)
    ref = evaluate_flow(_ref(args.generations, "generations"), _ref(args.dataset, "datasets"), args.name,
                        settings, args.store, args.rerun)
    print(ref)
    _print_metrics(ArtifactStore(args.store), ref)
    return 0


# -- asd store ...: one function per subcommand ------------------------------------------------
def store_ls(store, args: argparse.Namespace) -> int:
    found = False
    for kind, name in store.list_artifacts():
        for ref in store.list_versions(kind, name):
            rec = store.record(ref)
            size = sum(f["size"] for f in rec["files"].values())
            print(f"{ref}  {len(rec['files'])} files  {size / 1e6:.2f} MB  parents: {', '.join(rec['parents']) or '-'}")
            found = True
    if not found:
        print(f"(no committed versions in {store.display_url})")
    return 0


def store_show(store, args: argparse.Namespace) -> int:
    rec = store.record(args.ref)
    shown = {k: v for k, v in rec.items() if k != "files"}
    shown["files"] = rec["files"] if args.files else {k: v["size"] for k, v in rec["files"].items()}
    print(json.dumps(shown, indent=2, default=str))
    print("\nLineage:")
    _print_lineage(store, str(store.resolve(args.ref)), full=args.lineage)
    return 0


def store_lineage(store, args: argparse.Namespace) -> int:
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


def store_gc(store, args: argparse.Namespace) -> int:
    found = store.gc(_duration_s(args.grace), delete=args.delete)
    verb = "removed" if args.delete else "would remove (pass --delete)"
    for path in found:
        print(f"{verb}: {path}")
    print(f"{len(found)} leftover(s) of uncommitted versions older than {args.grace}")
    return 0


def store_catalog(store, args: argparse.Namespace) -> int:
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


def store_verify(store, args: argparse.Namespace) -> int:
    """Exit 1 when any version is damaged (a file or its commit record)."""
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
    if bad:
        print(f"{bad} of {len(refs)} version(s) damaged", file=sys.stderr)
    return 1 if bad else 0


STORE_COMMANDS = {"ls": store_ls, "show": store_show, "lineage": store_lineage, "gc": store_gc,
                  "catalog": store_catalog, "verify": store_verify}


def cmd_store(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore

    return STORE_COMMANDS[args.store_cmd](ArtifactStore(args.store), args)


def _duration_s(text: str) -> float:
    """'90s', '30m', '24h', '7d' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise UserError(f"--grace {text!r}: use e.g. 90s, 30m, 24h, 7d") from None


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


def cmd_deploy(args: argparse.Namespace) -> int:
    from deployments.deploy import DEFINITIONS, deploy_all, load_specs

    if args.list:
        for spec in load_specs(args.file or DEFINITIONS):
            print(f"{spec.full_name:32s} pool {spec.work_pool:6s} {spec.description or ''}")
        return 0
    done = deploy_all(args.store, dict(os.environ), args.file or DEFINITIONS, args.only)
    from prefect.settings import PREFECT_API_URL

    print(f"registered {len(done)} deployment(s) with {PREFECT_API_URL.value()}:")
    for name, pool, dep_id in done:
        print(f"  {name:32s} work pool {pool:6s} {dep_id}")
    pools = sorted({pool for _, pool, _ in done})
    print("start a worker per pool, from this environment:\n"
          + "".join(f"  prefect worker start --pool {p}\n" for p in pools)
          + f"then: prefect deployment run '{done[0][0]}' --watch")
    return 0


def _param(text: str) -> tuple[str, object]:
    """KEY=VALUE, the value read as JSON when it parses (numbers, lists, objects), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"--param {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _date_range(text: str):
    """START..END or START..END/STEP_DAYS (ISO dates)."""
    from flows.backfill import DateRange

    span, _, step = text.partition("/")
    start, sep, end = span.partition("..")
    if not sep:
        raise UserError(f"--dates {text!r}: expected START..END or START..END/STEP_DAYS (2026-11-01..2026-11-07)")
    from pydantic import ValidationError

    try:
        return DateRange(start=start.strip(), end=end.strip(), step_days=step.strip() or 1)
    except ValidationError as exc:
        why = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise UserError(f"--dates {text!r}: {why} (expected START..END or START..END/STEP_DAYS)") from None


def cmd_backfill(args: argparse.Namespace) -> int:
    from deployments.deploy import check_api_url
    from flows.backfill import backfill_flow

    if "/" not in args.deployment:  # every flag is checked before the server is asked anything
        raise UserError(f"deployment {args.deployment!r}: expected FLOW/DEPLOYMENT, e.g. asd-generate/generate")
    dates = _date_range(args.dates) if args.dates else None
    versions = [v.strip() for v in args.prompts_versions.split(",") if v.strip()] if args.prompts_versions else None
    if (dates is None) == (versions is None):
        raise UserError("give exactly one of --dates or --prompts-versions")
    if args.max_concurrency < 1:
        raise UserError("--max-concurrency must be at least 1")
    parameters = dict(_param(p) for p in args.param or [])
    check_api_url()
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(args.deployment)
        except ObjectNotFound:
            raise UserError(f"no deployment {args.deployment!r} on the server at {client.api_url} "
                            "(`asd deploy --list` shows what `asd deploy` registers)") from None
    rows = backfill_flow(args.deployment, dates=dates, prompts_versions=versions,
                         parameters=parameters, name=args.name,
                         max_concurrency=args.max_concurrency, store_url=args.store, return_state=True)
    result = rows.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        print(f"asd: backfill failed: {_one_line(result)}", file=sys.stderr)
        return 1
    print(f"{'partition':52s} {'status':22s} {'seconds':>8s}  output / flow run")
    for r in result:
        print(f"{r['partition']:52s} {r['status']:22s} {r['seconds']:8.1f}  {r['output']} {r['flow_run'] or ''}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore

    store = ArtifactStore(args.store)
    if args.dashboard_cmd == "build":
        from prefect.settings import PREFECT_UI_URL

        from dashboard.build import build_site

        built = build_site(store, thumb_px=args.thumb_px, max_images=args.max_images, prefect_ui=PREFECT_UI_URL.value())
        print(f"dashboard: {built.pages} pages, {built.pictures_made} pictures made, {built.pictures_reused} reused")
        print(f"open {built.index}" + ("  (or: asd dashboard serve)" if store.is_local else ""))
        return 0
    from dashboard.server import make_server

    server = make_server(store, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving the dashboard of {store.display_url} at http://{host}:{port}/_site/index.html (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line (`asd: ...`) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        print(f"asd: {message}" + (f" ({sub}; see `{self.prog} --help`)" if sub else " (see `asd --help`)"),
              file=sys.stderr)
        raise SystemExit(USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="asd", description="Any-Size-Diffusion pipeline (Prefect 3)")
    p.add_argument("--store", default=None, help="artifact store URL (default: $ASD_STORE or ./asd-store)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)

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
    add_settings_arguments(i, IngestSettings)
    i.set_defaults(func=cmd_ingest)

    t = sub.add_parser("train", help="ARAD fine-tuning on a dataset version")
    t.add_argument("--dataset", required=True, help="NAME, NAME@VERSION or datasets/NAME@VERSION")
    t.add_argument("--model", required=True, help="name of the model artifact to write")
    t.add_argument("--rerun", action="store_true", help="train again even if this exact model exists")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint of the same dataset, base model and settings")
    add_settings_arguments(t, TrainSettings, aliases={"learning_rate": ["--lr"]})
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="render prompts at any size with FSTD")
    g.add_argument("--model", required=True, help="NAME, NAME@VERSION or models/NAME@VERSION")
    g.add_argument("--name", default="generations", help="name of the generations artifact to write")
    g.add_argument("--prompts", help="Parquet/CSV/JSONL with prompt, width, height (optional: negative_prompt, "
                   "seed, steps, guidance_scale, strength), or a stored prompts/NAME@VERSION")
    g.add_argument("--prompt", help="one prompt, rendered at every --size")
    g.add_argument("--size", action="append", help="WIDTHxHEIGHT, repeatable (with --prompt)")
    g.add_argument("--seed", type=int, default=0, help="seed of --prompt (default: 0)")
    g.add_argument("--rerun", action="store_true", help="render again even if this exact job is committed")
    add_settings_arguments(g, GenerateSettings)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", help="FID/KID/CLIP/seam scores of a generations version")
    e.add_argument("--generations", required=True, help="NAME, NAME@VERSION or generations/NAME@VERSION")
    e.add_argument("--dataset", required=True, help="NAME, NAME@VERSION or datasets/NAME@VERSION")
    e.add_argument("--name", default="evaluation", help="name of the evaluation artifact to write")
    e.add_argument("--rerun", action="store_true", help="score again even if this exact evaluation is committed")
    add_settings_arguments(e, EvaluateSettings)
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("store", help="inspect the artifact store")
    ssub = s.add_subparsers(dest="store_cmd", required=True, parser_class=OneLineParser)
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
    v = ssub.add_parser("verify", help="re-hash files and check commit records; exit 1 on any damage")
    v.add_argument("refs", nargs="*", help="references (default: every committed version)")
    s.set_defaults(func=cmd_store)

    dp = sub.add_parser("deploy", help="create the work pools and register the deployments with a Prefect server",
                        description="Registers every deployment of deployments/prefect.yaml (or --file) with the "
                        "server at PREFECT_API_URL, creating its work pools; the store (--store, else $ASD_STORE) "
                        "goes into each deployment's environment.")
    dp.add_argument("--only", action="append", help="a deployment name or FLOW/NAME (repeatable; default: all)")
    dp.add_argument("--file", help="a prefect.yaml of your own (default: the packaged deployments/prefect.yaml)")
    dp.add_argument("--list", action="store_true", help="list the deployments of the file and stop")
    dp.set_defaults(func=cmd_deploy)

    b = sub.add_parser("backfill", help="one deployment run per date or prompt-manifest version",
                       description="Launches FLOW/DEPLOYMENT once per partition through run_deployment (idempotency "
                       "key per partition, bounded concurrency), skipping partitions whose output is committed. "
                       "Outputs are named NAME-PARTITION; {partition} and {date} in --param values are filled in.")
    b.add_argument("deployment", help="FLOW/DEPLOYMENT, e.g. asd-generate/generate")
    b.add_argument("--dates", help="START..END[/STEP_DAYS], ISO dates, inclusive")
    b.add_argument("--prompts-versions", help="comma-separated prompts/NAME@VERSION references")
    b.add_argument("--param", action="append", help="KEY=VALUE override of a deployment parameter (JSON or text)")
    b.add_argument("--name", help="base name of the outputs (default: the deployment's own)")
    b.add_argument("--max-concurrency", type=int, default=2, help="partition runs in flight at once (default: 2)")
    b.set_defaults(func=cmd_backfill)

    db = sub.add_parser("dashboard", help="a static dashboard of the store (_site/), built from the catalog")
    dsub = db.add_subparsers(dest="dashboard_cmd", required=True, parser_class=OneLineParser)
    dbb = dsub.add_parser("build", help="write or refresh _site/ in the store")
    dbb.add_argument("--thumb-px", type=int, default=256, help="longest side of the thumbnails (default: 256)")
    dbb.add_argument("--max-images", type=int, default=200, help="images shown per generations version (default: 200)")
    dbs = dsub.add_parser("serve", help="serve the store's dashboard on this machine")
    dbs.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    dbs.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    db.set_defaults(func=cmd_dashboard)
    for parser in [*sub.choices.values(), *ssub.choices.values(), *dsub.choices.values()]:
        # `asd deploy --store URL` as well as `asd --store URL deploy`; SUPPRESS keeps the global one
        parser.add_argument("--store", default=argparse.SUPPRESS, help="artifact store URL (as `asd --store`)")
    return p


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user gave something wrong (not a bug): one line, exit 2."""
    from botocore.exceptions import BotoCoreError, ClientError  # s3fs[boto3] is a dependency
    from pydantic import ValidationError

    from artifact_store import StoreError
    from asd_models.loading import ModelNotFoundError

    # CorruptRecord (a StoreError) is caught before these, in main(): it exits 1, not 2
    from deployments.deploy import DeployError
    from flows.backfill import BackfillError

    return (UserError, StoreError, ValidationError, ModelNotFoundError, BotoCoreError, ClientError, DeployError,
            BackfillError)


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    from flows.settings_cli import describe_validation_error

    if isinstance(exc, ValidationError):
        return describe_validation_error(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def _stop_on_sigterm() -> None:
    """SIGTERM ends `asd` like Ctrl-C: cleanup runs (Prefect's temporary server is stopped)."""
    def handler(signum: int, frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from artifact_store import CorruptRecord, redact

    _quiet_library_bars()
    _stop_on_sigterm()
    from flows.server_guard import tie_temporary_server_to_this_process

    tie_temporary_server_to_this_process()
    try:
        return args.func(args)
    except CorruptRecord as exc:
        print(f"asd: {redact(_one_line(exc))}", file=sys.stderr)
        return 1
    except _user_error_types() as exc:
        print(f"asd: {redact(_one_line(exc))} ({args.cmd})", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("asd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

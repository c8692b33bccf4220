"""`asd ingest`: folders, URL lists and shards into a bucketed dataset version."""

from __future__ import annotations

import argparse

from flows.cli.common import checked_sources
from flows.settings_cli import add_settings_arguments, settings_from_args
from tasks.ingest import IngestSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser(
        "ingest",
        help="ingest folders, URL lists and WebDataset/img2dataset shards into a bucketed dataset",
        description="SOURCE: a folder of images with captions (sidecar .txt/.caption or metadata.jsonl/csv/"
        "parquet), a URL list (.parquet/.csv/.tsv/.jsonl/.txt with url and caption columns; http(s)://, "
        "s3://, file:// URLs) or shards (a .tar, a {00000..00009}.tar pattern, a folder of .tar, local or s3://).",
    )
    i.add_argument("source", nargs="+")
    i.add_argument("--dataset", required=True)
    i.add_argument("--rerun", action="store_true", help="process everything again (no reuse)")
    i.add_argument(
        "--retry-failed", action="store_true", help="download again the rows whose download failed"
    )
    add_settings_arguments(i, IngestSettings)
    i.set_defaults(func=cmd_ingest)


def cmd_ingest(args: argparse.Namespace) -> int:
    from artifact_store import check_name
    from flows.stages import ingest_flow

    check_name(args.dataset)
    settings = settings_from_args(IngestSettings, args)
    sources = checked_sources(args.source, settings.source_options())
    ref = ingest_flow(sources, args.dataset, settings, args.store, args.rerun, args.retry_failed)
    _print_ingest_summary(ref, args.store)
    return 0


def _print_ingest_summary(ref: str, store_url: str | None) -> None:
    from artifact_store import ArtifactStore

    summary = ArtifactStore(store_url).record(ref).get("summary", {})
    print(ref)
    print(
        f"  {summary.get('samples_ok', 0)} ok, {summary.get('samples_failed', 0)} failed "
        f"{summary.get('failed_by_stage') or ''}, {summary.get('reused', 0)} reused from the previous version"
    )
    for bucket, n in (summary.get("buckets") or {}).items():
        print(f"  {bucket:>10s}: {n}")

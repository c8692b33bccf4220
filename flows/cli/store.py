"""`asd store ...`: inspect the artifact store, one function per subcommand."""

from __future__ import annotations

import argparse
import json
import math
import sys

from flows.cli.common import OneLineParser, UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    v.add_argument(
        "--shallow",
        action="store_true",
        help="read no file: one listing per version checks every "
        "recorded file is there with its size and was not written after the commit record",
    )
    s.set_defaults(func=cmd_store)


# -- asd store ...: one function per subcommand ------------------------------------------------
def store_ls(store, args: argparse.Namespace) -> int:
    found = False
    for kind, name in store.list_artifacts():
        for ref in store.list_versions(kind, name):
            rec = store.record(ref)
            size = rec.get("size_bytes", sum(f["size"] for f in rec["files"].values()))
            count = rec.get("file_count", len(rec["files"]))
            print(f"{ref}  {count} files  {size / 1e6:.2f} MB  parents: {', '.join(rec['parents']) or '-'}")
            found = True
    if not found:
        print(f"(no committed versions in {store.display_url})")
    return 0


def store_show(store, args: argparse.Namespace) -> int:
    rec = store.record(args.ref)
    shown = {k: v for k, v in rec.items() if k != "files"}
    files = dict(store.iter_files(args.ref)) if args.files else rec["files"]
    shown["files"] = files if args.files else {k: v["size"] for k, v in files.items()}
    if rec.get("file_lists") and not args.files:
        shown["files"]["..."] = (
            f"{rec['file_count'] - len(files)} more in the file lists (--files lists them all)"
        )
    print(json.dumps(shown, indent=2, default=str))
    print("\nLineage:")
    _print_lineage(store, str(store.resolve(args.ref)), full=args.lineage)
    return 0


def store_lineage(store, args: argparse.Namespace) -> int:
    ref, rel = store.locate(args.file)
    rec = store.record(ref)
    meta = store.file_meta(ref, rel)
    print(
        f"{args.file}\n  is {rel} of {ref} (sha256 {meta['sha256']}, {meta['size']} bytes"
        + (f", S3 VersionId {meta['version_id']}" if meta.get("version_id") else "")
        + ")"
    )
    print(
        f"  committed {rec['committed_at']} by flow run {rec.get('flow_run_id') or '-'}, "
        f"code {rec.get('code_version')}"
    )
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
    df = pl.DataFrame(table).select(
        "ref", "committed_at", "size_bytes", "file_count", "parents", "flow_run_id"
    )
    with pl.Config(tbl_rows=200, fmt_str_lengths=70, tbl_width_chars=200, tbl_hide_dataframe_shape=True):
        print(df)
    print(f"catalog: {store.uri('_catalog')}/*/*/*.parquet ({table.num_rows} versions)")
    return 0


def store_verify(store, args: argparse.Namespace) -> int:
    """Exit 1 when any version is damaged (a file or its commit record)."""
    refs = args.refs or [str(r) for k, n in store.list_artifacts() for r in store.list_versions(k, n)]
    bad = 0
    for r in refs:
        problems = store.verify(r, shallow=args.shallow)
        if problems:
            bad += 1
            for p in problems:
                print(f"MISMATCH {p}")
        else:
            print(f"ok {store.resolve(r)}")
    if bad:
        print(f"{bad} of {len(refs)} version(s) damaged", file=sys.stderr)
    return 1 if bad else 0


STORE_COMMANDS = {
    "ls": store_ls,
    "show": store_show,
    "lineage": store_lineage,
    "gc": store_gc,
    "catalog": store_catalog,
    "verify": store_verify,
}


def cmd_store(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore

    return STORE_COMMANDS[args.store_cmd](ArtifactStore(args.store), args)


def _duration_s(text: str) -> float:
    """'90s', '30m', '24h', '7d' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise UserError(f"--grace {text!r}: use e.g. 90s, 30m, 24h, 7d") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise UserError(f"--grace {text!r}: a duration is a finite number of seconds >= 0")
    return seconds


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

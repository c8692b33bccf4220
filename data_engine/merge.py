"""The ingest's merge: every partition's fragment and shards into one dataset version (then
committed once by the stage).

Pixel duplicates are exact across partitions and decided here, in input order (partitions in
order, rows in order within each): the first occurrence of an image is kept; a later copy in
another partition becomes a `duplicate` row naming the first, and its sample is taken out of its
shard (the shard is written again without it; a partition's own task never writes a copy of an
image it already holds). So the shards hold exactly the rows the manifest calls ok, byte for
byte what one process writing those rows would have written, and a trainer reading the tars
never sees a duplicate. Taking the copy out costs one shard rewrite per shard that held one;
leaving it in the tar and out of the index would have cost nothing and served the copy to every
reader that lists the tars rather than the index.

The same input listed in two partitions has the same key; the later one is renamed `<key>-<n>`
(in its shard too, when it is not a duplicate, which only a source serving different bytes for
the same URL makes possible).

Output: `manifest.parquet` (fragments streamed in order), `bucket_index.json`, wids indexes
and `partitions.json` (each partition's fingerprint, manifest rows, shards and failed downloads:
what the next ingest reuses).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import polars as pl

from artifact_store import ArtifactStore, PendingVersion, VersionWriter
from artifact_store.fragment_log import FragmentLog
from artifact_store.windows import bounded_map
from asd_models.buckets import Bucket
from data_engine.engine import (
    IngestConfig,
    IngestStats,
    ManifestWriter,
    PartitionResult,
    duplicate_row,
)
from data_engine.reuse import PARTITIONS_FILE
from data_engine.samples import STAGE_DOWNLOAD
from data_engine.shards import rewrite_shard, wids_indexes
from data_manifests.schemas import DATASET_MANIFEST, STATUS_OK


def _fragment(
    store: ArtifactStore, pending: PendingVersion, result: PartitionResult, columns: list[str] | None = None
) -> Any:
    return FragmentLog(store, pending, DATASET_MANIFEST).read(result.fragment.path, result.fragment, columns)


def _edits(
    store: ArtifactStore, pending: PendingVersion, results: list[PartitionResult]
) -> tuple[dict[int, dict[str, Any]], dict[str, tuple[set[str], dict[str, str]]]]:
    """Row edits by global row number, and shard edits (keys to drop, keys to rename) by shard."""
    frames = bounded_map(
        lambda r: pl.DataFrame(_fragment(store, pending, r, ["key", "status", "sha256", "shard"])),
        results,
        store.io_workers,
    )
    df = pl.concat(list(frames), how="vertical_relaxed").with_row_index("_g")
    rows: dict[int, dict[str, Any]] = {}
    shards: dict[str, tuple[set[str], dict[str, str]]] = defaultdict(lambda: (set(), {}))
    df = df.with_columns(pl.int_range(pl.len()).over("key").alias("_n"))
    renamed = df.filter(pl.col("_n") > 0)
    if renamed.height:
        taken = set(df["key"].to_list())
        new_keys = []
        for key, n in renamed.select("key", "_n").iter_rows():
            k = n + 1
            while f"{key}-{k}" in taken:
                k += 1
            taken.add(f"{key}-{k}")
            new_keys.append(f"{key}-{k}")
        renamed = renamed.with_columns(pl.Series("_key", new_keys))
        for g, key, new, status, shard in renamed.select("_g", "key", "_key", "status", "shard").iter_rows():
            rows[g] = {"key": new}
            if status == STATUS_OK:
                shards[shard][1][key] = new
        df = (
            df.join(renamed.select("_g", "_key"), on="_g", how="left")
            .with_columns(pl.coalesce("_key", "key").alias("key"))
            .sort("_g")
        )
    ok = df.filter(pl.col("status") == STATUS_OK)
    firsts = ok.group_by("sha256").agg(pl.col("_g").min().alias("_first"))
    firsts = firsts.join(
        ok.select(pl.col("_g").alias("_first"), pl.col("key").alias("_first_key")), on="_first"
    )
    dups = ok.join(firsts, on="sha256").filter(pl.col("_g") != pl.col("_first"))
    for g, key, first_key, shard in dups.select("_g", "key", "_first_key", "shard").iter_rows():
        rows[g] = {**rows.get(g, {}), "_duplicate_of": first_key}
        drop, rename = shards[shard]
        original = next((old for old, new in rename.items() if new == key), key)
        drop.add(original)
        rename.pop(original, None)
    return rows, dict(shards)


def merge_partitions(
    store: ArtifactStore,
    writer: VersionWriter,
    pending: PendingVersion,
    results: list[PartitionResult],
    dataset: str,
    config: IngestConfig,
) -> dict[str, Any]:
    """The dataset version's manifest, indexes and partition list from `results` (written into
    `writer`, not committed); returns the bucket index (with `_first_failures`)."""
    results = sorted(results, key=lambda r: r.index)
    for r in results:
        writer.add_files(r.files)
    row_edits, shard_edits = _edits(store, pending, results) if results else ({}, {})
    counts: dict[str, int] = {}
    for rel, (drop, rename) in sorted(shard_edits.items()):
        with store.pending_files(pending).open(rel) as data:
            counts[rel] = rewrite_shard(writer, rel, data, drop, rename)
    stats = IngestStats()
    by_bucket: dict[str, list[dict[str, Any]]] = defaultdict(list)
    partitions: list[dict[str, Any]] = []
    g = 0
    with writer.open("manifest.parquet") as stream:
        manifest = ManifestWriter(stream)
        for r in results:
            start, edited, download_failures = g, False, 0
            for row in _fragment(store, pending, r).to_pylist():
                edit = row_edits.get(g)
                if edit:
                    edited = True
                    row = {**row, **{k: v for k, v in edit.items() if not k.startswith("_")}}
                    if "_duplicate_of" in edit:
                        row = duplicate_row(row, edit["_duplicate_of"])
                manifest.add(row)
                stats.count(row)
                download_failures += row["failed_stage"] == STAGE_DOWNLOAD
                g += 1
            shards = {}
            for bucket, listed in r.shards.items():
                kept = [{**s, "count": counts.get(s["shard"], s["count"])} for s in listed]
                kept = [s for s in kept if s["count"]]
                if kept:
                    shards[bucket] = kept
                    by_bucket[bucket] += kept
            partitions.append(
                {
                    "fingerprint": r.fingerprint,
                    "rows": [start, g],
                    "shards": shards,
                    "download_failures": download_failures,
                    "edited": edited,
                }
            )
        manifest.close()
    for rel, wids in wids_indexes(dataset, by_bucket).items():
        writer.put_bytes(rel, wids)
    writer.put_bytes(
        PARTITIONS_FILE,
        json.dumps({"partition_inputs": config.partition_inputs, "partitions": partitions}).encode(),
    )
    buckets = {}
    for b in sorted(by_bucket):
        n = sum(s["count"] for s in by_bucket[b])
        buckets[b] = {
            "width": Bucket.parse(b).width,
            "height": Bucket.parse(b).height,
            "count": n,
            "mean_aspect_error": stats.aspect_error_sum[b] / n if n else None,
            "shards": by_bucket[b],
            "wids_index": f"buckets/{b}/wids-index.json",
        }
    index = {
        "dataset": dataset,
        "buckets": buckets,
        "table": [b.name for b in config.buckets],
        "total_ok": stats.ok,
        "total_failed": stats.failed,
        "reused": stats.reused,
        "failed_by_stage": dict(sorted(stats.failed_by_stage.items())),
        "wids_index": "wids-index.json",
        "partitions": len(results),
        "partitions_copied": sum(r.copied for r in results),
    }
    writer.put_bytes("bucket_index.json", json.dumps(index, indent=2).encode())
    index["_first_failures"] = stats.first_failures
    return index

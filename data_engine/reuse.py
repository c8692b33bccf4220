"""What a re-ingest takes from the newest version made with the same output options: partitions it
holds unchanged copied whole (rows and shards), the rows of inputs still listed unchanged in the
rest."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from artifact_store import ArtifactRef, ArtifactStore, PendingVersion, VersionWriter
from artifact_store.pending import PendingFiles
from data_engine.partitions import Partition, plan_fingerprints
from data_engine.samples import STAGE_DOWNLOAD, STAGE_DUPLICATE
from data_manifests.schemas import STATUS_FAILED

log = logging.getLogger("asd.data_engine")
PARTITIONS_FILE = "partitions.json"  # what the next ingest reuses: each partition's rows and shards


@dataclass(frozen=True)
class Reuse:
    """What a partition takes from the previous version: all of it (`whole`: that version's
    partition entry) or some of its rows (`rows`, reused input by input)."""

    ref: str
    whole: dict[str, Any] | None = None
    rows: tuple[dict[str, Any], ...] = ()


def manifest_rows(store: ArtifactStore, ref: str, start: int, stop: int) -> list[dict[str, Any]]:
    """Rows [start, stop) of a version's manifest, reading only the row groups that hold them."""
    out: list[dict[str, Any]] = []
    with store.open_checked(ref, "manifest.parquet") as f:
        pf = pq.ParquetFile(f)
        first = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first < stop and first + n > start:
                rows = pf.read_row_group(g).to_pylist()
                out += rows[max(0, start - first) : stop - first]
            first += n
    return out


def copy_whole(store: ArtifactStore, writer: VersionWriter, reuse: Reuse) -> list[dict[str, Any]] | None:
    """The previous version's partition copied: its shards (each re-hashed against that
    version's record while copied) and its rows. None when a shard does not check out (what
    was copied is discarded; the caller builds the partition afresh)."""
    entry = reuse.whole
    assert entry is not None
    copied: list[str] = []
    for rel in (s["shard"] for shards in entry["shards"].values() for s in shards):
        expected = store.file_meta(reuse.ref, rel)
        try:
            with store.open(reuse.ref, rel) as src, writer.open(rel) as dst:
                while block := src.read(8 << 20):
                    dst.write(block)
            copied.append(rel)
            if expected is None or writer.files[rel]["sha256"] != expected["sha256"]:
                raise ValueError("it does not match its recorded sha256")
        except (OSError, ValueError) as exc:
            log.warning("%s/%s cannot be reused (%s); its partition is ingested again", reuse.ref, rel, exc)
            for done in copied:
                writer.discard(done)
            return None
    a, b = entry["rows"]
    return [{**row, "reused": True} for row in manifest_rows(store, reuse.ref, a, b)]


# -- the plan of reuse (in the driver) --------------------------------------------------------
def latest_with_options(store: ArtifactStore, dataset: str, options_hash: str) -> ArtifactRef | None:
    for ref in reversed(store.list_versions("datasets", dataset)):
        if store.record(ref).get("params", {}).get("output_hash") == options_hash:
            return ref
    return None


def has_download_failures(store: ArtifactStore, ref: ArtifactRef) -> bool:
    return bool(store.record(ref).get("summary", {}).get("failed_by_stage", {}).get(STAGE_DOWNLOAD))


def plan_reuse(
    store: ArtifactStore,
    pending: PendingVersion,
    options_hash: str,
    parts: list[Partition],
    retry_failed: bool,
) -> tuple[ArtifactRef | None, dict[int, Reuse]]:
    """What each partition of `pending` (planned into its plan files) takes from the newest
    version of its dataset made with the same output options:
    partitions it holds unchanged are copied whole (unless `retry_failed` and they have failed
    downloads, or the merge edited them); the rest take the rows of inputs still listed unchanged
    (as many times as listed now), except failed downloads being retried and duplicates (which
    the merge decides again)."""
    prev = latest_with_options(store, pending.ref.name, options_hash)
    if prev is None:
        return None, {}
    try:
        entries = json.loads(store.read_checked(prev, PARTITIONS_FILE))["partitions"]
    except FileNotFoundError:
        log.info("%s predates partitioned ingest: nothing of it is reused", prev)
        return prev, {}
    by_fp = {e["fingerprint"]: e for e in entries}
    plan: dict[int, Reuse] = {}
    whole_rows: list[tuple[int, int]] = []
    changed: list[Partition] = []
    for part in parts:
        e = by_fp.get(part.fingerprint)
        if e is not None and not e.get("edited") and not (retry_failed and e.get("download_failures")):
            plan[part.index] = Reuse(str(prev), whole=e)
            whole_rows.append(tuple(e["rows"]))
        elif part.plan is not None:
            changed.append(part)
    if changed:
        files = store.pending_files(pending)
        for index, rows in _reusable_rows(store, files, prev, changed, whole_rows, retry_failed).items():
            plan[index] = Reuse(str(prev), rows=tuple(rows))
    return prev, plan


def _reusable_rows(
    store: ArtifactStore,
    files: PendingFiles,
    prev: ArtifactRef,
    changed: list[Partition],
    whole_rows: list[tuple[int, int]],
    retry_failed: bool,
) -> dict[int, list[dict[str, Any]]]:
    """Rows of `prev` for the inputs of `changed` partitions, matched by fingerprint and
    occurrence, by partition index (one pass over a local copy of `prev`'s manifest)."""
    current = pl.DataFrame(
        list(plan_fingerprints(files, changed)),
        schema={"_part": pl.Int64, "fingerprint": pl.String},
        orient="row",
    )
    current = current.with_columns(pl.int_range(pl.len()).over("fingerprint").alias("_rank"))
    with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
        with store.open_checked(prev, "manifest.parquet") as src:
            while block := src.read(8 << 20):
                tmp.write(block)
        tmp.flush()
        df = pl.scan_parquet(tmp.name).with_row_index("_row")
        taken = pl.lit(False)
        for a, b in whole_rows:
            taken = taken | pl.col("_row").is_between(a, b, closed="left")
        drop = taken | pl.col("failed_stage").eq_missing(STAGE_DUPLICATE)
        if retry_failed:
            drop = drop | (
                pl.col("status").eq_missing(STATUS_FAILED) & pl.col("failed_stage").eq_missing(STAGE_DOWNLOAD)
            )
        df = df.filter(~drop).with_columns(pl.int_range(pl.len()).over("fingerprint").alias("_rank"))
        matched = df.join(current.lazy(), on=["fingerprint", "_rank"], how="inner").collect()
    out: dict[int, list[dict[str, Any]]] = {}
    for row in matched.drop("_row", "_rank").iter_rows(named=True):
        out.setdefault(row.pop("_part"), []).append(row)
    return out

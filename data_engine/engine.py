"""The data engine's driver: sources (reader) -> fetch (downloader) -> samples (resizer) ->
shards (writer), into one bucketed dataset version of the store.

Output (one version of `datasets/<name>`): `manifest.parquet` (exactly one row per input,
failures with `failed_stage` and `error`), `buckets/<W>x<H>/<nnnnnn>.tar` WebDataset shards
(`<key>.jpg`, `<key>.txt`, `<key>.json`), `bucket_index.json` (bucket -> shards, counts,
aspect error) and wids indexes. Streaming end to end: memory does not grow with the dataset
beyond one small record per input of the listing and a 32-byte digest per good image.

Incremental: inputs whose fingerprint matches a row of the newest version made with the same
output options are copied from it (good rows) or keep their failure (bad rows), unless
`retry_failed` asks to download the failed downloads again.

No Prefect here: progress and logging come in as arguments (the task passes Prefect's).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from artifact_store import ArtifactRef, ArtifactStore, VersionWriter
from asd_models.buckets import Bucket
from asd_models.shard_reader import STORED_MAX_BYTES, sample_members, tar_stream_samples
from data_engine.fetch import Fetcher, FetchError, FetchOptions
from data_engine.samples import STAGE_CAPTION, STAGE_DOWNLOAD, STAGE_DUPLICATE, SampleSpec, process_sample
from data_engine.shards import BucketShardWriter
from data_engine.sources import Source, SourceOptions, SourceRecord
from data_manifests.schemas import DATASET_MANIFEST, STATUS_FAILED, STATUS_OK

MANIFEST_BATCH = 2000
LOG_FIRST_FAILURES = 20
log = logging.getLogger("asd.data_engine")


class ProgressSink(Protocol):
    """What the engine reports progress to (tqdm + a Prefect artifact in a task; nothing here)."""

    total: int

    def update(self, done: int) -> None: ...
    def set_total(self, total: int) -> None: ...
    def note(self, text: str) -> None: ...


ProgressFactory = Callable[[str, int], AbstractContextManager[ProgressSink | None]]


def no_progress(label: str, total: int) -> AbstractContextManager[None]:
    return nullcontext()


@dataclass(frozen=True)
class IngestConfig:
    """The data engine's frozen config (built from the ingest stage's settings in one place,
    `tasks.ingest.IngestSettings.engine_config`)."""

    buckets: tuple[Bucket, ...]
    sample: SampleSpec
    fetch: FetchOptions
    source: SourceOptions
    empty_caption: str  # "reject" | "keep"
    shard_max_samples: int
    shard_max_bytes: int
    workers: int  # decode processes


def sample_key(name: str, fingerprint: str) -> str:
    """Tar-member- and path-safe key: [A-Za-z0-9_-] only (no separators, dots, `..` or control
    characters), a readable stem and 10 hex of the input's fingerprint (stable across runs)."""
    stem = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:48] or "sample"
    return f"{stem}-{hashlib.sha1(fingerprint.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def windowed(items: Iterable[Any], window: int) -> Iterator[Any]:
    """Yield `items` in order, pulling up to `window` ahead: with items that are submitted
    futures, at most `window` calls are in flight and memory stays flat."""
    pending: deque[Any] = deque()
    for item in items:
        pending.append(item)
        if len(pending) >= window:
            yield pending.popleft()
    yield from pending


def _row(**values: Any) -> dict[str, Any]:
    row = {f.name: None for f in DATASET_MANIFEST}
    row.update(values)
    return row


class ManifestWriter:
    """Rows into `manifest.parquet` in batches (never the whole table in memory)."""

    def __init__(self, stream: Any) -> None:
        self.pq = pq.ParquetWriter(stream, DATASET_MANIFEST, compression="zstd")
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= MANIFEST_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.pq.write_table(pa.Table.from_pylist(self.rows, schema=DATASET_MANIFEST))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.pq.close()


@dataclass
class IngestStats:
    ok: int = 0
    failed: int = 0
    reused: int = 0
    failed_by_stage: Counter = dataclasses.field(default_factory=Counter)
    aspect_error_sum: Counter = dataclasses.field(default_factory=Counter)
    first_failures: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def count(self, row: dict[str, Any]) -> None:
        if row["reused"]:
            self.reused += 1
        if row["status"] == STATUS_OK:
            self.ok += 1
            self.aspect_error_sum[row["bucket"]] += row["aspect_error"] or 0.0
        else:
            self.failed += 1
            self.failed_by_stage[row["failed_stage"]] += 1
            if len(self.first_failures) < LOG_FIRST_FAILURES:
                self.first_failures.append((row["key"], row["source"], row["error"]))


@dataclass
class Previous:
    """What can be reused from an earlier version: its ref and the manifest rows to keep."""

    ref: ArtifactRef
    rows: pl.DataFrame  # reusable rows
    skip_units: set[str]  # shard units whose every row is reused (the shard is not read)
    available: Counter   # fingerprint -> reusable rows left for the records of this run


def plan_reuse(store: ArtifactStore, ref: ArtifactRef, current: Counter, shard_units: set[str],
               retry_failed: bool) -> Previous:
    """Rows of `ref` to carry over: a row is reused when its input is still listed unchanged
    (as many times as it is listed now) and it is not a failed download being retried."""
    df = pl.read_parquet(io.BytesIO(store.read_bytes(ref, "manifest.parquet")))
    df = df.with_columns(pl.col("fingerprint").str.split("#").list.first().alias("_unit"))
    retry = (pl.col("status") == STATUS_FAILED) & (pl.col("failed_stage") == STAGE_DOWNLOAD)
    if not retry_failed:
        retry = pl.lit(False)
    df = df.with_columns(retry.alias("_retry"))
    retried_units = set(df.filter(pl.col("_retry"))["_unit"].to_list())
    in_shard = pl.col("_unit").is_in(list(shard_units - retried_units))
    rank = pl.int_range(pl.len()).over("fingerprint")
    counts = pl.DataFrame({"fingerprint": list(current), "_n": list(current.values())},
                          schema={"fingerprint": pl.String, "_n": pl.Int64})
    df = df.join(counts, on="fingerprint", how="left").with_columns(rank.alias("_rank"))
    listed = pl.col("_n").is_not_null() & (pl.col("_rank") < pl.col("_n"))
    keep = df.filter((in_shard | listed) & ~pl.col("_retry"))
    skip = set(keep.filter(in_shard)["_unit"].to_list())
    available = Counter(keep.filter(~in_shard)["fingerprint"].to_list())
    return Previous(ref, keep.drop("_unit", "_retry", "_n", "_rank"), skip, available)


class DatasetIngest:
    """One run: sources -> rows + shards in `writer`."""

    def __init__(self, writer: VersionWriter, config: IngestConfig, progress: ProgressSink | None = None) -> None:
        self.config, self.progress = config, progress
        self.spec = config.sample
        self.shards = BucketShardWriter(writer, config.shard_max_samples, config.shard_max_bytes)
        self.stats = IngestStats()
        self.seen: dict[bytes, str] = {}  # pixel digest -> key
        self.keys: set[str] = set()
        self.done = 0

    # -- rows -----------------------------------------------------------------------------
    def _emit(self, manifest: ManifestWriter, row: dict[str, Any]) -> None:
        manifest.add(row)
        self.stats.count(row)
        self.done += 1
        if self.progress:
            if self.done > self.progress.total:
                self.progress.set_total(self.done)
            self.progress.update(self.done)
            if self.done % 50 == 0:
                self.progress.note(f"{self.stats.ok} ok, {self.stats.failed} failed")

    def _unique_key(self, name: str, fingerprint: str) -> str:
        key = base = sample_key(name, fingerprint)
        n = 1
        while key in self.keys:  # the same input listed twice
            n += 1
            key = f"{base}-{n}"
        self.keys.add(key)
        return key

    # -- reuse ----------------------------------------------------------------------------
    def copy_previous(self, store: ArtifactStore, prev: Previous, manifest: ManifestWriter) -> None:
        """Carry reused rows over; good ones' samples are streamed from the old shards."""
        good = prev.rows.filter(pl.col("status") == STATUS_OK)
        for row in prev.rows.filter(pl.col("status") != STATUS_OK).iter_rows(named=True):
            self.keys.add(row["key"])
            self._emit(manifest, {**row, "reused": True})
        by_shard: dict[str, dict[str, dict[str, Any]]] = {}
        for row in good.iter_rows(named=True):
            by_shard.setdefault(row["shard"], {})[row["key"]] = row
        for shard, wanted in sorted(by_shard.items()):
            with store.open(prev.ref, shard) as stream:
                for sample in tar_stream_samples(stream, STORED_MAX_BYTES, STORED_MAX_BYTES):
                    row = wanted.get(sample["__key__"])
                    if row is None or sample["__problems__"]:  # a listed sample that does not read is "lacking"
                        continue
                    del wanted[sample["__key__"]]
                    self.keys.add(row["key"])
                    self.seen[bytes.fromhex(row["sha256"])] = row["key"]
                    new_shard = self.shards.write(row["bucket"], sample_members(sample))
                    self._emit(manifest, {**row, "shard": new_shard, "reused": True})
            if wanted:
                raise RuntimeError(f"{prev.ref}/{shard} lacks samples its manifest lists: {sorted(wanted)[:5]}")

    # -- new work -------------------------------------------------------------------------
    def _prepare(self, rec: SourceRecord) -> tuple[SourceRecord, str]:
        return rec, self._unique_key(rec.name, rec.fingerprint)

    def _caption(self, rec: SourceRecord) -> tuple[str, str | None]:
        """(caption to store, error). Checked after decoding, so a file that is not an image
        says so first."""
        if (rec.caption or "").strip():
            return rec.caption or "", None
        if self.config.empty_caption == "keep":
            return "", None
        return "", ("no caption found" if rec.caption is None else "empty caption")

    def process(self, records: Iterable[SourceRecord], manifest: ManifestWriter, fetcher: Fetcher | None,
                pool: cf.Executor | None, threads: cf.Executor | None) -> None:
        prepared = (self._prepare(r) for r in records)

        def fetch(item: tuple[SourceRecord, str]) -> tuple[SourceRecord, str]:
            rec, key = item
            if rec.url and not rec.error and fetcher is not None:
                try:
                    rec.data = fetcher.fetch(rec.url)
                except FetchError as exc:
                    rec.error, rec.failed_stage = str(exc), STAGE_DOWNLOAD
            return item

        if threads is None:
            fetched: Iterable[tuple[SourceRecord, str]] = map(fetch, prepared)
        else:
            submitted = (threads.submit(fetch, item) for item in prepared)
            fetched = (f.result() for f in windowed(submitted, 4 * self.config.fetch.concurrency))

        def job(item: tuple[SourceRecord, str]) -> tuple[SourceRecord, str, Any]:
            rec, key = item
            if rec.error:
                return rec, key, None
            payload = rec.data if rec.data is not None else rec.path
            rec.data = None
            if pool is None:
                return rec, key, process_sample((key, payload, self.spec))
            return rec, key, pool.submit(process_sample, (key, payload, self.spec))

        for rec, key, result in windowed(map(job, fetched), max(2, 4 * self.config.workers)):
            self._finish(rec, key, result, manifest)

    def _finish(self, rec: SourceRecord, key: str, result: Any, manifest: ManifestWriter) -> None:
        if isinstance(result, cf.Future):
            result = result.result()
        caption, caption_error = self._caption(rec) if result is not None and result["ok"] else (rec.caption, None)
        base = {"key": key, "source": rec.source, "caption": caption, "fingerprint": rec.fingerprint,
                "reused": False}
        if result is None:
            self._emit(manifest, _row(**base, status=STATUS_FAILED, error=rec.error, failed_stage=rec.failed_stage))
            return
        if not result["ok"]:
            self._emit(manifest, _row(**base, status=STATUS_FAILED, error=result["error"],
                                      failed_stage=result["failed_stage"]))
            return
        if caption_error:
            self._emit(manifest, _row(**base, status=STATUS_FAILED, error=caption_error, failed_stage=STAGE_CAPTION,
                                      original_width=result["original_width"],
                                      original_height=result["original_height"], sha256=result["sha256"]))
            return
        digest = bytes.fromhex(result["sha256"])
        if digest in self.seen:
            self._emit(manifest, _row(
                **base, status=STATUS_FAILED, error=f"duplicate pixels of {self.seen[digest]}",
                failed_stage=STAGE_DUPLICATE, original_width=result["original_width"],
                original_height=result["original_height"], sha256=result["sha256"]))
            return
        self.seen[digest] = key
        geometry = {k: result[k] for k in ("original_width", "original_height", "bucket", "width", "height",
                                            "aspect_error", "cover_width", "cover_height", "crop_left", "crop_top",
                                            "crop_right", "crop_bottom")}
        meta = {"key": key, "source": rec.source, **geometry, **rec.meta}
        shard = self.shards.write(result["bucket"], {
            "__key__": key, "jpg": result["jpg"], "txt": caption.encode("utf-8", "replace"),
            "json": json.dumps(meta, default=str).encode(),
        })
        self._emit(manifest, _row(**base, status=STATUS_OK, **geometry, sha256=result["sha256"], shard=shard,
                                  bytes=len(result["jpg"])))

    # -- indexes --------------------------------------------------------------------------
    def bucket_index(self, dataset: str) -> dict[str, Any]:
        buckets = {}
        for b in sorted(self.shards.shards):
            n = self.shards.counts[b]
            buckets[b] = {
                "width": Bucket.parse(b).width, "height": Bucket.parse(b).height, "count": n,
                "mean_aspect_error": self.stats.aspect_error_sum[b] / n if n else None,
                "shards": self.shards.shards[b], "wids_index": f"buckets/{b}/wids-index.json",
            }
        return {
            "dataset": dataset, "buckets": buckets, "table": [b.name for b in self.config.buckets],
            "total_ok": self.stats.ok, "total_failed": self.stats.failed, "reused": self.stats.reused,
            "failed_by_stage": dict(sorted(self.stats.failed_by_stage.items())),
            "wids_index": "wids-index.json",
        }


def run_ingest(sources: list[Source], writer: VersionWriter, config: IngestConfig, *, dataset: str,
               store: ArtifactStore | None = None, previous: Previous | None = None,
               progress: ProgressSink | None = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole data stage into `writer` (not committed): returns the bucket index."""
    run = DatasetIngest(writer, config, progress)
    has_urls = any(s.needs_download for s in sources)
    ctx = multiprocessing.get_context("spawn")  # never fork a process that runs Prefect's threads
    pool = cf.ProcessPoolExecutor(config.workers, mp_context=ctx) if config.workers > 1 else None
    threads = cf.ThreadPoolExecutor(config.fetch.concurrency, thread_name_prefix="asd-fetch") if has_urls else None
    fetcher = Fetcher(config.fetch, storage_options) if has_urls else None
    try:
        with writer.open("manifest.parquet") as stream:
            manifest = ManifestWriter(stream)
            try:
                if previous is not None and store is not None:
                    run.copy_previous(store, previous, manifest)

                def fresh() -> Iterator[SourceRecord]:
                    for src in sources:
                        for rec in src.records(previous.skip_units if previous else None):
                            if previous and previous.available[rec.fingerprint] > 0:
                                previous.available[rec.fingerprint] -= 1
                                continue
                            yield rec

                run.process(fresh(), manifest, fetcher, pool, threads)
            finally:
                run.shards.close()
                manifest.close()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        if threads:
            threads.shutdown(cancel_futures=True)
    for rel, data in run.shards.wids_indexes(dataset).items():
        writer.put_bytes(rel, data)
    index = run.bucket_index(dataset)
    writer.put_bytes("bucket_index.json", json.dumps(index, indent=2).encode())
    index["_first_failures"] = run.stats.first_failures
    return index


def latest_with_options(store: ArtifactStore, dataset: str, options_hash: str) -> ArtifactRef | None:
    for ref in reversed(store.list_versions("datasets", dataset)):
        if store.record(ref).get("params", {}).get("output_hash") == options_hash:
            return ref
    return None


def has_download_failures(store: ArtifactStore, ref: ArtifactRef) -> bool:
    return bool(store.record(ref).get("summary", {}).get("failed_by_stage", {}).get(STAGE_DOWNLOAD))


def plan_previous(store: ArtifactStore, dataset: str, options_hash: str, opened: list[Source],
                  retry_failed: bool) -> tuple[Previous | None, int]:
    """What this ingest can carry over from the newest version made with the same output
    options, and how many inputs it will emit in all (for progress)."""
    prev_ref = latest_with_options(store, dataset, options_hash)
    current: Counter = Counter()
    shard_units: set[str] = set()
    known = 0
    for s in opened:
        units = s.units()
        if units is not None:
            shard_units |= units
        else:
            recs = list(s.records())
            current.update(r.fingerprint for r in recs)
            known += len(recs)
    if prev_ref is None:
        return None, known
    previous = plan_reuse(store, prev_ref, current, shard_units, retry_failed)
    return previous, known + len(previous.rows.filter(pl.col("fingerprint").str.contains("#")))

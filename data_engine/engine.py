"""One partition of an ingest: its inputs through the downloader and the resizer into its own
bucket shards and a manifest fragment (`data_engine.partitions` makes the partitions,
`data_engine.merge` merges what every partition wrote into one dataset version).

A partition task runs wherever the stage's executor puts it (a thread, a Dask worker); it needs
only the store URL, the pending version and the frozen config. It writes
`buckets/<W>x<H>/<stem>-<nnnn>.tar` WebDataset shards (`<key>.jpg`, `<key>.txt`, `<key>.json`)
and `_fragments/part-<stem>.parquet` (exactly one manifest row per input, failures with
`failed_stage` and `error`), and returns a small `PartitionResult`.

Reuse, from the newest version made with the same output options: a partition whose
fingerprint it holds is copied whole (its shards, each re-hashed against that version's
record while copied, and its manifest rows); otherwise the inputs it lists unchanged are carried
over one by one (good rows' samples streamed from the old shards), unless `retry_failed` asks
to download failed downloads again. Anything that does not check out is built afresh.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import re
import tarfile
from collections import Counter, defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from artifact_store import ArtifactStore, PendingVersion, VersionWriter
from artifact_store.fragment_log import Fragment, FragmentLog
from artifact_store.windows import windowed
from asd_models.buckets import Bucket
from asd_models.shard_reader import STORED_MAX_BYTES, sample_members, tar_stream_samples
from data_engine.fetch import Fetcher, FetchError, FetchOptions
from data_engine.partitions import Partition, partition_records
from data_engine.reuse import (
    Reuse,
    copy_whole,
)
from data_engine.samples import STAGE_CAPTION, STAGE_DOWNLOAD, STAGE_DUPLICATE, SampleSpec, process_sample
from data_engine.shard_source import shard_records
from data_engine.shards import BucketShardWriter
from data_engine.source_records import SourceOptions, SourceRecord
from data_manifests.schemas import DATASET_MANIFEST, STATUS_FAILED, STATUS_OK

MANIFEST_BATCH = 2000
LOG_FIRST_FAILURES = 20
log = logging.getLogger("asd.data_engine")


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
    partition_inputs: int  # records a partition holds, on average


def sample_key(name: str, fingerprint: str) -> str:
    """Tar-member- and path-safe key: [A-Za-z0-9_-] only (no separators, dots, `..` or control
    characters), a readable stem and 10 hex of the input's fingerprint (stable across runs)."""
    stem = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:48] or "sample"
    return f"{stem}-{hashlib.sha1(fingerprint.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def _row(**values: Any) -> dict[str, Any]:
    row = {f.name: None for f in DATASET_MANIFEST}
    row.update(values)
    return row


class ManifestWriter:
    """Rows into a manifest Parquet stream in batches (never the whole table in memory)."""

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
    aspect_error_sum: defaultdict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
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


@dataclass(frozen=True)
class PartitionJob:
    """What every partition task of one ingest shares (picklable: sent to Dask workers)."""

    store_url: str
    pending: PendingVersion
    config: IngestConfig
    storage_options: dict[str, Any] | None = None
    decode_threads: int = 1  # threads decoding within one partition (more workers than partitions)


@dataclass
class PartitionResult:
    """What a partition task tells the merge: its fragment, the files it wrote, its shards by
    bucket (with counts), and whether it was copied whole from the previous version."""

    index: int
    fingerprint: str
    fragment: Fragment  # its rows, in input order (`artifact_store.fragment_log`)
    rows: int
    files: dict[str, dict[str, Any]]
    shards: dict[str, list[dict[str, Any]]]
    copied: bool = False


class PartitionIngest:
    """One partition: records -> rows (a fragment) + samples (its own bucket shards)."""

    def __init__(self, writer: VersionWriter, config: IngestConfig, stem: str) -> None:
        self.config = config
        self.spec = config.sample
        self.shards = BucketShardWriter(writer, config.shard_max_samples, config.shard_max_bytes, stem)
        self.rows: list[dict[str, Any]] = []
        self.seen: dict[
            bytes, str
        ] = {}  # pixel digest -> key (within the partition; the merge does the rest)
        self.keys: set[str] = set()
        self.previous: dict[str, deque[dict[str, Any]]] = {}  # fingerprint -> reusable rows
        self.samples: dict[str, dict[str, Any]] = {}  # their samples, by old key

    def _emit(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def _unique_key(self, name: str, fingerprint: str) -> str:
        key = base = sample_key(name, fingerprint)
        n = 1
        while key in self.keys:  # the same input listed twice
            n += 1
            key = f"{base}-{n}"
        self.keys.add(key)
        return key

    # -- reuse ----------------------------------------------------------------------------
    def load_previous(self, store: ArtifactStore, prev: str, rows: Iterable[dict[str, Any]]) -> None:
        """Rows of the previous version to take for the inputs they describe (by fingerprint, in
        order), and the samples of the good ones, streamed from its shards (a sample that does
        not read leaves its input to be processed again)."""
        self.previous = {}
        by_shard: dict[str, set[str]] = {}
        for row in rows:
            self.previous.setdefault(row["fingerprint"], deque()).append(row)
            if row["status"] == STATUS_OK:
                by_shard.setdefault(row["shard"], set()).add(row["key"])
        for shard, wanted in sorted(by_shard.items()):
            try:
                with store.open(prev, shard) as stream:
                    for sample in tar_stream_samples(stream, STORED_MAX_BYTES, STORED_MAX_BYTES):
                        if sample["__key__"] in wanted and not sample["__problems__"]:
                            self.samples[sample["__key__"]] = sample_members(sample)
            except (OSError, ValueError, tarfile.TarError) as exc:
                log.warning("%s/%s does not read (%s); its inputs are processed again", prev, shard, exc)

    def _take_previous(self, rec: SourceRecord, key: str) -> dict[str, Any] | None:
        """The previous row of `rec`, when it can stand for it: a good row needs its sample, and
        a random crop its key (the crop is seeded by the key)."""
        queue = self.previous.get(rec.fingerprint)
        if not queue:
            return None
        row = queue.popleft()
        if row["status"] == STATUS_OK and (
            row["key"] not in self.samples or (row["key"] != key and self.spec.crop == "random")
        ):
            return None
        return row

    def _reuse(self, row: dict[str, Any], key: str) -> None:
        if row["status"] != STATUS_OK:
            self._emit({**row, "key": key, "reused": True})
            return
        digest = bytes.fromhex(row["sha256"])
        if digest in self.seen:
            self._emit(duplicate_row({**row, "key": key, "reused": True}, self.seen[digest]))
            return
        self.seen[digest] = key
        sample = self.samples.pop(row["key"])
        if key != row["key"]:
            meta = json.loads(sample.get("json", b"{}"))
            sample = {
                **sample,
                "__key__": key,
                "json": json.dumps({**meta, "key": key}, default=str).encode(),
            }
        shard = self.shards.write(row["bucket"], sample)
        self._emit({**row, "key": key, "shard": shard, "reused": True})

    # -- new work -------------------------------------------------------------------------
    def _caption(self, rec: SourceRecord) -> tuple[str, str | None]:
        """(caption to store, error). Checked after decoding, so a file that is not an image
        says so first."""
        if (rec.caption or "").strip():
            return rec.caption or "", None
        if self.config.empty_caption == "keep":
            return "", None
        return "", ("no caption found" if rec.caption is None else "empty caption")

    def process(
        self,
        records: Iterable[SourceRecord],
        fetcher: Fetcher | None,
        threads: cf.Executor | None,
        decoders: cf.Executor | None = None,
        decode_threads: int = 1,
    ) -> None:
        """Every record in order: its previous row where one stands for it, else downloaded
        (in `threads`), decoded (in `decoders`: PIL lets go of the GIL while it decodes and
        resizes) and written."""

        def prepare(rec: SourceRecord) -> tuple[SourceRecord, str, dict[str, Any] | None]:
            key = self._unique_key(rec.name, rec.fingerprint)
            return rec, key, self._take_previous(rec, key)

        prepared = map(prepare, records)

        def fetch(
            item: tuple[SourceRecord, str, dict[str, Any] | None],
        ) -> tuple[SourceRecord, str, dict[str, Any] | None]:
            rec, _, old = item
            if old is None and rec.url and not rec.error and fetcher is not None:
                try:
                    rec.data = fetcher.fetch(rec.url)
                except FetchError as exc:
                    rec.error, rec.failed_stage = str(exc), STAGE_DOWNLOAD
            return item

        if threads is None:
            fetched: Iterable[tuple[SourceRecord, str, dict[str, Any] | None]] = map(fetch, prepared)
        else:
            submitted = (threads.submit(fetch, item) for item in prepared)
            fetched = (f.result() for f in windowed(submitted, 4 * self.config.fetch.concurrency))

        def decode(item: tuple[SourceRecord, str, dict[str, Any] | None]) -> tuple[Any, ...]:
            rec, key, old = item
            if old is not None or rec.error:
                return rec, key, old, None
            payload = rec.data if rec.data is not None else rec.path
            if payload is None:  # a source's bug, not the input's: it named nothing to read
                raise ValueError(f"input {rec.source!r} has neither data nor a path to read")
            rec.data = None
            job = (key, payload, self.spec)
            return (
                rec,
                key,
                old,
                process_sample(job) if decoders is None else decoders.submit(process_sample, job),
            )

        for rec, key, old, result in windowed(map(decode, fetched), 4 * max(1, decode_threads)):
            if old is not None:
                self._reuse(old, key)
                continue
            self._finish(rec, key, result.result() if isinstance(result, cf.Future) else result)

    def _finish(self, rec: SourceRecord, key: str, result: dict[str, Any] | None) -> None:
        caption: str | None
        caption, caption_error = (
            self._caption(rec) if result is not None and result["ok"] else (rec.caption, None)
        )
        base = {
            "key": key,
            "source": rec.source,
            "caption": caption,
            "fingerprint": rec.fingerprint,
            "reused": False,
        }
        if result is None:
            self._emit(_row(**base, status=STATUS_FAILED, error=rec.error, failed_stage=rec.failed_stage))
            return
        if not result["ok"]:
            self._emit(
                _row(**base, status=STATUS_FAILED, error=result["error"], failed_stage=result["failed_stage"])
            )
            return
        if caption_error:
            self._emit(
                _row(
                    **base,
                    status=STATUS_FAILED,
                    error=caption_error,
                    failed_stage=STAGE_CAPTION,
                    original_width=result["original_width"],
                    original_height=result["original_height"],
                    sha256=result["sha256"],
                )
            )
            return
        digest = bytes.fromhex(result["sha256"])
        if digest in self.seen:
            self._emit(
                duplicate_row(
                    _row(
                        **base,
                        original_width=result["original_width"],
                        original_height=result["original_height"],
                        sha256=result["sha256"],
                    ),
                    self.seen[digest],
                )
            )
            return
        self.seen[digest] = key
        geometry = {
            k: result[k]
            for k in (
                "original_width",
                "original_height",
                "bucket",
                "width",
                "height",
                "aspect_error",
                "cover_width",
                "cover_height",
                "crop_left",
                "crop_top",
                "crop_right",
                "crop_bottom",
            )
        }
        meta = {"key": key, "source": rec.source, **geometry, **rec.meta}
        shard = self.shards.write(
            result["bucket"],
            {
                "__key__": key,
                "jpg": result["jpg"],
                "txt": (caption or "").encode("utf-8", "replace"),
                "json": json.dumps(meta, default=str).encode(),
            },
        )
        self._emit(
            _row(
                **base,
                status=STATUS_OK,
                **geometry,
                sha256=result["sha256"],
                shard=shard,
                bytes=len(result["jpg"]),
            )
        )


def duplicate_row(row: dict[str, Any], first_key: str) -> dict[str, Any]:
    """`row` as the later copy of pixels first seen as `first_key` (no shard of its own)."""
    keep = {
        "key",
        "source",
        "caption",
        "fingerprint",
        "reused",
        "original_width",
        "original_height",
        "sha256",
    }
    return {
        **{k: (v if k in keep else None) for k, v in row.items()},
        "status": STATUS_FAILED,
        "failed_stage": STAGE_DUPLICATE,
        "error": f"duplicate pixels of {first_key}",
    }


def ingest_partition(job: PartitionJob, part: Partition, reuse: Reuse | None) -> PartitionResult:
    """The task body: one partition into its shards and fragment (see the module doc)."""
    store = ArtifactStore(job.store_url)
    writer = VersionWriter.for_pending(store, job.pending)
    whole = reuse.whole if reuse is not None else None
    rows = copy_whole(store, writer, reuse) if reuse is not None and whole is not None else None
    if rows is not None and whole is not None:
        shards, copied = whole["shards"], True
    else:
        run = PartitionIngest(writer, job.config, part.stem)
        if reuse is not None and reuse.rows:
            run.load_previous(store, reuse.ref, reuse.rows)
        records = (
            partition_records(store.pending_files(job.pending), part)
            if part.plan is not None
            else shard_records(
                part.shard_url or "", part.shard_fp or "", job.config.source, job.storage_options
            )
        )
        threads = (
            cf.ThreadPoolExecutor(job.config.fetch.concurrency, thread_name_prefix="asd-fetch")
            if part.needs_download
            else None
        )
        decoders = (
            cf.ThreadPoolExecutor(job.decode_threads, thread_name_prefix="asd-decode")
            if job.decode_threads > 1
            else None
        )
        fetcher = Fetcher(job.config.fetch, job.storage_options) if part.needs_download else None
        try:
            run.process(records, fetcher, threads, decoders, job.decode_threads)
        finally:
            run.shards.close()
            for pool in (threads, decoders):
                if pool:
                    pool.shutdown(cancel_futures=True)
        rows, shards, copied = run.rows, run.shards.shards, False
    fragment = FragmentLog(store, job.pending, DATASET_MANIFEST).write(
        "part", part.stem, rows, compression="zstd"
    )
    return PartitionResult(
        part.index, part.fingerprint, fragment, len(rows), dict(writer.files), shards, copied
    )

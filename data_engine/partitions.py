"""Ingest inputs as partitions: the unit a task takes, and the unit a re-ingest reuses whole.

A partition is a run of consecutive inputs of one source:

- a folder or a URL list: consecutive records, cut after a record whose `source` hashes to a
  boundary (content-defined, as rsync and restic chunk files: adding, removing or changing an
  input changes its own partition, not every partition after it), at least half and at most
  twice `target` records. The records are written once, as the planner streams them, to
  plan files in the pending version (`_fragments/plan-<source>-<k>.parquet`, one row group a
  partition, 256 a file): the driver holds no records and a task reads its row group;
- existing shards: one partition per shard file, read by its task.

A partition's fingerprint covers its records' fingerprints in order (a shard's: the shard's), and
its occurrence among equal partitions, so the same inputs listed twice are two partitions. Its
first 16 hex name its bucket shards (`buckets/<WxH>/<stem>-<nnnn>.tar`): a reused partition's
shards keep their names.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from artifact_store.pending import PendingFiles
from artifact_store.refs import FRAGMENT_DIR
from data_engine.sources import Source, SourceRecord

PLAN_FIELDS = ("source", "name", "caption", "fingerprint", "path", "url", "error", "failed_stage")
# bytes, not strings: a listing's names are whatever the file system holds (surrogates included)
PLAN = pa.schema([(f, pa.binary()) for f in (*PLAN_FIELDS, "meta")])
MIN_FRACTION, MAX_FACTOR = 2, 2  # a partition holds target/2 .. 2*target records
GROUPS_PER_PLAN_FILE = (
    256  # partitions a plan file holds (the planner's memory stays flat in the number of inputs)
)


@dataclass(frozen=True)
class Partition:
    """One task's inputs: a row group of a plan file (`plan`, `group`; `inputs` records), or one
    shard file (`shard_url`, its samples counted as they are read)."""

    index: int
    fingerprint: str
    inputs: int | None
    needs_download: bool
    plan: str | None = None  # the plan file's path in the pending version
    group: int | None = None
    plan_digest: str | None = None  # sha256 of the row group's rows, as the driver planned them
    shard_url: str | None = None
    shard_fp: str | None = None

    @property
    def stem(self) -> str:
        return self.fingerprint[:16]


def _boundary(source: str, target: int) -> bool:
    h = int.from_bytes(hashlib.sha1(source.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h % target == 0


def cut(records: Iterable[SourceRecord], target: int) -> Iterator[list[SourceRecord]]:
    """Consecutive runs of `records`, cut at content-defined boundaries (see the module doc)."""
    low, high = max(1, target // MIN_FRACTION), max(1, target * MAX_FACTOR)
    run: list[SourceRecord] = []
    for rec in records:
        run.append(rec)
        if len(run) >= high or (len(run) >= low and _boundary(rec.source, target)):
            yield run
            run = []
    if run:
        yield run


def _enc(text: str | None) -> bytes | None:
    return None if text is None else text.encode("utf-8", "surrogatepass")


def _dec(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", "surrogatepass")


def _plan_table(records: list[SourceRecord]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                **{f: _enc(getattr(r, f)) for f in PLAN_FIELDS},
                "meta": _enc(json.dumps(r.meta, default=str)) if r.meta else None,
            }
            for r in records
        ],
        schema=PLAN,
    )


class _Fingerprints:
    """Partition fingerprints, unique within a run (an occurrence count for equal ones)."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def __call__(self, parts: Iterable[str]) -> str:
        h = hashlib.sha1()
        for p in parts:
            h.update(p.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        fp = h.hexdigest()
        self.seen[fp] += 1
        n = self.seen[fp]
        return fp if n == 1 else hashlib.sha1(f"{fp}:{n}".encode()).hexdigest()


class PlanChanged(ValueError):
    """A plan row group that is not what the driver planned (edited or damaged in the store)."""


def group_digest(table: pa.Table) -> str:
    """sha256 of a plan row group's rows: every field's bytes, length-prefixed, in order (the
    same for the table written and the row group read back)."""
    h = hashlib.sha256()
    for column in (*PLAN_FIELDS, "meta"):
        for value in table.column(column).to_pylist():
            h.update(b"\xff" if value is None else len(value).to_bytes(8, "little") + value)
    return h.hexdigest()


class _PlanFile:
    """One plan file being written (one row group a partition)."""

    def __init__(self, files: PendingFiles, rel: str) -> None:
        self.raw = files.open(rel, "wb")
        self.writer = pq.ParquetWriter(self.raw, PLAN, compression="zstd", write_statistics=False)

    def write(self, table: pa.Table) -> str:
        """Write one partition's rows as a row group; their digest."""
        self.writer.write_table(table, row_group_size=max(1, table.num_rows))
        return group_digest(table)

    def close(self) -> None:
        self.writer.close()
        self.raw.close()


def plan_partitions(sources: list[Source], target: int, files: PendingFiles) -> list[Partition]:
    """Every input of `sources` in partitions (in input order); record sources' records go to
    plan files in the pending version of `files`, streamed: memory holds one partition."""
    fingerprint = _Fingerprints()
    out: list[Partition] = []
    for i, src in enumerate(sources):
        shard_fps = getattr(src, "shard_fingerprints", None)
        if src.units() is not None and shard_fps is not None:
            for url, shard_fp in shard_fps().items():
                out.append(
                    Partition(
                        len(out),
                        fingerprint([shard_fp]),
                        None,
                        src.needs_download,
                        shard_url=url,
                        shard_fp=shard_fp,
                    )
                )
            continue
        writer = None
        try:
            for n, records in enumerate(cut(src.records(), target)):
                if n % GROUPS_PER_PLAN_FILE == 0:  # a new file: a writer's footer grows with its row groups
                    if writer is not None:
                        writer.close()
                    plan = f"{FRAGMENT_DIR}/plan-{i:04d}-{n // GROUPS_PER_PLAN_FILE:06d}.parquet"
                    writer = _PlanFile(files, plan)
                assert writer is not None  # made at n == 0
                digest = writer.write(_plan_table(records))
                out.append(
                    Partition(
                        len(out),
                        fingerprint(r.fingerprint for r in records),
                        len(records),
                        src.needs_download,
                        plan=plan,
                        group=n % GROUPS_PER_PLAN_FILE,
                        plan_digest=digest,
                    )
                )
        finally:
            if writer is not None:
                writer.close()
    return out


def partition_records(files: PendingFiles, part: Partition) -> list[SourceRecord]:
    """A plan partition's records (its row group of the plan file), checked against the digest
    the driver recorded when it planned them: PlanChanged when they differ (the plan lives in the
    pending version, which anyone sharing the store can write)."""
    assert part.plan is not None and part.group is not None
    with files.open(part.plan, "rb") as f:
        try:
            table = pq.ParquetFile(f).read_row_group(part.group, columns=[*PLAN_FIELDS, "meta"])
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise PlanChanged(
                f"{part.plan} (row group {part.group}) of {files.label} does not read: {exc}"
            ) from exc
    if table.schema != PLAN or (part.plan_digest is not None and group_digest(table) != part.plan_digest):
        raise PlanChanged(
            f"{part.plan} (row group {part.group}) of {files.label} is not what this job planned: "
            "it changed in the store after the plan was written; run the job again"
        )
    rows = table.to_pylist()
    return [
        SourceRecord(
            **{f: _dec(r[f]) for f in PLAN_FIELDS},  # type: ignore[arg-type]  # fields checked by name against PLAN_FIELDS
            meta=json.loads(r["meta"]) if r["meta"] else {},
        )
        for r in rows
    ]


def plan_fingerprints(files: PendingFiles, parts: list[Partition]) -> Iterator[tuple[int, str]]:
    """(partition index, record fingerprint) of plan partitions, streamed group by group."""
    for part in parts:
        if part.plan is None:
            continue
        for record in partition_records(files, part):  # checked against the planned digest
            yield part.index, record.fingerprint or ""

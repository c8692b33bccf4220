"""An upscale job's durable rows: each input's manifest row written as its own fragment as soon as
it is decided, a finished partition's compacted into one, and what a rerun may take of them (its
rows read, ok, and its files re-hashed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from artifact_store import ArtifactStore, PendingVersion
from artifact_store.fragment_log import FragmentDamaged, FragmentLog, fragment_path, img_id
from data_engine.partitions import Partition
from data_manifests.schemas import STATUS_FAILED, STATUS_OK, UPSCALE_FRAGMENT
from tasks.fragments import not_trusted
from tasks.runtime import run_logger
from tasks.upscale_settings import (
    PartitionDone,
    UpscaleJob,
)


def fragment_log(store: ArtifactStore, job: UpscaleJob) -> FragmentLog:
    return FragmentLog(store, job.pending, UPSCALE_FRAGMENT)


def read_fragment_rows(store: ArtifactStore, job: UpscaleJob, rel: str) -> list[dict[str, Any]]:
    """A fragment's rows (FragmentDamaged when it does not read as one)."""
    return fragment_log(store, job).read(rel).to_pylist()


def finished_rows(
    store: ArtifactStore, job: UpscaleJob, stem: str, done: set[int] | None
) -> dict[int, dict[str, Any]]:
    """This partition's images a previous run finished (`done`: the positions with a fragment;
    None: the partition's compacted fragment): their row reads, it is ok, and its files re-hash
    (anything else is rendered again, with a warning naming it)."""
    rows: dict[int, dict[str, Any]] = {}
    if done is None:
        rel = fragment_path("part", stem)
        try:
            rows = dict(enumerate(read_fragment_rows(store, job, rel)))
        except FragmentDamaged as exc:
            run_logger().warning("%s; its images are rendered again", exc)
    else:
        for n in sorted(done):
            rel = fragment_path("img", img_id(stem, n))
            try:
                rows[n] = read_fragment_rows(store, job, rel)[0]
            except (FragmentDamaged, IndexError) as exc:
                run_logger().warning("%s; its image is rendered again", exc)
    out = {}
    for n, row in rows.items():
        if row["status"] != STATUS_OK:
            continue
        why = not_trusted(store, job.pending, row["key"], row["files"])
        if why:
            run_logger().warning("%s cannot be taken as it is (%s); rendered again", row["key"], why)
            continue
        out[n] = row
    return out


def compact_rows(
    store: ArtifactStore, job: UpscaleJob, stem: str, rows: dict[int, dict[str, Any]], written: set[int]
) -> None:
    """The partition's rows into its one fragment (written whole first), then its inputs'
    fragments removed (a kill in between leaves both: the compacted one is read)."""
    log = fragment_log(store, job)
    log.write("part", stem, [rows[n] for n in sorted(rows)])
    for n in sorted(written):
        rel = fragment_path("img", img_id(stem, n))
        if not log.remove(rel):  # removed already (by a run killed after its own compaction)
            run_logger().debug("%s was removed already", rel)


@dataclass
class PartitionRows:
    """A partition task's rows as they are decided: each written as its input's fragment at once,
    all compacted into the partition's fragment at the end."""

    store: ArtifactStore
    job: UpscaleJob
    part: Partition
    out: PartitionDone
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    written: set[int] = field(default_factory=set)

    def write(self, n: int, row: dict[str, Any]) -> None:
        self.rows[n] = row
        self.written.add(n)
        fragment_log(self.store, self.job).write("img", img_id(self.part.stem, n), [row])

    def fail(self, n: int, row: dict[str, Any]) -> None:
        row["status"] = STATUS_FAILED
        run_logger().warning(
            "input %d of partition %d (%s) failed: %s", n, self.part.index, row["source"], row["error"]
        )
        self.write(n, row)
        self.out.failed += 1


def listed_fragments(store: ArtifactStore, pending: PendingVersion) -> dict[str, set[int] | None]:
    """Positions with a fragment, by partition stem; None for a partition with its compacted
    fragment (one listing of the pending version)."""
    found = FragmentLog(store, pending, UPSCALE_FRAGMENT).listing()
    images: dict[str, set[int]] = {}
    for fid in found["img"]:
        stem, _, n = fid.rpartition("-")
        images.setdefault(stem, set()).add(int(n))
    out: dict[str, set[int] | None] = {**images, **dict.fromkeys(found["part"])}
    return out

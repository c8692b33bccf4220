"""A generation job's durability points: one Parquet fragment per chunk of prompt rows.

A shard task renders its rows chunk by chunk (`chunk_rows`, 32 by default); when every image of
a chunk is written, the chunk's fragment (`_fragments/rows-<a>-<b>.parquet` in the pending
version, written whole or not at all) lists its manifest rows, each with the files it wrote
(path, sha256, size, S3 VersionId). A killed or lost worker costs at most the chunk it was on.

A rerun lists the fragments once and takes a finished image only when its fragment reads, the
image's files are named after its key, and every file re-hashes to what the fragment says
(anything else is rendered again, with a warning naming it). The commit streams the fragments,
in row order, into the version's manifest and file list (`compact`); the flow carries only
fragment references and counts, never rows."""

from __future__ import annotations

import hashlib
import heapq
import io
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from artifact_store import ArtifactStore, PendingVersion
from artifact_store.fragment_log import Fragment, FragmentDamaged, FragmentLog, rows_id
from data_manifests.schemas import GENERATION_FRAGMENT, GENERATIONS_MANIFEST, STATUS_OK

log = logging.getLogger("asd.generate")
HEAD_ROWS = 1000  # manifest rows the flow keeps for its UI table
HASH_THREADS = 8
TAR_NAME = re.compile(r"shards/rows-\d+-\d+\.tar")  # a chunk's tar shard (webdataset layout)


@dataclass(frozen=True)
class FragmentRef:
    """A written fragment: where, which prompt rows, how many images, its own sha256 and size."""

    path: str
    start: int
    stop: int
    images: int
    sha256: str
    size: int


def chunk_ranges(start: int, stop: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(a, min(stop, a + chunk_rows)) for a in range(start, stop, chunk_rows)]


def fragment_log(store: ArtifactStore, pending: PendingVersion) -> FragmentLog:
    return FragmentLog(store, pending, GENERATION_FRAGMENT)


def write_fragment(
    store: ArtifactStore, pending: PendingVersion, start: int, stop: int, entries: list[dict[str, Any]]
) -> FragmentRef:
    """The chunk's fragment, written atomically (rows in row order)."""
    rows = sorted(entries, key=lambda e: e["row"])
    f = fragment_log(store, pending).write("rows", rows_id(start, stop), rows)
    return FragmentRef(f.path, start, stop, f.rows, f.sha256, f.size)


def list_fragments(store: ArtifactStore, pending: PendingVersion) -> dict[tuple[int, int], str]:
    """Every chunk fragment in the pending version by its row range (one listing)."""
    chunks = fragment_log(store, pending).listing()["rows"]
    return {(int(i[:10]), int(i[11:])): rel for i, rel in chunks.items()}


@dataclass(frozen=True)
class FragmentRead:
    """A fragment as a rerun found it: its image keys, its number of rows, its sha256 and size
    (to reference it as it is when it holds exactly the images that checked out, once each)."""

    keys: frozenset[str]
    rows: int
    sha256: str
    size: int

    def holds_exactly(self, entries: list[dict[str, Any]]) -> bool:
        return self.rows == len(entries) == len(self.keys) and self.keys == {e["key"] for e in entries}

    def ref(self, rel: str, start: int, stop: int) -> FragmentRef:
        return FragmentRef(rel, start, stop, self.rows, self.sha256, self.size)


def read_fragment(
    store: ArtifactStore, pending: PendingVersion, rel: str
) -> tuple[list[dict[str, Any]], FragmentRead] | None:
    """A fragment's entries and what it is; None (and a warning naming it) when it does not read."""
    frags = fragment_log(store, pending)
    try:
        data = frags.read_bytes(rel)
        entries = pq.read_table(io.BytesIO(data), schema=GENERATION_FRAGMENT).to_pylist()
    except (FragmentDamaged, OSError, ValueError, pa.ArrowException) as exc:
        log.warning(
            "%s of %s does not read (%s: %s); its images are rendered again",
            rel,
            pending.ref,
            type(exc).__name__,
            exc,
        )
        return None
    return entries, FragmentRead(
        frozenset(e["key"] for e in entries), len(entries), hashlib.sha256(data).hexdigest(), len(data)
    )


def not_trusted(
    store: ArtifactStore, pending: PendingVersion, key: str, files: list[dict[str, Any]]
) -> str | None:
    """Why a finished image's own files cannot be taken as they are (None: they can)."""
    if not files:
        return "it lists no files"
    for f in files:
        rel = f["path"]
        if not rel.startswith(f"images/{key}.") and not rel.startswith(f"images/{key}_files/"):
            return f"it names {rel!r}, not a file of this image"
        if why := fragment_log(store, pending).rehash(f):
            return why
    return None


def not_this_jobs(row: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Why a resumed row is not the job's own (the fields it decides differ), None when it is."""
    wrong = sorted(k for k, v in expected.items() if row.get(k) != v)
    if not wrong:
        return None
    return f"its fragment's {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not this job's"


def _tars_of(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The tar shards a fragment's entries list (webdataset layout: with the chunk's first image)."""
    return {f["path"]: f for e in entries for f in e.get("files") or [] if TAR_NAME.fullmatch(f["path"])}


def finished_entries(
    store: ArtifactStore,
    pending: PendingVersion,
    fragments: dict[tuple[int, int], str],
    expected: dict[int, dict[str, Any]],
    start: int,
    stop: int,
) -> tuple[dict[int, dict[str, Any]], dict[str, FragmentRead]]:
    """Entries of the shard's rows that a previous run finished and that check out, keyed by row:
    from any fragment overlapping the range (a rerun may chunk differently), each read once; and
    what each fragment that read is. `expected`: manifest row -> the fields the job decides for
    it (its image key, prompt, size, seed); [start, stop) the shard's range in the prompts table.
    A fragment lives in the pending version, which anyone sharing the store can write, so an
    entry is taken only when every field the job decides is the job's own, it names only its own
    files and they re-hash; an image in a tar shard when its fragment lists that tar and the tar
    re-hashes (each tar once)."""
    candidates: dict[int, tuple[dict[str, Any], dict[str, Any] | None]] = {}
    read: dict[str, FragmentRead] = {}
    for (a, b), rel in sorted(fragments.items()):
        if b <= start or a >= stop:
            continue
        found = read_fragment(store, pending, rel)
        if found is None:
            continue
        entries, read[rel] = found
        tars = _tars_of(entries)
        for e in entries:
            row = e.get("row")
            if row in expected and e.get("key") == expected[row]["key"] and e.get("status") == STATUS_OK:
                candidates[row] = (e, tars.get(e["shard"]) if e.get("shard") else None)

    tar_verdicts: dict[str, str | None] = {}

    def check_tar(f: dict[str, Any]) -> tuple[str, str | None]:
        return f["path"], fragment_log(store, pending).rehash(f)

    def check(item: tuple[dict[str, Any], dict[str, Any] | None]) -> tuple[int, str | None]:
        e, tar = item
        if why := not_this_jobs(e, expected[e["row"]]):
            return e["row"], why
        if not e.get("shard"):
            return e["row"], not_trusted(store, pending, e["key"], e.get("files") or [])
        if tar is None:
            return e["row"], f"its tar {e['shard']!r} is not listed in its fragment"
        if e["image"] != f"{e['key']}.png":
            return e["row"], f"it names member {e['image']!r}, not its own"
        return e["row"], tar_verdicts[tar["path"]]

    taken = {}
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        tars = {t["path"]: t for _, t in candidates.values() if t is not None}
        tar_verdicts.update(pool.map(check_tar, tars.values()))
        for row, why in pool.map(check, candidates.values()):
            if why:
                log.warning(
                    "image %s of %s is not taken as done: %s; rendering it again",
                    expected[row]["key"],
                    pending.ref,
                    why,
                )
            else:
                taken[row] = candidates[row][0]
    return taken, read


@dataclass
class Compacted:
    """What the commit task learned streaming the fragments: counts and a head of the rows."""

    ok: int = 0
    failed: int = 0
    head: list[dict[str, Any]] = field(default_factory=list)
    slowest: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)
    has_viewer: bool = False


def _fragment_rows(store: ArtifactStore, pending: PendingVersion, ref: FragmentRef) -> list[dict[str, Any]]:
    written = Fragment(ref.path, "rows", rows_id(ref.start, ref.stop), ref.images, ref.sha256, ref.size)
    return fragment_log(store, pending).read(ref.path, written).to_pylist()


def iter_rows(
    store: ArtifactStore, pending: PendingVersion, refs: list[FragmentRef], invalid: list[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """Every manifest row in row order: the fragments' (read one at a time) merged with the
    invalid prompt rows."""

    def fragment_stream() -> Iterator[dict[str, Any]]:
        for ref in sorted(refs, key=lambda r: r.start):
            yield from _fragment_rows(store, pending, ref)

    yield from heapq.merge(fragment_stream(), sorted(invalid, key=lambda r: r["row"]), key=lambda r: r["row"])


def compact(
    store: ArtifactStore,
    pending: PendingVersion,
    writer: Any,
    refs: list[FragmentRef],
    invalid: list[dict[str, Any]],
    batch_rows: int = 8192,
) -> Compacted:
    """Stream the fragments into `manifest.parquet` and the version's file list (the writer's),
    checking each fragment against its reference and that no image appears twice."""
    out = Compacted()
    last_row = -1
    names = [f.name for f in GENERATIONS_MANIFEST]
    with tempfile.TemporaryDirectory(prefix="asd-manifest-") as tmp:
        path = os.path.join(tmp, "manifest.parquet")
        with pq.ParquetWriter(path, GENERATIONS_MANIFEST) as pw:
            batch: list[dict[str, Any]] = []
            for row in iter_rows(store, pending, refs, invalid):
                if (
                    row["row"] <= last_row
                ):  # rows come in order: a repeat is an image listed twice (no set kept)
                    raise RuntimeError(
                        f"{pending.ref}: image {row['key']} (row {row['row']}) appears twice in the manifest"
                    )
                last_row = row["row"]
                files = row.pop("files", None) or []
                writer.add_files(
                    {
                        f["path"]: {
                            k: v
                            for k, v in (
                                ("sha256", f["sha256"]),
                                ("size", f["size"]),
                                ("version_id", f.get("version_id")),
                            )
                            if v is not None
                        }
                        for f in files
                    },
                    row=row["row"],
                )
                if row["status"] == STATUS_OK:
                    out.ok += 1
                    heapq.heappush(
                        out.slowest, (row["seconds"] or 0.0, row["row"], {k: row[k] for k in names})
                    )
                    if len(out.slowest) > 10:
                        heapq.heappop(out.slowest)
                else:
                    out.failed += 1
                out.has_viewer = out.has_viewer or bool(row.get("viewer"))
                if len(out.head) < HEAD_ROWS:
                    out.head.append({k: row[k] for k in names})
                batch.append(row)
                if len(batch) >= batch_rows:
                    pw.write_table(pa.Table.from_pylist(batch, schema=GENERATIONS_MANIFEST))
                    batch = []
            if batch:
                pw.write_table(pa.Table.from_pylist(batch, schema=GENERATIONS_MANIFEST))
        writer.put_file("manifest.parquet", path)
    return out

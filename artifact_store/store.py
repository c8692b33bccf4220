"""ArtifactStore: versioned, immutable artifacts under one fsspec root URL.

A version is visible only once its commit record exists, so a writer that dies half-way
leaves nothing a reader can pick up. Every path read from a commit record, a reference or
the caller is validated; a commit record that exists but cannot be read is an error
(`CorruptRecord`), never 'absent'.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from artifact_store import file_lists
from artifact_store.backend import DEFAULT_STORE, StoreBackend, store_url_from_env
from artifact_store.catalog import catalog_row_path, read_catalog, read_catalog_rows, write_catalog_row
from artifact_store.leases import lease_epochs, live_holder, read_lease
from artifact_store.paths import check_relpath, local_target
from artifact_store.refs import (
    CATALOG_DIR,
    COMMIT_RECORD,
    FRAGMENT_DIR,
    KINDS,
    LEASE_DIR,
    PENDING_MARKER,
    VERSION_RE,
    ArtifactRef,
    CorruptRecord,
    InvalidReference,
    PendingVersion,
    StoreError,
    VersionNotFound,
    check_kind,
    check_name,
    new_version_id,
)
from artifact_store.writer import VersionWriter, code_version

__all__ = ["DEFAULT_STORE", "ArtifactStore", "store_url_from_env"]
log = logging.getLogger("asd.store")


IO_WORKERS = 32  # requests in flight for verify and download on an object store
LOCAL_WORKERS = 1  # a local disk: hashing is the work; threads cost more than they gave (bench.scale, 200k files)


def bounded_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """`fn` over `items` on `workers` threads, in order, with at most 2 x `workers` in flight
    (a million-file version is never a million futures)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="asd-io") as pool:
        window: deque[Future] = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _modified(info: dict[str, Any]) -> float:
    """When a listed file was last written (local mtime or S3 LastModified), in epoch seconds."""
    m = info.get("mtime") or info.get("LastModified") or info.get("created")
    return m.timestamp() if isinstance(m, datetime) else float(m or 0)


class ArtifactStore(StoreBackend):
    """Root of the versioned artifact store (`file://`, a local path, or `s3://bucket/prefix`):
    the files of `StoreBackend`, plus versions: reuse-or-new, resolve, read, verify, gc, lineage."""

    def __init__(self, url: str | None = None) -> None:
        super().__init__(url)
        self._records: dict[str, dict[str, Any]] = {}  # commit records are immutable: cache them

    def __repr__(self) -> str:
        return f"ArtifactStore({self.display_url!r})"

    # writing ---------------------------------------------------------------
    def new_version(self, kind: str, name: str, version: str | None = None) -> VersionWriter:
        """Writer of a new version; pass `version` (from `new_version_id()`) to let several
        workers write parts of one version, each through its own writer."""
        return VersionWriter(self, kind, name, version)

    def reuse_or_new(self, kind: str, name: str, input_hash: str, rerun: bool = False,
                     keep: Callable[[ArtifactRef], bool] | None = None) -> ArtifactRef | PendingVersion:
        """The one reuse-or-commit protocol of every stage: the committed version built from
        the same inputs (unless `rerun`, or `keep(ref)` says it must be redone), or a pending
        version to build and commit once. Name checks happen here, before any work."""
        check_kind(kind)
        check_name(name)
        if not rerun and (done := self.find_by_input_hash(kind, name, input_hash)) is not None:
            if keep is None or keep(done):
                return done
        return PendingVersion(ArtifactRef(kind, name, new_version_id()), input_hash)

    def resume_or_new(self, kind: str, name: str, input_hash: str, rerun: bool = False) -> ArtifactRef | PendingVersion:
        """As `reuse_or_new`, for work that is durable piece by piece (generation): an
        uncommitted version started for the same inputs (its `_PENDING.json` says so) is
        resumed, so what a killed run finished is found again; else a new one is marked."""
        found = self.reuse_or_new(kind, name, input_hash, rerun)
        if isinstance(found, ArtifactRef):
            return found
        if not rerun:
            for version in reversed(self._uncommitted_versions(kind, name)):
                try:
                    marker = json.loads(self.fs.cat_file(self.path(kind, name, version, PENDING_MARKER)))
                except FileNotFoundError:  # an uncommitted version of another kind of job: not ours to resume
                    continue
                except ValueError as exc:
                    log.warning("not resuming %s/%s@%s: its %s is unreadable (%s)", kind, name, version,
                                PENDING_MARKER, exc)
                    continue
                if isinstance(marker, dict) and marker.get("input_hash") == input_hash:
                    return PendingVersion(ArtifactRef(kind, name, version), input_hash)
        marker = {"input_hash": input_hash, "started_at": datetime.now(UTC).isoformat(), "code_version": code_version()}
        self.write_atomic(self.path(found.ref.prefix, PENDING_MARKER), json.dumps(marker).encode())
        return found

    def _uncommitted_versions(self, kind: str, name: str) -> list[str]:
        try:
            entries = self.fs.ls(self.path(kind, name), detail=False)
        except FileNotFoundError:
            return []
        versions = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return [v for v in versions if VERSION_RE.fullmatch(v) and not self.has_commit_record(ArtifactRef(kind, name, v))]

    def exists(self, pending: PendingVersion, relpath: str) -> bool:
        """Whether a file was already written into a pending (uncommitted) version."""
        return self.fs.exists(self.path(pending.ref.prefix, check_relpath(relpath, str(pending.ref))))

    def read_pending(self, pending: PendingVersion, relpath: str) -> bytes:
        """A file already written into a pending version (what a killed run finished)."""
        return self.fs.cat_file(self.path(pending.ref.prefix, check_relpath(relpath, str(pending.ref))))

    def writer(self, pending: PendingVersion) -> VersionWriter:
        """A writer of a pending version (each task that writes part of it opens its own)."""
        return VersionWriter.for_pending(self, pending)

    def write_run_record(self, flow_run_id: str, record: dict[str, Any]) -> str:
        """Record what one flow run read and wrote; one immutable file per run."""
        name = check_relpath(f"{flow_run_id}.json", "runs/")
        record = {"flow_run_id": flow_run_id, "code_version": code_version(), **record}
        self.write_atomic(self.path("runs", name), json.dumps(record, indent=2, sort_keys=True, default=str).encode())
        return self.uri("runs", name)

    def read_run_record(self, flow_run_id: str) -> dict[str, Any] | None:
        """The record of one flow run (None when it wrote none)."""
        name = check_relpath(f"{flow_run_id}.json", "runs/")
        try:
            return json.loads(self.fs.cat_file(self.path("runs", name)))
        except FileNotFoundError:
            return None

    # commit records -------------------------------------------------------------
    def _validated_record(self, ref: ArtifactRef, blob: bytes) -> dict[str, Any]:
        where = f"{self.uri(ref.prefix, COMMIT_RECORD)}"
        try:
            rec = json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptRecord(f"commit record {where} is damaged ({exc}); run `asd store verify`") from exc
        if not isinstance(rec, dict) or not isinstance(rec.get("files"), dict):
            raise CorruptRecord(f"commit record {where} has no file list")
        if rec.get("ref") != str(ref):
            raise CorruptRecord(f"commit record {where} names {rec.get('ref')!r}, not {ref}")
        for rel, meta in rec["files"].items():
            try:
                check_relpath(rel, where)
            except InvalidReference as exc:
                raise CorruptRecord(f"commit record {where} lists an unsafe path: {exc}") from exc
            if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str)
                    and isinstance(meta.get("size"), int)):
                raise CorruptRecord(f"commit record {where}: entry {rel!r} lacks sha256/size")
        lists = rec.get("file_lists") or []
        if not isinstance(lists, list) or any(not isinstance(p, dict) or p.get("path") not in rec["files"]
                                              for p in lists):
            raise CorruptRecord(f"commit record {where}: its file_lists name parts it does not list")
        for parent in rec.get("parents") or []:
            try:
                ArtifactRef.parse(parent)
            except (InvalidReference, AttributeError) as exc:
                raise CorruptRecord(f"commit record {where} has a bad parent {parent!r}") from exc
        return rec

    def _committed_record(self, ref: ArtifactRef) -> dict[str, Any] | None:
        """The commit record (None: not committed). Raises CorruptRecord when it exists but is
        unreadable or tampered with. Read once per store object (records never change)."""
        key = str(ref)
        if key not in self._records:
            try:
                blob = self.cat(self.path(ref.prefix, COMMIT_RECORD))
            except FileNotFoundError:
                return None
            self._records[key] = self._validated_record(ref, blob)
        return self._records[key]

    def has_commit_record(self, ref: ArtifactRef) -> bool:
        """True when a commit record exists, readable or not (gc never touches such a version)."""
        try:
            return self._committed_record(ref) is not None
        except CorruptRecord:
            return True

    def is_committed(self, ref: ArtifactRef) -> bool:
        return self._committed_record(ref) is not None

    def record(self, ref: ArtifactRef | str) -> dict[str, Any]:
        """Commit record of a committed version (resolving `@latest`)."""
        ref = self.resolve(ref)
        rec = self._committed_record(ref)
        if rec is None:
            raise VersionNotFound(f"{ref} has no commit record in {self.display_url}")
        return rec

    def resolve(self, ref: ArtifactRef | str) -> ArtifactRef:
        """Turn `kind/name@latest` into the committed version it names; check others exist.
        The newest committed version is the answer; a damaged newest record is an error."""
        if isinstance(ref, str):
            ref = ArtifactRef.parse(ref)
        if ref.version == "latest":
            pointed = self.read_latest(ref.kind, ref.name)
            if pointed and self.has_commit_record(ArtifactRef(ref.kind, ref.name, pointed)):
                newest = ArtifactRef(ref.kind, ref.name, pointed)
                self._committed_record(newest)  # raises CorruptRecord rather than fall back to an older one
                return newest
            versions = self.list_versions(ref.kind, ref.name)
            if not versions:
                raise VersionNotFound(f"no committed version of {ref.kind}/{ref.name} in {self.display_url}")
            newest = versions[-1]
            self._committed_record(newest)  # raises CorruptRecord rather than fall back to an older one
            return newest
        if not self.is_committed(ref):
            raise VersionNotFound(f"{ref} is not a committed version in {self.display_url}")
        return ref

    def list_artifacts(self) -> list[tuple[str, str]]:
        out = []
        for kind in KINDS:
            try:
                entries = self.fs.ls(self.path(kind), detail=False)
            except FileNotFoundError:
                continue
            for e in sorted(entries):
                name = e.rstrip("/").rsplit("/", 1)[-1]
                try:
                    out.append((kind, check_name(name)))
                except InvalidReference:
                    log.warning("ignoring %s in the store: not a valid artifact name", e)
        return out

    def list_versions(self, kind: str, name: str) -> list[ArtifactRef]:
        """Versions with a commit record (readable or damaged), oldest first."""
        check_kind(kind)
        check_name(name)
        try:
            entries = self.fs.ls(self.path(kind, name), detail=False)
        except FileNotFoundError:
            return []
        refs = []
        for e in sorted(entries):
            v = e.rstrip("/").rsplit("/", 1)[-1]
            if VERSION_RE.fullmatch(v):
                ref = ArtifactRef(kind, name, v)
                if self.has_commit_record(ref):
                    refs.append(ref)
        return refs

    def find_by_input_hash(self, kind: str, name: str, input_hash: str) -> ArtifactRef | None:
        """Newest committed version made from the same inputs, if any (finished work to reuse)."""
        for ref in reversed(self.list_versions(kind, name)):
            try:
                rec = self._committed_record(ref)
            except CorruptRecord as exc:
                log.warning("not reusing %s: %s", ref, exc)
                continue
            if rec and rec.get("input_hash") == input_hash:
                return ref
        return None

    # reading files ------------------------------------------------------------
    @property
    def io_workers(self) -> int:
        """Requests in flight for verify and download: many on an object store, few on a disk."""
        return LOCAL_WORKERS if self.is_local else IO_WORKERS

    def file_meta(self, ref: ArtifactRef | str, relpath: str) -> dict[str, Any] | None:
        """The recorded sha256, size (and S3 VersionId) of one file of a committed version; None
        when the version does not list it. A large version's file lists are read only as far as
        the part and row group that can hold it."""
        ref = self.resolve(ref)
        rec = self.record(ref)
        meta = rec["files"].get(relpath)
        if meta is None and rec.get("file_lists"):
            meta = file_lists.lookup(self, ref.prefix, rec["file_lists"], relpath,
                                     pin=lambda rel: self._pinned(ref, rel))
        return meta

    def iter_files(self, ref: ArtifactRef | str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every recorded file of a committed version (a large version's lists streamed)."""
        ref = self.resolve(ref)
        rec = self.record(ref)
        yield from rec["files"].items()
        if rec.get("file_lists"):
            yield from file_lists.iterate(self, ref.prefix, rec["file_lists"], pin=lambda rel: self._pinned(ref, rel))

    def _pinned(self, ref: ArtifactRef, relpath: str, meta: dict[str, Any] | None = None) -> str:
        """Path of a committed file; on a versioned S3 bucket, pinned to the recorded VersionId."""
        path = self.path(ref.prefix, check_relpath(relpath, str(ref)))
        if self.is_local:
            return path
        meta = meta or self.record(ref)["files"].get(relpath) or self.file_meta(ref, relpath)
        if meta and meta.get("version_id"):
            return f"{path}?versionId={meta['version_id']}"
        return path

    def open(self, ref: ArtifactRef | str, relpath: str, mode: str = "rb") -> Any:
        if "w" in mode or "a" in mode:
            raise StoreError("committed versions are read-only; write with new_version()")
        ref = self.resolve(ref)
        return self.vfs.open(self._pinned(ref, relpath), mode)

    def read_bytes(self, ref: ArtifactRef | str, relpath: str) -> bytes:
        ref = self.resolve(ref)
        meta = None if self.is_local else self.record(ref)["files"].get(relpath) or self.file_meta(ref, relpath)
        return self.cat(self._pinned(ref, relpath, meta), size=meta["size"] if meta else None, versioned=True)

    def read_range(self, ref: ArtifactRef | str, relpath: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a committed file (one ranged request: a member of a tar shard)."""
        ref = self.resolve(ref)
        return self.cat(self._pinned(ref, relpath), start=start, end=end, versioned=True)

    def download(self, ref: ArtifactRef | str, dest: str | Path, prefix: str = "", workers: int | None = None) -> Path:
        """Copy the committed files of a version (optionally under `prefix`) to a local folder,
        `workers` at a time; every target is checked to stay inside `dest` and every file's
        sha256 and size checked."""
        ref = self.resolve(ref)
        dest = Path(dest)
        cut = prefix.rstrip("/") + "/" if prefix else ""

        def fetch(item: tuple[str, dict[str, Any]]) -> None:
            rel, meta = item
            target = local_target(dest, rel[len(cut):], str(ref))
            target.parent.mkdir(parents=True, exist_ok=True)
            h, size = hashlib.sha256(), 0
            with self.vfs.open(self._pinned(ref, rel, meta), "rb") as src, open(target, "wb") as out:
                while block := src.read(8 << 20):
                    h.update(block)
                    size += len(block)
                    out.write(block)
            if size != meta["size"] or h.hexdigest() != meta["sha256"]:
                target.unlink()
                raise StoreError(f"{ref}: {rel} does not match its commit record (size {size} vs "
                                 f"{meta['size']}, sha256 {h.hexdigest()[:16]}…); run `asd store verify`")

        for _ in bounded_map(fetch, ((r, m) for r, m in self.iter_files(ref) if not cut or r.startswith(cut)),
                             workers or self.io_workers):
            pass
        return dest

    def verify(self, ref: ArtifactRef | str, shallow: bool = False, workers: int | None = None) -> list[str]:
        """Re-hash every recorded file (the recorded S3 VersionId, where there is one, and check
        it is still the current object), `workers` files at a time; one line per problem, empty
        when intact. `shallow`: no file is read: one listing of the version checks every
        recorded file is there with its size and was not written after the commit record. A
        damaged commit record is a problem, not an exception."""
        try:
            ref = self.resolve(ref)
            self.record(ref)
        except CorruptRecord as exc:
            return [str(exc)]
        if shallow:
            return self._verify_listing(ref)
        problems: list[str] = []
        for found in bounded_map(lambda item: self._verify_file(ref, *item), self.iter_files(ref),
                                 workers or self.io_workers):
            problems += found
        return problems

    def _verify_file(self, ref: ArtifactRef, rel: str, meta: dict[str, Any]) -> list[str]:
        problems = []
        vid = meta.get("version_id")
        if vid and not self.is_local:
            try:
                current = self.vfs.info(self.path(ref.prefix, rel), refresh=True).get("VersionId")
            except FileNotFoundError:
                current = None
            if current != vid:
                problems.append(f"{ref}: {rel}: current S3 VersionId {current} != recorded {vid} "
                                "(overwritten or deleted after commit)")
        try:
            digest, size = self.sha256_of(self._pinned(ref, rel, meta), meta["size"], versioned=True)
        except FileNotFoundError:
            return [*problems, f"{ref}: {rel}: missing"]
        if size != meta["size"]:
            problems.append(f"{ref}: {rel}: size {size} != recorded {meta['size']}")
        if digest != meta["sha256"]:
            problems.append(f"{ref}: {rel}: sha256 {digest[:16]}… != recorded {meta['sha256'][:16]}…")
        return problems

    def _verify_listing(self, ref: ArtifactRef) -> list[str]:
        record = next(self.match_listing(ref.prefix, [(COMMIT_RECORD, None)]))[2]
        sealed = _modified(record) if record else float("inf")
        problems = []
        for rel, meta, info in self.match_listing(ref.prefix, self.iter_files(ref)):
            if info is None:
                problems.append(f"{ref}: {rel}: missing")
            elif info.get("size") != meta["size"]:
                problems.append(f"{ref}: {rel}: size {info.get('size')} != recorded {meta['size']}")
            elif _modified(info) > sealed + 1:
                problems.append(f"{ref}: {rel}: written after the commit record (overwritten?)")
        return sorted(problems)

    # leftovers ---------------------------------------------------------------
    def uncommitted(self, grace_s: float = 24 * 3600) -> list[str]:
        """Version prefixes (and temp files) without a commit record, older than `grace_s`:
        what killed writers left behind. A version's age is that of its newest file (a resumed
        job keeps its old version id but writes now: it is not a leftover), so only versions
        nobody has written for `grace_s` are listed. A version whose record exists but is
        damaged is never listed."""
        now = datetime.now(UTC)
        out = []
        for kind, name in self.list_artifacts():
            try:
                entries = self.fs.ls(self.path(kind, name), detail=False)
            except FileNotFoundError:
                continue
            for e in entries:
                base = e.rstrip("/").rsplit("/", 1)[-1]
                stamp = base.split("-", 1)[0] if VERSION_RE.fullmatch(base) else None
                if stamp is None and ".tmp" not in base:
                    continue
                if stamp is not None:
                    if self.has_commit_record(ArtifactRef(kind, name, base)):
                        continue
                    born = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
                    if (now - born).total_seconds() < grace_s:
                        continue
                    pending = PendingVersion(ArtifactRef(kind, name, base), "")
                    epochs = lease_epochs(self, pending)
                    if epochs and live_holder(read_lease(self, pending, epochs[-1])) is not None:
                        continue  # a run holds it now (heartbeat within its lease)
                    newest = self._newest_write(e)
                    if newest is None:
                        continue  # nothing left under it (some S3 servers list emptied prefixes)
                    if now.timestamp() - newest < grace_s:
                        continue  # written within the grace period: a job is (or was just) at work on it
                elif (now.timestamp() - self._mtime(e)) < grace_s:
                    continue
                out.append(e)
        return sorted(out)

    def _newest_write(self, prefix: str) -> float | None:
        """When a pending version was last written: for a resumable job, its marker, lease
        heartbeats and chunk fragments (three short listings, whatever its number of images: a
        chunk's fragment follows its images within one chunk's time); else every file."""
        base = prefix.rstrip("/")
        if self.fs.exists(f"{base}/{PENDING_MARKER}"):
            times = [_modified(self.fs.info(f"{base}/{PENDING_MARKER}"))]
            for sub in (LEASE_DIR, FRAGMENT_DIR):
                with contextlib.suppress(FileNotFoundError):  # no lease taken / no chunk finished yet
                    times += [_modified(i) for i in self.fs.ls(f"{base}/{sub}", detail=True)]
            return max(times)
        files = {f: info for f, info in self.fs.find(prefix, detail=True).items() if f.startswith(base + "/")}
        return max((_modified(i) for i in files.values()), default=None)

    def _mtime(self, path: str) -> float:
        return _modified(self.fs.info(path))

    def gc(self, grace_s: float = 24 * 3600, delete: bool = False) -> list[str]:
        """List (and with `delete`, remove) leftovers of uncommitted versions."""
        found = self.uncommitted(grace_s)
        if delete:
            for path in found:
                self.fs.rm(path, recursive=True)
        return found

    def catalog(self, rebuild: bool = False) -> Any:
        """One row per committed version as a pyarrow Table (see `artifact_store.catalog`). With
        `rebuild`, first write the rows missing for committed versions (a writer killed after its
        commit record and before its catalog row)."""
        if rebuild:
            have = set(self.fs.glob(self.path(CATALOG_DIR, "*", "*", "*.parquet")))
            damaged = set(read_catalog_rows(self)[1])
            for kind, name in self.list_artifacts():
                for ref in self.list_versions(kind, name):
                    path = catalog_row_path(self, ref)
                    if path not in have or path in damaged:
                        try:
                            write_catalog_row(self, self.record(ref))
                        except CorruptRecord as exc:  # `asd store verify` reports it; the rest are rebuilt
                            log.warning("no catalog row for %s: %s", ref, exc)
                        damaged.discard(path)
            for path in damaged:  # no committed version behind it: not a row of this store
                log.warning("catalog file %s names no committed version; it is left for you to remove", path)
        return read_catalog(self)

    # locating files ------------------------------------------------------------
    def locate(self, file_or_uri: str) -> tuple[ArtifactRef, str]:
        """Which committed version holds this file (a path or URI inside the store)."""
        text = file_or_uri.split("?versionId=", 1)[0]
        if "://" in text and not text.startswith("file://"):
            text = text.split("://", 1)[1]
        elif text.startswith("file://"):
            text = text[len("file://"):]
        if self.is_local:
            text = str(Path(text).expanduser().resolve())
        root = self.root.rstrip("/") + "/"
        if not text.startswith(root):
            raise InvalidReference(f"{file_or_uri} is not inside the store {self.display_url}")
        parts = text[len(root):].split("/")
        if len(parts) < 4 or parts[0] not in KINDS or not VERSION_RE.fullmatch(parts[2]):
            raise InvalidReference(f"{file_or_uri} is not a file of a version (KIND/NAME/VERSION/PATH)")
        ref = ArtifactRef(parts[0], check_name(parts[1]), parts[2])
        if not self.is_committed(ref):
            raise VersionNotFound(f"{file_or_uri} belongs to {ref}, which is not committed")
        rel = "/".join(parts[3:])
        if self.file_meta(ref, rel) is None:
            raise VersionNotFound(f"{file_or_uri} is not a recorded file of {ref}")
        return ref, rel

    def lineage(self, ref: ArtifactRef | str) -> list[dict[str, Any]]:
        """The version and all its ancestors (depth-first), each as its commit record."""
        seen: set[str] = set()
        out: list[dict[str, Any]] = []

        def walk(r: str, depth: int) -> None:
            if r in seen:
                return
            seen.add(r)
            try:
                rec = self.record(r)
            except StoreError as exc:
                out.append({"ref": r, "depth": depth, "missing": str(exc)})
                return
            out.append({**rec, "depth": depth})
            for p in rec.get("parents", []):
                walk(p, depth + 1)

        walk(str(self.resolve(ref)), 0)
        return out

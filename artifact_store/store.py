"""ArtifactStore: versioned, immutable artifacts under one fsspec root URL.

A version is visible only once its commit record exists, so a writer that dies half-way
leaves nothing a reader can pick up. Every path read from a commit record, a reference or
the caller is validated; a commit record that exists but cannot be read is an error
(`CorruptRecord`), never 'absent'.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from artifact_store.backend import DEFAULT_STORE, StoreBackend, store_url_from_env
from artifact_store.lineage import Lineage
from artifact_store.maintenance import Maintenance
from artifact_store.paths import check_relpath
from artifact_store.pending import PendingFiles, StoreFolder
from artifact_store.reading import VersionReading
from artifact_store.refs import (
    COMMIT_RECORD,
    KINDS,
    PENDING_MARKER,
    SITE_DIR,
    VERSION_RE,
    ArtifactRef,
    CorruptRecord,
    InvalidReference,
    PendingVersion,
    VersionNotFound,
    check_kind,
    check_name,
    new_version_id,
)
from artifact_store.writer import VersionWriter, code_version

__all__ = ["DEFAULT_STORE", "ArtifactStore", "store_url_from_env"]
log = logging.getLogger("asd.store")


class ArtifactStore(VersionReading, Maintenance, Lineage, StoreBackend):
    """Root of the versioned artifact store (`file://`, a local path, or `s3://bucket/prefix`):
    the files of `StoreBackend`, plus versions: writing (reuse-or-new, resume), commit records and
    resolving (here), reading (`reading.VersionReading`: only what a record lists, download,
    verify), maintenance (`maintenance.Maintenance`: leftovers, gc, the catalog) and lineage
    (`lineage.Lineage`)."""

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

    def reuse_or_new(
        self,
        kind: str,
        name: str,
        input_hash: str,
        rerun: bool = False,
        keep: Callable[[ArtifactRef], bool] | None = None,
    ) -> ArtifactRef | PendingVersion:
        """The one reuse-or-commit protocol of every stage: the committed version built from
        the same inputs (unless `rerun`, or `keep(ref)` says it must be redone), or a pending
        version to build and commit once. Name checks happen here, before any work."""
        check_kind(kind)
        check_name(name)
        if not rerun and (done := self.find_by_input_hash(kind, name, input_hash)) is not None:
            if keep is None or keep(done):
                return done
        return PendingVersion(ArtifactRef(kind, name, new_version_id()), input_hash)

    def resume_or_new(
        self, kind: str, name: str, input_hash: str, rerun: bool = False
    ) -> ArtifactRef | PendingVersion:
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
                    log.warning(
                        "not resuming %s/%s@%s: its %s is unreadable (%s)",
                        kind,
                        name,
                        version,
                        PENDING_MARKER,
                        exc,
                    )
                    continue
                if isinstance(marker, dict) and marker.get("input_hash") == input_hash:
                    return PendingVersion(ArtifactRef(kind, name, version), input_hash)
        marker = {
            "input_hash": input_hash,
            "started_at": datetime.now(UTC).isoformat(),
            "code_version": code_version(),
        }
        self.write_atomic(self.path(found.ref.prefix, PENDING_MARKER), json.dumps(marker).encode())
        return found

    def _uncommitted_versions(self, kind: str, name: str) -> list[str]:
        try:
            entries = self.fs.ls(self.path(kind, name), detail=False)
        except FileNotFoundError:
            return []
        versions = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return [
            v
            for v in versions
            if VERSION_RE.fullmatch(v) and not self.has_commit_record(ArtifactRef(kind, name, v))
        ]

    def pending_files(self, pending: PendingVersion) -> PendingFiles:
        """A pending version's files by their path in the version (`artifact_store.pending`)."""
        return PendingFiles(self, pending)

    def site_files(self) -> StoreFolder:
        """The dashboard's built site (`_site/`), by paths inside it."""
        return StoreFolder(self, SITE_DIR, f"the dashboard site ({SITE_DIR}/)")

    def writer(self, pending: PendingVersion) -> VersionWriter:
        """A writer of a pending version (each task that writes part of it opens its own)."""
        return VersionWriter.for_pending(self, pending)

    def write_run_record(self, flow_run_id: str, record: dict[str, Any]) -> str:
        """Record what one flow run read and wrote; one immutable file per run."""
        name = check_relpath(f"{flow_run_id}.json", "runs/")
        record = {"flow_run_id": flow_run_id, "code_version": code_version(), **record}
        self.write_atomic(
            self.path("runs", name), json.dumps(record, indent=2, sort_keys=True, default=str).encode()
        )
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
            if not (
                isinstance(meta, dict)
                and isinstance(meta.get("sha256"), str)
                and isinstance(meta.get("size"), int)
            ):
                raise CorruptRecord(f"commit record {where}: entry {rel!r} lacks sha256/size")
        lists = rec.get("file_lists") or []
        if not isinstance(lists, list) or any(
            not isinstance(p, dict) or p.get("path") not in rec["files"] for p in lists
        ):
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

    def record_size(self, ref: ArtifactRef | str) -> int:
        """Bytes of a committed version's record as stored (what every open of it reads)."""
        ref = self.resolve(ref)
        self.record(ref)
        return int(self.fs.size(self.path(ref.prefix, COMMIT_RECORD)))

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

"""Writing one version: files once each (hashed as they stream), then the commit record last.

Fault points (`artifact_store.faults`) let tests SIGKILL a writer at every phase of a commit."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artifact_store.catalog import write_catalog_row
from artifact_store.faults import fault_point
from artifact_store.file_lists import FileListWriter
from artifact_store.paths import check_relpath
from artifact_store.refs import (
    COMMIT_RECORD,
    FRAGMENT_DIR,
    LEASE_DIR,
    PENDING_MARKER,
    PENDING_STATE,
    RECORD_FORMAT,
    ArtifactRef,
    PendingVersion,
    StoreError,
    check_kind,
    check_name,
    check_version,
    new_version_id,
)

if TYPE_CHECKING:
    from artifact_store.backend import StoreBackend

INLINE_FILES_MAX = (
    1000  # files a commit record lists itself; past it they go to file-list parts, whatever call
)
# wrote them (100,000 files inline made a 13 MB record, a 345 ms cold open and a 265 ms list_versions)
log = logging.getLogger("asd.store")


@cache
def code_version() -> str:
    """Package version plus the git commit of the checkout, when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("any-size-diffusion")
    except PackageNotFoundError:
        pkg = "0+unknown"
    sha = ""
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if out.returncode == 0:
                sha = out.stdout.strip()
                dirty = subprocess.run(
                    ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
                if dirty.returncode == 0 and dirty.stdout.strip():
                    sha += "-dirty"
    return f"{pkg}+{sha}" if sha else pkg


class HashingWriter:
    """File wrapper that hashes and counts bytes as they are written."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self._raw.write(data)
        return len(data)

    def flush(self) -> None:
        self._raw.flush()

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    @property
    def version_id(self) -> str | None:
        """S3 VersionId of the object once closed (None without bucket versioning)."""
        vid = getattr(self._raw, "version_id", None)
        return vid if vid and vid != "null" else None


class VersionWriter:
    """Writes the files of one new version, then commits it.

    Files are written straight to their final keys under a fresh, unique version prefix;
    the version stays invisible until :meth:`commit` writes the commit record.
    """

    def __init__(
        self,
        store: StoreBackend,
        kind: str,
        name: str,
        version: str | None = None,
        input_hash: str | None = None,
    ) -> None:
        check_kind(kind)
        check_name(name)
        self.store = store
        self.ref = ArtifactRef(
            kind, name, check_version(version) if version is not None else new_version_id()
        )
        self.input_hash = input_hash
        self.files: dict[str, dict[str, Any]] = {}
        self.committed = False
        self.lease: Any = None  # artifact_store.leases.Lease of a pending version this run holds
        self.listed: FileListWriter | None = None  # files listed outside the record (a large version)

    @classmethod
    def for_pending(cls, store: StoreBackend, pending: PendingVersion) -> VersionWriter:
        return cls(store, pending.ref.kind, pending.ref.name, pending.ref.version, pending.input_hash)

    def _target(self, relpath: str) -> str:
        rel = check_relpath(relpath.replace("\\", "/").lstrip("/"), str(self.ref))
        if self.committed:
            raise StoreError(f"{self.ref} is committed; versions are immutable")
        if rel in self.files:
            raise StoreError(f"{rel!r} was already written in {self.ref}; files are written once")
        return rel

    @contextlib.contextmanager
    def open(self, relpath: str) -> Iterator[HashingWriter]:
        """Open a new file of this version for binary writing; its hash is recorded on close.
        The file appears whole or not at all: on a local disk it is written to a temporary name
        and renamed when closed; on S3 an object exists only once its upload completes."""
        rel = self._target(relpath)
        path = self.store.path(self.ref.prefix, rel)
        self.store.ensure_parent(path)
        target = f"{path}.{uuid.uuid4().hex}.tmp" if self.store.is_local else path
        try:
            with self.store.vfs.open(target, "wb") as raw:
                writer = HashingWriter(raw)
                yield writer
                fault_point("during-upload")
            if target != path:
                os.replace(target, path)
        finally:
            if target != path and os.path.exists(target):
                os.unlink(target)
        meta: dict[str, Any] = {"sha256": writer.sha256.hexdigest(), "size": writer.size}
        if writer.version_id:
            meta["version_id"] = writer.version_id
        self.files[rel] = meta
        fault_point("between-files")

    def discard(self, relpath: str) -> None:
        """Delete a file this writer wrote (before the commit): it is as if never written."""
        rel = check_relpath(relpath, str(self.ref))
        if self.committed:
            raise StoreError(f"{self.ref} is committed; versions are immutable")
        self.files.pop(rel, None)
        path = self.store.path(self.ref.prefix, rel)
        if self.store.fs.exists(path):
            self.store.fs.rm_file(path)

    def put_bytes(self, relpath: str, data: bytes) -> dict[str, Any]:
        """Write one file; returns its recorded metadata (sha256, size, S3 VersionId)."""
        with self.open(relpath) as f:
            f.write(data)
        return self.files[relpath]

    def put_file(self, relpath: str, local_path: str | Path, chunk: int = 8 << 20) -> None:
        with open(local_path, "rb") as src, self.open(relpath) as dst:
            while block := src.read(chunk):
                dst.write(block)

    def add_files(self, files: dict[str, dict[str, Any]], row: int | None = None) -> None:
        """Adopt files that other workers wrote into this same version (fan-out writers). With
        `row` (the manifest row they belong to, given in row order), they go to the version's
        file list parts instead of its commit record (`artifact_store.file_lists`)."""
        for rel, meta in files.items():
            check_relpath(rel, str(self.ref))
            if row is not None:
                if self.listed is None:
                    self.listed = FileListWriter()
                self.listed.add(rel, meta, row)
                continue
            if rel in self.files and self.files[rel] != meta:
                raise StoreError(f"{rel!r} was written twice in {self.ref} with different content")
            self.files[rel] = dict(meta)

    def put_dir(self, local_dir: str | Path, prefix: str = "") -> None:
        """Upload every file under `local_dir` (sorted, so records are reproducible)."""
        local_dir = Path(local_dir)
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                rel = p.relative_to(local_dir).as_posix()
                self.put_file(f"{prefix.rstrip('/')}/{rel}" if prefix else rel, p)

    def _remove_unlisted(self) -> None:
        """A version's content is exactly its record: a file in its folder that this commit will
        not list (a stray temporary file, something another hand put there) is removed, and
        logged, before the record is written; the pending version's own state (lease, fragments,
        marker) goes after it."""
        expected = set(self.files)
        if self.listed is not None:
            self.listed.close()
            expected.update(rel for rel, _ in self.listed.entries())
        stray = [
            rel
            for rel, _ in self.store.files_under(self.ref.prefix)
            if rel not in expected and rel != COMMIT_RECORD and rel.split("/", 1)[0] not in PENDING_STATE
        ]
        for rel in stray:
            self.store.fs.rm_file(self.store.path(self.ref.prefix, rel))
        if stray:
            log.warning(
                "%s: removed %d file(s) in its folder that its commit would not list: %s%s",
                self.ref,
                len(stray),
                ", ".join(stray[:5]),
                " ..." if len(stray) > 5 else "",
            )

    def _check_files_present(self) -> None:
        """Every file the record will list is in the store with its recorded size (a stat each on
        a local disk, one streamed listing of the version's prefix on an object store; memory
        does not grow with the number of files)."""
        listed = self.listed.entries() if self.listed is not None else iter(())
        wrong = []
        for rel, meta, info in self.store.match_listing(
            self.ref.prefix, itertools.chain(self.files.items(), listed)
        ):
            if info is None or info.get("size") != meta["size"]:
                wrong.append(
                    rel if info is None else f"{rel} ({info.get('size')} bytes, recorded {meta['size']})"
                )
                if len(wrong) > 5:
                    break
        if wrong:
            raise StoreError(
                f"{self.ref}: not committed, files it would list are missing or changed: "
                f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}"
            )

    def commit(
        self,
        *,
        parents: list[ArtifactRef | str] | None = None,
        params: dict[str, Any] | None = None,
        flow_run_id: str | None = None,
        summary: dict[str, Any] | None = None,
        input_hash: str | None = None,
    ) -> ArtifactRef:
        """Write the commit record (last), then move `LATEST`. Returns the committed reference."""
        if self.committed:
            raise StoreError(f"{self.ref} is already committed")
        if self.store.fs.exists(self.store.path(self.ref.prefix, COMMIT_RECORD)):
            raise StoreError(
                f"{self.ref} was committed by another run meanwhile; this run committed nothing "
                f"(versions are written once)"
            )
        if self.lease is not None:
            self.lease.check()  # only the run holding the job's lease tidies its folder
        self._remove_unlisted()
        if len(self.files) > INLINE_FILES_MAX:  # a large version: its record points at parts, sorted by path
            if self.listed is None:
                self.listed = FileListWriter()
            self.listed.add_sorted(sorted(self.files.items()))
            self.files = {}
        if self.listed is not None:
            self.listed.close()
        self._check_files_present()
        file_lists = []
        if self.listed is not None:
            for part in self.listed.finish(self):
                file_lists.append({**part, **self.files[part["path"]]})
        count = len(self.files) + (self.listed.count if self.listed else 0)
        size = sum(m["size"] for m in self.files.values()) + (self.listed.size_bytes if self.listed else 0)
        record = {
            "format": RECORD_FORMAT,
            "ref": str(self.ref),
            "kind": self.ref.kind,
            "name": self.ref.name,
            "version": self.ref.version,
            "committed_at": datetime.now(UTC).isoformat(),
            "parents": [str(p) for p in (parents or [])],
            "params": params or {},
            "input_hash": input_hash or self.input_hash,
            "flow_run_id": flow_run_id,
            "code_version": code_version(),
            "summary": summary or {},
            "files": dict(sorted(self.files.items())),
            "file_count": count,
            "size_bytes": size,
        }
        if file_lists:
            record["file_lists"] = file_lists
        data = json.dumps(record, indent=2, sort_keys=True, default=str).encode()
        if self.lease is not None:
            self.lease.check()  # another run took the job over: this one commits nothing
        fault_point("before-commit-record")
        try:
            self.store.write_once(self.store.path(self.ref.prefix, COMMIT_RECORD), data)
        except FileExistsError:
            raise StoreError(
                f"{self.ref} was committed by another run meanwhile; this run committed nothing "
                f"(versions are written once)"
            ) from None
        self.committed = True
        if self.lease is not None:
            self.lease.finish()
        marker = self.store.path(self.ref.prefix, PENDING_MARKER)
        if self.store.fs.exists(marker):  # what a rerun looked for: the version is committed now
            self.store.fs.rm_file(marker)
        for pending_state in (LEASE_DIR, FRAGMENT_DIR):  # the record holds what they said
            folder = self.store.path(self.ref.prefix, pending_state)
            if self.store.fs.exists(folder):
                self.store.fs.rm(folder, recursive=True)
        fault_point("before-catalog")
        write_catalog_row(self.store, record)
        fault_point("before-latest")
        self.store.advance_latest(self.ref)
        return self.ref

"""Reading committed versions, the part of `ArtifactStore` that opens files: only what a version's
commit record lists is read (a path it does not list, or a link where a listed file was, is
refused); download and verify re-hash every file against the record, and verify reports what
lies in a version's folder that its record does not list."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artifact_store import file_lists
from artifact_store.backend import modified
from artifact_store.paths import check_relpath, local_target
from artifact_store.refs import (
    COMMIT_RECORD,
    ArtifactRef,
    CorruptFile,
    CorruptRecord,
    FileNotListed,
    StoreError,
)
from artifact_store.windows import bounded_map

if TYPE_CHECKING:
    from artifact_store.host import StoreHost
else:
    StoreHost = object

IO_WORKERS = 32  # requests in flight for verify and download on an object store
LOCAL_WORKERS = (
    1  # a local disk: hashing is the work; threads cost more than they gave (bench.scale, 200k files)
)

_CHECKED: set[tuple[str, str, str]] = set()  # (root, path, sha256) of files open_checked hashed


class VersionReading(StoreHost):
    """Files of committed versions (a part of `ArtifactStore`)."""

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
            meta = file_lists.lookup(
                self, ref.prefix, rec["file_lists"], relpath, pin=lambda rel: self._pinned(ref, rel)
            )
        return meta

    def iter_files(self, ref: ArtifactRef | str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every recorded file of a committed version (a large version's lists streamed)."""
        ref = self.resolve(ref)
        rec = self.record(ref)
        yield from rec["files"].items()
        if rec.get("file_lists"):
            yield from file_lists.iterate(
                self, ref.prefix, rec["file_lists"], pin=lambda rel: self._pinned(ref, rel)
            )

    def _pinned(self, ref: ArtifactRef, relpath: str, meta: dict[str, Any] | None = None) -> str:
        """Path of a committed file; on a versioned S3 bucket, pinned to the recorded VersionId."""
        path = self.path(ref.prefix, check_relpath(relpath, str(ref)))
        if self.is_local:
            return path
        meta = meta or self.record(ref)["files"].get(relpath) or self.file_meta(ref, relpath)
        if meta and meta.get("version_id"):
            return f"{path}?versionId={meta['version_id']}"
        return path

    def listed(self, ref: ArtifactRef | str, relpath: str) -> tuple[ArtifactRef, dict[str, Any], str]:
        """A committed file as its record lists it: (ref, recorded meta, path to read). A version's
        content is exactly its record: a path it does not list is refused (FileNotListed), however
        it got into the folder; on a local disk so is a path through a link (it could point
        anywhere the reader can read)."""
        ref = self.resolve(ref)
        meta = self.file_meta(ref, check_relpath(relpath, str(ref)))
        if meta is None:
            raise FileNotListed(
                f"{ref} does not list {relpath!r}: a version holds exactly the files its commit "
                f"record lists (`asd store show {ref}`)"
            )
        path = self._pinned(ref, relpath, meta)
        if self.is_local and os.path.realpath(path) != os.path.abspath(path):
            raise FileNotListed(
                f"{ref}: {relpath} is (or lies under) a link in the store, not the file its commit "
                f"record lists; run `asd store verify {ref}`"
            )
        return ref, meta, path

    def open(self, ref: ArtifactRef | str, relpath: str, mode: str = "rb") -> Any:
        """A committed file, opened for reading (only a file its record lists)."""
        if "w" in mode or "a" in mode:
            raise StoreError("committed versions are read-only; write with new_version()")
        _, _, path = self.listed(ref, relpath)
        return self.vfs.open(path, mode)

    def read_bytes(self, ref: ArtifactRef | str, relpath: str) -> bytes:
        """A committed file's bytes (only a file its record lists)."""
        _, meta, path = self.listed(ref, relpath)
        return self.cat(path, size=meta["size"], versioned=True)

    def read_checked(self, ref: ArtifactRef | str, relpath: str) -> bytes:
        """A committed file's bytes, re-hashed against the sha256 its record gives (what a reader
        acts on: manifests, indexes); CorruptFile when they differ."""
        ref, meta, path = self.listed(ref, relpath)
        data = self.cat(path, size=meta["size"], versioned=True)
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise CorruptFile(
                f"{relpath} of {ref} does not match its recorded sha256 (changed after the commit); "
                f"`asd store verify {ref}` lists what else changed"
            )
        return data

    def open_checked(self, ref: ArtifactRef | str, relpath: str) -> Any:
        """A committed file opened for reading after its bytes, read through the same handle,
        hashed against its record's sha256 (CorruptFile when they differ); hashed once per process
        and file, and not when the read is pinned to the recorded S3 object version, which cannot
        change. What a reader acts on and seeks in (Parquet manifests, metrics) goes through here."""
        ref, meta, path = self.listed(ref, relpath)
        f = self.vfs.open(path, "rb")
        key = (self.root, path, str(meta.get("sha256")))
        if "?versionId=" in path or key in _CHECKED:
            return f
        h, size = hashlib.sha256(), 0
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
        if h.hexdigest() != meta.get("sha256") or size != meta.get("size"):
            f.close()
            raise CorruptFile(
                f"{relpath} of {ref} does not match its recorded sha256 (changed after the commit); "
                f"`asd store verify {ref}` lists what else changed"
            )
        f.seek(0)
        _CHECKED.add(key)
        return f

    def read_range(self, ref: ArtifactRef | str, relpath: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a committed file (one ranged request: a member of a tar shard),
        inside the size its record gives."""
        _, meta, path = self.listed(ref, relpath)
        if not 0 <= start <= end <= meta["size"]:
            raise StoreError(
                f"bytes [{start}, {end}) are not inside {relpath} of {ref} ({meta['size']} bytes)"
            )
        return self.cat(path, start=start, end=end, versioned=True)

    def download(
        self, ref: ArtifactRef | str, dest: str | Path, prefix: str = "", workers: int | None = None
    ) -> Path:
        """Copy the committed files of a version (optionally under `prefix`) to a local folder,
        `workers` at a time; every target is checked to stay inside `dest` and every file's
        sha256 and size checked."""
        ref = self.resolve(ref)
        dest = Path(dest)
        cut = prefix.rstrip("/") + "/" if prefix else ""

        def fetch(item: tuple[str, dict[str, Any]]) -> None:
            rel, meta = item
            target = local_target(dest, rel[len(cut) :], str(ref))
            target.parent.mkdir(parents=True, exist_ok=True)
            h, size = hashlib.sha256(), 0
            with self.vfs.open(self._pinned(ref, rel, meta), "rb") as src, open(target, "wb") as out:
                while block := src.read(8 << 20):
                    h.update(block)
                    size += len(block)
                    out.write(block)
            if size != meta["size"] or h.hexdigest() != meta["sha256"]:
                target.unlink()
                raise StoreError(
                    f"{ref}: {rel} does not match its commit record (size {size} vs "
                    f"{meta['size']}, sha256 {h.hexdigest()[:16]}…); run `asd store verify`"
                )

        for _ in bounded_map(
            fetch,
            ((r, m) for r, m in self.iter_files(ref) if not cut or r.startswith(cut)),
            workers or self.io_workers,
        ):
            pass
        return dest

    def verify(self, ref: ArtifactRef | str, shallow: bool = False, workers: int | None = None) -> list[str]:
        """Re-hash every recorded file (the recorded S3 VersionId, where there is one, and check
        it is still the current object), `workers` files at a time; one line per problem, empty
        when intact. `shallow`: no file is read (but a large version's file-list parts, hashed
        against the record): one listing of the version checks every recorded file is there with
        its size and was not written after the commit record. A
        damaged commit record is a problem, not an exception."""
        try:
            ref = self.resolve(ref)
            self.record(ref)
        except CorruptRecord as exc:
            return [str(exc)]
        problems: list[str] = []
        try:
            if shallow:
                return self._verify_listing(ref) + self.unlisted(ref)
            for found in bounded_map(
                lambda item: self._verify_file(ref, *item), self.iter_files(ref), workers or self.io_workers
            ):
                problems += found
            return problems + self.unlisted(ref)
        except CorruptFile as exc:  # a file-list part edited after the commit: nothing it lists is known
            return [*problems, f"{ref}: {exc}"]

    def unlisted(self, ref: ArtifactRef) -> list[str]:
        """A problem line for each file in the version's folder that its record does not list,
        and each link (one listing; the recorded paths held as a set while it runs)."""
        recorded = {rel for rel, _ in self.iter_files(ref)}
        problems = []
        for rel, info in self.files_under(ref.prefix):
            if info.get("islink"):
                problems.append(f"{ref}: {rel}: a link, not a file (readers refuse it)")
            elif rel not in recorded and rel != COMMIT_RECORD:
                problems.append(
                    f"{ref}: {rel}: in the version's folder but not in its commit record (readers "
                    "refuse it; remove it)"
                )
        return sorted(problems)

    def _verify_file(self, ref: ArtifactRef, rel: str, meta: dict[str, Any]) -> list[str]:
        problems = []
        vid = meta.get("version_id")
        if vid and not self.is_local:
            try:
                current = self.vfs.info(self.path(ref.prefix, rel), refresh=True).get("VersionId")
            except FileNotFoundError:
                current = None
            if current != vid:
                problems.append(
                    f"{ref}: {rel}: current S3 VersionId {current} != recorded {vid} "
                    "(overwritten or deleted after commit)"
                )
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
        sealed = modified(record) if record else float("inf")
        problems = []
        for rel, meta, info in self.match_listing(ref.prefix, self.iter_files(ref)):
            if info is None:
                problems.append(f"{ref}: {rel}: missing")
            elif info.get("size") != meta["size"]:
                problems.append(f"{ref}: {rel}: size {info.get('size')} != recorded {meta['size']}")
            elif modified(info) > sealed + 1:
                problems.append(f"{ref}: {rel}: written after the commit record (overwritten?)")
        return sorted(problems)

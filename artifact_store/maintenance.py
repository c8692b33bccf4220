"""Keeping a store tidy, the part of `ArtifactStore` that looks across versions: leftovers of
killed writers (`uncommitted`, `gc`) and the catalog of committed versions."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from artifact_store.backend import modified
from artifact_store.catalog import catalog_row_path, read_catalog, read_catalog_rows, write_catalog_row
from artifact_store.leases import lease_epochs, live_holder, read_lease
from artifact_store.refs import (
    CATALOG_DIR,
    FRAGMENT_DIR,
    LEASE_DIR,
    PENDING_MARKER,
    VERSION_RE,
    ArtifactRef,
    CorruptRecord,
    PendingVersion,
)

if TYPE_CHECKING:
    from artifact_store.host import StoreHost
else:
    StoreHost = object


log = logging.getLogger("asd.store")


class Maintenance(StoreHost):
    """Leftovers and the catalog (a part of `ArtifactStore`)."""

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
            times = [modified(self.fs.info(f"{base}/{PENDING_MARKER}"))]
            for sub in (LEASE_DIR, FRAGMENT_DIR):
                with contextlib.suppress(FileNotFoundError):  # no lease taken / no chunk finished yet
                    times += [modified(i) for i in self.fs.ls(f"{base}/{sub}", detail=True)]
            return max(times)
        files = {f: info for f, info in self.fs.find(prefix, detail=True).items() if f.startswith(base + "/")}
        return max((modified(i) for i in files.values()), default=None)

    def _mtime(self, path: str) -> float:
        return modified(self.fs.info(path))

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

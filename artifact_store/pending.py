"""A pending (uncommitted) version's files by their path in the version: what the stages write
into a version before its commit and read back (fragments, plan files, shards a merge rewrites).
Paths are checked (no `..`, no absolute paths) and composed here, so nothing outside the store
touches its file system; on a local disk a path through a link is refused, since whatever the
pipeline wrote may have been replaced by someone sharing the store."""

from __future__ import annotations

import os
from typing import IO, Any

from artifact_store.paths import check_relpath
from artifact_store.refs import FileNotListed, PendingVersion


class PendingFiles:
    """The files of one pending version (`store.pending_files(pending)`)."""

    def __init__(self, store: Any, pending: PendingVersion) -> None:
        self.store, self.pending = store, pending

    def path(self, rel: str) -> str:
        """The store path of `rel` (checked; a link on a local disk is refused)."""
        path = self.store.path(
            self.pending.ref.prefix, check_relpath(rel, str(self.pending.ref), store_state=True)
        )
        if self.store.is_local and os.path.lexists(path) and os.path.realpath(path) != os.path.abspath(path):
            raise FileNotListed(
                f"{rel} in {self.pending.ref} is (or lies under) a link, not a file this job wrote"
            )
        return path

    def open(self, rel: str, mode: str = "rb") -> IO[bytes]:
        if "w" in mode:
            self.store.ensure_parent(self.path(rel))
        return self.store.fs.open(self.path(rel), mode)

    def read(self, rel: str) -> bytes:
        return self.store.fs.cat_file(self.path(rel))

    def write_atomic(self, rel: str, data: bytes) -> None:
        self.store.write_atomic(self.path(rel), data)

    def exists(self, rel: str) -> bool:
        return self.store.fs.exists(self.path(rel))

    def ls(self, rel_dir: str) -> list[str]:
        """Names (not paths) in a folder of the version; [] when there is none."""
        try:
            names = self.store.fs.ls(self.path(rel_dir), detail=False)
        except FileNotFoundError:
            return []
        return [n.rstrip("/").rsplit("/", 1)[-1] for n in names]

    def remove(self, rel: str) -> bool:
        """Remove a file (False: it was gone already)."""
        try:
            self.store.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            return False
        return True

    def sha256_of(self, rel: str, expected_size: int | None = None) -> tuple[str, int]:
        return self.store.sha256_of(self.path(rel), expected_size)

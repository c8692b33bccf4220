"""A folder of the store by paths inside it: a pending (uncommitted) version's files, what the
stages write into a version before its commit and read back (fragments, plan files, shards a
merge rewrites), and the dashboard's built site (`_site/`). Paths are checked (no `..`, no
absolute paths) and composed here, so nothing outside the store touches its file system; on a
local disk a path through a link is refused, since whatever the pipeline wrote may have been
replaced by someone sharing the store."""

from __future__ import annotations

import os
from typing import IO, Any

from artifact_store.paths import check_relpath
from artifact_store.refs import FileNotListed, PendingVersion


class StoreFolder:
    """The files under one folder of the store (`prefix`), by their path in it; `label` names
    the folder in errors."""

    def __init__(self, store: Any, prefix: str, label: str) -> None:
        self.store, self.prefix, self.label = store, prefix, label

    def path(self, rel: str) -> str:
        """The store path of `rel` (checked; a link on a local disk is refused)."""
        path = self.store.path(self.prefix, check_relpath(rel, self.label, store_state=True))
        if self.store.is_local and os.path.lexists(path) and os.path.realpath(path) != os.path.abspath(path):
            raise FileNotListed(
                f"{rel} in {self.label} is (or lies under) a link, not a file the pipeline wrote"
            )
        return path

    def size_of(self, rel: str) -> int | None:
        """The size of the file at `rel`; None when there is none (or a folder is there)."""
        try:
            info = self.store.fs.info(self.path(rel))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

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


class PendingFiles(StoreFolder):
    """The files of one pending version (`store.pending_files(pending)`)."""

    def __init__(self, store: Any, pending: PendingVersion) -> None:
        super().__init__(store, pending.ref.prefix, str(pending.ref))
        self.pending = pending

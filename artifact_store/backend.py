"""The files under one store root, and no more: paths and URIs, atomic writes, the `LATEST`
pointers. What the version writer and the catalog need of a store (`ArtifactStore` builds
reuse, resolve, verify and gc on top of it)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs

from artifact_store.faults import fault_point
from artifact_store.paths import check_relpath
from artifact_store.redaction import redact
from artifact_store.refs import LATEST_POINTER, VERSION_RE, ArtifactRef, StoreError
from artifact_store.s3_options import s3_retries, s3_storage_options
from data_manifests.runtime import runtime

DEFAULT_STORE = "./asd-store"


def _filesystems(url: str) -> tuple[fsspec.AbstractFileSystem, fsspec.AbstractFileSystem, str]:
    """(lister, versioned, root) for a store URL. On S3, a version-aware client writes (to
    learn each object's VersionId) and reads pinned versions; a plain one lists, since version
    listings keep showing prefixes whose objects were deleted. Elsewhere both are one client."""
    if url.startswith(("s3://", "s3a://")):
        opts = s3_storage_options()
        fs, root = url_to_fs(url, **opts)
        vfs, _ = url_to_fs(url, **{**opts, "version_aware": True})
        for client in (fs, vfs):
            client.retries = s3_retries()  # s3fs' backoff loop (class attribute)
        return fs, vfs, root
    if "://" not in url:
        url = str(Path(url).expanduser().resolve())
    fs, root = url_to_fs(url)
    return fs, fs, root


def store_url_from_env(url: str | None = None) -> str:
    """The store URL to use: the one given, else $ASD_STORE, else ./asd-store (made absolute,
    so flows and workers started elsewhere open the same folder)."""
    raw = url or runtime().store or DEFAULT_STORE
    if "://" not in raw:
        raw = str(Path(raw).expanduser().resolve())
    return raw


class StoreBackend:
    """One store root (`file://`, a local path, or `s3://bucket/prefix`) as files.

    `url` is the operational URL (pass it on to open the same store elsewhere);
    `display_url` is the same with credentials removed, for messages and logs."""

    def __init__(self, url: str | None = None) -> None:
        self.url = store_url_from_env(url)
        self.display_url = redact(self.url)
        try:
            self.fs, self.vfs, self.root = _filesystems(self.url)
        except (ValueError, ImportError) as exc:
            raise StoreError(f"cannot open the store {self.display_url!r}: {exc}") from exc
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = self.protocol in ("file", "local")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.display_url!r})"

    # paths -----------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """Full URL of a path inside the store (what a user or another tool opens)."""
        p = self.path(*parts)
        return p if self.is_local else f"{self.protocol}://{p}"

    def file_uri(self, ref: ArtifactRef, relpath: str) -> str:
        return self.uri(ref.prefix, check_relpath(relpath, str(ref)))

    def ensure_parent(self, path: str) -> None:
        if self.is_local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)

    def _synced_temp(self, path: str, data: bytes) -> str:
        """`data` in a flushed and fsynced temporary file beside `path` (local disks only)."""
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def write_atomic(self, path: str, data: bytes) -> None:
        """Whole-or-nothing write: rename on a local disk, a single PUT on object stores."""
        self.ensure_parent(path)
        if self.is_local:
            os.replace(self._synced_temp(path, data), path)
        else:
            self.fs.pipe_file(path, data)

    def write_once(self, path: str, data: bytes) -> None:
        """Whole-or-nothing and only if nothing is there yet (a commit record): FileExistsError
        when another writer got there first (a hard link on a local disk, a conditional PUT,
        If-None-Match: *, on S3)."""
        self.ensure_parent(path)
        if self.is_local:
            tmp = self._synced_temp(path, data)
            fault_point("during-commit-record")  # written, not yet linked: a reader sees nothing
            try:
                os.link(tmp, path)  # fails if the path exists: exactly one writer wins
            finally:
                os.unlink(tmp)
            return
        fault_point("during-commit-record")  # a single PUT: all or nothing
        try:
            self.fs.pipe_file(path, data, mode="create")
        except Exception:
            if self.fs.exists(path):
                raise FileExistsError(path) from None
            raise

    def read_latest(self, kind: str, name: str) -> str | None:
        try:
            text = self.fs.cat_file(self.path(kind, name, LATEST_POINTER)).decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None
        return text if VERSION_RE.fullmatch(text) else None

    def advance_latest(self, ref: ArtifactRef) -> None:
        pointer = self.path(ref.kind, ref.name, LATEST_POINTER)
        current = self.read_latest(ref.kind, ref.name)
        if current is None or current < ref.version:
            self.write_atomic(pointer, ref.version.encode())


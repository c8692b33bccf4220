"""The files under one store root, and no more: paths and URIs, atomic writes, the `LATEST`
pointers. What the version writer and the catalog need of a store (`ArtifactStore` builds
reuse, resolve, verify and gc on top of it)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from artifact_store.faults import fault_point
from artifact_store.paths import check_relpath
from artifact_store.redaction import redact
from artifact_store.refs import LATEST_POINTER, VERSION_RE, ArtifactRef, StoreError
from artifact_store.s3_options import s3_retries, s3_storage_options
from data_manifests.runtime import runtime

DEFAULT_STORE = "./asd-store"
MATCH_WINDOW = 10_000  # expected files held while the listing catches up (match_listing)
SINGLE_GET_BYTES = 16 << 20  # on S3, smaller objects are read with one GET (larger: concurrent ranges)


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


def modified(info: dict[str, Any]) -> float:
    """When a listed file was last written (local mtime or S3 LastModified), in epoch seconds."""
    m = info.get("mtime") or info.get("LastModified") or info.get("created")
    return m.timestamp() if isinstance(m, datetime) else float(m or 0)


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

    def cat(
        self,
        path: str,
        start: int | None = None,
        end: int | None = None,
        size: int | None = None,
        versioned: bool = False,
    ) -> bytes:
        """A file's bytes (or [start, end)) in one request. On S3 a whole read of an object under
        `SINGLE_GET_BYTES` (or of unknown size that is known to be small: a record) skips the
        HEAD that s3fs makes to split large downloads."""
        fs = self.vfs if versioned else self.fs
        if self.is_local:
            return fs.cat_file(path, start=start, end=end)
        single = start is not None or end is not None or size is None or size <= SINGLE_GET_BYTES
        return fs.cat_file(path, start=start, end=end, **({"max_concurrency": 1} if single else {}))

    def sha256_of(
        self, path: str, expected_size: int | None = None, versioned: bool = False
    ) -> tuple[str, int]:
        """(sha256 hex, size) of a file, streamed. A file expected small is read with one ranged
        GET of at most one byte more than expected (no HEAD; a file grown since is caught without
        being read whole). FileNotFoundError when it is not there."""
        h, size = hashlib.sha256(), 0
        if isinstance(expected_size, int) and 0 < expected_size <= SINGLE_GET_BYTES:
            data = self.cat(path, start=0, end=expected_size + 1, versioned=versioned)
            h.update(data)
            return h.hexdigest(), len(data)
        with (self.vfs if versioned else self.fs).open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
                size += len(block)
        return h.hexdigest(), size

    def match_listing(
        self, prefix: str, expected: Iterable[tuple[str, Any]]
    ) -> Iterator[tuple[str, Any, dict[str, Any] | None]]:
        """Each expected (relpath, meta) under `prefix` with what the store has there (a dict
        with `size` and `mtime`/`LastModified`; None: missing), in memory that does not grow with
        the number of files. A local disk: one stat each. An object store: one listing, streamed
        page by page and matched against the expected files in a window (listings come in key
        order, as a generation's files are listed: the window stays small)."""
        base = self.path(prefix).rstrip("/") + "/"
        if self.is_local:
            for rel, meta in expected:
                try:
                    st = os.stat(base + rel)
                except (FileNotFoundError, NotADirectoryError):
                    yield rel, meta, None
                    continue
                yield rel, meta, {"size": st.st_size, "mtime": st.st_mtime}
            return
        listing = self._listing(base)
        waiting: dict[str, Any] = {}  # expected, not listed yet
        extra: dict[str, dict[str, Any]] = {}  # listed before it was expected (or never: unlisted files)
        for rel, meta in expected:
            if rel in extra:
                yield rel, meta, extra.pop(rel)
                continue
            waiting[rel] = meta
            while len(waiting) > MATCH_WINDOW and (item := next(listing, None)) is not None:
                if item[0] in waiting:
                    yield item[0], waiting.pop(item[0]), item[1]
                else:
                    extra[item[0]] = item[1]
        for lrel, info in listing:
            if not waiting:
                break
            if lrel in waiting:
                yield lrel, waiting.pop(lrel), info
        for rel, meta in waiting.items():
            yield rel, meta, None

    def files_under(self, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every file under `prefix` as (relpath, info with `size`), streamed; on a local disk links
        are not followed, and a link is listed as itself (`islink` in its info)."""
        base = self.path(prefix).rstrip("/") + "/"
        if not self.is_local:
            yield from self._listing(base)
            return
        for top, dirs, names in os.walk(base, followlinks=False):
            rel_top = top[len(base) :].strip("/")
            links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
            for name in sorted(names) + links:
                st = os.lstat(os.path.join(top, name))
                rel = f"{rel_top}/{name}" if rel_top else name
                yield (
                    rel,
                    {
                        "size": st.st_size,
                        "mtime": st.st_mtime,
                        "islink": os.path.islink(os.path.join(top, name)),
                    },
                )

    def _listing(self, base: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every object under `base` (relpath, info), one page of the listing at a time."""
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(base)
        pages = self.fs._iterdir(bucket, prefix=key, delimiter="")
        while True:
            try:
                info = sync(self.fs.loop, pages.__anext__)
            except StopAsyncIteration:
                return
            name = info["name"]
            yield name.split(base, 1)[-1] if base in name else name, info

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

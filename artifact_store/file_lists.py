"""The file list of a large version, outside its commit record (Iceberg's manifest list, in
small): Parquet parts `_files/part-<n>.parquet` (path, sha256, size, S3 VersionId, the manifest
row a file belongs to), written in row order with row groups of `GROUP_ROWS` files; the commit
record names each part with its row range, sha256 and size, so the record stays a few KB
whatever the number of files. A part is store data read back: before a process first reads
from it, its bytes are hashed against the record's sha256 (once per process and part; not when
the read is pinned to the recorded S3 object version, which cannot change), so an entry edited
after the commit is refused, not acted on.

Opening one file of such a version reads the record, the part whose row range holds the file's
row, that part's footer and one row group (a generation's file names start with their row:
`images/<row>-...`); listing streams the parts one row group at a time. A version's small files
(its manifest, the parts themselves) stay in the record's `files`, as every version's did."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from artifact_store.refs import CorruptFile
from data_manifests.schemas import FILE_LIST

if TYPE_CHECKING:
    from artifact_store.backend import StoreBackend

FILE_LIST_DIR = "_files"
GROUP_ROWS = 4096  # files per row group: what one lookup reads
PART_ROWS = 1 << 18  # files per part: its footer (row statistics only) stays under the 64 KB a reader
# fetches first, so opening one file costs the record, the footer, one row group and the file itself
ROW_OF = re.compile(r"^(?:images/|shards/rows-)(\d+)-")  # an image's files; a chunk's tar (its first row)


def row_of(rel: str) -> int | None:
    """The manifest row a file of a generations version is listed with (from its name)."""
    m = ROW_OF.match(rel)
    return int(m.group(1)) if m else None


class FileListWriter:
    """Entries appended in row order into local Parquet parts; `finish` uploads them through the
    version writer and returns their record entries."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="asd-files-")
        self._parts: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._buffer: list[dict[str, Any]] = []
        self._rows_in_part = 0
        self.count = 0
        self.size_bytes = 0

    def add_sorted(self, files: list[tuple[str, dict[str, Any]]]) -> None:
        """Files that belong to no manifest row, in path order, in row groups of their own (each
        group's path range in its statistics: a lookup reads the one group that can hold a path)."""
        self._flush()
        for rel, meta in files:
            self.add(rel, meta, None)

    def add(self, rel: str, meta: dict[str, Any], row: int | None) -> None:
        self._buffer.append(
            {
                "path": rel,
                "sha256": meta["sha256"],
                "size": int(meta["size"]),
                "version_id": meta.get("version_id"),
                "row": row,
            }
        )
        self.count += 1
        self.size_bytes += int(meta["size"])
        if len(self._buffer) >= GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            path = os.path.join(self._tmp.name, f"part-{len(self._parts):05d}.parquet")
            self._writer = pq.ParquetWriter(path, FILE_LIST, write_statistics=["row", "path"])
            self._parts.append({"local": path, "rows": [None, None], "count": 0})
        table = pa.Table.from_pylist(self._buffer, schema=FILE_LIST)
        self._writer.write_table(table, row_group_size=GROUP_ROWS)
        part = self._parts[-1]
        rows = [r for r in table.column("row").to_pylist() if r is not None]
        if rows:
            lo, hi = part["rows"]
            part["rows"] = [
                min(rows) if lo is None else min(lo, *rows),
                max(rows) if hi is None else max(hi, *rows),
            ]
        paths = table.column("path").to_pylist()
        lo, hi = part.setdefault("paths", [min(paths), max(paths)])
        part["paths"] = [min(lo, min(paths)), max(hi, max(paths))]
        part["count"] += table.num_rows
        self._rows_in_part += table.num_rows
        self._buffer = []
        if self._rows_in_part >= PART_ROWS:
            self._writer.close()
            self._writer, self._rows_in_part = None, 0

    def close(self) -> None:
        """No more entries: the local parts are complete."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """The entries written so far (after `close`), read back from the local parts."""
        for part in self._parts:
            pf = pq.ParquetFile(part["local"])
            for g in range(pf.num_row_groups):
                for d in pf.read_row_group(g).to_pylist():
                    yield d["path"], _entry(d)

    def finish(self, version_writer: Any) -> list[dict[str, Any]]:
        """Upload the parts as files of the version; their entries for the commit record."""
        self.close()
        out = []
        for i, part in enumerate(self._parts):
            rel = f"{FILE_LIST_DIR}/part-{i:05d}.parquet"
            version_writer.put_file(rel, part["local"])
            out.append(
                {"path": rel, "rows": part["rows"], "paths": part.get("paths"), "count": part["count"]}
            )
        self._tmp.cleanup()
        return out


class RangedFile(io.RawIOBase):
    """A remote file of known size, read only by ranged GETs of the bytes asked for (no HEAD, no
    read-ahead): what pyarrow needs to read a Parquet footer and one row group."""

    def __init__(self, store: StoreBackend, path: str, size: int) -> None:
        super().__init__()
        self._store, self._path, self._size, self._pos = store, path, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence] + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b""
        data = self._store.cat(self._path, start=self._pos, end=end, versioned=True)
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _entry(d: dict[str, Any]) -> dict[str, Any]:
    meta = {"sha256": d["sha256"], "size": d["size"]}
    if d.get("version_id"):
        meta["version_id"] = d["version_id"]
    return meta


_CHECKED: set[tuple[str, str, str]] = set()  # (store root, part path, sha256) hashed in this process
_CHECKED_LOCK = threading.Lock()
HASH_BLOCK = 8 << 20


def _check_part(store: StoreBackend, prefix: str, path: str, part: dict[str, Any]) -> None:
    """The part's bytes are the ones the commit record names (CorruptFile otherwise); hashed once
    per process and part. Not hashed: a read pinned to the recorded S3 object version (immutable),
    and a part recorded without a sha256 (written before they were)."""
    want = part.get("sha256")
    key = (store.root, path, str(want))
    if not want or "?versionId=" in path or key in _CHECKED:
        return
    h, size = hashlib.sha256(), 0
    with store.vfs.open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
            size += len(block)
    if h.hexdigest() != want or (isinstance(part.get("size"), int) and size != part["size"]):
        raise CorruptFile(
            f"{part['path']} of {prefix} (a file list) does not match the sha256 its commit record "
            "gives: changed after the commit; `asd store verify` lists what else changed"
        )
    with _CHECKED_LOCK:
        _CHECKED.add(key)


@contextlib.contextmanager
def _open_part(
    store: StoreBackend, prefix: str, part: dict[str, Any], pinned: str | None
) -> Iterator[pq.ParquetFile]:
    """A part, read by ranges (its footer, then the row groups asked for; never whole). On an
    object store its recorded size spares a HEAD, and each row group's columns come in one ranged
    GET (`pre_buffer`), with no read-ahead past them."""
    path = pinned or store.path(prefix, part["path"])
    _check_part(store, prefix, path, part)
    if store.is_local or not isinstance(part.get("size"), int):
        with store.vfs.open(path, "rb") as f:
            yield pq.ParquetFile(f)
        return
    yield pq.ParquetFile(RangedFile(store, path, part["size"]), pre_buffer=True)


_GROUPS: OrderedDict[tuple[str, str, str, int], dict[str, dict[str, Any]]] = OrderedDict()
_GROUPS_KEPT = 8  # row groups of recent lookups (readers go through a version in row order)
_GROUPS_LOCK = threading.Lock()


def _cached_group(key: tuple[str, str, str, int]) -> dict[str, dict[str, Any]] | None:
    with _GROUPS_LOCK:
        if key in _GROUPS:
            _GROUPS.move_to_end(key)
            return _GROUPS[key]
    return None


def _keep_group(key: tuple[str, str, str, int], entries: dict[str, dict[str, Any]]) -> None:
    with _GROUPS_LOCK:
        _GROUPS[key] = entries
        while len(_GROUPS) > _GROUPS_KEPT:
            _GROUPS.popitem(last=False)


def lookup(
    store: StoreBackend, prefix: str, parts: list[dict[str, Any]], rel: str, pin: Any = None
) -> dict[str, Any] | None:
    """One file's entry: only the parts and row groups whose row range (from the file's name) or
    path range can hold it are read (the last few row groups read are kept: the next file of a
    reader going in row order costs no request). Parts are immutable files of committed versions,
    so what is kept stays true. Parts written before path ranges were recorded are read as before."""
    row = row_of(rel)

    def may_hold(rows: Any, paths: Any) -> bool:
        by_row = row is not None and rows is not None and rows[0] is not None and rows[0] <= row <= rows[1]
        if paths is None:  # no path range: the row range decides, or every group is read
            return by_row or row is None or rows is None or rows[0] is None
        return by_row or paths[0] <= rel <= paths[1]

    for part in parts:
        if not may_hold(part.get("rows"), part.get("paths")):
            continue
        part_id = (store.root, prefix, part.get("sha256") or part["path"])
        with _GROUPS_LOCK:
            kept = [k for k in _GROUPS if k[:3] == part_id]
        for key in kept:
            entries = _cached_group(key)
            if entries is not None and rel in entries:
                return entries[rel]
        with _open_part(store, prefix, part, pin(part["path"]) if pin else None) as pf:
            row_col, path_col = (
                pf.schema_arrow.get_field_index("row"),
                pf.schema_arrow.get_field_index("path"),
            )
            for g in range(pf.num_row_groups):
                group = pf.metadata.row_group(g)
                if not may_hold(
                    _range(group.column(row_col).statistics), _range(group.column(path_col).statistics)
                ):
                    continue
                entries = {
                    d["path"]: _entry(d)
                    for d in pf.read_row_group(
                        g, columns=["path", "sha256", "size", "version_id"]
                    ).to_pylist()
                }
                _keep_group((*part_id, g), entries)
                if rel in entries:
                    return entries[rel]
    return None


def _range(stats: Any) -> list[Any] | None:
    """A row group column's [min, max], or None when it has no statistics."""
    return [stats.min, stats.max] if stats is not None and stats.has_min_max else None


def iterate(
    store: StoreBackend, prefix: str, parts: list[dict[str, Any]], pin: Any = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every listed file, streamed one row group at a time."""
    for part in parts:
        with _open_part(store, prefix, part, pin(part["path"]) if pin else None) as pf:
            for g in range(pf.num_row_groups):
                for d in pf.read_row_group(g).to_pylist():
                    yield d["path"], _entry(d)

"""A pending version's durable fragments, the one place they are named, written, listed, read
and checked: ingest partitions, generation chunks and upscale images all keep their finished
work here until the commit merges it.

A fragment is one Parquet file of manifest rows, `_fragments/<unit>-<id>.parquet`, written whole
or not at all (`write_atomic`), with its sha256 and size returned to whoever wrote it. Units and
their ids (`FRAGMENT_UNITS`):

    part   <partition stem>           an ingest partition's rows, an upscale partition compacted
    rows   <first row>-<stop row>     a generation chunk (10 digits each)
    img    <partition stem>-<nnnnnn>  one upscaled input, until its partition is compacted

A rerun lists the folder once (`listing`); every name that is not a fragment of a known unit is
ignored. Rows read back are input like any other: `read` checks a fragment against the sha256
its writer reported when there is one, and against the schema always; callers then check each
row against the job (its key, its files re-hashed: `rehash`). The commit removes the folder."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from artifact_store.pending import PendingFiles
from artifact_store.refs import FRAGMENT_DIR, PendingVersion, StoreError

FRAGMENT_UNITS = {
    "part": re.compile(r"[A-Za-z0-9_]{1,64}"),
    "rows": re.compile(r"\d{10}-\d{10}"),
    "img": re.compile(r"[A-Za-z0-9_]{1,64}-\d{6,10}"),
}
NAME = re.compile(r"(?P<unit>[a-z]+)-(?P<id>.+)\.parquet")


class FragmentDamaged(StoreError):
    """A fragment that does not read, or does not match what its writer reported."""


@dataclass(frozen=True)
class Fragment:
    """A written fragment: its path in the version, its unit and id, rows, sha256 and size."""

    path: str
    unit: str
    id: str
    rows: int
    sha256: str
    size: int


def fragment_path(unit: str, fragment_id: str) -> str:
    """`_fragments/<unit>-<id>.parquet`; a unit or id outside `FRAGMENT_UNITS` is refused."""
    if unit not in FRAGMENT_UNITS or not FRAGMENT_UNITS[unit].fullmatch(fragment_id):
        raise ValueError(f"not a fragment name: unit {unit!r}, id {fragment_id!r}")
    return f"{FRAGMENT_DIR}/{unit}-{fragment_id}.parquet"


def rows_id(start: int, stop: int) -> str:
    return f"{start:010d}-{stop:010d}"


def img_id(stem: str, n: int) -> str:
    return f"{stem}-{n:06d}"


class FragmentLog:
    """The fragments of one pending version, rows of one `schema`."""

    def __init__(self, store: Any, pending: PendingVersion, schema: pa.Schema) -> None:
        self.pending, self.schema = pending, schema
        self.files = PendingFiles(store, pending)

    def write(
        self, unit: str, fragment_id: str, rows: Iterable[dict[str, Any]], compression: str = "snappy"
    ) -> Fragment:
        """The rows as one fragment, written whole (replacing one of the same name)."""
        table = pa.Table.from_pylist(list(rows), schema=self.schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=compression)
        data = buf.getvalue()
        rel = fragment_path(unit, fragment_id)
        self.files.write_atomic(rel, data)
        return Fragment(rel, unit, fragment_id, table.num_rows, hashlib.sha256(data).hexdigest(), len(data))

    def listing(self) -> dict[str, dict[str, str]]:
        """Every fragment in the folder (one listing): unit -> id -> path."""
        out: dict[str, dict[str, str]] = {u: {} for u in FRAGMENT_UNITS}
        for name in self.files.ls(FRAGMENT_DIR):
            m = NAME.fullmatch(name)
            if m and m["unit"] in FRAGMENT_UNITS and FRAGMENT_UNITS[m["unit"]].fullmatch(m["id"]):
                out[m["unit"]][m["id"]] = fragment_path(m["unit"], m["id"])
        return out

    def read_bytes(self, rel: str, expected: Fragment | None = None) -> bytes:
        """A fragment's bytes, checked against what its writer reported (when known)."""
        try:
            data = self.files.read(rel)
        except (OSError, ValueError, StoreError) as exc:
            raise FragmentDamaged(
                f"{rel} of {self.pending.ref} does not read ({type(exc).__name__}: {exc})"
            ) from exc
        if expected is not None and (
            len(data) != expected.size or hashlib.sha256(data).hexdigest() != expected.sha256
        ):
            raise FragmentDamaged(
                f"{rel} of {self.pending.ref} changed after its task wrote it; run the job again"
            )
        return data

    def read(self, rel: str, expected: Fragment | None = None, columns: list[str] | None = None) -> pa.Table:
        """A fragment's rows as a table of this log's schema (FragmentDamaged when it does not read)."""
        data = self.read_bytes(rel, expected)
        try:
            return pq.read_table(io.BytesIO(data), schema=self.schema, columns=columns)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise FragmentDamaged(
                f"{rel} of {self.pending.ref} does not read as a fragment ({type(exc).__name__}: {exc})"
            ) from exc

    def remove(self, rel: str) -> bool:
        """Remove a fragment (False: it was gone already)."""
        return self.files.remove(rel)

    def rehash(self, f: dict[str, Any]) -> str | None:
        """Why a file a fragment lists (path, sha256, size) does not match the pending version's
        file (None: it does)."""
        rel = f.get("path") or ""
        try:
            digest, size = self.files.sha256_of(rel, f.get("size"))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return f"{rel} is missing"
        except StoreError as exc:
            return str(exc)
        except OSError as exc:  # a file the store cannot read is one more image to render again
            return f"{rel} does not read ({type(exc).__name__})"
        if digest != f.get("sha256") or size != f.get("size"):
            return f"{rel} does not match its recorded sha256"
        return None

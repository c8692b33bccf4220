"""The catalog: one immutable Parquet row per committed version (appends never race), for
dashboards and ad-hoc queries (`polars.read_parquet('<store>/_catalog/**/*.parquet')`)."""

from __future__ import annotations

import io
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from artifact_store.refs import CATALOG_DIR, KINDS, NAME_RE, VERSION_RE, ArtifactRef
from data_manifests.schemas import CATALOG

if TYPE_CHECKING:
    from artifact_store.backend import StoreBackend

log = logging.getLogger("asd.store")


def catalog_row_path(store: StoreBackend, ref: ArtifactRef) -> str:
    return store.path(CATALOG_DIR, ref.kind, ref.name, f"{ref.version}.parquet")


def write_catalog_row(store: StoreBackend, record: dict[str, Any]) -> None:
    """Write the catalog row of a (validated) commit record."""
    metrics = {
        k: float(v)
        for k, v in (record.get("summary") or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and v == v
    }
    ref = ArtifactRef(record["kind"], record["name"], record["version"])
    row = {
        "kind": ref.kind,
        "name": ref.name,
        "version": ref.version,
        "ref": str(ref),
        "committed_at": datetime.fromisoformat(record["committed_at"]),
        "size_bytes": record.get("size_bytes", sum(f["size"] for f in record["files"].values())),
        "file_count": record.get("file_count", len(record["files"])),
        "parents": record.get("parents", []),
        "flow_run_id": record.get("flow_run_id"),
        "code_version": record.get("code_version"),
        "metrics": list(metrics.items()),
        "uri": store.uri(ref.prefix),
    }
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row], schema=CATALOG), buf)
    store.write_atomic(catalog_row_path(store, ref), buf.getvalue())


def check_row(table: pa.Table, kind: str, name: str, version: str) -> None:
    """A catalog file read back is store data: it must hold one row naming the version its path
    names (kind, name, version, ref), with a valid name and version, sane parents and sizes
    (ValueError naming the field otherwise)."""
    if table.num_rows != 1:
        raise ValueError(f"{table.num_rows} rows, not one")
    row = table.to_pylist()[0]
    expected = {"kind": kind, "name": name, "version": version, "ref": f"{kind}/{name}@{version}"}
    wrong = sorted(k for k, v in expected.items() if row.get(k) != v)
    if wrong:
        raise ValueError(f"its {', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not match its path")
    if kind not in KINDS or not NAME_RE.fullmatch(name) or not VERSION_RE.fullmatch(version):
        raise ValueError("its path names no version of this store")
    for parent in row.get("parents") or []:  # a ref, or a source outside the store (a folder, a hub id)
        if not isinstance(parent, str) or not parent or "\n" in parent or len(parent) > 4096:
            raise ValueError("a parent is neither a ref nor a source")
    if (row.get("size_bytes") or 0) < 0 or (row.get("file_count") or 0) < 0:
        raise ValueError("a negative size or file count")


def read_catalog_rows(store: StoreBackend) -> tuple[pa.Table, list[str]]:
    """The catalog rows that read and check out (`check_row`), and the paths of those that do not
    (a damaged, forged or foreign file is skipped with a warning naming it; `asd store catalog
    --rebuild` rewrites the row of a committed version)."""
    tables, damaged = [], []
    for path in sorted(store.fs.glob(store.path(CATALOG_DIR, "*", "*", "*.parquet"))):
        try:
            with store.fs.open(path, "rb") as f:
                table = pq.read_table(f, schema=CATALOG)
            kind, name, file = path.rsplit("/", 3)[1:]
            check_row(table, kind, name, file[: -len(".parquet")])
            tables.append(table)
        except (OSError, ValueError, pa.ArrowException) as exc:
            log.warning(
                "catalog row %s is unreadable, skipped (%s: %s); `asd store catalog --rebuild` rewrites it",
                store.uri(path[len(store.root.rstrip("/")) + 1 :]) if path.startswith(store.root) else path,
                type(exc).__name__,
                exc,
            )
            damaged.append(path)
    return (pa.concat_tables(tables) if tables else CATALOG.empty_table()), damaged


def read_catalog(store: StoreBackend) -> pa.Table:
    """The catalog as a pyarrow Table (one row per committed version; `ArtifactStore.catalog`
    rebuilds missing or damaged rows first when asked)."""
    return read_catalog_rows(store)[0]

"""What every ingest source produces and shares: `SourceRecord` (one input), the `Source` protocol,
`SourceOptions`, the file kinds they recognise, and reading a metadata or URL table."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import fsspec
import polars as pl

from data_engine.url_lists import LIST_EXTS

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


CAPTION_EXTS = (".txt", ".caption")


METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


SHARD_EXTS = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class SourceOptions:
    """What the readers need from the ingest settings (built once, by `IngestSettings.source_options`)."""

    url_col: str | None
    caption_col: str | None
    max_bytes: int
    sample_max_bytes: int
    caption_max_bytes: int
    follow_links_outside: bool


def record_sha1(*parts: object) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class SourceRecord:
    """One input. `fingerprint` identifies it with its content's identity (for reuse);
    its `unit` (the part before '#') is what a listing knows without reading data."""

    source: str
    name: str
    caption: str | None
    fingerprint: str
    path: str | None = None  # a local file the worker reads
    url: str | None = None  # to download
    data: bytes | None = None  # already read (a shard sample)
    error: str | None = None
    failed_stage: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return self.fingerprint.split("#", 1)[0]


class Source(Protocol):
    """An ingest source. `needs_download`: its records carry URLs the engine fetches.
    `units()`: the pieces a re-ingest reuses whole (a shard's samples), or None when inputs are
    reused one record at a time."""

    kind: ClassVar[str]
    needs_download: ClassVar[bool]

    def __init__(
        self, spec: str, options: SourceOptions, storage_options: dict[str, Any] | None = None
    ) -> None: ...
    def records(self, skip_units: set[str] | None = None) -> Iterator[SourceRecord]: ...
    def fingerprint(self) -> str: ...
    def units(self) -> set[str] | None: ...


def read_jsonl_lenient(path: Path, bad_lines: list[tuple[int, str]]) -> pl.DataFrame:
    """metadata.jsonl line by line: a broken line becomes a recorded failure, not the end."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
            except ValueError as exc:
                bad_lines.append((lineno, f"{path} line {lineno} is not a JSON object: {exc}"))
                continue
            rows.append({k: None if v is None else str(v) for k, v in row.items()})
    return (
        pl.DataFrame(rows, schema={k: pl.String for r in rows for k in r})
        if rows
        else pl.DataFrame({"file_name": [], "text": []}, schema={"file_name": pl.String, "text": pl.String})
    )


def read_table(path: str, storage_options: dict[str, Any] | None = None) -> pl.DataFrame:
    """Parquet / CSV / TSV / JSONL / JSON (records) / TXT (one URL a line), local or fsspec."""
    opts = storage_options if path.startswith("s3://") else {}
    with fsspec.open(path, "rb", **(opts or {})) as f:
        data = f.read()
    low = path.lower()
    if low.endswith(".parquet"):
        return pl.read_parquet(io.BytesIO(data))
    if low.endswith(".csv"):
        return pl.read_csv(
            io.BytesIO(data), infer_schema_length=0, truncate_ragged_lines=True, encoding="utf8-lossy"
        )
    if low.endswith(".tsv"):
        return pl.read_csv(
            io.BytesIO(data),
            separator="\t",
            infer_schema_length=0,
            truncate_ragged_lines=True,
            encoding="utf8-lossy",
        )
    if low.endswith(".jsonl"):
        return pl.read_ndjson(io.BytesIO(data))
    if low.endswith(".json"):
        return pl.DataFrame(json.loads(data))
    if low.endswith(".txt"):
        lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines()]
        return pl.DataFrame({"url": [ln for ln in lines if ln]}, schema={"url": pl.String})
    raise ValueError(f"{path}: unknown table format (use {', '.join(LIST_EXTS)})")

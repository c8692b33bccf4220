"""URL lists read as streams: (url, caption) rows in batches, whatever the format, in memory
that does not grow with the list (a 10-million-row list is read a batch at a time).

Parquet is read by row batches; CSV / TSV by pyarrow's streaming CSV reader (quoted captions
may hold the delimiter and newlines; every column is read as bytes and decoded leniently, so a
stray byte is a replacement character, not the end of the list); JSONL and TXT line by line (a
line that is not a JSON object becomes a row with its error). A `.json` file (one document) is
the one format read whole.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

LIST_EXTS = (".parquet", ".csv", ".tsv", ".jsonl", ".json", ".txt")
CAPTION_COLUMNS = ("caption", "text", "TEXT", "prompt")
URL_COLUMNS = ("url", "URL", "image_url")
BATCH_ROWS = 65_536
CSV_BLOCK_BYTES = 1 << 20  # with one reader thread: ~60 MB in flight (4 MB blocks on threads: ~200 MB)

Row = tuple[str | None, str | None, str | None]  # url, caption, error of the row itself


def _open(path: str, storage_options: dict[str, Any] | None) -> Any:
    opts = storage_options if path.startswith("s3://") else {}
    return fsspec.open(path, "rb", **(opts or {}))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class UrlTable:
    """One URL list: its columns (checked when opened, from the header alone) and its rows,
    streamed."""

    def __init__(
        self,
        path: str,
        url_col: str | None,
        caption_col: str | None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.path, self.storage_options = path, storage_options
        self.format = next((ext for ext in LIST_EXTS if path.lower().endswith(ext)), None)
        if self.format is None:
            raise ValueError(f"{path}: unknown table format (use {', '.join(LIST_EXTS)})")
        columns = self._columns()
        self.url_col = url_col or next((c for c in URL_COLUMNS if c in columns), None)
        if self.url_col not in columns:
            raise ValueError(
                f"URL list {path}: no URL column (looked for {url_col or ', '.join(URL_COLUMNS)}; "
                f"it has {columns})"
            )
        self.caption_col = caption_col or next((c for c in CAPTION_COLUMNS if c in columns), None)
        if caption_col and caption_col not in columns:
            raise ValueError(f"URL list {path}: no caption column {caption_col!r} (it has {columns})")

    # -- the header ---------------------------------------------------------------------
    def _columns(self) -> list[str]:
        if self.format == ".txt":
            return ["url"]
        with _open(self.path, self.storage_options) as f:
            if self.format == ".parquet":
                return list(pq.ParquetFile(f).schema_arrow.names)
            if self.format in (".csv", ".tsv"):
                head = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
                return next(csv.reader(head, delimiter=self._delimiter), [])
            if self.format == ".jsonl":
                for line in io.TextIOWrapper(f, encoding="utf-8", errors="replace"):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(row, dict):
                            return list(row)
                return []
            return list(self._json_document(f.read()))

    @property
    def _delimiter(self) -> str:
        return "\t" if self.format == ".tsv" else ","

    @staticmethod
    def _json_document(data: bytes) -> dict[str, list[Any]]:
        doc = json.loads(data)
        if isinstance(doc, list):  # records
            cols: dict[str, list[Any]] = {}
            for i, rec in enumerate(doc):
                for k, v in rec.items() if isinstance(rec, dict) else ():
                    cols.setdefault(k, [None] * i).append(v)
                for v in cols.values():
                    if len(v) < i + 1:
                        v.append(None)
            return cols
        if isinstance(doc, dict):
            return {k: v if isinstance(v, list) else [v] for k, v in doc.items()}
        raise ValueError("a JSON URL list must be a list of records or an object of columns")

    # -- the rows -----------------------------------------------------------------------
    def batches(self) -> Iterator[list[Row]]:
        """Every row in order, in batches of up to `BATCH_ROWS`."""
        with _open(self.path, self.storage_options) as f:
            if self.format == ".parquet":
                cols = [self.url_col] + ([self.caption_col] if self.caption_col else [])
                for batch in pq.ParquetFile(f).iter_batches(
                    batch_size=BATCH_ROWS, columns=cols, use_threads=False
                ):
                    yield self._pairs(batch)
            elif self.format in (".csv", ".tsv"):
                yield from self._csv(f)
            elif self.format in (".jsonl", ".txt"):
                yield from self._lines(f)
            else:
                doc = self._json_document(f.read())
                urls = doc.get(self.url_col, []) if self.url_col else []
                caps = doc.get(self.caption_col, []) if self.caption_col else []
                rows: list[Row] = [
                    (_text(u), _text(caps[i]) if i < len(caps) else None, None) for i, u in enumerate(urls)
                ]
                for a in range(0, len(rows), BATCH_ROWS):
                    yield rows[a : a + BATCH_ROWS]

    def _pairs(self, batch: pa.RecordBatch) -> list[Row]:
        urls = batch.column(0).to_pylist()
        caps = batch.column(1).to_pylist() if batch.num_columns > 1 else [None] * len(urls)
        return [(_text(u), _text(c), None) for u, c in zip(urls, caps, strict=True)]

    def _csv(self, f: Any) -> Iterator[list[Row]]:
        header = None
        ragged: list[str] = []

        def bad_row(row: Any) -> str:
            ragged.append(
                f"line {row.number}: {row.actual_columns} fields where the header has {row.expected_columns}"
            )
            return "skip"

        reader = None
        try:
            header = self._columns()
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=False),
                parse_options=pacsv.ParseOptions(
                    delimiter=self._delimiter, newlines_in_values=True, invalid_row_handler=bad_row
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.binary() for c in header},
                    strings_can_be_null=True,
                    include_columns=[self.url_col] + ([self.caption_col] if self.caption_col else []),
                ),
            )
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                return
            raise
        for batch in reader:
            rows = self._pairs(batch)
            rows += [(None, None, f"unparseable CSV row, {what}") for what in ragged]
            ragged.clear()
            yield rows

    def _lines(self, f: Any) -> Iterator[list[Row]]:
        rows: list[Row] = []
        decoder = io.TextIOWrapper(f, encoding="utf-8", errors="replace")
        for lineno, line in enumerate(decoder, 1):
            line = line.strip()
            if not line:
                continue
            if self.format == ".txt":
                rows.append((line, None, None))
            else:
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError(f"a JSON {type(rec).__name__}, not an object")
                    rows.append(
                        (
                            _text(rec.get(self.url_col)),
                            _text(rec.get(self.caption_col)) if self.caption_col else None,
                            None,
                        )
                    )
                except ValueError as exc:
                    rows.append((None, None, f"line {lineno} is not a JSON object: {exc}"[:300]))
            if len(rows) >= BATCH_ROWS:
                yield rows
                rows = []
        if rows:
            yield rows

    def content_sha256(self) -> str:
        """The list file's bytes, hashed as a stream (its identity: same bytes, same rows)."""
        h = hashlib.sha256()
        with _open(self.path, self.storage_options) as f:
            while block := f.read(8 << 20):
                h.update(block)
        return h.hexdigest()

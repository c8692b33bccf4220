"""Prompt manifests: a Parquet / CSV / JSONL file (or a list) -> every row validated, with its
row number, as a PROMPTS table (stored by the prompts stage, `tasks.prompts`, as
`prompts/<name>`: `prompts.parquet`).

A file that cannot be read at all (unknown format, missing file, no `prompt`/`width`/`height`
columns) is a `PromptFileError`: one line for the user, before any work. A row that is wrong
(no prompt, a size out of 64..16384, not a number, a seed out of [0, 2^64), text that is not
UTF-8) stays in the manifest with its `error`: generation reports it as a failed image and
renders the rest."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from artifact_store import ArtifactRef, ArtifactStore
from data_manifests.schemas import PROMPTS
from data_manifests.settings import PromptSpec

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
REQUIRED = ("prompt", "width", "height")
PROMPTS_FILE = "prompts.parquet"


class PromptFileError(ValueError):
    """A prompt file that cannot be read as a table of prompts at all."""


def _read_rows(path: Path) -> list[dict[str, Any]]:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise PromptFileError(
            f"prompt file {path}: unknown format {path.suffix!r} (use .parquet, .csv or .jsonl)"
        )
    if not path.is_file():
        raise PromptFileError(f"prompt file {path}: no such file")
    try:
        if kind == "parquet":
            return pl.read_parquet(path).to_dicts()
        if kind == "csv":  # every cell as text (pydantic converts); bad bytes marked, found per row below
            return pl.read_csv(path, infer_schema_length=0, encoding="utf8-lossy").to_dicts()
        rows = []
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                value = json.loads(line.decode("utf-8"))
                rows.append(
                    value
                    if isinstance(value, dict)
                    else {"__error__": f"a JSON {type(value).__name__}, not an object"}
                )
            except UnicodeDecodeError:
                rows.append({"__error__": "not UTF-8 text"})
            except ValueError as exc:
                rows.append({"__error__": f"not JSON ({exc})"})
        return rows
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PromptFileError(f"prompt file {path}: cannot be read as {kind}: {first}") from exc


def validate_rows(rows: Iterable[dict[str, Any]], where: str) -> pa.Table:
    """Every row as a PROMPTS row: the values when valid, else `error` says why (with the field)."""
    out = []
    for n, row in enumerate(rows, start=1):
        rec: dict[str, Any] = {"row": n, "error": row.get("__error__")}
        values = {k: v for k, v in row.items() if k in PromptSpec.model_fields and v is not None}
        for k in ("prompt", "negative_prompt"):
            if isinstance(values.get(k), str) and "\ufffd" in values[k]:
                rec["error"] = rec["error"] or f"{k}: not UTF-8 text"
        if rec["error"] is None:
            try:
                spec = PromptSpec(**values)
                rec.update(spec.model_dump())
            except ValidationError as exc:
                err = exc.errors()[0]
                field = ".".join(str(p) for p in err["loc"]) or "row"
                rec["error"] = f"{field}: {err['msg']} (got {err.get('input')!r})"[:300]
        if rec["error"] is not None:  # kept for the report, made storable (an unpaired surrogate becomes ?)
            for k in ("prompt", "negative_prompt"):
                text = str(row.get(k))[:1000] if row.get(k) is not None else None
                rec[k] = text.encode("utf-8", "replace").decode("utf-8") if text is not None else None
        out.append(rec)
    if not out:
        raise PromptFileError(f"{where}: no rows")
    return pa.Table.from_pylist(out, schema=PROMPTS)


def prompt_table(path: str | Path) -> pa.Table:
    """A prompt file as a validated PROMPTS table."""
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise PromptFileError(f"prompt file {path}: no rows")
    columns = {k for r in rows for k in r}
    missing = [c for c in REQUIRED if c not in columns]
    if missing and "__error__" not in columns:
        raise PromptFileError(
            f"prompt file {path}: missing column(s) {', '.join(missing)} "
            f"(has {', '.join(sorted(columns)) or 'none'})"
        )
    return validate_rows(rows, f"prompt file {path}")


def read_prompts(store: ArtifactStore, ref: ArtifactRef | str) -> pa.Table:
    """The PROMPTS table of a committed prompts version (checked against its recorded sha256)."""
    return pq.read_table(io.BytesIO(store.read_checked(ref, PROMPTS_FILE)), schema=PROMPTS)

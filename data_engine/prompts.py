"""Prompt files (Parquet, CSV, JSONL): read, every row validated up front with its row number."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from pydantic import ValidationError

from data_manifests.settings import PromptSpec

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class PromptFileError(ValueError):
    """A prompt file that cannot be read, or a row in it that is not a valid prompt."""


def read_prompt_table(path: str | Path) -> pl.DataFrame:
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise PromptFileError(f"prompt file {path}: unknown format {path.suffix!r} (use .parquet, .csv or .jsonl)")
    if not path.is_file():
        raise PromptFileError(f"prompt file {path}: no such file")
    try:
        if kind == "parquet":
            return pl.read_parquet(path)
        if kind == "csv":
            return pl.read_csv(path, encoding="utf8", infer_schema_length=0)  # all text; pydantic converts
        return pl.read_ndjson(path)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PromptFileError(f"prompt file {path}: cannot be read as {kind}: {first}") from exc


def load_prompts(path: str | Path) -> list[PromptSpec]:
    """Every row as a PromptSpec; the first bad row raises with its number (1-based) and reason."""
    df = read_prompt_table(path)
    missing = [c for c in ("prompt", "width", "height") if c not in df.columns]
    if missing:
        raise PromptFileError(f"prompt file {path}: missing column(s) {', '.join(missing)} "
                              f"(has {', '.join(df.columns) or 'none'})")
    if df.height == 0:
        raise PromptFileError(f"prompt file {path}: no rows")
    known = [c for c in df.columns if c in PromptSpec.model_fields]
    out = []
    for n, row in enumerate(df.select(known).iter_rows(named=True), start=1):
        try:
            out.append(PromptSpec(**{k: v for k, v in row.items() if v is not None or k in ("prompt", "width", "height")}))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise PromptFileError(f"prompt file {path} row {n}: {field}: {err['msg']} (got {err.get('input')!r})") from None
    return out

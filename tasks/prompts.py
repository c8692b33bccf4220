"""The prompts stage, in one place: a validated prompt table (from a file, a list or `--prompt`;
bad rows stay in it with their error) -> `prompts/<name>` (`prompts.parquet`). The same rows give
the same version. Reading and validating the rows is the data engine's (`data_engine.prompts`)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from artifact_store import ArtifactStore
from data_engine.prompts import PROMPTS_FILE
from tasks.stage import Built, Inputs, Stage, StageRun, run_stage


@dataclass(frozen=True)
class Prompts(Stage):
    """A prompt table stored as a version; `source` says where its rows came from."""

    flow: ClassVar[str] = "asd-store-prompts"
    output_param: ClassVar[str] = "name"
    kind: ClassVar[str] = "prompts"
    table: pa.Table
    source: str

    def resolve(self, store: ArtifactStore) -> Inputs:
        return Inputs(reads=[self.source], parents=[], identity={"prompts": self.table.to_pylist()})

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        buf = io.BytesIO()
        pq.write_table(self.table, buf)
        run.writer.put_bytes(PROMPTS_FILE, buf.getvalue())
        bad = sum(e is not None for e in self.table.column("error").to_pylist())
        return Built(
            params={"source": self.source}, summary={"rows": self.table.num_rows, "invalid_rows": bad}
        )


def store_prompts(store_url: str | None, table: pa.Table, name: str, source: str) -> str:
    """`table` as `prompts/<name>` (the committed version of the same rows when there is one)."""
    return run_stage(Prompts(table, source), name, store_url).ref

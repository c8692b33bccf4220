"""The stages a user runs, listed once: the `asd` subcommand, the stage (`tasks/<stage>.py`) and
its settings model. Backfills, the CLI's tests and anything else that goes over every stage
iterate over `STAGES`; a new stage is one row here."""

from __future__ import annotations

from dataclasses import dataclass

from data_manifests.settings import StageSettings
from tasks.evaluate import Evaluate, EvaluateSettings
from tasks.generate import Generate, GenerateSettings
from tasks.ingest import Ingest, IngestSettings
from tasks.stage import Stage
from tasks.train import Arad, TrainSettings
from tasks.upscale import Upscale, UpscaleSettings


@dataclass(frozen=True)
class StageEntry:
    command: str  # `asd <command>`
    stage: type[Stage]  # its flow (`stage.flow`), output parameter and kind
    settings: type[StageSettings]


STAGES: dict[str, StageEntry] = {
    e.command: e
    for e in (
        StageEntry("ingest", Ingest, IngestSettings),
        StageEntry("train", Arad, TrainSettings),
        StageEntry("generate", Generate, GenerateSettings),
        StageEntry("upscale", Upscale, UpscaleSettings),
        StageEntry("evaluate", Evaluate, EvaluateSettings),
    )
}

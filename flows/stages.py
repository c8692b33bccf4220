"""One flow per stage: thin shells that name the stage (`tasks/<stage>.py`) and run it through
the one stage protocol (`tasks.stage.run_stage`), passing references, not data."""

from __future__ import annotations

import os

from prefect import flow

from artifact_store import check_name
from data_engine.prompts import validate_rows
from data_manifests.settings import PromptSpec
from tasks.evaluate import Evaluate, EvaluateSettings
from tasks.generate import Generate, GenerateSettings
from tasks.ingest import Ingest, IngestSettings
from tasks.prompts import Prompts
from tasks.runtime import open_store
from tasks.stage import run_stage
from tasks.train import Arad, TinyBase, TrainSettings, rank_zero_first


@flow(name="asd-ingest", log_prints=True)
def ingest_flow(source: str | list[str], dataset: str = "demo", settings: IngestSettings = IngestSettings(),
                store_url: str | None = None, rerun: bool = False, retry_failed: bool = False) -> str:
    """Folders, URL lists and shards -> `datasets/<dataset>` (manifest + per-bucket shards).
    `asd-demo:photos` names the demo photos shipped inside the installed packages."""
    check_name(dataset)  # every name is checked before any work
    sources = (source,) if isinstance(source, str) else tuple(source)
    return run_stage(Ingest(sources, settings, retry_failed), dataset, store_url, rerun).ref


@flow(name="asd-train", log_prints=True)
def train_flow(dataset_ref: str, model: str = "demo", settings: TrainSettings = TrainSettings(),
               store_url: str | None = None, rerun: bool = False, resume: bool = False) -> str:
    """ARAD fine-tuning of `settings.base_model` on a dataset version -> `models/<model>`
    (`base_model` 'tiny': first `models/<model>-tiny-base`, built in code); `resume` continues
    from the newest checkpoint of the same training."""
    check_name(model)
    store_url = open_store(store_url).url
    base = settings.base_model
    if base == "tiny":
        with rank_zero_first():  # several processes: rank 0 builds it, the others then reuse that version
            base = run_stage(TinyBase(dataset_ref, settings.vae_steps, settings.seed), f"{model}-tiny-base",
                             store_url, rerun and os.environ.get("RANK", "0") == "0").ref
    return run_stage(Arad(dataset_ref, base, settings, resume), model, store_url, rerun).ref


@flow(name="asd-generate", log_prints=True)
def generate_flow(model_ref: str, prompts_ref: str, generations: str = "demo",
                  settings: GenerateSettings = GenerateSettings(), store_url: str | None = None,
                  rerun: bool = False) -> str:
    """Render a stored prompt manifest (`prompts/NAME@VERSION`) at its exact sizes, fanned out in
    shards of rows. Resumable: a rerun of the same job after a kill renders only the images that
    are not finished; one generations version is committed at the end."""
    check_name(generations)
    return run_stage(Generate(model_ref, prompts_ref, settings), generations, store_url, rerun).ref


@flow(name="asd-store-prompts", log_prints=True)
def prompts_flow(prompts: list[PromptSpec], name: str = "demo", store_url: str | None = None) -> str:
    """A list of prompts (small; files go through `asd generate --prompts`) -> `prompts/<name>`."""
    check_name(name)
    table = validate_rows([p.model_dump() for p in prompts], "prompt list")
    return run_stage(Prompts(table, "prompt list"), name, store_url).ref


@flow(name="asd-evaluate", log_prints=True)
def evaluate_flow(generations_ref: str, dataset_ref: str, evaluation: str = "demo",
                  settings: EvaluateSettings = EvaluateSettings(), store_url: str | None = None,
                  rerun: bool = False) -> str:
    """FID/KID/CLIP/seam scores of a generations version -> `evaluations/<evaluation>`."""
    check_name(evaluation)
    return run_stage(Evaluate(generations_ref, dataset_ref, settings), evaluation, store_url, rerun).ref

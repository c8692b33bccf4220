"""One flow per stage (ingest, train, generate, evaluate). Each passes references, not data."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.params import EvaluateSettings, GenerateSettings, IngestSettings, PromptSpec, TrainSettings
from tasks.evaluate import evaluate_generations
from tasks.generate import commit_generations, generate_shard
from tasks.ingest import ingest_dataset
from tasks.runs import record_run
from tasks.store import ArtifactStore, new_version_id, params_hash
from tasks.train import arad_finetune, build_tiny_base


def _workers() -> int:
    return max(1, int(os.environ.get("ASD_WORKERS", "1")))


@flow(name="asd-ingest", log_prints=True)
def ingest_flow(source: str | list[str], dataset: str = "demo", settings: IngestSettings = IngestSettings(),
                store_url: str | None = None, rerun: bool = False, retry_failed: bool = False) -> str:
    """Folders, URL lists and shards -> `datasets/<dataset>` (manifest + per-bucket shards)."""
    store_url = ArtifactStore(store_url).url
    sources = [source] if isinstance(source, str) else list(source)
    ref = ingest_dataset(store_url, sources, dataset, settings.model_dump(), rerun, retry_failed)
    record_run(store_url, "asd-ingest", sources, [ref], settings.model_dump())
    return ref


@flow(name="asd-train", log_prints=True)
def train_flow(dataset_ref: str, model: str = "demo", settings: TrainSettings = TrainSettings(),
               store_url: str | None = None, rerun: bool = False, resume: bool = False) -> str:
    """ARAD fine-tuning of `settings.base_model` on a dataset version -> `models/<model>`;
    `resume` continues from the newest checkpoint of the same training."""
    store_url = ArtifactStore(store_url).url
    base = settings.base_model
    reads = [dataset_ref]
    if base == "tiny":
        base = build_tiny_base(store_url, dataset_ref, f"{model}-tiny-base", settings.vae_steps, settings.seed, rerun)
        reads.append(base)
    ref = arad_finetune(store_url, dataset_ref, base, model, settings.train_config(), rerun, resume,
                        settings.checkpoint_every)
    record_run(store_url, "asd-train", reads, [ref], settings.model_dump())
    return ref


@flow(name="asd-generate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=_workers()))
def generate_flow(model_ref: str, prompts: list[PromptSpec], generations: str = "demo",
                  settings: GenerateSettings = GenerateSettings(), store_url: str | None = None,
                  rerun: bool = False) -> str:
    """Render prompts at their exact sizes with FSTD, fanned out in shards of prompts."""
    logger = get_run_logger()
    store = ArtifactStore(store_url)
    model = str(store.resolve(model_ref))
    parents = [model]
    if settings.upscaler and settings.upscaler.startswith("models/"):  # a stored upscaler is a parent too
        settings = settings.model_copy(update={"upscaler": str(store.resolve(settings.upscaler))})
        parents.append(settings.upscaler)
    items = [{"index": i, **p.model_dump()} for i, p in enumerate(prompts)]
    if not items:
        raise ValueError("generate_flow got no prompts")
    params: dict[str, Any] = {"model": model, "prompts": items, **settings.model_dump()}
    input_hash = params_hash(params)
    if not rerun and (done := store.find_by_input_hash("generations", generations, input_hash)):
        logger.info("generations %s already rendered for the same inputs: reusing it", done)
        return str(done)
    version = new_version_id()
    shards = [items[i : i + settings.shard_size] for i in range(0, len(items), settings.shard_size)]
    logger.info("rendering %d prompts in %d shard(s) with %s", len(items), len(shards), model)
    futures = [generate_shard.submit(store.url, model, generations, version, s, settings.model_dump()) for s in shards]
    results = [f.result() for f in futures]
    ref = commit_generations(store.url, generations, version, results, parents,
                             {"prompts": len(items), **settings.model_dump()}, input_hash)
    rows = [r for res in results for r in res["rows"]]
    create_table_artifact(
        key="generations", description=f"generations {ref}",
        table=[{k: r[k] for k in ("key", "prompt", "width", "height", "status", "bucket", "tiles_per_step", "seconds")}
               for r in rows],
    )
    record_run(store.url, "asd-generate", [model], [ref], {"prompts": len(items), **settings.model_dump()})
    return ref


@flow(name="asd-evaluate", log_prints=True)
def evaluate_flow(generations_ref: str, dataset_ref: str, evaluation: str = "demo",
                  settings: EvaluateSettings = EvaluateSettings(), store_url: str | None = None,
                  rerun: bool = False) -> str:
    """FID/KID/CLIP/seam scores of a generations version -> `evaluations/<evaluation>`."""
    store = ArtifactStore(store_url)
    ref = evaluate_generations(store.url, generations_ref, dataset_ref, evaluation, settings.model_dump(), rerun)
    report = store.read_bytes(ref, "report.md").decode()
    create_markdown_artifact(key="evaluation-report", markdown=report, description=f"metrics of {ref}")
    record_run(store.url, "asd-evaluate", [generations_ref, dataset_ref], [ref], settings.model_dump())
    return ref

"""One flow per stage (ingest, train, generate, evaluate). Each passes references, not data,
and hands its typed settings to the tasks whole."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from artifact_store import ArtifactRef, ArtifactStore, check_name, params_hash
from data_manifests.settings import (
    EvaluateSettings,
    GenerateSettings,
    IngestSettings,
    PromptSpec,
    TrainSettings,
)
from tasks.evaluate import evaluate_generations
from tasks.generate import ShardOutput, commit_generations, generate_shard
from tasks.ingest import ingest_dataset
from tasks.progress import publish_markdown, publish_table
from tasks.runs import record_run
from tasks.train import arad_finetune, build_tiny_base


@flow(name="asd-ingest", log_prints=True)
def ingest_flow(source: str | list[str], dataset: str = "demo", settings: IngestSettings = IngestSettings(),
                store_url: str | None = None, rerun: bool = False, retry_failed: bool = False) -> str:
    """Folders, URL lists and shards -> `datasets/<dataset>` (manifest + per-bucket shards)."""
    check_name(dataset)  # every name is checked before any work
    store_url = ArtifactStore(store_url).url
    sources = [source] if isinstance(source, str) else list(source)
    ref = ingest_dataset(store_url, sources, dataset, settings, rerun, retry_failed)
    record_run(store_url, "asd-ingest", sources, [ref], settings.model_dump())
    return ref


@flow(name="asd-train", log_prints=True)
def train_flow(dataset_ref: str, model: str = "demo", settings: TrainSettings = TrainSettings(),
               store_url: str | None = None, rerun: bool = False, resume: bool = False) -> str:
    """ARAD fine-tuning of `settings.base_model` on a dataset version -> `models/<model>`;
    `resume` continues from the newest checkpoint of the same training."""
    check_name(model)
    store_url = ArtifactStore(store_url).url
    base = settings.base_model
    reads = [dataset_ref]
    if base == "tiny":
        base = build_tiny_base(store_url, dataset_ref, f"{model}-tiny-base", settings.vae_steps, settings.seed, rerun)
        reads.append(base)
    ref = arad_finetune(store_url, dataset_ref, base, model, settings, rerun, resume)
    record_run(store_url, "asd-train", reads, [ref], settings.model_dump())
    return ref


@flow(name="asd-generate", log_prints=True, task_runner=ThreadPoolTaskRunner())
def generate_flow(model_ref: str, prompts: list[PromptSpec], generations: str = "demo",
                  settings: GenerateSettings = GenerateSettings(), store_url: str | None = None,
                  rerun: bool = False) -> str:
    """Render prompts at their exact sizes with FSTD, fanned out in shards of prompts
    (`settings.workers` shard tasks at a time)."""
    logger = get_run_logger()
    check_name(generations)
    store = ArtifactStore(store_url)
    if not prompts:
        raise ValueError("generate_flow got no prompts")
    model = str(store.resolve(model_ref))
    parents = [model]
    if settings.upscaler and settings.upscaler.startswith("models/"):  # a stored upscaler is a parent too
        settings = settings.model_copy(update={"upscaler": str(store.resolve(settings.upscaler))})
        parents.append(settings.upscaler)
    input_hash = params_hash({"model": model, "prompts": [p.model_dump() for p in prompts],
                              **settings.render_options()})
    found = store.reuse_or_new("generations", generations, input_hash, rerun)
    if isinstance(found, ArtifactRef):
        logger.info("generations %s already rendered for the same inputs: reusing it", found)
        return str(found)
    indexed = list(enumerate(prompts))
    shards = [indexed[i : i + settings.shard_size] for i in range(0, len(indexed), settings.shard_size)]
    logger.info("rendering %d prompts in %d shard(s) with %s", len(prompts), len(shards), model)
    outputs: list[ShardOutput] = []
    for wave in range(0, len(shards), settings.workers):  # at most `workers` shard tasks in flight
        futures = [generate_shard.submit(store.url, model, found, s, settings)
                   for s in shards[wave : wave + settings.workers]]
        outputs += [f.result() for f in futures]
    params: dict[str, Any] = {"prompts": len(prompts), **settings.model_dump()}
    ref = commit_generations(store.url, found, outputs, parents, params)
    rows = [r for o in outputs for r in o.rows]
    publish_table("generations", [{k: r[k] for k in ("key", "prompt", "width", "height", "status", "bucket",
                                                     "fstd_tiles", "seconds")} for r in rows], f"generations {ref}")
    record_run(store.url, "asd-generate", [model], [ref], params)
    return ref


@flow(name="asd-evaluate", log_prints=True)
def evaluate_flow(generations_ref: str, dataset_ref: str, evaluation: str = "demo",
                  settings: EvaluateSettings = EvaluateSettings(), store_url: str | None = None,
                  rerun: bool = False) -> str:
    """FID/KID/CLIP/seam scores of a generations version -> `evaluations/<evaluation>`."""
    check_name(evaluation)
    store = ArtifactStore(store_url)
    ref = evaluate_generations(store.url, generations_ref, dataset_ref, evaluation, settings, rerun)
    publish_markdown("evaluation-report", store.read_bytes(ref, "report.md").decode(), f"metrics of {ref}")
    record_run(store.url, "asd-evaluate", [generations_ref, dataset_ref], [ref], settings.model_dump())
    return ref

"""One flow per stage (ingest, train, generate, evaluate). Each passes references, not data,
and hands its typed settings to the tasks whole."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from artifact_store import ArtifactRef, ArtifactStore, check_name, params_hash
from data_engine.prompts import commit_prompts, read_prompts, validate_rows
from data_manifests.demo import DEMO_SOURCE, demo_photos_folder
from data_manifests.settings import (
    EvaluateSettings,
    GenerateSettings,
    IngestSettings,
    PromptSpec,
    TrainSettings,
)
from flows.executors import gpu_annotation, task_runner_for
from tasks.evaluate import evaluate_generations
from tasks.generate import GenerationJob, ShardOutput, commit_generations, render_shard
from tasks.ingest import ingest_dataset
from tasks.progress import Progress, publish_markdown, publish_table
from tasks.runs import record_run
from tasks.runtime import current_flow_run_id, open_store
from tasks.train import arad_finetune, build_tiny_base


@flow(name="asd-ingest", log_prints=True)
def ingest_flow(source: str | list[str], dataset: str = "demo", settings: IngestSettings = IngestSettings(),
                store_url: str | None = None, rerun: bool = False, retry_failed: bool = False) -> str:
    """Folders, URL lists and shards -> `datasets/<dataset>` (manifest + per-bucket shards).
    `asd-demo:photos` names the demo photos shipped inside the installed packages."""
    check_name(dataset)  # every name is checked before any work
    store_url = open_store(store_url).url
    sources = [source] if isinstance(source, str) else list(source)
    sources = [str(demo_photos_folder()) if s == DEMO_SOURCE else s for s in sources]
    ref = ingest_dataset(store_url, sources, dataset, settings, rerun, retry_failed)
    record_run(store_url, "asd-ingest", sources, [ref], settings.model_dump())
    return ref


@flow(name="asd-train", log_prints=True)
def train_flow(dataset_ref: str, model: str = "demo", settings: TrainSettings = TrainSettings(),
               store_url: str | None = None, rerun: bool = False, resume: bool = False) -> str:
    """ARAD fine-tuning of `settings.base_model` on a dataset version -> `models/<model>`;
    `resume` continues from the newest checkpoint of the same training."""
    check_name(model)
    store_url = open_store(store_url).url
    base = settings.base_model
    reads = [dataset_ref]
    if base == "tiny":
        base = build_tiny_base(store_url, dataset_ref, f"{model}-tiny-base", settings.vae_steps, settings.seed, rerun)
        reads.append(base)
    ref = arad_finetune(store_url, dataset_ref, base, model, settings, rerun, resume)
    record_run(store_url, "asd-train", reads, [ref], settings.model_dump())
    return ref


@flow(name="asd-generate-shards", log_prints=True)
def render_shards_flow(job: GenerationJob, ranges: list[tuple[int, int]], total: int) -> list[ShardOutput]:
    """The fan-out: one task per shard of prompt rows, on the task runner the job's settings
    chose (threads or Dask), retried when a task fails or its worker is lost. Progress (images
    done, tiles/s, ETA) is updated as shards finish."""
    logger = get_run_logger()
    task = render_shard.with_options(retries=job.settings.retries, retry_delay_seconds=2)
    with gpu_annotation(job.settings):
        futures = [task.submit(job, start, stop) for start, stop in ranges]
    position = {id(f): i for i, f in enumerate(futures)}
    outputs: dict[int, ShardOutput] = {}
    t0 = time.monotonic()
    with Progress("generate images", total=max(1, total), unit="img") as progress:
        for future in as_completed(futures):
            outputs[position[id(future)]] = out = future.result()
            done = sum(len(o.rows) for o in outputs.values())
            rendered = sum(o.rendered for o in outputs.values())
            evals = sum(r["unet_evals"] or 0 for o in outputs.values() for r in o.rows)
            elapsed = time.monotonic() - t0
            eta = elapsed / rendered * (total - done) if rendered else float("nan")
            progress.update(min(done, progress.total))
            progress.note(f"{evals / max(elapsed, 1e-9):.1f} UNet evals/s, ETA {eta:.0f} s")
            logger.info("shard done on %s: %d images (%d rendered now); %d/%d in all", out.worker, len(out.rows),
                        out.rendered, done, total)
    return [outputs[i] for i in range(len(futures))]


@flow(name="asd-generate", log_prints=True)
def generate_flow(model_ref: str, prompts_ref: str, generations: str = "demo",
                  settings: GenerateSettings = GenerateSettings(), store_url: str | None = None,
                  rerun: bool = False) -> str:
    """Render a stored prompt manifest (`prompts/NAME@VERSION`) at its exact sizes with FSTD,
    fanned out in shards of rows. Resumable: a rerun of the same job after a kill renders only
    the images that are not finished; one generations version is committed at the end."""
    logger = get_run_logger()
    check_name(generations)
    store = open_store(store_url)
    model = str(store.resolve(model_ref))
    prompts = str(store.resolve(prompts_ref if prompts_ref.startswith("prompts/") else f"prompts/{prompts_ref}"))
    parents = [model, prompts]
    if settings.upscaler and settings.upscaler.startswith("models/"):  # a stored upscaler is a parent too
        settings = settings.model_copy(update={"upscaler": str(store.resolve(settings.upscaler))})
        parents.append(settings.upscaler)
    input_hash = params_hash({"model": model, "prompts": prompts, **settings.render_options()})
    found = store.resume_or_new("generations", generations, input_hash, rerun)
    if isinstance(found, ArtifactRef):
        logger.info("generations %s already rendered for the same inputs: reusing it", found)
        return str(found)
    n_rows = read_prompts(store, prompts).num_rows
    ranges = [(i, min(n_rows, i + settings.shard_size)) for i in range(0, n_rows, settings.shard_size)]
    job = GenerationJob(store.url, model, prompts, found, settings)
    logger.info("rendering %d prompt rows of %s in %d shard(s) with %s (%s executor) into %s", n_rows, prompts,
                len(ranges), model, settings.executor, found.ref)
    runner = task_runner_for(settings)
    outputs = render_shards_flow.with_options(task_runner=runner)(job, ranges, n_rows)
    params: dict[str, Any] = {"prompts": prompts, **settings.model_dump()}
    ref = commit_generations(job, outputs, parents, params)
    _publish_generation_tables(store, ref, [r for o in outputs for r in o.rows])
    record_run(store.url, "asd-generate", [model, prompts], [ref], params)
    return ref


GENERATIONS_TABLE_ROWS = 1000  # rows of the UI table; the manifest has them all


def _publish_generation_tables(store: ArtifactStore, ref: str, rows: list[dict[str, Any]]) -> None:
    gen = store.resolve(ref)
    table = [{"key": r["key"], "prompt": r["prompt"][:80] if r["prompt"] else None, "size": f"{r['width']}x{r['height']}",
              "status": r["status"], "seconds": round(r["seconds"] or 0, 2), "unet_evals": r["unet_evals"],
              "uri": store.file_uri(gen, r["image"]) if r["image"] else r["error"]} for r in rows]
    shown = table[:GENERATIONS_TABLE_ROWS]
    more = f" (the first {len(shown)} of {len(table)} images; all: manifest.parquet)" if len(table) > len(shown) else ""
    publish_table("generations", shown, f"generations {ref}{more}")
    slowest = sorted((t for t in table if t["status"] == "ok"), key=lambda t: -t["seconds"])[:10]
    publish_table("slowest-images", slowest, f"the slowest images of {ref}")


@flow(name="asd-store-prompts", log_prints=True)
def prompts_flow(prompts: list[PromptSpec], name: str = "demo", store_url: str | None = None) -> str:
    """A list of prompts (small; files go through `asd generate --prompts`) -> `prompts/<name>`."""
    check_name(name)
    table = validate_rows([p.model_dump() for p in prompts], "prompt list")
    return str(commit_prompts(open_store(store_url), table, name, "prompt list", current_flow_run_id()))


@flow(name="asd-evaluate", log_prints=True)
def evaluate_flow(generations_ref: str, dataset_ref: str, evaluation: str = "demo",
                  settings: EvaluateSettings = EvaluateSettings(), store_url: str | None = None,
                  rerun: bool = False) -> str:
    """FID/KID/CLIP/seam scores of a generations version -> `evaluations/<evaluation>`."""
    check_name(evaluation)
    store = open_store(store_url)
    ref = evaluate_generations(store.url, generations_ref, dataset_ref, evaluation, settings, rerun)
    publish_markdown("evaluation-report", store.read_bytes(ref, "report.md").decode(), f"metrics of {ref}")
    record_run(store.url, "asd-evaluate", [generations_ref, dataset_ref], [ref], settings.model_dump())
    return ref

"""The whole pipeline: ingest -> ARAD fine-tuning -> FSTD generation -> evaluation."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from artifact_store import check_name
from data_manifests.settings import PromptSpec
from flows.stages import evaluate_flow, generate_flow, ingest_flow, prompts_flow, train_flow
from tasks.evaluate import EvaluateSettings
from tasks.generate import GenerateSettings
from tasks.ingest import IngestSettings
from tasks.reports import publish_pipeline_summary, refresh_dashboard
from tasks.runs import record_run
from tasks.runtime import open_store
from tasks.train import TrainSettings


class PipelineRefs(BaseModel):
    dataset: str
    model: str
    generations: str
    evaluation: str


@flow(name="asd-pipeline", log_prints=True)
def asd_pipeline(
    source: str,
    prompts: list[PromptSpec] | str,
    name: str = "demo",
    ingest: IngestSettings = IngestSettings(),
    train: TrainSettings = TrainSettings(),
    generate: GenerateSettings = GenerateSettings(),
    evaluate: EvaluateSettings = EvaluateSettings(),
    store_url: str | None = None,
    rerun: bool = False,
    dashboard: bool = True,
) -> PipelineRefs:
    """Run every stage as a child flow; each stage's output version is the next one's input.
    `source`: as `asd ingest` takes it (`asd-demo:photos`: the packaged demo photos). `prompts`: a
    stored prompt manifest (`prompts/NAME@VERSION`) or a (small) list of prompts. `dashboard`:
    refresh the store's static dashboard (`_site/`) at the end."""
    check_name(name)  # before any stage runs
    store_url = open_store(store_url).url
    prompts_ref = prompts if isinstance(prompts, str) else prompts_flow(prompts, name, store_url)
    dataset = ingest_flow(source, name, ingest, store_url, rerun)
    model = train_flow(dataset, name, train, store_url, rerun)
    generations = generate_flow(model, prompts_ref, name, generate, store_url, rerun)
    evaluation = evaluate_flow(generations, dataset, name, evaluate, store_url, rerun)
    refs = PipelineRefs(dataset=dataset, model=model, generations=generations, evaluation=evaluation)
    record_run(store_url, "asd-pipeline", [source], list(refs.model_dump().values()), {"name": name})
    if dashboard:
        refresh_dashboard(store_url)
    publish_pipeline_summary(open_store(store_url), {"prompts": prompts_ref, **refs.model_dump()})
    return refs

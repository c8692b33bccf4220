"""One flow per stage: thin shells that name the stage (`tasks/<stage>.py`) and run it through
the one stage protocol (`tasks.stage.run_stage`), passing references, not data."""

from __future__ import annotations

import os
import subprocess
import sys

from prefect import flow, get_run_logger

from artifact_store import check_name
from data_engine.prompts import validate_rows
from data_manifests.settings import PromptSpec
from tasks.evaluate import Evaluate, EvaluateSettings
from tasks.generate import Generate, GenerateSettings
from tasks.ingest import Ingest, IngestSettings
from tasks.model_import import ModelImport
from tasks.prompts import Prompts
from tasks.runtime import open_store
from tasks.stage import run_stage
from tasks.train import Arad, TinyBase, TrainSettings, rank_zero_first
from tasks.upscale import Upscale, UpscaleSettings


@flow(name="asd-ingest", log_prints=True)
def ingest_flow(
    source: str | list[str],
    dataset: str = "demo",
    settings: IngestSettings = IngestSettings(),
    store_url: str | None = None,
    rerun: bool = False,
    retry_failed: bool = False,
) -> str:
    """Folders, URL lists and shards -> `datasets/<dataset>` (manifest + per-bucket shards).
    `asd-demo:photos` names the demo photos shipped inside the installed packages."""
    check_name(dataset)  # every name is checked before any work
    sources = (source,) if isinstance(source, str) else tuple(source)
    return run_stage(Ingest(sources, settings, retry_failed), dataset, store_url, rerun).ref


@flow(name="asd-train", log_prints=True)
def train_flow(
    dataset_ref: str,
    model: str = "demo",
    settings: TrainSettings = TrainSettings(),
    store_url: str | None = None,
    rerun: bool = False,
    resume: bool = False,
) -> str:
    """ARAD fine-tuning of `settings.base_model` on a dataset version -> `models/<model>`
    (`base_model` 'tiny': first `models/<model>-tiny-base`, built in code); `resume` continues
    from the newest checkpoint of the same training."""
    check_name(model)
    store_url = open_store(store_url).url
    base = settings.base_model
    if base == "tiny":
        with rank_zero_first():  # several processes: rank 0 builds it, the others then reuse that version
            base = run_stage(
                TinyBase(dataset_ref, settings.vae_steps, settings.seed, settings.tiny_family),
                f"{model}-tiny-base",
                store_url,
                rerun and os.environ.get("RANK", "0") == "0",
            ).ref
    return run_stage(Arad(dataset_ref, base, settings, resume), model, store_url, rerun).ref


@flow(name="asd-train-processes", log_prints=True)
def train_processes_flow(
    dataset_ref: str,
    model: str = "demo",
    settings: TrainSettings = TrainSettings(),
    store_url: str | None = None,
    rerun: bool = False,
    resume: bool = False,
    processes: int = 2,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
) -> str:
    """ARAD on `processes` processes of this machine (GPUs, or gloo on the CPU), and with `nnodes`
    > 1 on as many machines, each running this flow with its `node_rank` and one `rdzv_endpoint`
    (host:port of a c10d rendezvous): `torchrun` over `asd train` (every rank a run of
    `asd-train`; rank 0 commits). A work pool worker on each machine starts it. Returns the model
    version rank 0 committed (on the machine of rank 0; elsewhere the newest version)."""
    from flows.settings_cli import settings_to_args

    check_name(model)
    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError(f"nnodes {nnodes} needs rdzv_endpoint (host:port of one of the machines)")
    store = open_store(store_url)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    launch += (
        [
            "--nnodes",
            str(nnodes),
            "--node_rank",
            str(node_rank),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            str(rdzv_endpoint),
        ]
        if nnodes > 1
        else ["--standalone"]
    )
    command = [
        *launch,
        "-m",
        "flows.cli",
        "--store",
        store.url,
        "train",
        "--dataset",
        dataset_ref,
        "--model",
        model,
        *settings_to_args(settings),
        *(["--rerun"] if rerun else []),
        *(["--resume"] if resume else []),
    ]
    logger = get_run_logger()
    logger.info(
        "launching %d x %d processes: torchrun ... asd train --dataset %s --model %s",
        nnodes,
        processes,
        dataset_ref,
        model,
    )
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    ) as proc:
        for line in proc.stdout or ():
            logger.info("%s", line.rstrip())
    if proc.returncode:
        raise RuntimeError(
            f"torchrun over asd train exited with {proc.returncode} (its output is logged above)"
        )
    return str(store.resolve(f"models/{model}@latest"))


@flow(name="asd-generate", log_prints=True)
def generate_flow(
    model_ref: str,
    prompts_ref: str,
    generations: str = "demo",
    settings: GenerateSettings = GenerateSettings(),
    store_url: str | None = None,
    rerun: bool = False,
) -> str:
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


@flow(name="asd-upscale", log_prints=True)
def upscale_flow(
    source: str | list[str],
    model_ref: str,
    upscale: str = "demo",
    settings: UpscaleSettings = UpscaleSettings(),
    store_url: str | None = None,
    rerun: bool = False,
) -> str:
    """Existing images (folders, URL lists, shards, a `datasets/`, `generations/` or `upscales/`
    version) enlarged by a model
    version -> `upscales/<upscale>`. Resumable: a rerun after a kill renders only the images not
    finished; one version is committed at the end."""
    check_name(upscale)
    sources = (source,) if isinstance(source, str) else tuple(source)
    return run_stage(Upscale(sources, model_ref, settings), upscale, store_url, rerun).ref


@flow(name="asd-evaluate", log_prints=True)
def evaluate_flow(
    generations_ref: str,
    dataset_ref: str,
    evaluation: str = "demo",
    settings: EvaluateSettings = EvaluateSettings(),
    store_url: str | None = None,
    rerun: bool = False,
) -> str:
    """FID/KID/CLIP/seam scores of a generations version -> `evaluations/<evaluation>`."""
    check_name(evaluation)
    return run_stage(Evaluate(generations_ref, dataset_ref, settings), evaluation, store_url, rerun).ref


@flow(name="asd-model-import", log_prints=True)
def model_import_flow(
    source: str, name: str, store_url: str | None = None, rerun: bool = False, config: str | None = None
) -> str:
    """A diffusers model folder, a hub id in the local HF cache, or a single-file checkpoint
    (converted with the configs of `config`) -> `models/<name>` (the same bytes again reuse the
    version)."""
    check_name(name)
    return run_stage(ModelImport(source, config), name, store_url, rerun).ref

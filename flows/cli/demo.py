"""`asd demo`: the whole pipeline on the demo photos shipped inside the installed packages."""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from asd_models.families import TINY
from data_manifests.settings import PromptSpec
from flows.cli.common import print_metrics
from tasks.evaluate import EvaluateSettings
from tasks.generate import GenerateSettings
from tasks.ingest import IngestSettings
from tasks.train import TrainSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="run the whole pipeline on the packaged demo photos")
    d.add_argument("--name", default="demo")
    d.add_argument("--quick", action="store_true", help="tiny training and small sizes (smoke test)")
    d.add_argument("--rerun", action="store_true", help="redo stages even if finished work exists")
    d.add_argument(
        "--family",
        choices=sorted(TINY),
        default="sd",
        help="the model family of the tiny model built in code and trained (default sd)",
    )
    d.set_defaults(func=cmd_demo)


def demo_settings(quick: bool) -> dict:
    """The demo's stage settings: those of the `nightly` deployment (`quick` with --quick) in
    deployments/prefect.yaml, written there once, so `asd demo` and the deployments never drift."""
    from flows.deploy import load_specs

    wanted = "quick" if quick else "nightly"
    spec = next(s for s in load_specs() if s.name == wanted and s.entrypoint.endswith("asd_pipeline"))
    models = {
        "ingest": IngestSettings,
        "train": TrainSettings,
        "generate": GenerateSettings,
        "evaluate": EvaluateSettings,
    }
    return {stage: model(**spec.parameters.get(stage, {})) for stage, model in models.items()}


def _with_family(settings: dict, family: str) -> dict:
    return {**settings, "train": settings["train"].model_copy(update={"tiny_family": family})}


def cmd_demo(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore, check_name
    from artifact_store.members import image_uri
    from data_manifests.demo import demo_prompts, materialize_demo_photos
    from flows.pipeline_flow import asd_pipeline

    check_name(args.name)
    store = ArtifactStore(args.store)
    print(f"asd demo: store {store.display_url}", flush=True)
    with tempfile.TemporaryDirectory(prefix="asd-demo-photos-") as tmp:
        folder = materialize_demo_photos(Path(tmp) / "photos")
        prompts = [PromptSpec(**p) for p in demo_prompts()]
        if args.quick:
            prompts = [
                PromptSpec(prompt=p.prompt, width=p.width // 4 + 64, height=p.height // 4 + 64, seed=p.seed)
                for p in prompts[:3]
            ]
        refs = asd_pipeline(
            source=str(folder),
            prompts=prompts,
            name=args.name,
            **_with_family(demo_settings(args.quick), args.family),
            store_url=store.url,
            rerun=args.rerun,
        )
    print("\nCommitted versions (the evaluation and everything it descends from):")
    stages = {v: k for k, v in refs.model_dump().items()}
    for rec in store.lineage(refs.evaluation):
        print(f"  {stages.get(rec['ref'], ''):12s} {rec['ref']}")
    import polars as pl

    manifest = pl.read_parquet(io.BytesIO(store.read_bytes(refs.generations, "manifest.parquet")))
    gen = store.resolve(refs.generations)
    print("\nGenerated images:")
    for r in manifest.iter_rows(named=True):
        where = image_uri(store, gen, r) if r["image"] else f"FAILED: {r['error']}"
        print(f"  {r['width']:>5d}x{r['height']:<5d} {where}")
    print(f"\nMetrics ({refs.evaluation}):")
    print_metrics(store, refs.evaluation)
    if args.quick:
        print("\n(--quick: the model is barely trained; these numbers mean nothing.)")
    return 0

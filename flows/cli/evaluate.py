"""`asd evaluate`: FID/KID/CLIP/seam scores of a generations version."""

from __future__ import annotations

import argparse

from flows.cli.common import print_metrics, ref_arg
from flows.settings_cli import add_settings_arguments, settings_from_args
from tasks.evaluate import EvaluateSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="FID/KID/CLIP/seam scores of a generations version")
    e.add_argument(
        "--generations",
        required=True,
        help="NAME, NAME@VERSION or generations/NAME@VERSION, or "
        "upscales/NAME@VERSION (its round trip is scored too)",
    )
    e.add_argument("--dataset", required=True, help="NAME, NAME@VERSION or datasets/NAME@VERSION")
    e.add_argument("--name", default="evaluation", help="name of the evaluation artifact to write")
    e.add_argument(
        "--rerun", action="store_true", help="score again even if this exact evaluation is committed"
    )
    add_settings_arguments(e, EvaluateSettings)
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore, check_name
    from flows.stages import evaluate_flow

    check_name(args.name)
    settings = settings_from_args(EvaluateSettings, args)
    scored = (
        ref_arg(args.generations, "upscales")
        if args.generations.startswith("upscales/")
        else ref_arg(args.generations, "generations")
    )
    ref = evaluate_flow(
        scored, ref_arg(args.dataset, "datasets"), args.name, settings, args.store, args.rerun
    )
    print(ref)
    print_metrics(ArtifactStore(args.store), ref)
    return 0

"""`asd train`: ARAD fine-tuning on a dataset version."""

from __future__ import annotations

import argparse
import os

from flows.cli.common import ref_arg
from flows.settings_cli import add_settings_arguments, settings_from_args
from tasks.train import TrainSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="ARAD fine-tuning on a dataset version")
    t.add_argument("--dataset", required=True, help="NAME, NAME@VERSION or datasets/NAME@VERSION")
    t.add_argument("--model", required=True, help="name of the model artifact to write")
    t.add_argument("--rerun", action="store_true", help="train again even if this exact model exists")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint of the same dataset, base model and settings",
    )
    add_settings_arguments(t, TrainSettings, aliases={"learning_rate": ["--lr"]})
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore, check_name
    from flows.stages import train_flow

    check_name(args.model)
    settings = settings_from_args(TrainSettings, args)
    ref = train_flow(
        ref_arg(args.dataset, "datasets"), args.model, settings, args.store, args.rerun, args.resume
    )
    if not ref:  # a rank other than 0 of a multi-process run: rank 0 commits and prints the model
        print(
            f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}: done; rank 0 commits the model"
        )
        return 0
    summary = ArtifactStore(args.store).record(ref).get("summary", {})
    print(ref)
    print(
        f"  loss (mean of the first / last 10% of steps) {summary.get('loss_first10pct_mean', float('nan')):.4f} -> "
        f"{summary.get('loss_last10pct_mean', float('nan')):.4f} over {summary.get('steps')} steps "
        f"({summary.get('weights')} weights)"
    )
    return 0

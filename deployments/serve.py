"""Serve the flows from this process, without work pools: `python -m deployments.serve`.

Its deployments are named `<flow>/served`, a name `prefect.yaml` never uses, so serving next to
`asd deploy`'s deployments changes none of them (serve pauses its own on exit). Trigger runs from
the UI or `prefect deployment run 'asd-pipeline/served' --param source=... --param prompts=...`.
The store comes from $ASD_STORE of this process (made absolute)."""

from __future__ import annotations

from typing import cast

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.backfill import backfill_flow
from flows.pipeline_flow import asd_pipeline
from flows.stages import (
    evaluate_flow,
    generate_flow,
    ingest_flow,
    prompts_flow,
    train_flow,
    train_processes_flow,
    upscale_flow,
)

SERVED_NAME = "served"
SERVED_FLOWS = (
    asd_pipeline,
    ingest_flow,
    train_flow,
    train_processes_flow,
    prompts_flow,
    generate_flow,
    upscale_flow,
    evaluate_flow,
    backfill_flow,
)


def main() -> None:
    # called from sync code, Prefect's sync-or-async `to_deployment` returns the deployment itself
    serve(*(cast(RunnerDeployment, f.to_deployment(name=SERVED_NAME)) for f in SERVED_FLOWS))


if __name__ == "__main__":
    main()

"""Serve the flows from this process (no work pool needed): `python -m deployments.serve`.

Then trigger runs from the UI or `prefect deployment run 'asd-pipeline/asd-pipeline' --param ...`.
"""

from __future__ import annotations

from prefect import serve

from flows.pipeline_flow import asd_pipeline
from flows.stages import evaluate_flow, generate_flow, ingest_flow, train_flow


def main() -> None:
    serve(
        asd_pipeline.to_deployment(name="asd-pipeline"),
        ingest_flow.to_deployment(name="ingest"),
        train_flow.to_deployment(name="train"),
        generate_flow.to_deployment(name="generate"),
        evaluate_flow.to_deployment(name="evaluate"),
    )


if __name__ == "__main__":
    main()

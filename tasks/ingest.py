"""The ingest task: the data engine run inside Prefect (progress artifact, run logger, run id)."""

from __future__ import annotations

from typing import Any

from prefect import task

from artifact_store import ArtifactStore
from data_engine.engine import ingest_to_store
from data_manifests.settings import IngestSettings
from tasks.progress import Progress, publish_table
from tasks.runtime import current_flow_run_id, run_logger


@task(name="ingest-dataset")
def ingest_dataset(store_url: str, sources: list[str], dataset: str, settings: IngestSettings,
                   rerun: bool = False, retry_failed: bool = False) -> str:
    """Sources -> `datasets/<dataset>` (reused when the same inputs were ingested already)."""
    result = ingest_to_store(
        ArtifactStore(store_url), sources, dataset, settings, rerun=rerun, retry_failed=retry_failed,
        flow_run_id=current_flow_run_id(), make_progress=lambda label, total: Progress(label, total, unit="img"),
        logger=run_logger(),
    )
    if not result.reused:
        publish_table("bucket-stats", _bucket_rows(result.index), f"bucket statistics of {result.ref}")
    return str(result.ref)


def _bucket_rows(index: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"bucket": b, "count": v["count"], "mean_aspect_error": round(v["mean_aspect_error"] or 0.0, 4),
             "shards": len(v["shards"])} for b, v in index["buckets"].items()]

"""Running the data engine from tests the way the ingest task does (without Prefect)."""

from __future__ import annotations

from typing import Any

from artifact_store import ArtifactStore
from data_engine.engine import ingest_to_store
from data_manifests.settings import IngestSettings


def ingest_ref(store_url: str, sources: list[str], dataset: str, options: dict[str, Any], **kw: Any) -> str:
    """Ingest `sources` with `IngestSettings(**options)`; the committed (or reused) reference."""
    return str(ingest_to_store(ArtifactStore(store_url), sources, dataset, IngestSettings(**options), **kw).ref)

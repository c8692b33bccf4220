"""Running the ingest stage from tests the way its flow does (without Prefect)."""

from __future__ import annotations

from typing import Any

from tasks.ingest import IngestSettings, ingest


def ingest_ref(store_url: str, sources: list[str], dataset: str, options: dict[str, Any], **kw: Any) -> str:
    """Ingest `sources` with `IngestSettings(**options)`; the committed (or reused) reference."""
    return ingest(store_url, sources, dataset, IngestSettings(**options), **kw)

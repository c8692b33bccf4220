"""Run records: what one flow run read and wrote (`runs/<flow_run_id>.json`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from artifact_store import ArtifactStore
from tasks.runtime import current_flow_run_id


def record_run(store_url: str, flow: str, reads: list[str], writes: list[str], params: dict[str, Any]) -> str | None:
    run_id = current_flow_run_id()
    if run_id is None:
        return None
    return ArtifactStore(store_url).write_run_record(run_id, {
        "flow": flow, "reads": reads, "writes": writes, "params": params,
        "finished_at": datetime.now(UTC).isoformat(),
    })

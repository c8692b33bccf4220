"""Run records: what one flow run read and wrote (`runs/<flow_run_id>.json`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from artifact_store import ArtifactStore
from tasks.runtime import current_flow_run_id


def record_run(
    store_url: str, flow: str, reads: list[str], writes: list[str], params: dict[str, Any]
) -> str | None:
    """Add what a stage read and wrote to its flow run's record (a flow that runs two stages,
    as training's tiny base and fine-tuning, lists both; `params` are the last stage's)."""
    run_id = current_flow_run_id()
    if run_id is None:
        return None
    store = ArtifactStore(store_url)
    before = store.read_run_record(run_id) or {}

    def merged(key: str, new: list[str]) -> list[str]:
        return list(dict.fromkeys([*before.get(key, []), *new]))

    return store.write_run_record(
        run_id,
        {
            "flow": flow,
            "reads": merged("reads", reads),
            "writes": merged("writes", writes),
            "params": params,
            "finished_at": datetime.now(UTC).isoformat(),
        },
    )

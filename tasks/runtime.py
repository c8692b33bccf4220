"""The run context: what the running Prefect context says about itself (flow run id, logger),
outside a run too, and committing a version with that run id."""

from __future__ import annotations

from typing import Any

from artifact_store import ArtifactRef, VersionWriter


def current_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        run_id = flow_run.id
    except Exception:  # noqa: BLE001 - outside Prefect there is simply no run id
        return None
    return str(run_id) if run_id else None


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def run_logger():
    """Prefect's run logger inside a flow or task run, the `asd` logger outside one."""
    if in_prefect_run():
        from prefect import get_run_logger

        return get_run_logger()
    import logging

    return logging.getLogger("asd")


def commit_in_run(writer: VersionWriter, **record: Any) -> ArtifactRef:
    """Commit `writer`'s version, recording the flow run that made it."""
    return writer.commit(flow_run_id=current_flow_run_id(), **record)

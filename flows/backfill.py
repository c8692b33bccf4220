"""Backfills: one deployment run per partition (dates, or prompt-manifest versions).

The Prefect 3 form of a one-off backfill: each partition becomes a `run_deployment` call with an
idempotency key (a retried or restarted backfill never starts a partition twice) and a
`scheduled_time`, at most `max_concurrency` in flight, each a child run of the backfill. A
partition whose output (`generations/<name>-<partition>`, ...) is already committed in the store is
skipped, so re-running a backfill only does what is missing or failed."""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field, model_validator

from artifact_store import ArtifactRef, ArtifactStore, check_name, params_hash
from tasks.evaluate import Evaluate
from tasks.generate import Generate
from tasks.progress import publish_table
from tasks.registry import STAGES

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

# flow name -> (the parameter naming its output, the output's kind), from the stages' own
# declarations; the whole pipeline's output is its evaluation
OUTPUTS = {"asd-pipeline": ("name", Evaluate.kind)} | {
    e.stage.flow: (e.stage.output_param, e.stage.kind) for e in STAGES.values()
}
# the parameter that takes a prompt manifest (for prompt-version partitions)
PROMPTS_PARAM = {"asd-pipeline": "prompts", Generate.flow: Generate.prompts_param}
MAX_RETRY_KEYS = 50
MAX_PARTITIONS = 100  # more runs than this at once need an explicit --max-partitions
FINAL_FAILED = {"FAILED", "CRASHED", "CANCELLED"}


class BackfillError(ValueError):
    """A backfill that cannot be planned as asked (one line for the user)."""


class DateRange(BaseModel):
    """Dates `start` to `end` inclusive, every `step_days` days."""

    start: date
    end: date
    step_days: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> DateRange:
        if self.end < self.start:
            raise ValueError(f"the date range ends ({self.end}) before it starts ({self.start})")
        if (self.end - self.start).days // self.step_days >= 10_000:
            raise ValueError("more than 10000 date partitions")
        return self

    def dates(self) -> list[date]:
        n = (self.end - self.start).days // self.step_days
        return [self.start + timedelta(days=i * self.step_days) for i in range(n + 1)]


@dataclass(frozen=True)
class Partition:
    label: str
    parameters: dict[str, Any]
    output: ArtifactRef  # kind/name, version "latest": committed means done


def _fill(value: Any, fields: dict[str, str]) -> Any:
    """Replace {partition} / {date} in every string of a parameter value."""
    if isinstance(value, str):
        for k, v in fields.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, fields) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, fields) for v in value]
    return value


def plan_partitions(
    flow_name: str,
    defaults: dict[str, Any],
    parameters: dict[str, Any],
    store: ArtifactStore,
    dates: DateRange | None = None,
    prompts_versions: list[str] | None = None,
    name: str | None = None,
    max_partitions: int = MAX_PARTITIONS,
) -> list[Partition]:
    """Each partition's parameters: the deployment's defaults, overridden by `parameters` with
    {partition}/{date} filled in, the output named `<name>-<partition>`, and for prompt-version
    partitions the pinned manifest in the flow's prompts parameter."""
    if flow_name not in OUTPUTS:
        raise BackfillError(
            f"cannot backfill {flow_name!r}: its output is not known (one of {', '.join(OUTPUTS)})"
        )
    if (dates is None) == (not prompts_versions):
        raise BackfillError("give exactly one of a date range or a list of prompt-manifest versions")
    out_param, kind = OUTPUTS[flow_name]
    base = name or parameters.get(out_param) or defaults.get(out_param)
    if not base:
        raise BackfillError(f"no base name for the outputs: pass a name (the flow's {out_param!r} parameter)")
    check_name(base)
    labels: list[tuple[str, dict[str, str], dict[str, Any]]] = []
    if dates is not None:
        for d in dates.dates():
            labels.append((d.isoformat(), {"partition": d.isoformat(), "date": d.isoformat()}, {}))
    else:
        param = PROMPTS_PARAM.get(flow_name)
        if param is None:
            raise BackfillError(f"{flow_name} takes no prompt manifest; partition it by dates")
        for text in prompts_versions or []:
            ref = store.resolve(text if text.startswith("prompts/") else f"prompts/{text}")  # pinned, checked
            slug = f"{ref.name}-{ref.version}"
            labels.append((str(ref), {"partition": slug}, {param: str(ref)}))
    if len(labels) > max_partitions:
        raise BackfillError(
            f"{len(labels)} partitions asked for (at most {max_partitions} without a larger "
            f"--max-partitions): a 10-year --dates range is {len(labels)} runs; narrow it or raise the cap"
        )
    plans, seen = [], set()
    for label, fields, pinned in labels:
        if label in seen:
            raise BackfillError(f"partition {label} is listed twice")
        seen.add(label)
        out_name = f"{base}-{fields['partition']}"
        if len(out_name) > 128:  # cut, two partitions could share a name and the second be skipped as done
            raise BackfillError(
                f"partition {label}: its output name {out_name[:40]}... is {len(out_name)} characters "
                "(at most 128): give a shorter --name"
            )
        check_name(out_name)
        params = {**defaults, **_fill(parameters, fields), **pinned, out_param: out_name}
        plans.append(Partition(label, params, ArtifactRef(kind, out_name, "latest")))
    return plans


def _attempt_key(client: Any, base_key: str) -> str:
    """The idempotency key of this attempt: the base key, unless the run it names ended failed
    (then the next `:retry-N` key, so a re-run backfill retries it instead of returning it)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

    keys = [base_key] + [f"{base_key}:retry-{i}" for i in range(1, MAX_RETRY_KEYS)]
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=keys))
    )
    by_key = {r.idempotency_key: r for r in runs}
    for i, key in enumerate(keys):
        run = by_key.get(key)
        if run is None:
            return key
        if run.state is None or run.state.type.value not in FINAL_FAILED:
            return key  # running, scheduled or completed: wait for / return that run
        if i == len(keys) - 1:
            raise BackfillError(f"{base_key} failed {MAX_RETRY_KEYS} times; look at its runs before retrying")
    return keys[-1]


def _launch(
    deployment: str, part: Partition, key: str, scheduled_time: datetime, poll_s: float
) -> dict[str, Any]:
    from prefect.deployments import run_deployment

    t0 = time.monotonic()
    # called from sync code, Prefect's sync-or-async `run_deployment` returns the run itself
    run = cast(
        "FlowRun",
        run_deployment(
            deployment,
            parameters=part.parameters,
            scheduled_time=scheduled_time,
            idempotency_key=key,
            tags=["backfill"],
            poll_interval=poll_s,
            timeout=None,
        ),
    )
    state = run.state.type.value if run.state else "UNKNOWN"
    return {
        "partition": part.label,
        "output": f"{part.output.kind}/{part.output.name}",
        "status": state,
        "flow_run": run.name,
        "flow_run_id": str(run.id),
        "seconds": round(time.monotonic() - t0, 1),
        "idempotency_key": key,
    }


@flow(name="asd-backfill", log_prints=True)
def backfill_flow(
    deployment: str,
    dates: DateRange | None = None,
    prompts_versions: list[str] | None = None,
    parameters: dict[str, Any] | None = None,
    name: str | None = None,
    max_concurrency: int = 2,
    max_partitions: int = MAX_PARTITIONS,
    store_url: str | None = None,
    scheduled_time: datetime | None = None,
    poll_interval_s: float = 5.0,
) -> list[dict[str, Any]]:
    """Run `deployment` ('flow/deployment') once per partition: each date of `dates`, or each
    version in `prompts_versions`. `parameters` override the deployment's defaults ({partition}
    and {date} are filled in per partition); outputs are named `<name>-<partition>`. Partitions
    already committed in the store are skipped. Fails when any partition's run failed."""
    from prefect import get_client
    from prefect.settings import PREFECT_UI_URL

    logger = get_run_logger()
    if max_concurrency < 1:
        raise BackfillError("max_concurrency must be at least 1")
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        env = (dep.job_variables or {}).get("env") or {}
        store = ArtifactStore(store_url or env.get("ASD_STORE"))
        plans = plan_partitions(
            deployment.split("/", 1)[0],
            dict(dep.parameters or {}),
            parameters or {},
            store,
            dates,
            prompts_versions,
            name,
            max_partitions,
        )
        todo, rows = [], []
        for part in plans:
            done = store.list_versions(part.output.kind, part.output.name)
            if done:
                rows.append(
                    {
                        "partition": part.label,
                        "output": str(done[-1]),
                        "status": "SKIPPED (committed)",
                        "flow_run": None,
                        "flow_run_id": None,
                        "seconds": 0.0,
                        "idempotency_key": None,
                    }
                )
            else:
                base_key = f"asd-backfill:{deployment}:{part.label}:{params_hash(part.parameters)[:16]}"
                todo.append((part, _attempt_key(client, base_key)))
    logger.info(
        "backfill of %s: %d partition(s), %d already committed, %d to run (at most %d at a time) on store %s",
        deployment,
        len(plans),
        len(plans) - len(todo),
        len(todo),
        max_concurrency,
        store.display_url,
    )
    when = scheduled_time or datetime.now(UTC)
    with ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="backfill") as pool:
        # each thread gets a copy of this run's context, so every deployment run is a child of it
        futures = [
            pool.submit(contextvars.copy_context().run, _launch, deployment, part, key, when, poll_interval_s)
            for part, key in todo
        ]
        rows += [f.result() for f in futures]
    ui = PREFECT_UI_URL.value()
    for r in rows:
        r["link"] = f"{ui.rstrip('/')}/runs/flow-run/{r['flow_run_id']}" if ui and r["flow_run_id"] else None
    publish_table("backfill-summary", rows, f"backfill of {deployment}: one row per partition")
    failed = [r for r in rows if r["status"] in FINAL_FAILED or r["status"] == "UNKNOWN"]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(rows)} partitions failed: "
            + ", ".join(f"{r['partition']} ({r['status']})" for r in failed)
        )
    return rows

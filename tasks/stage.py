"""The stage protocol, written once: every stage (ingest, prompts, train, generate, evaluate)
is a `Stage` that says what it reads and what its output depends on, and how to build it;
`run_stage` does the rest the same way for all of them:

    open the store -> resolve the inputs (pinned references) -> input hash of the identity ->
    reuse a committed version made from the same inputs (or, for a resumable stage, resume an
    uncommitted one) -> build into the pending version -> commit it with its parents, params
    and summary -> UI artifacts -> the run record (what this flow run read and wrote)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prefect import task
from prefect.cache_policies import NO_CACHE

from artifact_store import (
    ArtifactRef,
    ArtifactStore,
    PendingVersion,
    VersionWriter,
    check_name,
    leases,
    params_hash,
)
from data_manifests.runtime import runtime
from tasks.runs import record_run
from tasks.runtime import commit_in_run, current_flow_run_id, in_prefect_run, open_store, run_logger


@dataclass
class Inputs:
    """What `Stage.resolve` found: the versions and sources it reads (`reads`, as the run
    record lists them), the parents the output descends from, the identity its input hash
    covers, and the pinned references by role (`refs["model"]`: `models/NAME@VERSION`)."""

    reads: list[str]
    parents: list[str]
    identity: dict[str, Any]
    refs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # what resolve found for build (a job's plan)


@dataclass
class Built:
    """What `Stage.build` made, for the commit record: params, summary, more parents (a
    version that build itself found, e.g. a checkpoint), and anything the caller wants back.
    `commit` False: the build stopped early and nothing is committed (its pending version
    stays for a resumable stage)."""

    params: dict[str, Any]
    summary: dict[str, Any]
    parents: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    commit: bool = True


@dataclass
class StageRun:
    """Where a build writes: the store, the pending version and its writer, the logger, and
    whether the run was asked to redo everything (`rerun`: reuse nothing, not even parts)."""

    store: ArtifactStore
    pending: PendingVersion
    writer: VersionWriter
    logger: Any
    rerun: bool = False


@dataclass
class StageResult:
    """The committed version (empty when the build stopped without committing), whether it was
    reused as it was, and the build's outcome (None when reused)."""

    ref: str
    reused: bool
    built: Built | None = None


class Stage:
    """One stage: `flow` (its flow's name, in run records), `output_param` (the flow parameter
    that names the output: backfills name each partition's output through it), `kind` (what it
    writes), `resumable` (an uncommitted version of the same inputs is resumed rather than
    started anew), `builds_in_task` (inside a flow run the build is one Prefect task; a build
    that fans out over tasks of its own runs in the flow)."""

    flow: ClassVar[str]
    output_param: ClassVar[str]
    kind: ClassVar[str]
    resumable: ClassVar[bool] = False
    builds_in_task: ClassVar[bool] = True

    def resolve(self, store: ArtifactStore) -> Inputs:
        raise NotImplementedError

    def keep(self, store: ArtifactStore, found: ArtifactRef) -> bool:
        """Whether a committed version made from the same inputs may be reused as it is."""
        return True

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        """Write the output into `run.writer`."""
        raise NotImplementedError

    def publish(self, store: ArtifactStore, ref: str, built: Built | None) -> None:
        """UI artifacts of the version (`built` None: it was reused as it was)."""


@task(name="build", task_run_name="build-{stage.kind}", cache_policy=NO_CACHE)
def build_task(stage: Stage, run: StageRun, inputs: Inputs) -> Built:
    """A stage's build as a Prefect task (its own run, logs and state in the UI)."""
    return stage.build(run, inputs)


def run_stage(stage: Stage, name: str, store_url: str | None = None, rerun: bool = False) -> StageResult:
    """Run `stage` into `<stage.kind>/<name>`: reuse, resume or build, then commit once."""
    logger = run_logger()
    check_name(name)
    store = open_store(store_url)
    inputs = stage.resolve(store)
    input_hash = params_hash(inputs.identity)
    lease = None
    if stage.resumable:
        found = store.resume_or_new(stage.kind, name, input_hash, rerun)
        if isinstance(found, PendingVersion):  # one run writes it at a time: wait, take over, or refuse
            env = runtime()
            pending = found
            lease = leases.acquire(
                store,
                pending,
                lease_s=env.lease_s,
                wait_s=env.lease_wait_s,
                flow_run_id=current_flow_run_id(),
                committed=lambda: store.has_commit_record(pending.ref),
            )
            if lease is None:  # the run we waited for committed it
                found = pending.ref
    else:
        found = store.reuse_or_new(
            stage.kind, name, input_hash, rerun, keep=lambda ref: stage.keep(store, ref)
        )
    if isinstance(found, ArtifactRef):
        logger.info("%s already made from the same inputs: reusing it", found)
        stage.publish(store, str(found), None)
        record_run(store.url, stage.flow, inputs.reads, [str(found)], {"reused": True})
        return StageResult(str(found), reused=True)
    run = StageRun(store, found, store.writer(found), logger, rerun)
    with lease if lease is not None else contextlib.nullcontext():  # renewed while the job writes
        run.writer.lease = lease
        built = (
            build_task(stage, run, inputs)
            if stage.builds_in_task and in_prefect_run()
            else stage.build(run, inputs)
        )
        if not built.commit:
            return StageResult("", reused=False, built=built)
        ref = str(
            commit_in_run(
                run.writer, parents=inputs.parents + built.parents, params=built.params, summary=built.summary
            )
        )
    logger.info("committed %s", ref)
    stage.publish(store, ref, built)
    record_run(store.url, stage.flow, inputs.reads, [ref], built.params)
    return StageResult(ref, reused=False, built=built)

"""Deployments and backfills against a real Prefect API (the test harness's server)."""

from __future__ import annotations

from datetime import date

import pytest

import flows.stages  # noqa: F401 - Prefect's log handler set up before capsys tests (see test_cli)
from artifact_store import ArtifactStore
from flows.backfill import BackfillError, DateRange, _attempt_key, backfill_flow, plan_partitions
from flows.deploy import DEFINITIONS, DeployError, deploy_all, deployment_store, load_specs


def test_every_packaged_deployment_is_complete_and_its_defaults_fit_its_flow():
    specs = load_specs(DEFINITIONS)
    names = {s.full_name for s in specs}
    assert {"asd-pipeline/nightly", "asd-pipeline/quick", "asd-generate/generate", "asd-train/train"} <= names
    for spec in specs:
        assert "." in spec.entrypoint and ":" not in spec.entrypoint  # module path, no code location needed
        spec.load_flow().validate_parameters(spec.parameters)  # the defaults run as they stand
        assert "store_url" not in spec.parameters  # the store comes from `asd deploy --store`
    nightly = next(s for s in specs if s.name == "nightly")
    assert nightly.schedules and nightly.parameters["train"]["base_model"]  # trains what it says
    assert all(not s.schedules for s in specs if s.name != "nightly")


def test_served_deployments_never_collide_with_the_yaml():
    from deployments.serve import SERVED_NAME

    assert SERVED_NAME not in {s.name for s in load_specs(DEFINITIONS)}


def test_deploy_refuses_unclear_setups(tmp_path, monkeypatch):
    with pytest.raises(DeployError, match="no store"):
        deployment_store(None, {})
    with pytest.raises(DeployError, match="credentials"):
        deployment_store("s3://AKIAEXAMPLE:s3cr3t@bucket/x", {})
    assert deployment_store("rel/store", {}) == str((tmp_path.cwd() / "rel/store").resolve())
    bad = tmp_path / "prefect.yaml"
    bad.write_text(
        "deployments:\n  - name: x\n    entrypoint: flows/stages.py:ingest_flow\n    work_pool: {name: cpu}\n"
        "    schedules: []\n"
    )
    with pytest.raises(DeployError, match="module path"):
        load_specs(bad)
    bad.write_text(
        "deployments:\n  - name: x\n    entrypoint: flows.stages.ingest_flow\n    work_pool: {name: cpu}\n"
    )
    with pytest.raises(DeployError, match="schedules"):
        load_specs(bad)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(DeployError, match="PREFECT_API_URL"):
        deploy_all("/tmp/x", {})
    from tests.helpers import free_port

    dead = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    with temporary_settings({PREFECT_API_URL: dead}), pytest.raises(DeployError, match="does not answer"):
        deploy_all("/tmp/x", {})


def test_deploy_creates_pools_and_deployments_without_questions(prefect_harness, tmp_path):
    from prefect import get_client

    done = deploy_all(str(tmp_path / "store"), {})
    assert len(done) == len(load_specs(DEFINITIONS))
    with get_client(sync_client=True) as client:
        assert {p.name for p in client.read_work_pools()} >= {"cpu", "gpu"}
        nightly = client.read_deployment_by_name("asd-pipeline/nightly")
        quick = client.read_deployment_by_name("asd-pipeline/quick")
    assert nightly.entrypoint == "flows.pipeline_flow.asd_pipeline" and nightly.pull_steps == []
    assert nightly.job_variables["env"]["ASD_STORE"] == str((tmp_path / "store").resolve())
    assert len(nightly.schedules) == 1 and not quick.schedules
    assert deploy_all(str(tmp_path / "store"), {}, only=["quick"])[0][0] == "asd-pipeline/quick"  # re-deploy


def test_partitions_by_date_and_by_prompt_version(tmp_path):
    from data_engine.prompts import validate_rows
    from tasks.prompts import store_prompts

    store = ArtifactStore(str(tmp_path / "store"))
    parts = plan_partitions(
        "asd-ingest",
        {"dataset": "photos", "source": "/d"},
        {"source": "/data/{date}/x"},
        store,
        dates=DateRange(start=date(2026, 11, 1), end=date(2026, 11, 5), step_days=2),
    )
    assert [p.label for p in parts] == ["2026-11-01", "2026-11-03", "2026-11-05"]
    assert parts[1].parameters == {"dataset": "photos-2026-11-03", "source": "/data/2026-11-03/x"}
    assert str(parts[1].output) == "datasets/photos-2026-11-03@latest"
    v1, v2 = (
        store.resolve(
            store_prompts(
                store.url, validate_rows([{"prompt": p, "width": 64, "height": 64}], "test"), "daily", "test"
            )
        )
        for p in ("a cat", "a dog")
    )
    parts = plan_partitions(
        "asd-generate",
        {"generations": "daily", "prompts_ref": "x"},
        {},
        store,
        prompts_versions=[str(v1), "daily@" + v2.version],
    )
    assert [p.parameters["prompts_ref"] for p in parts] == [str(v1), str(v2)]
    assert parts[0].parameters["generations"] == f"daily-daily-{v1.version}"
    with pytest.raises(BackfillError, match="exactly one"):
        plan_partitions("asd-generate", {"generations": "g"}, {}, store)
    with pytest.raises(BackfillError, match="no prompt manifest"):
        plan_partitions("asd-ingest", {"dataset": "d"}, {}, store, prompts_versions=[str(v1)])
    with pytest.raises(BackfillError, match="twice"):
        plan_partitions("asd-generate", {"generations": "g"}, {}, store, prompts_versions=[str(v1), str(v1)])
    with pytest.raises(ValueError, match="before it starts"):
        DateRange(start=date(2026, 11, 2), end=date(2026, 11, 1))


def test_failed_partition_gets_a_new_idempotency_key_and_committed_ones_are_skipped(
    prefect_harness, tmp_path
):
    from prefect import get_client
    from prefect.states import Completed, Failed

    store = ArtifactStore(str(tmp_path / "store"))
    deploy_all(store.url, {}, only=["ingest"])
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("asd-ingest/ingest")
        assert _attempt_key(client, "k-new") == "k-new"
        client.create_flow_run_from_deployment(dep.id, idempotency_key="k-failed", state=Failed())
        client.create_flow_run_from_deployment(dep.id, idempotency_key="k-done", state=Completed())
        assert _attempt_key(client, "k-failed") == "k-failed:retry-1"
        assert _attempt_key(client, "k-done") == "k-done"

    for day in ("2026-11-01", "2026-11-02"):
        w = store.new_version("datasets", f"photos-{day}")
        w.put_bytes("manifest.parquet", b"x")
        w.commit(parents=[], params={})
    rows = backfill_flow("asd-ingest/ingest", dates=DateRange(start=date(2026, 11, 1), end=date(2026, 11, 2)))
    assert [r["status"] for r in rows] == ["SKIPPED (committed)"] * 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["backfill", "nodeployment", "--dates", "2026-11-01..2026-11-02"], "expected FLOW/DEPLOYMENT"),
        (["backfill", "a/b", "--dates", "2026-11-05..2026-11-02"], "ends (2026-11-02) before it starts"),
        (["backfill", "a/b", "--dates", "2026-11-01..2026-11-02/0"], "--dates"),
        (["backfill", "a/b", "--dates", "2026-11-01"], "expected START..END"),
        (["backfill", "a/b"], "exactly one of --dates or --prompts-versions"),
        (["backfill", "a/b", "--dates", "2026-11-01..2026-11-02", "--param", "oops"], "expected KEY=VALUE"),
    ],
)
def test_backfill_flags_are_checked_before_the_server_is_asked(argv, message, capsys, monkeypatch):
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # no server: flag errors must come first
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("asd: ") and message in err and len(err.strip().splitlines()) == 1

"""A plan before a large job: the UNet evaluations it counts are the ones the pipeline makes,
a job over max_job_pixels is refused before anything is written, --pack-max-pixels is capped,
and a measured rate of the same model on the same kind of device gives an estimated time."""

from __future__ import annotations

import pytest

from artifact_store import ArtifactStore
from asd_models.pipeline import AnySizePipeline
from data_engine.prompts import validate_rows
from flows.cli import main as asd_main
from tasks.generate import GenerateSettings
from tasks.job_plan import JobTooLarge, plan_job

ROWS = [
    {"prompt": "a", "width": 96, "height": 96, "seed": 0},
    {"prompt": "b", "width": 300, "height": 100, "seed": 1, "strength": 0.9, "guidance_scale": 1.0},
    {"prompt": "c", "width": 96, "height": 250, "seed": 2},
    {"prompt": "d", "width": 512, "height": 64, "seed": 3, "strength": 0.3, "steps": 3},
    {"prompt": "e", "width": 10, "height": 10, "seed": 4},
]  # invalid: under the minimum side


@pytest.fixture(scope="module")
def planned_store(tmp_path_factory, commit_tiny_model):
    url = str(tmp_path_factory.mktemp("plan") / "store")
    return url, commit_tiny_model(url)


@pytest.mark.parametrize("sampler", ["fstd", "multidiffusion", "naive"])
def test_the_plan_counts_the_unet_evaluations_the_pipeline_makes(planned_store, tiny_model_dir, sampler):
    url, model = planned_store
    store = ArtifactStore(url)
    table = validate_rows(ROWS, "test")
    settings = GenerateSettings(steps=4, sampler=sampler, offset_salt=7)
    plan = plan_job(store, model, table, settings)
    assert plan.images == 4 and plan.failed_rows == 1
    assert plan.pixels == 96 * 96 + 300 * 100 + 96 * 250 + 512 * 64 and plan.largest == (512, 64)
    pipe = AnySizePipeline.from_pretrained(tiny_model_dir)
    good = [r for r in table.to_pylist() if r["error"] is None]
    results = pipe.generate_many(
        [settings.render_request(r) for r in good],
        pipe.default_sampler(sampler, None, None, settings.offset_salt),
    )
    assert plan.unet_evals == sum(r.unet_evals for r in results)


def test_a_job_over_max_job_pixels_is_refused_before_anything_is_written(planned_store, tmp_path, capsys):
    url, model = planned_store
    store = ArtifactStore(url)
    before = store.list_artifacts()
    args = [
        "--store",
        url,
        "generate",
        "--model",
        model,
        "--name",
        "huge",
        "--prompt",
        "x",
        "--size",
        "16384x16384",
        "--size",
        "8192x8192",
    ]
    assert asd_main([*args, "--max-job-pixels", "100000000"]) == 2
    err = capsys.readouterr().err
    assert (
        "refused: 335,544,320 output pixels is over max_job_pixels 100,000,000" in err
        and "--max-job-pixels" in err
    )
    assert store.list_artifacts() == before  # not even the prompts were stored
    assert (
        asd_main([*args, "--dry-run"]) == 0
    )  # the default (64 gigapixels) takes it: the plan, nothing rendered
    out = capsys.readouterr().out
    assert "images: 2 to render" in out and "largest 16384x16384" in out and "UNet evaluations" in out
    assert store.list_artifacts() == before
    with pytest.raises(JobTooLarge):
        plan_job(store, model, validate_rows(ROWS, "t"), GenerateSettings(max_job_pixels=1000)).check()
    assert asd_main([*args, "--pack-max-pixels", str(1 << 31)]) == 2
    assert "--pack-max-pixels: Input should be less than or equal to 1073741824" in capsys.readouterr().err


def test_a_flow_refuses_a_large_job_before_it_starts_a_version(planned_store, prefect_harness):
    from flows.stages import generate_flow
    from tasks.prompts import store_prompts

    url, model = planned_store
    prompts = store_prompts(url, validate_rows(ROWS, "t"), "flowplan", "test")
    with pytest.raises(JobTooLarge, match="over max_job_pixels 1,000"):
        generate_flow(model, prompts, "refused", GenerateSettings(max_job_pixels=1000), url)
    assert not ArtifactStore(url).fs.exists(ArtifactStore(url).path("generations", "refused"))


def test_a_measured_rate_of_the_same_model_and_device_gives_an_estimate(planned_store):
    url, model = planned_store
    store = ArtifactStore(url)
    table = validate_rows(ROWS, "t")
    settings = GenerateSettings(steps=4, device="cpu", workers=2)
    assert plan_job(store, model, table, settings).seconds is None
    w = store.new_version("generations", "measured")
    w.put_bytes("manifest.parquet", b"x")
    ref = w.commit(parents=[model], summary={"unet_evals_per_s_cpu": 10.0, "unet_evals_per_s_cuda": 1000.0})
    plan = plan_job(store, model, table, settings)
    assert plan.rate == 10.0 and plan.rate_from == str(ref)
    assert plan.seconds == pytest.approx(plan.unet_evals / 20)
    assert f"measured by {ref}" in "\n".join(plan.lines())


def test_a_job_is_planned_once_when_the_cli_then_the_stage_ask(planned_store):
    """`asd generate` plans the job before it starts the flow; the stage's resolve plans it from the
    stored prompts: the same rows and settings are costed once (the same per-row costs, not
    computed again), while other settings or other rows are costed afresh."""
    from data_engine.prompts import read_prompts
    from tasks.prompts import store_prompts

    url, model = planned_store
    store = ArtifactStore(url)
    table = validate_rows(ROWS, "test")
    settings = GenerateSettings(steps=4)
    first = plan_job(store, model, table, settings)
    stored = store_prompts(url, table, "plan-once", "test")
    again = plan_job(store, model, read_prompts(store, stored), settings)
    assert again.row_evals is first.row_evals and again.unet_evals == first.unet_evals
    assert plan_job(store, model, table, GenerateSettings(steps=5)).row_evals is not first.row_evals
    assert plan_job(store, model, validate_rows(ROWS[:3], "test"), settings).images == 3

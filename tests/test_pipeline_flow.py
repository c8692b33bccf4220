"""The whole pipeline as Prefect flows under the test harness, on the tiny model."""

from __future__ import annotations

import io
import json

import polars as pl
import pytest
from PIL import Image

from artifact_store import ArtifactStore
from data_manifests.demo import materialize_demo_photos
from data_manifests.settings import PromptSpec
from flows.cli import main as asd_main
from flows.pipeline_flow import asd_pipeline
from tasks.evaluate import EvaluateSettings
from tasks.generate import GenerateSettings
from tasks.ingest import IngestSettings
from tasks.train import TrainSettings

SIZES = [(1000, 300), (333, 777), (200, 200)]


def run_pipeline(store_url: str, photos) -> tuple:
    prompts = [
        PromptSpec(prompt="a red motorcycle parked in a garage", width=w, height=h, seed=i)
        for i, (w, h) in enumerate(SIZES)
    ]
    refs = asd_pipeline(
        source=str(photos),
        prompts=prompts,
        name="t",
        ingest=IngestSettings(bucket_base=128, bucket_step=16),
        train=TrainSettings(base_model="tiny", vae_steps=10, steps=10, batch_size=4),
        generate=GenerateSettings(steps=4, shard_size=2),
        evaluate=EvaluateSettings(patch_size=64, patches_per_image=2),
        store_url=store_url,
    )
    return refs, prompts


def check_pipeline_outputs(store: ArtifactStore, refs) -> None:
    # every stage committed, linked by parents
    model_rec = store.record(refs.model)
    base = [p for p in model_rec["parents"] if p.startswith("models/")]
    assert refs.dataset in model_rec["parents"] and base
    assert store.record(base[0])["parents"] == [refs.dataset]
    gen_parents = store.record(refs.generations)["parents"]
    assert gen_parents[0] == refs.model and gen_parents[1].startswith("prompts/t@") and len(gen_parents) == 2
    assert set(store.record(refs.evaluation)["parents"]) == {refs.generations, refs.dataset}
    lineage = [r["ref"] for r in store.lineage(refs.evaluation)]
    assert refs.dataset in lineage and refs.model in lineage
    for ref in refs.model_dump().values():
        assert store.verify(ref) == []
        assert store.record(ref)["flow_run_id"]
    # every generated image has exactly its requested size
    manifest = pl.read_parquet(io.BytesIO(store.read_bytes(refs.generations, "manifest.parquet")))
    assert manifest["status"].to_list() == ["ok"] * len(SIZES)
    for r in manifest.iter_rows(named=True):
        img = Image.open(io.BytesIO(store.read_bytes(refs.generations, r["image"])))
        assert img.size == (r["width"], r["height"])
    assert sorted(zip(manifest["width"], manifest["height"], strict=True)) == sorted(SIZES)
    metrics = pl.read_parquet(io.BytesIO(store.read_bytes(refs.evaluation, "metrics.parquet")))
    by = {m: (v, s) for m, v, s in metrics.select("metric", "value", "status").iter_rows()}
    assert by["kid_patch"][1] == "ok" and by["fid_patch"][1] == "ok"
    assert by["clip_score"][1] == "skipped" and by["clip_score"][0] is None  # no CLIP weights offline
    # the run records say what each flow run read and wrote
    run = json.loads(store.fs.cat_file(store.path("runs", f"{store.record(refs.model)['flow_run_id']}.json")))
    assert run["flow"] == "asd-train" and refs.model in run["writes"] and refs.dataset in run["reads"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return materialize_demo_photos(tmp_path_factory.mktemp("photos") / "p")


def test_whole_pipeline_local_store(prefect_harness, tmp_path, photos):
    store_url = str(tmp_path / "store")
    refs, _ = run_pipeline(store_url, photos)
    store = ArtifactStore(store_url)
    check_pipeline_outputs(store, refs)
    assert asd_main(["--store", store_url, "store", "verify"]) == 0

    # re-running with the same inputs commits nothing new
    again, _ = run_pipeline(store_url, photos)
    assert again == refs
    assert len(store.list_versions("generations", "t")) == 1


@pytest.mark.slow
def test_whole_pipeline_on_s3(prefect_harness, s3_bucket, photos):
    refs, _ = run_pipeline(s3_bucket, photos)
    store = ArtifactStore(s3_bucket)
    check_pipeline_outputs(store, refs)
    assert asd_main(["--store", s3_bucket, "store", "verify"]) == 0


@pytest.mark.slow
def test_demo_command_on_s3(prefect_harness, s3_bucket, capsys):
    """`asd demo --store s3://...` commits every stage; verify and the catalog agree."""
    assert asd_main(["--store", s3_bucket, "demo", "--quick"]) == 0
    out = capsys.readouterr().out
    store = ArtifactStore(s3_bucket)
    kinds = {k for k, _ in store.list_artifacts()}
    assert kinds == {"datasets", "models", "prompts", "generations", "evaluations"}
    assert "s3://" in out and "these numbers mean nothing" in out
    assert asd_main(["--store", s3_bucket, "store", "verify"]) == 0
    refs = {str(r) for k, n in store.list_artifacts() for r in store.list_versions(k, n)}
    assert set(store.catalog()["ref"].to_pylist()) == refs and len(refs) == 6

"""Generation at scale: images of a shard packed into shared UNet calls, devices, a resumable
job (SIGKILL and rerun renders only what is missing), Dask workers (one model load each; a
worker killed mid-shard and the job still completes with every image once)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import flows.stages  # noqa: F401 - Prefect sets up its log handlers on import
from artifact_store import ArtifactRef, ArtifactStore, PendingVersion
from asd_models.pipeline import AnySizePipeline, RenderRequest
from tasks.fragments import list_fragments, write_fragment
from tasks.generate import GenerateSettings
from tests.helpers import asd_process as _asd

REQUESTS = [
    RenderRequest("a red cat", 128, 128, seed=1, steps=3),
    RenderRequest("a blue dog", 128, 128, seed=2, steps=3),
    RenderRequest("a green hill", 200, 96, seed=3, steps=4, strength=0.8),
]


def _count_unet_calls(unet):
    calls = []
    forward = unet.forward

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return forward(*args, **kwargs)

    unet.forward = counted
    return calls


def test_packed_images_match_one_at_a_time_with_fewer_unet_calls(tiny_model_dir):
    pipe = AnySizePipeline.from_pretrained(tiny_model_dir)
    sampler = pipe.default_sampler(tile_batch_size=16)
    calls = _count_unet_calls(pipe.c.unet)
    alone = [pipe.generate_many([r], sampler)[0] for r in REQUESTS]
    alone_calls = len(calls)
    calls.clear()
    packed = pipe.generate_many(REQUESTS, sampler)
    assert len(calls) < alone_calls  # tiles of several images shared UNet calls
    for a, p in zip(alone, packed, strict=True):
        assert a.image.size == p.image.size and a.unet_evals == p.unet_evals
        diff = np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(p.image, dtype=np.int16))
        assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())


def test_device_and_dtype_are_resolved_and_reported(tiny_model_dir):
    from asd_models.devices import resolve_device, resolve_dtype

    pipe = AnySizePipeline.from_pretrained(tiny_model_dir).to("cpu", torch.float32)
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError):
        GenerateSettings(device="gpu")


def _prompt_file(path: Path, n: int) -> Path:
    sizes = [(96, 96), (160, 96), (96, 160), (128, 128)]
    pl.DataFrame(
        {
            "prompt": [f"picture {i}" for i in range(n)],
            "width": [sizes[i % 4][0] for i in range(n)],
            "height": [sizes[i % 4][1] for i in range(n)],
            "seed": list(range(n)),
        }
    ).write_parquet(path)
    return path


def _manifest(store_url, ref):
    return pl.read_parquet(io.BytesIO(ArtifactStore(store_url).read_bytes(ref, "manifest.parquet")))


@pytest.mark.slow
def test_killed_job_reruns_only_the_missing_images(stored_model, tmp_path):
    prompts = _prompt_file(tmp_path / "p.parquet", 6)
    common = [
        "generate",
        "--model",
        "tiny",
        "--name",
        "resume",
        "--prompts",
        str(prompts),
        "--steps",
        "2",
        "--shard-size",
        "2",
    ]
    killed = _asd(
        stored_model, *common, env={"ASD_FAULT_AT": "after-image-2", "PREFECT_HOME": str(tmp_path / "ph")}
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    store = ArtifactStore(stored_model)
    assert store.list_versions("generations", "resume") == []  # nothing half-committed is visible
    # a damaged fragment between the runs: its rows listed twice (the rerun must not fail on it)
    (version,) = [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.path("generations", "resume"))]
    pending = PendingVersion(ArtifactRef("generations", "resume", version), "")
    (rel,) = list_fragments(store, pending).values()
    entries = pq.read_table(io.BytesIO(store.fs.cat_file(store.path(pending.ref.prefix, rel)))).to_pylist()
    write_fragment(store, pending, 0, 2, entries + entries)
    done = _asd(stored_model, *common, env={"PREFECT_HOME": str(tmp_path / "ph")})
    assert done.returncode == 0, done.stderr[-2000:]
    ref = done.stdout.strip().splitlines()[-1]
    summary = store.record(ref)["summary"]
    assert (
        summary["images_ok"] == 6
        and summary["images_resumed"] == 2
        and summary["images_rendered_by_this_run"] == 4
    )
    manifest = _manifest(stored_model, ref)
    assert manifest["key"].n_unique() == 6 and manifest["status"].to_list() == ["ok"] * 6
    assert manifest["piece_shapes"].to_list() == ["exact"] * 6  # the CPU's choice, recorded with each image
    assert store.verify(ref) == []
    files = dict(store.iter_files(ref))  # each image's seam heat-map beside it, resumed ones included
    assert all(f"images/{k}.seams.png" in files for k in manifest["key"])
    again = _asd(stored_model, *common, env={"PREFECT_HOME": str(tmp_path / "ph")})
    assert again.stdout.strip().splitlines()[-1] == ref  # the same job is reused, nothing rendered


@pytest.mark.slow
def test_dask_workers_load_the_model_once_and_survive_a_lost_worker(
    stored_model, tmp_path, prefect_harness, monkeypatch
):
    from data_engine.prompts import prompt_table
    from flows.stages import generate_flow
    from tasks.prompts import store_prompts

    store = ArtifactStore(stored_model)
    prompts = store_prompts(store.url, prompt_table(_prompt_file(tmp_path / "p.parquet", 8)), "dask", "test")
    monkeypatch.setenv("ASD_FAULT_AT", "after-image-1")
    monkeypatch.setenv("ASD_FAULT_ONCE_FILE", str(tmp_path / "killed-once"))
    monkeypatch.setenv("ASD_CACHE", str(tmp_path / "cache"))
    settings = GenerateSettings(steps=2, shard_size=2, executor="dask", workers=2, retries=3)
    ref = generate_flow("models/tiny", prompts, "dask", settings, stored_model)
    assert (tmp_path / "killed-once").exists()  # one worker process was SIGKILLed mid-shard
    manifest = _manifest(stored_model, ref)
    assert manifest["status"].to_list() == ["ok"] * 8 and manifest["key"].n_unique() == 8
    workers = set(manifest["worker"].to_list())
    loads = store.record(ref)["summary"]["model_loads_by_worker"]
    assert all(loads.get(w, 0) <= 1 for w in workers) and sum(loads.values()) <= len(loads)
    for r in manifest.iter_rows(named=True):
        assert Image.open(io.BytesIO(store.read_bytes(ref, r["image"]))).size == (r["width"], r["height"])


@pytest.mark.parametrize("pieces", ["exact", "bucketed"])
def test_a_pack_shares_its_unet_shapes_and_calls_per_step_do_not_grow(tiny_model_dir, pieces):
    """Offsets come from the job's salt and the step: images of one size in a pack share every UNet
    input shape, so 4 images take no more stage-2 UNet calls than one, with exact pieces (the CPU's
    default) and bucketed ones (CUDA's); with bucketed pieces a whole job of mixed sizes runs at
    most 3 x 3 stage-2 shapes, and each image says which it had."""
    pipe = AnySizePipeline.from_pretrained(tiny_model_dir)
    sampler = pipe.default_sampler(tile_batch_size=64, pieces=None if pieces == "exact" else pieces)
    assert pipe.generate_many([RenderRequest("x", 128, 96, steps=2)], sampler)[0].piece_shapes == pieces
    stage, calls = [""], []
    forward = pipe.c.unet.forward

    def counted(*args, **kwargs):
        calls.append((stage[-1], args[0].shape[0], *args[0].shape[-2:]))
        return forward(*args, **kwargs)

    pipe.c.unet.forward = counted

    def stage2_calls(batch):
        calls.clear()
        pipe.generate_many(batch, sampler, on_stage=stage.append)
        return [c[1:] for c in calls if c[0] == "fstd"]

    reqs = [RenderRequest(f"picture {i}", 512, 384, seed=i, steps=4, strength=1.0) for i in range(4)]
    one, four = stage2_calls(reqs[:1]), stage2_calls(reqs)
    assert len(four) <= len(one), (len(four), len(one))
    assert sum(c[0] for c in four) == 4 * sum(c[0] for c in one)  # the same pieces, batched together
    if pieces == "bucketed":
        mixed = stage2_calls(
            [
                RenderRequest("a", 512, 384, steps=6, strength=1.0),
                RenderRequest("b", 328, 696, steps=6, strength=1.0),
                RenderRequest("c", 1000, 200, steps=6, strength=1.0),
            ]
        )
        assert len({c[1:] for c in mixed}) <= 9, sorted({c[1:] for c in mixed})


def test_shards_are_planned_from_the_job():
    """About 4 shards per worker, equal in pixels x steps, every row once, largest first; an
    explicit shard size still wins, and no shard holds more than 1000 rows."""
    from tasks.job_plan import MAX_SHARD_ROWS, plan_shards

    costs = [1] * 30 + [100] * 2 + [1] * 30  # two heavy rows in the middle of light ones
    ranges = plan_shards(costs, None, workers=2)
    assert len(ranges) == 8
    rows = sorted(i for a, b in ranges for i in range(a, b))
    assert rows == list(range(len(costs)))  # every row in exactly one shard
    loads = [sum(costs[a:b]) for a, b in ranges]
    assert loads == sorted(loads, reverse=True)  # largest first
    assert max(loads) <= max(max(costs), 2 * sum(costs) / len(ranges))  # no shard much over its share
    assert sorted(plan_shards([1] * 10, 4, workers=8)) == [(0, 4), (4, 8), (8, 10)]
    assert sorted(plan_shards([1] * 3, None, workers=4)) == [
        (0, 1),
        (1, 2),
        (2, 3),
    ]  # one row each, no empty shard
    big = plan_shards([1] * 5000, None, workers=1)
    assert max(b - a for a, b in big) <= MAX_SHARD_ROWS and sum(b - a for a, b in big) == 5000
    assert plan_shards([], None, workers=2) == []

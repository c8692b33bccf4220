"""ARAD training: the streaming bucketed loader, the trainer, checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from artifact_store import ArtifactStore
from asd_models.arad_loader import BucketBatchStream, LoaderConfig, ShardRef, make_loader
from data_engine.dataset_reader import StoreOpener, dataset_buckets
from tasks.train import TrainSettings, train_to_store
from tests.ingest_helpers import ingest_ref

SIZES = [(64, 64), (96, 64), (64, 96)]  # -> buckets 64x64, 80x48, 48x80 at base 64 / step 16


def _folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % 3]
        Image.fromarray(rng.integers(0, 255, (h * 2, w * 2, 3), dtype=np.uint8)).save(root / f"i{i:03d}.png")
        (root / f"i{i:03d}.txt").write_text(f"image number {i}")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A store with a 3-bucket dataset of 20 images (7/7/6), 2 samples per shard."""
    root = tmp_path_factory.mktemp("arad")
    store_url = str(root / "store")
    ref = ingest_ref(
        store_url,
        [str(_folder(root / "in", 20))],
        "d",
        {"bucket_base": 64, "bucket_step": 16, "shard_max_samples": 2},
    )
    return store_url, ref


def _stream(store_url, ref, **cfg):
    store = ArtifactStore(store_url)
    buckets = dataset_buckets(store, store.resolve(ref))
    slot = cfg.pop("slot", 0)
    slots = cfg.pop("slots", 1)
    return BucketBatchStream(buckets, StoreOpener(store_url, ref), LoaderConfig(**cfg), slot, slots), buckets


def _epoch(stream, n_batches):
    it = iter(stream)
    return [next(it) for _ in range(n_batches)]


def test_batches_are_bucket_pure_and_an_epoch_sees_every_sample_once(dataset):
    stream, buckets = _stream(*dataset, batch_size=3, seed=1)
    counts = {b: sum(s.count for s in v) for b, v in buckets.items()}
    assert sorted(counts.values()) == [6, 7, 7]
    n_batches = sum(-(-c // 3) for c in counts.values())  # keep: ceil per bucket
    batches = _epoch(stream, n_batches + 1)
    epoch0 = [b for b in batches if b.epoch == 0]
    assert len(epoch0) == n_batches and batches[-1].epoch == 1
    seen = Counter()
    for b in epoch0:
        meta = [json.loads(s["json"]) for s in b.samples]
        assert {m["bucket"] for m in meta} == {b.bucket}
        seen.update(s["__key__"] for s in b.samples)
    assert sum(seen.values()) == 20 and set(seen.values()) == {1}
    sizes = Counter(len(b.samples) for b in epoch0)
    assert sizes == Counter({3: 6, 1: 2})  # 7 = 3+3+1, 7 = 3+3+1, 6 = 3+3: leftovers kept


def test_leftover_drop_policy(dataset):
    stream, _ = _stream(*dataset, batch_size=3, seed=1, leftover="drop")
    batches = [b for b in _epoch(stream, 8) if b.epoch == 0]
    assert len(batches) == 6 and all(len(b.samples) == 3 for b in batches)


def test_same_seed_same_sequence_other_seed_other_sequence(dataset):
    def keys(seed):
        stream, _ = _stream(*dataset, batch_size=4, seed=seed, shuffle_buffer=3)
        return [tuple(s["__key__"] for s in b.samples) for b in _epoch(stream, 12)]

    assert keys(5) == keys(5)
    assert keys(5) != keys(6)


def test_ranks_split_the_data_without_overlap(dataset):
    per_rank = []
    for rank in range(2):
        stream, _ = _stream(*dataset, batch_size=2, seed=0, slot=rank, slots=2)
        per_rank.append([s["__key__"] for b in _epoch(stream, 40) if b.epoch == 0 for s in b.samples])
    a, b = set(per_rank[0]), set(per_rank[1])
    assert not a & b and len(a | b) == 20 and len(per_rank[0]) == len(a)


def test_drawing_is_proportional_to_remaining_samples():
    """First draw over 2000 seeds: bucket A (30 samples) vs B (10) should be about 3:1."""
    buckets = {"A": [ShardRef("a", 30)], "B": [ShardRef("b", 10)]}

    @contextlib.contextmanager
    def never(url):
        raise AssertionError("the draw must not need the data")
        yield

    class Fake(BucketBatchStream):
        def _take(self, plan, n, rng):
            return [{"__key__": "x"}] * n

    first = Counter(
        next(iter(Fake(buckets, never, LoaderConfig(batch_size=5, seed=s)))).bucket for s in range(2000)
    )
    assert 0.71 < first["A"] / 2000 < 0.79


def test_data_loader_workers_are_deterministic_and_resume_mid_stream(dataset):
    store_url, ref = dataset
    store = ArtifactStore(store_url)
    buckets = dataset_buckets(store, store.resolve(ref))
    cfg = LoaderConfig(batch_size=3, seed=2)

    def keys(workers, start=0, n=9):
        it = iter(
            make_loader(buckets, StoreOpener(store_url, ref), cfg, num_workers=workers, start_batch=start)
        )
        return [tuple(next(it)["keys"]) for _ in range(n)]

    two = keys(2)
    assert two == keys(2)
    assert keys(2, start=4, n=5) == two[4:]
    assert keys(0, start=3, n=6) == keys(0)[3:]
    batch = next(iter(make_loader(buckets, StoreOpener(store_url, ref), cfg)))
    assert batch["pixels"].shape[1:] in {
        torch.Size([3, 64, 64]),
        torch.Size([3, 48, 80]),
        torch.Size([3, 80, 48]),
    }
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1


CFG = {
    "steps": 8,
    "batch_size": 3,
    "grad_accum": 2,
    "learning_rate": 1e-3,
    "ema_decay": 0.99,
    "warmup_steps": 2,
    "checkpoint_every": 0,
}


def arad_to_store(store_url, ref, base, name, cfg, checkpoint_every=0, **kw):
    """Train with `TrainSettings(**cfg)`; the outcome (model ref, resumed checkpoint, step)."""
    return train_to_store(
        store_url, ref, base, name, TrainSettings(**{**cfg, "checkpoint_every": checkpoint_every}), **kw
    )


def _log(store_url, ref):
    return json.loads(ArtifactStore(store_url).read_bytes(ref, "training_log.json"))


def test_resume_continues_the_uninterrupted_loss_sequence(dataset, tiny_model_dir):
    store_url, ref = dataset
    full = arad_to_store(store_url, ref, str(tiny_model_dir), "full", CFG, checkpoint_every=3).model
    cut = arad_to_store(store_url, ref, str(tiny_model_dir), "cut", CFG, checkpoint_every=3, stop_after=5)
    assert cut.model == "" and cut.step == 5
    store = ArtifactStore(store_url)
    ckpts = store.list_versions("checkpoints", "cut")
    assert [store.record(c)["summary"]["step"] for c in ckpts] == [3]
    outcome = arad_to_store(store_url, ref, str(tiny_model_dir), "cut", CFG, checkpoint_every=3, resume=True)
    resumed = outcome.model
    assert outcome.resumed_from == str(ckpts[0])
    assert _log(store_url, resumed)["loss"] == _log(store_url, full)["loss"]  # exactly, step by step
    assert _log(store_url, resumed)["resumed_from"] == str(ckpts[0])
    a = store.read_bytes(full, "unet/diffusion_pytorch_model.safetensors")
    b = store.read_bytes(resumed, "unet/diffusion_pytorch_model.safetensors")
    assert a == b
    assert (
        str(ckpts[0]) in store.record(resumed)["parents"]
        and str(store.resolve(ref)) in store.record(resumed)["parents"]
    )
    # another config is another training: its checkpoints are not used
    other = {**CFG, "learning_rate": 5e-4}
    fresh = arad_to_store(store_url, ref, str(tiny_model_dir), "cut", other, resume=True, stop_after=1)
    assert fresh.resumed_from is None and fresh.step == 1 and fresh.model == ""


def test_result_loads_in_stable_diffusion_pipeline(dataset, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    store_url, ref = dataset
    model = arad_to_store(
        store_url, ref, str(tiny_model_dir), "sd", {**CFG, "steps": 2, "cache_latents": True}
    ).model
    folder = ArtifactStore(store_url).download(model, tmp_path / "m")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    img = pipe("image number 1", height=64, width=64, num_inference_steps=2, output_type="np").images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()
    assert (folder / "loss.png").is_file()


def test_v_prediction_trains(dataset, tiny_model_dir, tmp_path):
    import shutil

    base = tmp_path / "vbase"
    shutil.copytree(tiny_model_dir, base)
    cfg_path = base / "scheduler" / "scheduler_config.json"
    sched = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**sched, "prediction_type": "v_prediction"}))
    store_url, ref = dataset
    model = arad_to_store(store_url, ref, str(base), "vpred", {**CFG, "steps": 3, "ema_decay": 0}).model
    losses = _log(store_url, model)["loss"]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_missing_base_checkpoint_names_what_was_looked_for(dataset, tmp_path):
    from asd_models.loading import ModelNotFoundError

    store_url, ref = dataset
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nowhere")):
        arad_to_store(store_url, ref, str(tmp_path / "nowhere"), "x", CFG)


def _asd(store, *args):
    env = {**os.environ, "TQDM_DISABLE": "1", "ASD_STORE": store}
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_cli_train_killed_mid_run_resumes_to_the_same_losses(tmp_path, prefect_harness):
    """`asd train` SIGKILLed after its first checkpoint, then `--resume`: the same loss sequence."""
    store_url = str(tmp_path / "store")
    ds = ingest_ref(
        store_url, [str(_folder(tmp_path / "in", 12))], "d", {"bucket_base": 64, "bucket_step": 16}
    )
    common = [
        "train",
        "--dataset",
        ds,
        "--vae-steps",
        "5",
        "--steps",
        "40",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "5",
    ]
    full = _asd(store_url, *common, "--model", "full")
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out
    cut = _asd(store_url, *common, "--model", "cut")
    store = ArtifactStore(store_url)
    deadline = time.monotonic() + 600
    while not store.list_versions("checkpoints", "cut"):
        assert cut.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.2)
    os.killpg(cut.pid, signal.SIGKILL)
    cut.wait()
    assert not store.list_versions("models", "cut")
    resumed = _asd(store_url, *common, "--model", "cut", "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    a = _log(store_url, "models/full@latest")
    b = _log(store_url, "models/cut@latest")
    assert b["resumed_from"] and a["loss"] == b["loss"]
    assert store.read_bytes("models/cut@latest", "loss.png").startswith(b"\x89PNG")


def test_training_keeps_one_loss_artifact_key_in_the_ui(dataset, tiny_model_dir, prefect_harness):
    """Checkpoints no longer publish a table each: the run has the `arad-loss` progress artifact
    (updated in place) and the final loss table under the same key, nothing else per checkpoint."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.stages import train_flow

    store_url, ref = dataset
    state = train_flow(
        ref,
        "ui",
        TrainSettings(**{**CFG, "base_model": str(tiny_model_dir), "checkpoint_every": 3}),
        store_url,
        return_state=True,
    )
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    loss = sorted((a for a in arts if a.key == "arad-loss"), key=lambda a: a.created)
    assert [a.type for a in loss] == ["progress", "table"]
    assert len(ArtifactStore(store_url).list_versions("checkpoints", "ui")) == 2  # the checkpoints did happen


_RNG_ROUND_TRIP = """
import json, random, sys
import torch
from asd_models.arad_training import AradTrainer
from asd_models.loading import load_components
from tasks.train import TrainSettings

model, folder, cfg = sys.argv[1], sys.argv[2], TrainSettings(**json.loads(sys.argv[3])).train_config()
trainer = AradTrainer(load_components(model), cfg)
torch.randint(0, 10, (1,), generator=trainer.generator)  # the trainer's own stream moves on
saved = trainer.save_checkpoint(folder)
expected = torch.randint(0, 2**30, (4,), generator=trainer.generator).tolist()
torch.manual_seed(1234)
random.seed(99)
torch_state, py_state = torch.get_rng_state(), random.getstate()
restored = AradTrainer(load_components(model), cfg)
restored.load_checkpoint(saved)
print(json.dumps({
    "torch_rng_untouched": bool(torch.equal(torch.get_rng_state(), torch_state)),
    "python_rng_untouched": random.getstate() == py_state,
    "stream_restored": torch.randint(0, 2**30, (4,), generator=restored.generator).tolist() == expected,
}))
"""


def test_a_checkpoint_round_trip_leaves_the_global_rngs_alone(tiny_model_dir, tmp_path):
    """Library code never changes the process's global RNGs: the trainer's draws come from its
    own generator, which is what a checkpoint saves and restores. It runs in a fresh interpreter:
    threads that earlier tests left in this one (Prefect's, Dask's) may draw from `random` at
    any moment, which is theirs to do and would make this check flaky."""
    done = subprocess.run(
        [sys.executable, "-c", _RNG_ROUND_TRIP, str(tiny_model_dir), str(tmp_path / "ckpt"), json.dumps(CFG)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "torch_rng_untouched": True,
        "python_rng_untouched": True,
        "stream_restored": True,
    }


def test_training_places_each_sample_at_its_ingest_crop(dataset, tmp_path):
    """The crop box ingest recorded for each sample reaches the family's call: an SDXL-class UNet
    is given the original (cover) size, the crop's top-left and the bucket size, as SDXL trains;
    a forged box that does not fit its cover is refused naming the sample."""
    import polars as pl

    from asd_models.arad_loader import decode_batch, sample_crop
    from asd_models.arad_training import AradTrainer
    from asd_models.families import save_tiny
    from asd_models.loading import load_components

    store_url, ref = dataset
    store = ArtifactStore(store_url)
    manifest = pl.read_parquet(store.read_bytes(ref, "manifest.parquet")).filter(pl.col("status") == "ok")
    boxes = {r["key"]: r for r in manifest.iter_rows(named=True)}
    batch = decode_batch(next(iter(_stream(store_url, ref, batch_size=3, seed=0)[0])))
    for key, crop in zip(batch["keys"], batch["crops"], strict=True):
        row = boxes[key]
        assert crop == (row["crop_left"], row["crop_top"], row["cover_width"], row["cover_height"])

    c = load_components(save_tiny("sdxl", tmp_path / "sdxl"))
    trainer = AradTrainer(c, TrainSettings(steps=1, batch_size=3, ema_decay=0).train_config())
    seen = []
    real_time_ids = c.family.time_ids

    def record(places, f):
        seen.append(places)
        return real_time_ids(places, f)

    object.__setattr__(c.family, "time_ids", record)
    trainer._loss(batch)
    f = c.vae_scale_factor
    for (ry, rx, rh, rw, H, W), (left, top, cw, ch) in zip(seen[0], batch["crops"], strict=True):
        assert (ry, rx) == (top // f, left // f) and (H, W) == (ch // f, cw // f)
        assert (rh, rw) == tuple(batch["pixels"].shape[-2:][i] // f for i in (0, 1))

    forged = {
        "__key__": "x",
        "json": json.dumps({"crop_left": 50, "crop_top": 0, "cover_width": 64, "cover_height": 64}),
    }
    with pytest.raises(ValueError, match="sample x: crop .* does not fit"):
        sample_crop(forged, 32, 32)

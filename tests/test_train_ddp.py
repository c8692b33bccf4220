"""ARAD training on two processes (torchrun, gloo on the CPU): one command, one commit by rank 0,
every rank's draws in each checkpoint, exact resume of a SIGKILLed 2-process run, and a resume
with another number of processes refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifact_store import ArtifactStore
from tests.helpers import free_port, kill_tree
from tests.ingest_helpers import ingest_ref
from tests.test_train import _folder

ROOT = Path(__file__).resolve().parent.parent


def _launch(store_url: str, processes: int, *args: str) -> subprocess.Popen:
    """`asd train` under torchrun (a process group of its own, so a kill takes every rank)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "ASD_STORE": store_url, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "flows.cli",
        *args,
    ]
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _log(store_url: str, ref: str) -> dict:
    return json.loads(ArtifactStore(store_url).read_bytes(ref, "training_log.json"))


@pytest.mark.slow
def test_two_process_training_resumes_after_sigkill_to_the_same_losses(tmp_path):
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
        "60",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "4",
    ]
    store = ArtifactStore(store_url)

    full = _launch(store_url, 2, *common, "--model", "full")
    out, _ = full.communicate(timeout=900)
    assert full.returncode == 0, out[-4000:]
    assert len(store.list_versions("models", "full")) == 1  # rank 0 committed, rank 1 did not
    ckpt = store.list_versions("checkpoints", "full")[-1]
    state = json.loads(store.read_bytes(ckpt, "trainer_state.json"))
    assert state["world_size"] == 2
    rng = {rel for rel, _ in store.iter_files(ckpt)}
    assert "rng.safetensors" in rng

    cut = _launch(store_url, 2, *common, "--model", "cut")
    deadline = time.monotonic() + 900
    while not store.list_versions("checkpoints", "cut"):
        assert cut.poll() is None and time.monotonic() < deadline, (
            cut.stdout.read() if cut.poll() is not None else "no checkpoint in time"
        )[-4000:]
        time.sleep(0.02)
    kill_tree(cut)
    assert not store.list_versions("models", "cut")

    one = _launch(store_url, 1, *common, "--model", "cut", "--resume")  # another world size: refused
    out, _ = one.communicate(timeout=900)
    assert one.returncode != 0 and "run of 2 process(es); this run has 1" in out, out[-4000:]

    resumed = _launch(store_url, 2, *common, "--model", "cut", "--resume")
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-4000:]
    a, b = _log(store_url, "models/full@latest"), _log(store_url, "models/cut@latest")
    assert b["resumed_from"], out[-6000:]
    assert len(a["loss"]) == 60 and a["loss"] == b["loss"]  # exactly, step by step


def test_settings_round_trip_through_the_command_line():
    import argparse

    from flows.settings_cli import add_settings_arguments, settings_from_args, settings_to_args
    from tasks.train import TrainSettings

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, TrainSettings)
    for settings in (
        TrainSettings(),
        TrainSettings(steps=7, cache_latents=True, learning_rate=3e-4, ema_decay=0.99),
        TrainSettings(base_model="/models/sd-2-1", checkpoint_every=0),
    ):
        assert settings_from_args(TrainSettings, parser.parse_args(settings_to_args(settings))) == settings


@pytest.mark.slow
def test_the_launch_flow_trains_on_two_processes_from_a_flow_run(tmp_path, prefect_harness, monkeypatch):
    from flows.stages import train_processes_flow
    from tasks.train import TrainSettings

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    store_url = str(tmp_path / "store")
    ds = ingest_ref(
        store_url, [str(_folder(tmp_path / "in", 8))], "d", {"bucket_base": 64, "bucket_step": 16}
    )
    ref = train_processes_flow(
        ds,
        "pair",
        TrainSettings(vae_steps=3, steps=6, batch_size=2, checkpoint_every=0),
        store_url,
        processes=2,
    )
    store = ArtifactStore(store_url)
    assert ref == str(store.resolve("models/pair@latest")) and len(store.list_versions("models", "pair")) == 1
    assert store.record(ref)["params"]["world_size"] == 2 and len(_log(store_url, ref)["loss"]) == 6

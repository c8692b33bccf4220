"""LoRA adapters: `asd train --lora-rank` trains an adapter on a stored base model (the base
frozen) and commits the adapter alone with the base as a parent; `--lora REF[:WEIGHT]` applies it
to every tile at generation; a version that is not an adapter, or an adapter of another family,
is refused naming it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import flows.stages  # noqa: F401 - Prefect sets up its log handlers on import: not inside a capsys test
from artifact_store import ArtifactStore
from asd_models.families import save_tiny
from asd_models.loading import load_components
from asd_models.lora import Adapter, AdapterMismatch, add_trainable_lora, apply_adapters, save_adapter
from flows.cli import main
from tests.ingest_helpers import ingest_ref


def asd(store, *argv):
    return main(["--store", str(store), *argv])


def _image(store: ArtifactStore, ref: str) -> np.ndarray:
    rel = next(
        r
        for r, _ in store.iter_files(ref)
        if r.startswith("images/") and r.endswith(".png") and ".seams" not in r
    )
    with store.open(ref, rel) as f:
        return np.asarray(Image.open(f).convert("RGB"), dtype=np.int16)


def test_train_a_lora_adapter_then_generate_with_it(tmp_path, capsys, prefect_harness):
    store_dir = tmp_path / "store"
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"a picture {i}")
    ingest_ref(str(store_dir), [str(photos)], "d", {"bucket_base": 64, "bucket_step": 16})
    assert asd(store_dir, "model", "import", str(save_tiny("sd", tmp_path / "sd")), "--name", "base") == 0
    base = capsys.readouterr().out.strip().splitlines()[-1]
    train = ["train", "--dataset", "d", "--base-model", base, "--model", "style", "--steps", "3"]
    assert asd(store_dir, *train, "--batch-size", "2", "--ema-decay", "0", "--lora-rank", "4") == 0
    adapter = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("models/style@"))
    store = ArtifactStore(str(store_dir))
    rec = store.record(adapter)
    files = {rel for rel, _ in store.iter_files(adapter)}
    assert rec["params"]["lora"] == {"rank": 4, "family": "sd"} and base in rec["parents"]
    assert {"lora/adapter.safetensors", "lora/adapter_config.json"} <= files
    assert not any(rel.startswith(("unet/", "vae/", "text_encoder/")) for rel in files), files

    def generate(name, *extra):
        argv = ["generate", "--model", base, "--prompt", "a red barn", "--size", "96x64", "--steps", "2"]
        assert asd(store_dir, *argv, "--name", name, *extra) == 0
        return capsys.readouterr().out.strip().splitlines()[-1]

    plain, styled = generate("plain"), generate("styled", "--lora", f"{adapter}:1.0")
    assert adapter in store.record(styled)["parents"]
    a, b = _image(store, plain), _image(store, styled)
    assert a.shape == b.shape == (64, 96, 3)
    assert np.abs(a - b).mean() > 0.5, "the adapter changed nothing"

    with pytest.raises(SystemExit) as stop:
        raise SystemExit(
            asd(
                store_dir,
                "generate",
                "--model",
                base,
                "--prompt",
                "x",
                "--size",
                "64x64",
                "--name",
                "bad",
                "--lora",
                base,
            )
        )
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "is not a LoRA adapter" in err and "Traceback" not in err


def test_an_adapter_of_another_family_is_refused_and_nothing_half_applied(tmp_path):
    sd = load_components(save_tiny("sd", tmp_path / "sd"))
    add_trainable_lora(sd.unet, 4)
    folder = save_adapter(sd.unet, tmp_path / "adapter", 4, "sd")
    sdxl = load_components(save_tiny("sdxl", tmp_path / "sdxl"))
    before = {k: v.clone() for k, v in sdxl.unet.state_dict().items()}
    with pytest.raises(AdapterMismatch, match="trained on a 'sd' model; this model is 'sdxl'"):
        apply_adapters(sdxl.unet, [Adapter(folder, 1.0, "lora0")], "sdxl")
    with pytest.raises(AdapterMismatch, match="does not fit this model|modules this model lacks"):
        apply_adapters(sdxl.unet, [Adapter(folder, 1.0, "lora0")], "sd")  # forged family: shapes differ
    assert not getattr(sdxl.unet, "peft_config", {})
    after = sdxl.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

"""`asd model import`: a diffusers folder of each family, or a hub id in the local HF cache,
into `models/<name>`, then `asd generate --model` on it gives exact sizes; the same bytes again
reuse the version; pickles, single files, missing components and links out of the folder are one
line each, and nothing is stored."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import flows.stages  # noqa: F401 - Prefect sets up its log handlers on import: not inside a capsys test
from artifact_store import ArtifactStore
from asd_models.families import TINY, save_tiny
from bench.original_format import write_sd_single_file
from flows.cli import main
from tests.helpers import asd_process


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("import-families")
    return {name: save_tiny(name, root / name) for name in sorted(TINY)}


def asd(store, *argv):
    return main(["--store", str(store), *argv])


def one_line_error(capsys, store, *argv) -> str:
    with pytest.raises(SystemExit) as stop:
        raise SystemExit(asd(store, *argv))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("asd: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("family", sorted(TINY))
def test_import_then_generate_exact_sizes(tiny_dirs, tmp_path, capsys, family):
    store_dir = tmp_path / "store"
    assert asd(store_dir, "model", "import", str(tiny_dirs[family]), "--name", f"mine-{family}") == 0
    ref = capsys.readouterr().out.strip().splitlines()[-1]
    store = ArtifactStore(str(store_dir))
    rec = store.record(ref)
    assert rec["params"]["family"] == family and rec["params"]["content_sha256"]
    assert all(not rel.endswith((".bin", ".ckpt", ".pt")) for rel, _ in store.iter_files(ref))
    assert any(rel.endswith(".safetensors") for rel, _ in store.iter_files(ref))
    # the same bytes again: the same version
    assert asd(store_dir, "model", "import", str(tiny_dirs[family]), "--name", f"mine-{family}") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == ref
    assert asd(store_dir, "model", "ls") == 0
    assert f"{ref}  {family}  imported from" in capsys.readouterr().out
    assert asd(store_dir, "model", "show", f"mine-{family}") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["family"] == family and ({"unet", "transformer"} & set(shown["components"]))
    assert (
        asd(
            store_dir,
            "generate",
            "--model",
            f"mine-{family}",
            "--prompt",
            "a red barn",
            "--size",
            "150x90",
            "--steps",
            "2",
            "--name",
            "g",
        )
        == 0
    )
    gen = capsys.readouterr().out.strip().splitlines()[-1]
    images = [
        rel
        for rel, _ in store.iter_files(gen)
        if rel.startswith("images/") and rel.endswith(".png") and ".seams" not in rel
    ]
    assert len(images) == 1
    with store.open(gen, images[0]) as f:
        assert Image.open(f).size == (150, 90)
    assert ref in store.record(gen)["parents"]


def test_a_hub_id_in_the_local_cache_is_imported_without_a_download(tiny_dirs, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "hf"
    repo = cache / "models--someone--tiny-sdxl"
    snap = repo / "snapshots" / ("0" * 40)
    # the HF cache's layout: snapshot files are links into blobs/
    for src in tiny_dirs["sdxl"].rglob("*"):
        if src.is_file():
            blob = repo / "blobs" / f"{abs(hash(str(src))):x}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, blob)
            dst = snap / src.relative_to(tiny_dirs["sdxl"])
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, dst.parent), dst)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    assert asd(tmp_path / "store", "model", "import", "someone/tiny-sdxl", "--name", "cached") == 0
    ref = capsys.readouterr().out.strip().splitlines()[-1]
    assert ArtifactStore(str(tmp_path / "store")).record(ref)["params"]["family"] == "sdxl"
    err = one_line_error(capsys, tmp_path / "store", "model", "import", "someone/not-cached", "--name", "x")
    assert "not in the local Hugging Face cache" in err


def test_bad_sources_are_one_line_and_store_nothing(tiny_dirs, tmp_path, capsys):
    store_dir = tmp_path / "store"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really a pickle")
    assert "never unpickles" in one_line_error(capsys, store_dir, "model", "import", str(ckpt), "--name", "a")
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")
    assert "not a safetensors file" in one_line_error(
        capsys, store_dir, "model", "import", str(single), "--name", "b"
    )
    missing = tmp_path / "missing"
    shutil.copytree(tiny_dirs["sdxl"], missing)
    shutil.rmtree(missing / "tokenizer_2")
    assert "lacks tokenizer_2/" in one_line_error(
        capsys, store_dir, "model", "import", str(missing), "--name", "c"
    )
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dirs["sd"], pickled)
    for f in (pickled / "vae").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    err = one_line_error(capsys, store_dir, "model", "import", str(pickled), "--name", "d")
    assert "only pickled weights" in err and "vae" in err
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_dirs["sd"], damaged)
    next((damaged / "unet").glob("*.safetensors")).write_bytes(b"\xff" * 64)
    assert "not a safetensors file" in one_line_error(
        capsys, store_dir, "model", "import", str(damaged), "--name", "e"
    )
    linked = tmp_path / "linked"
    shutil.copytree(tiny_dirs["sd"], linked)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    os.symlink(secret, linked / "tokenizer" / "extra.txt")
    assert "outside" in one_line_error(capsys, store_dir, "model", "import", str(linked), "--name", "f")
    assert not (store_dir / "models").exists() or not any((store_dir / "models").rglob("_COMMITTED.json"))


def test_an_imported_model_is_the_same_model(tiny_dirs, tmp_path, capsys):
    """What generate loads from the store is what the folder held: the same pixels."""
    from asd_models.pipeline import AnySizePipeline, RenderRequest
    from tasks.model_cache import local_model_dir

    store_dir = tmp_path / "store"
    assert asd(store_dir, "model", "import", str(tiny_dirs["sdxl"]), "--name", "same") == 0
    ref = capsys.readouterr().out.strip().splitlines()[-1]
    store = ArtifactStore(str(store_dir))
    req = [RenderRequest("a cat", 96, 72, steps=2)]
    a = AnySizePipeline.from_pretrained(tiny_dirs["sdxl"]).generate_many(req)[0]
    b = AnySizePipeline.from_pretrained(local_model_dir(store, ref)).generate_many(req)[0]
    assert np.array_equal(a.pixels, b.pixels)


def _components_equal(a_dir, b_dir, family: str) -> None:
    from asd_models.loading import load_components

    a, b = load_components(str(a_dir)), load_components(str(b_dir))
    assert a.family.name == b.family.name == family
    for ma, mb in zip(a.modules(), b.modules(), strict=True):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), type(ma).__name__


def test_a_single_file_checkpoint_round_trips(tiny_dirs, tmp_path, capsys):
    """An A1111/ComfyUI-style single file of the tiny SD model: its family read from its keys,
    converted with the folder's configs, stored as the very same weights; the same file again
    reuses the version; generate runs on it."""
    from tasks.model_cache import local_model_dir

    single = write_sd_single_file(tiny_dirs["sd"], tmp_path / "tiny-sd.safetensors")
    store_dir = tmp_path / "store"
    argv = ("model", "import", str(single), "--name", "single", "--config", str(tiny_dirs["sd"]))
    assert asd(store_dir, *argv) == 0
    ref = capsys.readouterr().out.strip().splitlines()[-1]
    store = ArtifactStore(str(store_dir))
    params = store.record(ref)["params"]
    assert params["family"] == "sd" and params["checkpoint_type"] == "v1" and params["checkpoint_sha256"]
    assert {rel.split("/")[0] for rel, _ in store.iter_files(ref)} >= {
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
    }
    _components_equal(tiny_dirs["sd"], local_model_dir(store, ref), "sd")
    assert asd(store_dir, *argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == ref
    assert (
        asd(
            store_dir,
            "generate",
            "--model",
            "single",
            "--prompt",
            "a barn",
            "--size",
            "70x64",
            "--steps",
            "1",
        )
        == 0
    )


def test_a_single_file_is_read_by_its_keys(tiny_dirs, tmp_path, capsys):
    """What a file's keys say decides; a file, config or component that does not fit is one line
    naming it, and nothing is stored."""
    from safetensors.torch import load_file, save_file

    store_dir = tmp_path / "store"
    full = load_file(write_sd_single_file(tiny_dirs["sd"], tmp_path / "full.safetensors"))

    def single(name: str, tensors: dict) -> str:
        save_file(tensors, str(tmp_path / name))
        return str(tmp_path / name)

    # no model's keys at all (e.g. a LoRA or an embedding)
    err = one_line_error(
        capsys,
        store_dir,
        "model",
        "import",
        single("lora.safetensors", {"lora_unet_x.alpha": torch.ones(1)}),
        "--name",
        "a",
    )
    assert "match no model family" in err and "model.diffusion_model.*" in err
    # a model type no family takes (an x4 upscaler's keys)
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    upscaler = single("up.safetensors", {CHECKPOINT_KEY_NAMES["upscale"]: torch.ones(1), **full})
    err = one_line_error(
        capsys, store_dir, "model", "import", upscaler, "--name", "b", "--config", str(tiny_dirs["sd"])
    )
    assert "'upscale' checkpoint" in err and "no model family here imports" in err
    # an SDXL checkpoint's keys with an SD config folder
    xl = single("xl.safetensors", {CHECKPOINT_KEY_NAMES["xl_base"]: torch.ones(1), **full})
    err = one_line_error(
        capsys, store_dir, "model", "import", xl, "--name", "c", "--config", str(tiny_dirs["sd"])
    )
    assert "Stable Diffusion XL checkpoint" in err and "is a Stable Diffusion 1.x/2.x pipeline" in err
    # the UNet alone, with a config folder that has no VAE weights: the missing part is named
    unet_only = single("unet.safetensors", {k: v for k, v in full.items() if k.startswith("model.")})
    configs = tmp_path / "configs-only"
    shutil.copytree(tiny_dirs["sd"], configs)
    for f in configs.rglob("*.safetensors"):
        f.unlink()
    err = one_line_error(
        capsys, store_dir, "model", "import", unet_only, "--name", "d", "--config", str(configs)
    )
    assert "holds no vae" in err and "first_stage_model.*" in err
    # weights that do not fit the config's shapes
    other = tmp_path / "other"
    shutil.copytree(tiny_dirs["sd"], other)
    cfg = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps(cfg | {"block_out_channels": [16, 32]}))
    err = one_line_error(
        capsys,
        store_dir,
        "model",
        "import",
        str(tmp_path / "full.safetensors"),
        "--name",
        "e",
        "--config",
        str(other),
    )
    assert "its unet weights do not convert" in err
    # a single file's --config is required to be a folder of its own family, and absent for a folder
    err = one_line_error(
        capsys, store_dir, "model", "import", str(tiny_dirs["sd"]), "--name", "f", "--config", str(other)
    )
    assert "--config is for a single-file checkpoint" in err
    # the default config is diffusers' model of the type, looked up in the cache only
    err = one_line_error(
        capsys, store_dir, "model", "import", str(tmp_path / "full.safetensors"), "--name", "g"
    )
    assert (
        "stable-diffusion-v1-5/stable-diffusion-v1-5" in err and "not in the local Hugging Face cache" in err
    )
    assert not (store_dir / "models").exists() or not any((store_dir / "models").rglob("_COMMITTED.json"))


def test_a_bad_source_is_one_line_on_a_terminal(tiny_dirs, tmp_path):
    """A bad source (here: a single file whose default configs are not in the cache) prints the
    CLI's one line on a real terminal, no traceback (a refusal found inside a flow, a lease held,
    is the same one line: `tests/test_leases.py`)."""

    single = write_sd_single_file(tiny_dirs["sd"], tmp_path / "tiny-sd.safetensors")
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "PREFECT_HOME": str(tmp_path / "ph")}
    done = asd_process(
        str(tmp_path / "store"), "model", "import", str(single), "--name", "x", env=env, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("asd: ")]
    assert "not in the local Hugging Face cache" in line

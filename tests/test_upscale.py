"""ASD-upscale: existing images enlarged to exact sizes by FSTD's stage 2, bad inputs as failed
rows with their reason, lineage to the inputs, and a killed job that reruns only what is missing
(every image once)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import flows.stages  # noqa: F401 - Prefect sets up its log handlers on import
from artifact_store import ArtifactStore
from artifact_store.refs import CorruptFile
from tests.helpers import asd_process as _asd
from tests.helpers import smooth_image

ROOT = Path(__file__).resolve().parent.parent


def _photos(folder: Path, n: int = 4) -> Path:
    """n smooth colour pictures of mixed sizes with captions, and one of each kind of bad input."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        g = smooth_image(i, 96).astype(np.float32)[..., 0]
        rgb = np.stack([g, g * 0.8 + 30, 255 - g], axis=2).clip(0, 255).astype(np.uint8)
        Image.fromarray(rgb[: 64 + 16 * (i % 2), : 64 + 32 * (i % 3)]).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"a picture number {i}")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.zeros((64, 8200, 3), np.uint8)).save(folder / "wide.png")  # 2x is over 16384 px wide
    return folder


def _manifest(store_url: str, ref: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(ArtifactStore(store_url).read_bytes(ref, "manifest.parquet")))


def test_upscale_folder_exact_sizes_failed_rows_and_lineage(stored_model, tmp_path, prefect_harness):
    from flows.stages import upscale_flow
    from tasks.upscale import UpscaleSettings

    folder = _photos(tmp_path / "in")
    ref = upscale_flow(
        [str(folder)], "models/tiny", "x2", UpscaleSettings(steps=2, partition_inputs=2), stored_model
    )
    store = ArtifactStore(stored_model)
    m = _manifest(stored_model, ref)
    assert len(m) == 6 and m["row"].to_list() == list(range(6))
    ok = m.filter(pl.col("status") == "ok")
    assert ok.height == 4
    for r in ok.iter_rows(named=True):
        assert (r["width"], r["height"]) == (2 * r["input_width"], 2 * r["input_height"])
        assert Image.open(io.BytesIO(store.read_bytes(ref, r["image"]))).size == (r["width"], r["height"])
        assert r["prompt"].startswith("a picture number") and r["source"].endswith(".png")
        # a random network draws noise; back-projection (the default) still makes each downscale its input
        assert r["roundtrip_ssim"] > 0.95 and r["roundtrip_color_error"] < 1 and r["seam_score"] is not None
        digest = __import__("hashlib").sha256(Path(r["source"]).read_bytes()).hexdigest()
        assert r["input_sha256"] == digest  # every output names the bytes it came from
    bad = {Path(r["source"]).name: r for r in m.filter(pl.col("status") == "failed").iter_rows(named=True)}
    assert bad["broken.png"]["failed_stage"] == "decode"
    assert bad["wide.png"]["failed_stage"] == "target" and "16384" in bad["wide.png"]["error"]
    record = store.record(ref)
    assert str(store.resolve("models/tiny")) in record["parents"]
    assert record["summary"]["images_ok"] == 4 and record["summary"]["images_failed"] == 2
    assert store.verify(ref) == []


def test_generations_and_upscales_versions_are_sources(stored_model, tmp_path, prefect_harness):
    """A generation in the webdataset layout (images read from their tar by ranged reads) and an
    upscale (plain files, one tampered with after its commit) upscaled again: the prompts carried
    over, both versions pinned as parents, the tampered image a failed row naming it."""
    from artifact_store.members import image_bytes
    from data_manifests.settings import PromptSpec
    from flows.stages import generate_flow, prompts_flow, upscale_flow
    from tasks.generate import GenerateSettings
    from tasks.upscale import UpscaleSettings

    store = ArtifactStore(stored_model)
    prompts = prompts_flow(
        [PromptSpec(prompt=f"scene {i}", width=64 + 32 * i, height=64, seed=i) for i in range(3)],
        "few",
        stored_model,
    )
    gen = generate_flow(
        "models/tiny", prompts, "wds", GenerateSettings(steps=2, layout="webdataset"), stored_model
    )
    first = upscale_flow(
        [str(_photos(tmp_path / "in", n=2))], "models/tiny", "once", UpscaleSettings(steps=2), stored_model
    )
    tampered = _manifest(stored_model, first).filter(pl.col("status") == "ok")["image"][0]
    path = Path(store.path(store.resolve(first).prefix, tampered))
    path.write_bytes(path.read_bytes()[:-40] + b"\0" * 40)
    made = _manifest(stored_model, gen)
    manifest_path = Path(store.path(store.resolve(gen).prefix, "manifest.parquet"))
    original = manifest_path.read_bytes()
    hostile = made.head(2).with_columns(  # a manifest edited after its commit: a path out of the store
        image=pl.Series(["../../../../etc/passwd", made["image"][1]]), shard_offset=pl.Series([None, -5])
    )
    pl.concat([made, hostile]).write_parquet(manifest_path)
    with pytest.raises(
        CorruptFile, match="manifest.parquet of generations/wds@.* does not match its recorded sha256"
    ):
        upscale_flow([gen], "models/tiny", "edited", UpscaleSettings(steps=2), stored_model)
    manifest_path.write_bytes(original)
    member = made.row(1, named=True)  # one image inside its tar changed, same size: its member digest says so
    tar = Path(store.path(store.resolve(gen).prefix, member["shard"]))
    raw = bytearray(tar.read_bytes())
    at = member["shard_offset"] + member["shard_size"] // 2
    raw[at] ^= 0xFF
    tar.write_bytes(bytes(raw))
    ref = upscale_flow(
        [gen, first], "models/tiny", "again", UpscaleSettings(steps=2, scale=1.5), stored_model
    )
    m = _manifest(stored_model, ref)
    assert len(m) == 3 + 2
    for r, g in zip(m.head(3).iter_rows(named=True), made.iter_rows(named=True), strict=True):
        assert r["source"] == f"{store.resolve(gen)}/{g['image']}"
        if g["image"] == member["image"]:
            assert r["status"] == "failed" and "does not match its recorded sha256" in r["error"], r["error"]
            continue
        assert r["status"] == "ok" and r["prompt"] == g["prompt"]
        assert (r["input_width"], r["width"]) == (g["width"], round(1.5 * g["width"]))
        assert r["input_sha256"] == hashlib.sha256(image_bytes(store, gen, g)).hexdigest()
    bad = m.filter(pl.col("source").str.ends_with(tampered)).row(0, named=True)
    assert bad["status"] == "failed" and "does not match its recorded sha256" in bad["error"]
    assert (
        m.filter(pl.col("status") == "ok").height == 3 and m.filter(pl.col("status") == "failed").height == 2
    )
    assert {str(store.resolve(gen)), str(store.resolve(first))} <= set(store.record(ref)["parents"])
    with pytest.raises(ValueError, match="not an image source"):
        upscale_flow([prompts], "models/tiny", "no", UpscaleSettings(steps=2), stored_model)


def test_upscale_target_rules():
    from tasks.upscale import UpscaleSettings

    assert UpscaleSettings().target(100, 60) == (200, 120)
    assert UpscaleSettings(size="640x360").target(300, 200) == (640, 360)
    assert UpscaleSettings(long_side=1000).target(400, 300) == (1000, 750)
    with pytest.raises(ValueError, match="smaller than the input"):
        UpscaleSettings(size="100x100").target(300, 200)
    with pytest.raises(ValueError, match="one of scale, size and long_side"):
        UpscaleSettings(scale=3, long_side=512)
    with pytest.raises(ValueError, match="each side must be 64..16384"):
        UpscaleSettings(size="100000x64")


@pytest.mark.slow
def test_killed_upscale_reruns_only_the_missing_images(stored_model, tmp_path):
    folder = _photos(tmp_path / "in", n=6)
    common = [
        "upscale",
        str(folder),
        "--model",
        "tiny",
        "--name",
        "resume",
        "--steps",
        "2",
        "--partition-inputs",
        "2",
        "--workers",
        "2",
    ]
    ph = {"PREFECT_HOME": str(tmp_path / "ph")}
    killed = _asd(stored_model, *common, env={"ASD_FAULT_AT": "after-upscale-3", **ph})
    assert killed.returncode == -9, killed.stderr[-2000:]
    store = ArtifactStore(stored_model)
    assert store.list_versions("upscales", "resume") == []
    frags = [
        p
        for p in Path(stored_model).glob("upscales/resume/*/_fragments/*-*.parquet")
        if not p.name.startswith("plan-")
    ]
    # three images' rows: each in its own fragment, or with its finished partition's rows in one
    assert sum(pl.read_parquet(p).filter(pl.col("status") == "ok").height for p in frags) == 3
    # someone sharing the store edits one finished row (its prompt): that image is not taken as done
    forged = next(p for p in frags if pl.read_parquet(p).filter(pl.col("status") == "ok").height)
    table = pq.read_table(forged)
    prompts = table.column("prompt").to_pylist()
    at = table.column("status").to_pylist().index("ok")
    prompts[at] = "a forged prompt"
    pq.write_table(
        table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts)), forged
    )
    done = _asd(stored_model, *common, env=ph)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prompt is not this job's; rendered again" in done.stderr + done.stdout
    ref = done.stdout.strip().splitlines()[-2]
    summary = store.record(ref)["summary"]
    assert summary["images_ok"] == 6 and summary["images_failed"] == 2
    assert summary["images_resumed"] == 2 and summary["images_rendered_by_this_run"] == 4
    assert "a forged prompt" not in _manifest(stored_model, ref)["prompt"].to_list()
    m = _manifest(stored_model, ref)
    assert m.filter(pl.col("status") == "ok")["key"].n_unique() == 6 and store.verify(ref) == []
    again = _asd(stored_model, *common, env=ph)
    assert again.stdout.strip().splitlines()[-2] == ref  # the same job is reused, nothing rendered

    data = _asd(
        stored_model,
        "ingest",
        str(folder),
        "--dataset",
        "inputs",
        "--bucket-base",
        "64",
        "--bucket-step",
        "16",
        env=ph,
    )
    assert data.returncode == 0, data.stderr[-2000:]
    scored = _asd(
        stored_model,
        "evaluate",
        "--generations",
        ref,
        "--dataset",
        "inputs",
        "--name",
        "up",
        "--sample",
        "4",
        "--patch-size",
        "32",
        env=ph,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    metrics = {
        r["metric"]: r
        for r in pl.read_parquet(
            io.BytesIO(store.read_bytes("evaluations/up@latest", "metrics.parquet"))
        ).iter_rows(named=True)
    }
    assert metrics["roundtrip_ssim"]["value"] == pytest.approx(
        m["roundtrip_ssim"].mean()
    )  # in the evaluation too


def test_tiny_x4_upscaler_fitted_in_code_runs_the_upscaler_path(tiny_model_dir, tmp_path):
    """The x4 upscaler path end to end on pixels: a tiny upscaler fitted in code (its loss falls),
    saved in the diffusers layout, loaded through `from_pretrained`, enlarging an image 4x."""
    from asd_models.fidelity import roundtrip
    from asd_models.images import pil_to_tensor_m11
    from asd_models.pipeline import AnySizePipeline, RenderRequest
    from asd_models.tiny_model import save_upscaler_components
    from asd_models.upscaler_training import fit_tiny_upscaler

    photos = [Image.open(p) for p in sorted(_photos(tmp_path / "in", n=3).glob("p*.png"))]
    losses: list[float] = []
    components = fit_tiny_upscaler(
        [pil_to_tensor_m11(im) for im in photos],
        ["a picture"] * 3,
        vae_steps=30,
        unet_steps=40,
        batch_size=4,
        on_step=lambda part, s, n, loss: losses.append(loss) if part == "unet" else None,
    )
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    pipe = AnySizePipeline.from_pretrained(
        tiny_model_dir, upscaler=save_upscaler_components(components, tmp_path / "x4")
    )
    small = photos[0].convert("RGB").resize((32, 24))
    result = pipe.upscale_many([RenderRequest("a picture", 128, 96, steps=3, noise_level=20)], [small])[0]
    assert result.size == (128, 96)
    ssim, color = roundtrip(result.pixels, small)
    assert -1 <= ssim <= 1 and color >= 0


def test_an_upscale_plan_counts_what_the_job_then_does(stored_model, tmp_path, capsys, prefect_harness):
    """`asd upscale --dry-run` sizes every input from its header and writes nothing; a job over
    --max-job-pixels is refused in one line before any version exists; at the cap it runs, and its
    manifest holds exactly the planned output pixels and failures."""
    import re

    from flows.cli import main

    folder = _photos(tmp_path / "in")  # 4 pictures, one broken file, one too wide to double
    argv = ["--store", stored_model, "upscale", str(folder), "--model", "tiny", "--name", "planned"]
    argv += ["--steps", "2"]
    store = ArtifactStore(stored_model)
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "inputs: 6 (4 sized, 0 URLs sized when downloaded, 2 that will fail)" in out, out
    pixels = int(re.search(r"output pixels: ([\d,]+)", out).group(1).replace(",", ""))
    evals = int(
        re.search(r"UNet evaluations \(FSTD stage 2 tiles, guidance counted\): ([\d,]+)", out)
        .group(1)
        .replace(",", "")
    )
    assert pixels > 0 and evals > 0
    assert ("upscales", "planned") not in store.list_artifacts()

    with pytest.raises(SystemExit) as stop:
        raise SystemExit(main([*argv, "--max-job-pixels", str(pixels - 1)]))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("asd: refused:") and len(err.splitlines()) == 1, err
    assert ("upscales", "planned") not in store.list_artifacts()

    assert main([*argv, "--max-job-pixels", str(pixels)]) == 0
    ref = capsys.readouterr().out.strip().splitlines()[0]
    m = _manifest(stored_model, ref)
    ok = m.filter(pl.col("status") == "ok")
    assert sum(w * h for w, h in zip(ok["width"], ok["height"], strict=True)) == pixels
    assert m.filter(pl.col("status") == "failed").height == 2

"""`asd` as a user types it: flags map onto the stage settings, every mistake is one line and
exit code 2 before any work, and `asd generate` / `asd evaluate` run their flows."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
from PIL import Image

import flows.stages  # noqa: F401 - Prefect sets up its log handlers on import: not inside a capsys test
from artifact_store import ArtifactStore
from flows.cli import build_parser, main
from flows.settings_cli import settings_from_args
from tasks.evaluate import EvaluateSettings
from tasks.generate import GenerateSettings
from tasks.ingest import IngestSettings
from tasks.registry import STAGES as REGISTRY
from tests.ingest_helpers import ingest_ref

STAGES = {command: entry.settings for command, entry in REGISTRY.items()}


def _subparser(name):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "cmd")
    return action.choices[name]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_setting_has_a_flag_with_its_help_and_choices(stage):
    model = STAGES[stage]
    flags = {a.dest: a for a in _subparser(stage)._actions}
    for name, field in model.model_fields.items():
        assert name in flags, f"asd {stage} has no flag for {name}"
        if field.description:
            assert field.description in flags[name].help.replace("%%", "%")  # argparse doubles a literal %
    if stage == "ingest":
        assert flags["crop"].choices == ["center", "random"]
        assert flags["resample"].choices == ["bilinear", "bicubic", "lanczos"]


def test_generate_flags_become_settings():
    args = build_parser().parse_args(
        [
            "generate",
            "--model",
            "m",
            "--prompt",
            "a cat",
            "--size",
            "640x360",
            "--steps",
            "3",
            "--tile-batch-size",
            "4",
            "--tile",
            "16",
            "--guidance-scale",
            "2.5",
            "--workers",
            "2",
        ]
    )
    assert settings_from_args(GenerateSettings, args) == GenerateSettings(
        steps=3, tile_batch_size=4, tile=16, guidance_scale=2.5, workers=2
    )
    args = build_parser().parse_args(
        [
            "evaluate",
            "--generations",
            "g",
            "--dataset",
            "d",
            "--patch-size",
            "32",
            "--clip-model",
            "/models/clip",
            "--seam-period",
            "4",
        ]
    )
    assert settings_from_args(EvaluateSettings, args) == EvaluateSettings(
        patch_size=32, clip_model="/models/clip", seam_period=4
    )


def test_ingest_cross_field_check_sees_the_given_step():
    args = build_parser().parse_args(
        ["ingest", "x", "--dataset", "d", "--bucket-base", "120", "--bucket-step", "8"]
    )
    assert settings_from_args(IngestSettings, args).bucket_base == 120


def _bad_csv(tmp_path):
    (tmp_path / "nocol.csv").write_text("text,width,height\na cat,64,64\n")
    (tmp_path / "p.xlsx").write_text("not a table format we read")
    return tmp_path


@pytest.mark.parametrize(
    "argv, words",
    [
        (["generate", "--model", "m", "--prompt", "x", "--size", "0x0"], "--size 0x0: width"),
        (
            ["generate", "--model", "m", "--prompt", "x", "--size", "abc"],
            "--size 'abc': expected WIDTHxHEIGHT",
        ),
        (["generate", "--model", "m", "--prompt", "x", "--size", "64x64", "--steps", "0"], "--steps"),
        (
            ["generate", "--model", "m", "--prompt", "x", "--size", "64x64", "--guidance-scale", "lots"],
            "guidance",
        ),
        (["generate", "--model", "m", "--prompt", "x", "--size", "64x64", "--seed", str(2**70)], "--seed"),
        (["generate", "--model", "m"], "give --prompts FILE"),
        (["generate", "--model", "m", "--prompts", "{tmp}/nocol.csv"], "missing column(s) prompt"),
        (["generate", "--model", "m", "--prompts", "{tmp}/none.parquet"], "no such file"),
        (["generate", "--model", "m", "--prompts", "{tmp}/p.xlsx"], "unknown format"),
        (
            ["generate", "--model", "bad name", "--prompt", "x", "--size", "64x64"],
            "bad artifact name 'bad name'",
        ),
        (
            ["generate", "--model", "m", "--name", "bad\n", "--prompt", "x", "--size", "64x64"],
            "bad artifact name",
        ),
        (["evaluate", "--generations", "g", "--dataset", "d", "--patch-size", "4"], "--patch-size"),
        (
            ["evaluate", "--generations", "g", "--dataset", "d", "--patch-size", "big"],
            "--patch-size: expected int, got 'big'",
        ),
        (["ingest", "x", "--dataset", "d", "--crop", "diagonal"], "invalid choice: 'diagonal'"),
        (
            ["ingest", "x", "--dataset", "d", "--bucket-base", "120", "--bucket-step", "64"],
            "multiple of bucket_step",
        ),
        (["train", "--dataset", "d", "--model", "bad name"], "bad artifact name"),
        (["store", "gc", "--grace", "soon"], "--grace 'soon'"),
        (["store", "gc", "--grace", "nan"], "--grace 'nan': a duration is a finite number"),
        (["store", "gc", "--grace=-5m"], "finite number of seconds >= 0"),
        (["dashboard", "serve", "--port", "99999"], "99999 is outside 0..65535"),
        (
            ["dashboard", "serve", "--host", "no-such-host.invalid", "--port", "0"],
            "cannot listen on no-such-host.invalid",
        ),
        (["dashboard", "build", "--thumb-px", "-5"], "-5 is outside 16..4096"),
        (
            [
                "generate",
                "--model",
                "m",
                "--prompt",
                "x",
                "--size",
                "64x64",
                "--dask-address",
                "tcp://10.9.9.9:1",
            ],
            "used only with executor 'dask'",
        ),
        (
            ["generate", "--model", "m", "--prompt", "x", "--size", "64x64", "--lora", "m:lots"],
            "'lots' after ':'",
        ),
        (
            ["train", "--dataset", "d", "--model", "m", "--lora-rank", "-1"],
            "--lora-rank: Input should be greater",
        ),
        (["upscale", "x", "--model", "m", "--scale", "0"], "--scale: Input should be greater than 1"),
        (["upscale", "x", "--model", "m", "--long-side", "-3"], "--long-side: Input should be greater"),
        (["upscale", "x", "--model", "m", "--scale", "2", "--size", "10x10"], "not scale and size"),
        (["ingest", "{tmp}/nowhere", "--dataset", "d"], "no such file or folder"),
        (["model", "import", "{tmp}/nowhere", "--name", "x"], "nowhere does not exist"),
        (["model", "import", "{tmp}/m.ckpt", "--name", "x"], "never unpickles"),
        (["model", "show", "bad/name@x"], "bad artifact reference"),
        (["demo", "--family", "nosuch"], "invalid choice: 'nosuch'"),
        (["backfill", "asd-generate/generate", "--dates", "notadate"], "--dates 'notadate'"),
        (
            ["generate", "--model", "m", "--prompt", "x", "--size", "64x64", "--image-parallel", "0"],
            "--image-parallel: Input should be greater",
        ),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(argv, words, tmp_path, capsys):
    folder = _bad_csv(tmp_path)
    argv = [a.replace("{tmp}", str(folder)) for a in argv]
    with pytest.raises(SystemExit) as stop:
        raise SystemExit(main(["--store", str(tmp_path / "store"), *argv]))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("asd: ") and "Traceback" not in err, err
    assert words in err, err
    assert not (tmp_path / "store" / "generations").exists()
    assert not (tmp_path / "store" / "models").exists()


@pytest.fixture(scope="module")
def stored_model_and_data(tmp_path_factory, commit_tiny_model):
    root = tmp_path_factory.mktemp("cli")
    store_url = str(root / "store")
    commit_tiny_model(store_url)
    folder = root / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"photo {i}")
    ds = ingest_ref(store_url, [str(folder)], "photos", {"bucket_base": 128, "bucket_step": 16})
    return store_url, ds


def test_cli_generate_then_evaluate(stored_model_and_data, prefect_harness, capsys, tmp_path):
    store_url, ds = stored_model_and_data
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(
        b'{"prompt": "a red cat", "width": 200, "height": 96, "seed": 1}\n'
        b'{"prompt": "too big", "width": 20000, "height": 96}\n'
        b'{"prompt": "caf\xe9", "width": 96, "height": 96}\n'
        b'{"prompt": "a blue dog", "width": 96, "height": 160, "seed": 2}\n'
        b'{"prompt": "huge seed", "width": 96, "height": 96, "seed": 1180591620717411303424}\n'
    )
    assert (
        main(
            [
                "--store",
                store_url,
                "generate",
                "--model",
                "tiny",
                "--name",
                "cli",
                "--prompts",
                str(prompts),
                "--steps",
                "2",
                "--tile-batch-size",
                "3",
                "--shard-size",
                "1",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    gen = captured.out.strip().splitlines()[-1]
    assert "prompt row 2 will not be rendered: width" in captured.err
    store = ArtifactStore(store_url)
    rec = store.record(gen)
    assert rec["params"]["tile_batch_size"] == 3 and rec["params"]["steps"] == 2
    manifest = pl.read_parquet(io.BytesIO(store.read_bytes(gen, "manifest.parquet")))
    assert manifest["status"].to_list() == ["ok", "failed", "failed", "ok", "failed"], manifest[
        "error"
    ].to_list()
    errors = manifest["error"].to_list()
    assert "row 2: width" in errors[1] and "not UTF-8" in errors[2] and "row 5: seed" in errors[4]
    manifest = manifest.filter(pl.col("status") == "ok")
    assert sorted(zip(manifest["width"], manifest["height"], strict=True)) == [(96, 160), (200, 96)]
    for r in manifest.iter_rows(named=True):
        assert Image.open(io.BytesIO(store.read_bytes(gen, r["image"]))).size == (r["width"], r["height"])
        assert (
            r["fstd_tiles"] > 0 and r["unet_evals"] > r["fstd_tiles"] and r["device"] == "cpu" and r["worker"]
        )
    assert (
        main(
            [
                "--store",
                store_url,
                "evaluate",
                "--generations",
                gen,
                "--dataset",
                ds,
                "--name",
                "cli",
                "--patch-size",
                "32",
                "--patches-per-image",
                "2",
                "--clip-model",
                str(tmp_path / "no-clip"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    ev = out.strip().splitlines()[0]
    assert store.record(ev)["params"]["patch_size"] == 32
    metrics = pl.read_parquet(io.BytesIO(store.read_bytes(ev, "metrics.parquet")))
    clip = metrics.filter(pl.col("metric") == "clip_score").row(0, named=True)
    assert clip["status"] == "skipped" and "no-clip" in clip["detail"]


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["demo"],
        ["ingest"],
        ["train"],
        ["generate"],
        ["evaluate"],
        ["store"],
        ["store", "gc"],
        ["deploy"],
        ["backfill"],
        ["dashboard"],
        ["dashboard", "build"],
    ],
)
def test_every_help_page_renders(argv, capsys):
    """Help text comes from the settings' descriptions: a literal % (as in '50%-overlap') must not
    break argparse's formatting."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage: asd" in capsys.readouterr().out

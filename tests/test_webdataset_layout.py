"""The webdataset layout of a generation job: each chunk's images, heat-maps and captions in one
tar shard that webdataset's own reader reads, every image readable alone by one ranged read, seam
scores in the manifest (so evaluate reads only its sample), and a killed job resumed chunk by
chunk, nothing lost or listed twice."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from PIL import Image

import flows.stages  # noqa: F401 - Prefect sets up its log handlers on import
from artifact_store import ArtifactStore
from artifact_store.members import TarPacker, image_bytes, image_uri
from tests.helpers import asd_process as _asd


def _prompts(path: Path, n: int) -> Path:
    sizes = [(96, 96), (160, 96), (96, 160)]
    pl.DataFrame(
        {
            "prompt": [f"picture {i}" for i in range(n)],
            "width": [sizes[i % 3][0] for i in range(n)],
            "height": [sizes[i % 3][1] for i in range(n)],
            "seed": list(range(n)),
        }
    ).write_parquet(path)
    return path


def test_tar_packer_offsets_point_at_each_members_bytes():
    packer = TarPacker()
    members = {"a.png": b"x" * 3, "a.json": b"{}", "b.png": os.urandom(1500), "b.seams.png": b""}
    at = {name: packer.add(name, data) for name, data in members.items()}
    blob = packer.finish().read()
    for name, data in members.items():
        off, size = at[name]
        assert blob[off : off + size] == data and size == len(data)
    again = TarPacker()
    for name, data in members.items():
        again.add(name, data)
    assert again.finish().read() == blob  # fixed headers: the same members make the same bytes


@pytest.mark.slow
def test_webdataset_layout_job_killed_and_resumed(stored_model, tmp_path):
    prompts = _prompts(tmp_path / "p.parquet", 7)
    common = [
        "generate",
        "--model",
        "tiny",
        "--name",
        "wds",
        "--prompts",
        str(prompts),
        "--steps",
        "2",
        "--shard-size",
        "7",
        "--chunk-rows",
        "3",
        "--layout",
        "webdataset",
    ]
    env = {"PREFECT_HOME": str(tmp_path / "ph")}
    killed = _asd(stored_model, *common, env={**env, "ASD_FAULT_AT": "after-image-5"})
    assert killed.returncode == -9, killed.stderr[-2000:]  # chunk [0, 3) durable, chunk [3, 6) not
    done = _asd(stored_model, *common, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = done.stdout.strip().splitlines()[-1]
    store = ArtifactStore(stored_model)
    ref = store.resolve(ref)
    summary = store.record(ref)["summary"]
    assert (
        summary["images_ok"] == 7
        and summary["images_resumed"] == 3
        and summary["images_rendered_by_this_run"] == 4
    )
    manifest = pl.read_parquet(io.BytesIO(store.read_bytes(ref, "manifest.parquet")))
    assert manifest["status"].to_list() == ["ok"] * 7 and manifest["key"].n_unique() == 7
    files = dict(store.iter_files(ref))
    tars = sorted(f for f in files if f.startswith("shards/"))
    assert tars == [
        "shards/rows-000001-000003.tar",
        "shards/rows-000004-000006.tar",
        "shards/rows-000007-000007.tar",
    ]
    assert not [f for f in files if f.startswith("images/")]  # no object per image
    assert store.verify(ref) == [] and store.verify(ref, shallow=True) == []

    # webdataset's own reader, on the shards as they are in the store
    samples = {}
    for path in tars:
        for s in wds.WebDataset(store.file_uri(ref, path), shardshuffle=False, empty_check=False):
            samples[s["__key__"]] = s
    assert set(samples) == set(manifest["key"].to_list())
    for r in manifest.iter_rows(named=True):
        s = samples[r["key"]]
        assert json.loads(s["json"])["prompt"] == r["prompt"] and "seams.png" in s
        png = image_bytes(store, ref, r)  # one ranged read of its tar
        assert png == s["png"] and Image.open(io.BytesIO(png)).size == (r["width"], r["height"])
        assert image_uri(store, ref, r).endswith(f"{r['shard']}#{r['key']}.png")
        assert (
            r["seam_score"] is not None and np.isfinite(r["seam_score"]) or not (r["seam_x"] or r["seam_y"])
        )

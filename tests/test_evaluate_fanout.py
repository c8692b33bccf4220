"""Evaluation fanned out: the same metrics (seam scores exactly, FID/KID within float rounding)
from one thread and from two Dask workers of an existing scheduler (a LocalCluster the test
starts, passed as `dask_address`); seam scores the shard tasks stored are read, not recomputed."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import flows.stages  # noqa: F401 - Prefect sets up its log handlers on import
from artifact_store import ArtifactStore
from data_manifests.schemas import GENERATIONS_MANIFEST
from tasks.evaluate import EvaluateSettings
from tests.helpers import smooth_image
from tests.ingest_helpers import ingest_ref

N = 16


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """A dataset of 12 photos-like images and a generations version of N images, half of them
    with seam scores in the manifest (as a shard task writes them), half without (older)."""
    root = tmp_path_factory.mktemp("evalfan")
    folder = root / "real"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(smooth_image(100 + i, 128).astype(np.uint8)).save(folder / f"r{i}.png")
        (folder / f"r{i}.txt").write_text(f"real {i}")
    store_url = str(root / "store")
    data = ingest_ref(store_url, [str(folder)], "real", {"bucket_base": 64, "bucket_step": 16})
    store = ArtifactStore(store_url)
    w = store.new_version("generations", "fake")
    rows = []
    for i in range(N):
        arr = smooth_image(i, 128)
        arr[:, 64:] += 25 * (i % 2)  # every other image with a visible seam at x=64
        key = f"{i:06d}-128x128-abc"
        rel = f"images/{key}.png"
        w.put_bytes(rel, _png(arr))
        row = {f.name: None for f in GENERATIONS_MANIFEST}
        row.update(
            key=key,
            row=i,
            prompt=f"picture {i}",
            width=128,
            height=128,
            seed=i,
            status="ok",
            image=rel,
            seam_x=[64],
            seam_y=[],
            tile_px=64,
        )
        if i < N // 2:
            row.update(seam_score=1.5 + i, seam_score_x=1.5 + i, seam_score_y=float("nan"))
        rows.append(row)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATIONS_MANIFEST), buf)
    w.put_bytes("manifest.parquet", buf.getvalue())
    return store_url, str(w.commit()), data


def _metrics(store_url: str, ref: str) -> dict[str, float | None]:
    m = pl.read_parquet(io.BytesIO(ArtifactStore(store_url).read_bytes(ref, "metrics.parquet")))
    return dict(zip(m["metric"].to_list(), m["value"].to_list(), strict=True))


@pytest.mark.slow
def test_two_dask_workers_give_the_metrics_of_one_thread(versions, prefect_harness):
    from distributed import LocalCluster

    from flows.stages import evaluate_flow

    store_url, gen, data = versions
    common = {"sample": 10, "patch_size": 48, "patches_per_image": 2, "batch_rows": 3}
    one = _metrics(store_url, evaluate_flow(gen, data, "one", EvaluateSettings(**common), store_url))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        two = _metrics(
            store_url,
            evaluate_flow(
                gen,
                data,
                "two",
                EvaluateSettings(**common, executor="dask", dask_address=cluster.scheduler_address),
                store_url,
            ),
        )
    assert one.keys() == two.keys()
    assert one["fid_patch"] is not None and one["kid_patch"] is not None  # real Inception features, offline
    assert two["fid_patch"] == pytest.approx(one["fid_patch"], rel=1e-4, abs=1e-3)
    assert two["kid_patch"] == pytest.approx(one["kid_patch"], rel=1e-4, abs=1e-5)
    seams = {k: v for k, v in one.items() if k.startswith("seam_score/")}
    assert seams == {k: v for k, v in two.items() if k.startswith("seam_score/")}
    assert (
        len(seams) == N and seams["seam_score/000003-128x128-abc"] == 4.5
    )  # stored by its shard task: read, not recomputed
    scored = [seams[f"seam_score/{i:06d}-128x128-abc"] for i in range(N // 2, N)]  # no stored score: decoded
    assert all(s > 2 for s in scored[1::2]) and all(s < 1.5 for s in scored[0::2])

"""Ingest in partitions, on threads or Dask workers: the same dataset whatever the executor and
whatever the partitioning (rows, buckets, pixel sha256; shard bytes between executors), pixel
duplicates exact across partitions (decided at the merge, their samples out of every shard), and
a re-ingest that copies unchanged partitions whole and equals a fresh ingest."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from PIL import Image

import flows.stages  # noqa: F401 - Prefect sets up its log handlers on import
from artifact_store import ArtifactStore
from tests.helpers import smooth_image
from tests.image_server import ImageServer
from tests.ingest_helpers import ingest_ref
from tests.test_ingest import _img2dataset_shard

SMALL = {"bucket_base": 64, "bucket_step": 16, "min_side": 32}
ROW = [
    "key",
    "source",
    "status",
    "failed_stage",
    "error",
    "bucket",
    "sha256",
    "caption",
    "crop_left",
    "crop_top",
]


def _folder(root, n=10):
    """n images, two pairs of them pixel-identical (far apart in listing order)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        seed = {n - 1: 0, n - 3: 2}.get(i, i)  # the last copies the first; the third-last the third
        arr = smooth_image(seed, 96 + 8 * (seed % 4)).astype(np.uint8)
        Image.fromarray(arr[:, : 80 + 16 * (seed % 3)]).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"picture {i}")
    return root


def _sources(tmp_path, srv):
    folder = _folder(tmp_path / "photos")
    urls = [f"{srv.url}/img/{i}.jpg?w={96 + 16 * i}&h=80" for i in range(4)]
    urls += [urls[1], f"{srv.url}/missing.jpg"]  # the same URL twice, and a 404
    pl.DataFrame({"url": urls, "caption": [f"web {i}" for i in range(len(urls))]}).write_csv(
        tmp_path / "urls.csv"
    )
    (tmp_path / "shards").mkdir()
    _img2dataset_shard(tmp_path / "shards" / "00000.tar", 0, 3, bad={1})
    _img2dataset_shard(tmp_path / "shards" / "00001.tar", 3, 2)
    return [
        str(folder),
        str(tmp_path / "urls.csv"),
        str(tmp_path / "shards" / "{00000..00001}.tar"),
        str(folder),
    ]


def _dataset(store_url, ref):
    store = ArtifactStore(store_url)
    df = pl.read_parquet(io.BytesIO(store.read_bytes(ref, "manifest.parquet")))
    index = json.loads(store.read_bytes(ref, "bucket_index.json"))
    tars = {k: v["sha256"] for k, v in store.record(ref)["files"].items() if k.endswith(".tar")}
    samples = {}
    for bucket, info in index["buckets"].items():
        urls = [store.path(store.resolve(ref).prefix, s["shard"]) for s in info["shards"]]
        for s in wds.WebDataset(urls, shardshuffle=False):
            assert s["__key__"] not in samples
            assert json.loads(s["json"])["key"] == s["__key__"] and json.loads(s["json"])["bucket"] == bucket
            samples[s["__key__"]] = s
    return df, index, tars, samples


def _check_consistent(df, samples):
    ok = df.filter(pl.col("status") == "ok")
    assert df["key"].n_unique() == len(df)
    assert ok["sha256"].n_unique() == ok.height  # no pixels twice among the kept
    assert set(samples) == set(ok["key"])  # the shards hold exactly the ok rows
    dups = df.filter(pl.col("failed_stage") == "duplicate")
    first = {r["sha256"]: r["key"] for r in ok.iter_rows(named=True)}
    for r in dups.iter_rows(named=True):  # each names the kept copy, which comes first
        assert r["error"] == f"duplicate pixels of {first[r['sha256']]}"
        assert df["key"].to_list().index(first[r["sha256"]]) < df["key"].to_list().index(r["key"])
    return dups


@pytest.mark.slow
def test_partitions_on_dask_workers_equal_one_thread_and_one_partition(tmp_path, prefect_harness):
    from distributed import LocalCluster

    store_url = str(tmp_path / "store")
    with ImageServer() as srv:
        sources = _sources(tmp_path, srv)
        common = {**SMALL, "allow_private_addresses": True, "retries": 0}
        whole = ingest_ref(store_url, sources, "whole", {**common, "partition_inputs": 1000})
        one = ingest_ref(store_url, sources, "one", {**common, "partition_inputs": 2})
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            two = ingest_ref(
                store_url,
                sources,
                "two",
                {
                    **common,
                    "partition_inputs": 2,
                    "executor": "dask",
                    "dask_address": cluster.scheduler_address,
                },
            )
    d_whole, i_whole, _, s_whole = _dataset(store_url, whole)
    d_one, i_one, tars_one, s_one = _dataset(store_url, one)
    d_two, i_two, tars_two, s_two = _dataset(store_url, two)
    assert (
        i_one["partitions"] > 6 and i_whole["partitions"] == 5
    )  # a listing each (the folder twice), a shard file each
    # threads and Dask workers: the same rows and byte-identical shards
    assert d_one.equals(d_two) and tars_one == tars_two
    # one partition or many: the same rows, buckets and pixels (shards are cut per partition)
    assert d_whole.select(ROW).equals(d_one.select(ROW))
    assert {b: v["count"] for b, v in i_whole["buckets"].items()} == {
        b: v["count"] for b, v in i_one["buckets"].items()
    }
    for df, samples in ((d_whole, s_whole), (d_one, s_one), (d_two, s_two)):
        dups = _check_consistent(df, samples)
        # two copies in the folder, the folder's second listing (10), the same URL twice (another caption)
        assert dups.height == 2 + 10 + 1, dups.select("key", "error")
        assert df.filter(pl.col("key").str.ends_with("-2")).height == 10  # the second listing's keys renamed
    assert {s: s_one[s]["jpg"] for s in s_one} == {s: s_whole[s]["jpg"] for s in s_whole}


@pytest.mark.slow
def test_reingest_copies_unchanged_partitions_and_equals_a_fresh_ingest(tmp_path, prefect_harness):
    store_url = str(tmp_path / "store")
    folder = _folder(tmp_path / "photos", n=24)
    opts = {**SMALL, "partition_inputs": 4}
    first = ingest_ref(store_url, [str(folder)], "d", opts)
    Image.fromarray(smooth_image(99, 96).astype(np.uint8)).save(folder / "img10b.png")  # in the middle
    (folder / "img10b.txt").write_text("a new one")
    store = ArtifactStore(store_url)
    parts = json.loads(store.read_bytes(first, "partitions.json"))["partitions"]
    tar = next(s["shard"] for p in parts[:1] for b in p["shards"].values() for s in b)
    path = store.path(store.resolve(first).prefix, tar)  # a shard of the first partition, tampered with
    data = bytearray(open(path, "rb").read())
    data[600] ^= 0xFF
    open(path, "wb").write(bytes(data))
    second = ingest_ref(store_url, [str(folder)], "d", opts)
    fresh = ingest_ref(store_url, [str(folder)], "fresh", opts)
    d2, _, tars2, s2 = _dataset(store_url, second)
    d3, _, tars3, _ = _dataset(store_url, fresh)
    assert d2.drop("reused").equals(d3.drop("reused")) and tars2 == tars3
    _check_consistent(d2, s2)
    new_parts = json.loads(store.read_bytes(second, "partitions.json"))["partitions"]
    kept = {p["fingerprint"] for p in parts} & {p["fingerprint"] for p in new_parts}
    assert (
        len(new_parts) - 3 <= len(kept) < len(new_parts)
    )  # one changed partition (two at a moved cut), one tampered
    # every unchanged partition is copied whole, but the tampered one and those the merge edited
    # (a copy of pixels another partition holds was taken out of their shards; where the cuts
    # fall depends on the folder's path, so which partitions those are does too)
    edited = {p["fingerprint"] for p in parts if p["edited"]}
    assert (
        not parts[0]["edited"] and parts[0]["fingerprint"] in kept
    )  # the tampered one would have been copied
    assert store.record(second)["summary"]["partitions_copied"] == len(kept - edited) - 1
    assert (
        d2["reused"].sum() >= 24 - 4 * 4 - 4
        and not d2.filter(pl.col("source").str.ends_with("img10b.png"))["reused"][0]
    )
    assert str(store.resolve(first)) in store.record(second)["parents"]

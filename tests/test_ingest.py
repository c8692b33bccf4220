"""Ingest: every input becomes exactly one manifest row; shards hold exactly the good ones."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from PIL import Image

from asd_models.buckets import asd_buckets
from tasks.ingest import IngestOptions, ingest_items, read_folder, sanitize_key
from tasks.store import ArtifactStore


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def make_messy_folder(root):
    """Good images in many modes plus one of each class of bad input."""
    root.mkdir()
    captions = {}
    _photo(300, 200, 1).save(root / "landscape.jpg")
    captions["landscape.jpg"] = "a wide field"
    _photo(200, 300, 2).convert("RGBA").save(root / "portrait_rgba.png")
    captions["portrait_rgba.png"] = "a tall tower"
    _photo(256, 256, 3).convert("P").save(root / "palette.png")
    captions["palette.png"] = "a square tile"
    _photo(320, 180, 4).convert("CMYK").save(root / "cmyk.jpg")
    captions["cmyk.jpg"] = "a cinema screen"
    Image.fromarray((np.arange(200 * 150).reshape(150, 200) * 2).astype(np.uint16)).save(root / "gray16.png")
    captions["gray16.png"] = "a gradient"
    _photo(160, 160, 5).convert("1").save(root / "bits.png")
    captions["bits.png"] = "black and white dots"
    # bad ones
    buf = io.BytesIO()
    _photo(300, 300, 6).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[:400])
    captions["truncated.jpg"] = "broken"
    _photo(40, 30, 7).save(root / "tiny.png")
    captions["tiny.png"] = "too small"
    _photo(200, 200, 8).save(root / "empty_caption.png")
    captions["empty_caption.png"] = "   "
    _photo(300, 200, 1).save(root / "dup.png")  # same pixels as landscape.jpg? no: jpeg is lossy
    _photo(300, 200, 1).save(root / "dup_of_dup.png")
    captions["dup.png"] = captions["dup_of_dup.png"] = "a copy"
    (root / "not_an_image.png").write_text("hello")
    captions["not_an_image.png"] = "text pretending"
    _photo(128, 128, 9).save(root / "no_caption.png")
    sub = root / "nested" / "..weird name?"
    sub.mkdir(parents=True)
    _photo(200, 130, 10).save(sub / "x.y.jpg")
    (sub / "x.y.txt").write_text("a sidecar caption")
    with open(root / "metadata.jsonl", "w") as f:
        for k, v in captions.items():
            f.write(json.dumps({"file_name": k, "text": v}) + "\n")
    return root


EXPECTED_FAILURES = {
    "truncated": "", "tiny": "too small", "empty_caption": "empty caption", "dup_of_dup": "duplicate",
    "not_an_image": "", "no_caption": "no caption",
}


def test_every_input_one_row_and_shards_match(tmp_path):
    folder = make_messy_folder(tmp_path / "in")
    items = read_folder(folder)
    store = ArtifactStore(str(tmp_path / "store"))
    writer = store.new_version("datasets", "messy")
    table, index = ingest_items(items, writer, IngestOptions(bucket_base=128, bucket_step=16), asd_buckets(128, 16))
    ref = writer.commit()
    df = pl.from_arrow(table)
    assert len(df) == len(items) == 14
    assert df["key"].n_unique() == len(df)
    failed = {k.split("-", 1)[1]: e for k, e in df.filter(pl.col("status") == "failed").select("key", "error").iter_rows()}
    assert set(failed) == set(EXPECTED_FAILURES)
    for k, needle in EXPECTED_FAILURES.items():
        assert needle in failed[k]
    for key in df["key"]:
        assert "/" not in key and ".." not in key and "." not in key and key.isprintable()
    ok = df.filter(pl.col("status") == "ok")
    assert (ok["width"] * ok["height"]).min() > 0 and ok["bucket"].null_count() == 0

    # real WebDataset reader over the shards: exactly the ok rows, each in its bucket's shard set
    seen = {}
    for bucket, info in index["buckets"].items():
        urls = [str(tmp_path / "store" / ref.prefix / s["shard"]) for s in info["shards"]]
        for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
            meta = sample["json"]
            assert meta["bucket"] == bucket
            assert sample["jpg"].size == tuple(int(v) for v in bucket.split("x"))
            seen[sample["__key__"]] = sample["txt"]
    assert set(seen) == set(ok["key"])
    assert dict(zip(ok["key"], ok["caption"], strict=True)) == seen
    assert store.verify(ref) == []


def test_landscape_and_portrait_land_in_their_buckets(tmp_path):
    folder = make_messy_folder(tmp_path / "in")
    store = ArtifactStore(str(tmp_path / "store"))
    table, _ = ingest_items(read_folder(folder), store.new_version("datasets", "d"), IngestOptions(),
                            asd_buckets(512, 64))
    df = pl.from_arrow(table).filter(pl.col("status") == "ok")
    by = {k.split("-", 1)[1]: (w, h) for k, w, h in df.select("key", "width", "height").iter_rows()}
    assert by["landscape"][0] > by["landscape"][1]
    assert by["portrait_rgba"][0] < by["portrait_rgba"][1]
    assert by["palette"][0] == by["palette"][1]


def test_decompression_bomb_guard(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(400, 400, 0).save(folder / "big.png")
    (folder / "big.txt").write_text("big")
    table, _ = ingest_items(read_folder(folder), ArtifactStore(str(tmp_path / "s")).new_version("datasets", "d"),
                            IngestOptions(max_pixels=100_000), asd_buckets())
    row = table.to_pylist()[0]
    assert row["status"] == "failed" and "too many pixels" in row["error"]


@pytest.mark.parametrize("raw", ["../../etc/passwd", "a/b\\c", "x\x00y\n", "...", "é日本"])
def test_keys_are_sanitized(raw):
    key = sanitize_key(raw, 7)
    assert key.startswith("000007-")
    assert all(c.isalnum() or c in "-_" for c in key) and key.isascii()


def test_bad_metadata_columns_are_named(tmp_path):
    (tmp_path / "metadata.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(ValueError, match="file_name and text"):
        read_folder(tmp_path)

"""Ingest: every input becomes exactly one manifest row; shards hold exactly the good ones."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from PIL import Image

from artifact_store import ArtifactStore
from data_engine.engine import sample_key
from data_engine.sources import FolderSource, open_source
from tasks.ingest import IngestSettings
from tests.image_server import ImageServer, jpeg_bytes
from tests.ingest_helpers import ingest_ref

SMALL = {"bucket_base": 128, "bucket_step": 16}
OPTS = IngestSettings().source_options()


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def photo_folder(folder, sizes, ext="png", prefix="p", caption="photo"):
    """`folder` with one random photo per size and a sidecar caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        _photo(w, h, i).save(folder / f"{prefix}{i}.{ext}")
        (folder / f"{prefix}{i}.txt").write_text(f"{caption} {i}")
    return folder


def ingest(tmp_path, sources, dataset="d", store_url=None, **opts):
    store_url = store_url or str(tmp_path / "store")
    ref = ingest_ref(
        store_url,
        [str(s) for s in sources],
        dataset,
        {**SMALL, **opts},
        rerun=opts.pop("rerun", False) if "rerun" in opts else False,
    )
    store = ArtifactStore(store_url)
    ref = store.resolve(ref)
    df = pl.read_parquet(io.BytesIO(store.read_bytes(ref, "manifest.parquet")))
    index = json.loads(store.read_bytes(ref, "bucket_index.json"))
    return df, index, ref, store


def read_shards(store, ref, index):
    """Every sample of every bucket through webdataset's own reader."""
    out = {}
    for bucket, info in index["buckets"].items():
        urls = [store.path(ref.prefix, s["shard"]) for s in info["shards"]]
        for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
            assert sample["json"]["bucket"] == bucket
            assert sample["jpg"].size == tuple(int(v) for v in bucket.split("x"))
            out[sample["__key__"]] = sample
    return out


def stem(key: str) -> str:
    return key.rsplit("-", 1)[0]


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
    _photo(180, 160, 11).convert("LA").save(root / "gray_alpha.png")
    captions["gray_alpha.png"] = "grey with alpha"
    _photo(190, 170, 12).save(root / "UPPER.JPEG")
    captions["UPPER.JPEG"] = "shouting extension"
    # bad ones
    buf = io.BytesIO()
    _photo(300, 300, 6).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[:400])
    captions["truncated.jpg"] = "broken"
    _photo(40, 30, 7).save(root / "tiny.png")
    captions["tiny.png"] = "too small"
    _photo(600, 100, 13).save(root / "strip.png")
    captions["strip.png"] = "a 6:1 strip"
    _photo(200, 200, 8).save(root / "empty_caption.png")
    captions["empty_caption.png"] = "   "
    _photo(300, 200, 1).save(root / "dup.png")
    _photo(300, 200, 1).save(root / "dup_of_dup.png")
    captions["dup.png"] = captions["dup_of_dup.png"] = "a copy"
    (root / "not_an_image.png").write_text("hello")
    captions["not_an_image.png"] = "text pretending"
    (root / "zero.jpg").write_bytes(b"")
    captions["zero.jpg"] = "nothing"
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    _photo(128, 128, 9).save(root / "no_caption.png")
    (root / "orphan.txt").write_text("a caption with no image")
    captions["gone.png"] = "listed but not there"
    captions["../outside.png"] = "escapes the folder"
    sub = root / "nested" / "..weird name?"
    sub.mkdir(parents=True)
    _photo(200, 130, 10).save(sub / "x.y.jpg")
    (sub / "x.y.txt").write_text("a sidecar caption")
    with open(root / "metadata.jsonl", "w") as f:
        for k, v in captions.items():
            f.write(json.dumps({"file_name": k, "text": v}) + "\n")
    return root


EXPECTED_FAILURES = {  # stem -> (stage, words in the error)
    "truncated": ("decode", "truncated"),
    "tiny": ("validate", "too small"),
    "strip": ("validate", "extreme aspect"),
    "empty_caption": ("caption", "empty caption"),
    "dup_of_dup": ("duplicate", "duplicate pixels of dup-"),
    "not_an_image": ("decode", "not an image"),
    "zero": ("decode", "empty file"),
    "DS_Store": ("decode", "not an image"),
    "no_caption": ("caption", "no caption"),
    "orphan": ("source", "caption file without an image"),
    "gone": ("source", "listed in metadata but missing"),
    "outside": ("source", "outside the source folder"),
}


def test_folder_every_input_one_row_and_shards_match(tmp_path):
    folder = make_messy_folder(tmp_path / "in")
    df, index, ref, store = ingest(tmp_path, [folder])
    assert len(df) == 22 and df["key"].n_unique() == len(df)
    failed = {
        stem(k): (s, e)
        for k, s, e in df.filter(pl.col("status") == "failed")
        .select("key", "failed_stage", "error")
        .iter_rows()
    }
    assert set(failed) == set(EXPECTED_FAILURES)
    for k, (stage, words) in EXPECTED_FAILURES.items():
        assert failed[k][0] == stage and words in failed[k][1].lower(), (k, failed[k])
    for key in df["key"]:
        assert all(c.isalnum() or c in "-_" for c in key) and key.isascii()
    ok = df.filter(pl.col("status") == "ok")
    assert ok.height == 10 and ok["bucket"].null_count() == 0
    samples = read_shards(store, ref, index)
    assert set(samples) == set(ok["key"])
    assert {k: s["txt"] for k, s in samples.items()} == dict(zip(ok["key"], ok["caption"], strict=True))
    assert index["total_ok"] == 10 and index["total_failed"] == 12
    assert sum(b["count"] for b in index["buckets"].values()) == 10
    for bucket, entry in index["buckets"].items():  # |log aspect(image) - log aspect(bucket)|, by hand
        rows = ok.filter(pl.col("bucket") == bucket)
        want = [
            abs(math.log(r["original_width"] / r["original_height"]) - math.log(r["width"] / r["height"]))
            for r in rows.iter_rows(named=True)
        ]
        assert rows["aspect_error"].to_list() == pytest.approx(want)
        assert entry["mean_aspect_error"] == pytest.approx(sum(want) / len(want))
    assert store.verify(ref) == []


def test_buckets_crop_box_and_exif_orientation(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(300, 200, 1).save(folder / "landscape.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    _photo(300, 200, 2).save(folder / "rotated.jpg", exif=exif.tobytes())
    _photo(256, 256, 3).save(folder / "square.png")
    for name in ("landscape", "rotated", "square"):
        (folder / f"{name}.txt").write_text(name)
    df, _, _, _ = ingest(tmp_path, [folder], bucket_base=512, bucket_step=64)
    by = {stem(r["key"]): r for r in df.iter_rows(named=True)}
    assert (by["landscape"]["original_width"], by["landscape"]["original_height"]) == (300, 200)
    assert by["landscape"]["width"] > by["landscape"]["height"]
    assert (by["rotated"]["original_width"], by["rotated"]["original_height"]) == (200, 300)
    assert by["rotated"]["width"] < by["rotated"]["height"]
    assert by["square"]["bucket"] == "512x512"
    for r in by.values():
        assert (
            r["crop_right"] - r["crop_left"] == r["width"] and r["crop_bottom"] - r["crop_top"] == r["height"]
        )
        assert r["crop_right"] <= r["cover_width"] and r["crop_bottom"] <= r["cover_height"]


def test_decompression_bomb_guard(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(400, 400, 0).save(folder / "big.png")
    (folder / "big.txt").write_text("big")
    Image.new("1", (6000, 6000)).save(folder / "huge.png")  # 36 MP in a few kB
    (folder / "huge.txt").write_text("huge")
    df, _, _, _ = ingest(tmp_path, [folder], max_pixels=100_000)
    assert df["status"].to_list() == ["failed", "failed"]
    assert all("too many pixels" in e for e in df["error"])


def test_caption_policy_keep(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(200, 200, 0).save(folder / "a.png")
    df, index, ref, store = ingest(tmp_path, [folder], empty_caption="keep")
    assert df["status"].to_list() == ["ok"] and df["caption"].to_list() == [""]
    assert [s["txt"] for s in read_shards(store, ref, index).values()] == [""]


def test_url_list_over_http_every_failure_has_its_reason(tmp_path):
    with ImageServer() as srv:
        local = tmp_path / "local.jpg"
        local.write_bytes(jpeg_bytes(200, 180, 3))
        rows = [
            (f"{srv.url}/img/1.jpg", "a good one"),
            (f"{srv.url}/img/2.jpg?w=200&h=400", "a tall one"),
            (f"{srv.url}/octet/3", "served as octet-stream"),
            (f"{srv.url}/missing.jpg", "404"),
            (f"{srv.url}/slow.jpg?sleep=3", "slow"),
            (f"{srv.url}/truncated.jpg", "cut short"),
            (f"{srv.url}/html.jpg", "a web page"),
            (f"{srv.url}/flaky/a.jpg?fail=2", "503 twice, then fine"),
            (f"{srv.url}/broken500.jpg", "always 500"),
            ("", "no url"),
            ("ftp://example.com/x.jpg", "unsupported"),
            (local.as_uri(), "a file:// URL"),
            ((tmp_path / "nope.jpg").as_uri(), "a missing file"),
        ]
        pl.DataFrame({"url": [r[0] for r in rows], "caption": [r[1] for r in rows]}).write_parquet(
            tmp_path / "urls.parquet"
        )
        df, index, ref, store = ingest(
            tmp_path,
            [tmp_path / "urls.parquet"],
            timeout_s=0.5,
            retries=2,
            backoff_s=0.05,
            allow_private_addresses=True,
            allow_schemes="http,https,file",
        )
        hits = dict(srv.hits)
    assert len(df) == len(rows)
    by = {r["caption"]: r for r in df.iter_rows(named=True)}
    for cap in (
        "a good one",
        "a tall one",
        "served as octet-stream",
        "503 twice, then fine",
        "a file:// URL",
    ):
        assert by[cap]["status"] == "ok", by[cap]
    assert by["a tall one"]["height"] > by["a tall one"]["width"]
    expect = {
        "404": "HTTP 404",
        "slow": "timed out",
        "cut short": "connection dropped",
        "a web page": "wrong content type 'text/html'",
        "always 500": "HTTP 500",
        "no url": "empty URL",
        "unsupported": "unsupported URL scheme 'ftp'",
        "a missing file": "not found",
    }
    for cap, words in expect.items():
        assert by[cap]["status"] == "failed" and words in by[cap]["error"], by[cap]
    assert by["cut short"]["failed_stage"] == "download"
    assert hits["/missing.jpg"] == 1  # a 404 is final
    assert hits["/broken500.jpg"] == 3 and hits["/flaky/a.jpg"] == 3  # 1 try + 2 retries
    assert set(read_shards(store, ref, index)) == set(df.filter(pl.col("status") == "ok")["key"])


def test_per_host_limit_is_respected(tmp_path):
    with ImageServer() as srv:
        urls = [f"{srv.url}/img/{i}.jpg?delay=0.3" for i in range(10)]
        (tmp_path / "urls.txt").write_text("\n".join(urls))
        df, _, _, _ = ingest(
            tmp_path,
            [tmp_path / "urls.txt"],
            per_host=2,
            download_concurrency=8,
            empty_caption="keep",
            allow_private_addresses=True,
        )
        assert srv.max_active == 2
    assert df["status"].to_list() == ["ok"] * 10


def _img2dataset_shard(path, start, n, bad=()):
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            key = f"{i:09d}"
            members = {
                "txt": f"caption {i}".encode(),
                "json": json.dumps({"url": f"http://x/{i}", "key": key, "status": "success"}).encode(),
            }
            if i not in bad:
                members["jpg"] = jpeg_bytes(160 + 10 * i, 120, i)
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_existing_shards_local_pattern_and_folder(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _img2dataset_shard(shards / "00000.tar", 0, 4, bad={2})
    _img2dataset_shard(shards / "00001.tar", 4, 3)
    (shards / "00001_stats.json").write_text("{}")
    pattern = str(shards / "{00000..00001}.tar")
    df, index, ref, store = ingest(tmp_path, [pattern])
    assert len(df) == 7
    bad = df.filter(pl.col("status") == "failed")
    assert (
        bad.height == 1 and "no image member" in bad["error"][0] and bad["source"][0].endswith("#000000002")
    )
    samples = read_shards(store, ref, index)
    assert sorted(s["txt"] for s in samples.values()) == sorted(f"caption {i}" for i in (0, 1, 3, 4, 5, 6))
    assert all(s["json"]["source_json"]["status"] == "success" for s in samples.values())
    # the img2dataset output folder itself is recognised as shards
    assert open_source(str(shards), None, OPTS).kind == "shards"
    # a cut-off shard: the samples before the cut are kept, the cut is one failed row
    data = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(data[: len(data) * 2 // 3])
    df2, _, _, _ = ingest(tmp_path, [pattern], dataset="cut")
    assert df2.filter(pl.col("error").str.contains("shard unreadable")).height == 1


def test_s3_sources_url_list_and_shards(tmp_path, s3_bucket, s3_server):
    import boto3

    bucket = s3_bucket[len("s3://") :].split("/")[0]
    client = boto3.client("s3", endpoint_url=s3_server)
    client.put_object(Bucket=bucket, Key="raw/a.jpg", Body=jpeg_bytes(240, 160, 1))
    _img2dataset_shard(tmp_path / "00000.tar", 0, 3)
    client.put_object(Bucket=bucket, Key="shards/00000.tar", Body=(tmp_path / "00000.tar").read_bytes())
    pl.DataFrame(
        {
            "url": [f"s3://{bucket}/raw/a.jpg", f"s3://{bucket}/raw/missing.jpg"],
            "text": ["from s3", "not there"],
        }
    ).write_csv(tmp_path / "list.csv")
    df, index, ref, store = ingest(
        tmp_path,
        [tmp_path / "list.csv", f"s3://{bucket}/shards/{{00000..00000}}.tar"],
        store_url=s3_bucket,
        retries=0,
        allow_schemes="s3",
        source_credentials="env",
    )
    by = {r["caption"]: r for r in df.iter_rows(named=True)}
    assert by["from s3"]["status"] == "ok" and "not found" in by["not there"]["error"], by["from s3"]["error"]
    assert df.filter(pl.col("status") == "ok").height == 4
    assert store.verify(ref) == []


def test_incremental_reuse_and_retry_failed(tmp_path):
    folder = photo_folder(tmp_path / "in", [(200 + 20 * i, 160) for i in range(3)])
    (folder / "broken.png").write_bytes(b"nope")
    (folder / "broken.txt").write_text("broken")
    df1, _, ref1, store = ingest(tmp_path, [folder])
    _, _, again, _ = ingest(tmp_path, [folder])
    assert again == ref1  # unchanged sources: no new version

    _photo(300, 150, 9).save(folder / "new.png")
    (folder / "new.txt").write_text("new photo")
    df2, index2, ref2, _ = ingest(tmp_path, [folder])
    assert ref2 != ref1 and len(df2) == 5
    assert df2.filter(pl.col("reused"))["key"].sort().to_list() == df1["key"].sort().to_list()
    assert df2.filter(~pl.col("reused"))["source"].to_list() == [str(folder / "new.png")]
    assert set(read_shards(store, ref2, index2)) == set(df2.filter(pl.col("status") == "ok")["key"])
    assert str(ref1) in store.record(ref2)["parents"]

    with ImageServer() as srv:
        urls = [f"{srv.url}/img/1.jpg", f"{srv.url}/flaky/b.jpg?fail=1"]
        pl.DataFrame({"url": urls, "caption": ["fine", "flaky"]}).write_parquet(tmp_path / "u.parquet")
        src = [tmp_path / "u.parquet"]
        d1, _, r1, _ = ingest(tmp_path, src, dataset="web", retries=0, allow_private_addresses=True)
        assert d1.filter(pl.col("caption") == "flaky")["failed_stage"].to_list() == ["download"]
        _, _, same, _ = ingest(tmp_path, src, dataset="web", retries=0, allow_private_addresses=True)
        assert same == r1 and srv.hits["/img/1.jpg"] == 1 and srv.hits["/flaky/b.jpg"] == 1
        ref = ingest_ref(
            str(tmp_path / "store"),
            [str(s) for s in src],
            "web",
            {**SMALL, "retries": 0, "allow_private_addresses": True},
            retry_failed=True,
        )
        d2 = pl.read_parquet(io.BytesIO(store.read_bytes(ref, "manifest.parquet")))
        assert d2["status"].to_list() == ["ok", "ok"]
        assert srv.hits["/img/1.jpg"] == 1 and srv.hits["/flaky/b.jpg"] == 2  # only the failed row again
        assert (
            ingest_ref(
                str(tmp_path / "store"),
                [str(s) for s in src],
                "web",
                {**SMALL, "retries": 0, "allow_private_addresses": True},
                retry_failed=True,
            )
            == ref
        )  # nothing left to retry


def test_worker_processes_give_the_same_dataset(tmp_path):
    folder = photo_folder(tmp_path / "in", [(150 + 30 * i, 200) for i in range(8)], ext="jpg")
    one, _, r1, store = ingest(tmp_path, [folder], dataset="one", workers=1)
    two, _, r2, _ = ingest(tmp_path, [folder], dataset="two", workers=2)
    assert one.drop("reused").equals(two.drop("reused"))
    rec1, rec2 = store.record(r1)["files"], store.record(r2)["files"]
    assert {k: v["sha256"] for k, v in rec1.items() if k.endswith(".tar")} == {
        k: v["sha256"] for k, v in rec2.items() if k.endswith(".tar")
    }


def test_shard_limits_and_wids_index(tmp_path):
    import wids

    folder = photo_folder(tmp_path / "in", [(200, 200)] * 5, prefix="s", caption="square")
    df, index, ref, store = ingest(tmp_path, [folder], shard_max_samples=2)
    shards = index["buckets"]["128x128"]["shards"]
    assert [s["count"] for s in shards] == [2, 2, 1]
    for rel in ("wids-index.json", "buckets/128x128/wids-index.json"):
        ds = wids.ShardListDataset(store.path(ref.prefix, rel), keep=True)
        assert len(ds) == 5
        keys = {ds[i]["__key__"] for i in range(len(ds))}
        assert keys == set(df["key"])
        assert ds[0][".txt"].startswith("square")


@pytest.mark.parametrize(
    "raw", ["../../etc/passwd", "a/b\\c", "x\x00y\n", "...", "é日本", "..", ".hidden.png", ""]
)
def test_keys_are_sanitized(raw):
    key = sample_key(raw, "fingerprint")
    assert all(c.isalnum() or c in "-_" for c in key) and key.isascii()
    assert ".." not in key and "/" not in key and len(key) <= 64
    assert key != sample_key(raw, "other fingerprint")


def test_metadata_in_subfolders_and_unusable_metadata(tmp_path):
    """diffusers ImageFolder: a metadata file per folder, names relative to it; a metadata file
    without the columns is a failed row and its folder falls back to sidecar captions."""
    root = tmp_path / "in"
    photo_folder(root / "train", [(200, 200), (240, 200)], caption="unused sidecar")
    (root / "train" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "p0.png", "text": "from train metadata"})
        + "\n"
        + json.dumps({"file_name": "../top.png", "text": "one level up"})
        + "\n"
    )
    _photo(220, 220, 7).save(root / "top.png")
    photo_folder(root / "val", [(200, 260)], prefix="v", caption="sidecar")
    (root / "val" / "metadata.csv").write_text("image,caption\nv0.png,x\n")
    recs = list(FolderSource(root, OPTS).records())
    by = {r.source.rsplit("/", 1)[-1]: r for r in recs}
    assert by["p0.png"].caption == "from train metadata" and by["p1.png"].caption == "unused sidecar 1"
    assert by["top.png"].caption == "one level up" and by["v0.png"].caption == "sidecar 0"
    assert "file_name and text" in by["metadata.csv"].error
    assert "metadata.jsonl" not in by


def test_unknown_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        open_source(str(tmp_path / "nowhere"), None, OPTS)
    (tmp_path / "list.xlsx").write_bytes(b"x")
    with pytest.raises(ValueError, match="list.xlsx"):
        open_source(str(tmp_path / "list.xlsx"), None, OPTS)
    (tmp_path / "l.csv").write_text("link,caption\nhttp://x,y\n")
    with pytest.raises(ValueError, match="no URL column"):
        open_source(str(tmp_path / "l.csv"), None, OPTS)


def test_hostile_listing_names_and_broken_metadata_lines(tmp_path):
    import os

    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.fsencode(str(folder)) + b"/caf\xe9 \x01.png"  # not UTF-8, a control character
    _photo(200, 200, 1).save(raw.decode("utf-8", "surrogateescape"))
    _photo(220, 200, 2).save(folder / "good.png")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "good.png", "text": "fine"})
        + "\n{not json\n[1, 2]\n"
        + json.dumps(
            {
                "file_name": "caf\udce9 \x01.png".encode("utf-8", "surrogateescape").decode(
                    "utf-8", "replace"
                ),
                "text": "accent",
            }
        )
        + "\n"
    )
    df, index, ref, store = ingest(tmp_path, [folder])
    assert len(df) == 5  # two images, two bad lines, and the metadata row whose name cannot match
    assert df.filter(pl.col("error").str.contains("not a JSON object")).height == 2
    assert "fine" in df.filter(pl.col("status") == "ok")["caption"].to_list()
    for key in df["key"]:
        assert all(c.isalnum() or c in "-_" for c in key)


def test_links_pipes_and_empty_sources(tmp_path):
    import os

    folder = photo_folder(tmp_path / "in", [(200, 200)])
    os.mkfifo(folder / "pipe.png")  # reading it would block forever
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    other = photo_folder(tmp_path / "elsewhere", [(300, 200)], prefix="q")
    (folder / "linked").symlink_to(other, target_is_directory=True)
    (other / "loop").symlink_to(folder, target_is_directory=True)  # a loop back: walked once
    df, _, _, _ = ingest(tmp_path, [folder])
    by = {r["source"].rsplit("/", 1)[-1]: r for r in df.iter_rows(named=True)}
    assert by["p0.png"]["status"] == "ok" and "q0.png" not in by
    assert "not a regular file" in by["pipe.png"]["error"]
    assert "cannot stat" in by["dangling.png"]["error"]
    assert "folder link to outside the source folder" in by["linked"]["error"]
    assert len(df) == 4
    # widened by the explicit flag: the linked folder is walked, its loop back only once
    df, _, _, _ = ingest(tmp_path, [folder], dataset="wide", follow_links_outside=True)
    by = {r["source"].rsplit("/", 1)[-1]: r for r in df.iter_rows(named=True)}
    assert by["p0.png"]["status"] == "ok" and by["q0.png"]["status"] == "ok"
    assert len(df) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="hold no inputs"):
        ingest(tmp_path, [tmp_path / "empty"], dataset="e")


def test_cli_names_a_bad_source_in_one_line(tmp_path, capsys):
    from flows.cli import main

    rc = main(["--store", str(tmp_path / "s"), "ingest", str(tmp_path / "typo"), "--dataset", "d"])
    assert rc == 2 and "no such file or folder" in capsys.readouterr().err

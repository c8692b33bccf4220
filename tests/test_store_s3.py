"""The store against a real S3-compatible server (moto, on 127.0.0.1), bucket versioning on."""

from __future__ import annotations

import boto3
import pytest

from artifact_store import ArtifactStore, VersionNotFound
from flows.cli import main as asd_main


def test_s3_commit_verify_and_latest(s3_bucket, s3_server):
    store = ArtifactStore(s3_bucket)
    assert store.protocol == "s3"
    w = store.new_version("datasets", "d")
    w.put_bytes("manifest.parquet", b"p" * 1000)
    with w.open("buckets/64x64/000000.tar") as f:
        f.write(b"t" * 5000)
    # uncommitted: invisible
    with pytest.raises(VersionNotFound):
        store.resolve("datasets/d@latest")
    ref = w.commit(params={"a": 1})
    assert store.resolve("datasets/d@latest") == ref
    assert store.verify(ref) == []
    assert store.file_uri(ref, "manifest.parquet").startswith("s3://")

    # one flipped byte, written straight to the bucket, is caught
    bucket, _, prefix = s3_bucket[len("s3://") :].partition("/")
    key = f"{prefix}/{ref.prefix}/manifest.parquet"
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=bucket, Key=key, Body=b"p" * 999 + b"q")
    ArtifactStore(s3_bucket).fs.invalidate_cache()
    problems = ArtifactStore(s3_bucket).verify(ref)
    assert len(problems) == 1 and "manifest.parquet" in problems[0]
    assert asd_main(["--store", s3_bucket, "store", "verify"]) == 1


def test_s3_two_writers_both_commit(s3_bucket):
    a = ArtifactStore(s3_bucket).new_version("models", "m")
    b = ArtifactStore(s3_bucket).new_version("models", "m")
    a.put_bytes("w", b"a")
    b.put_bytes("w", b"b")
    ra, rb = b.commit(), a.commit()
    store = ArtifactStore(s3_bucket)
    store.fs.invalidate_cache()
    assert sorted(store.list_versions("models", "m")) == sorted([ra, rb])
    assert store.resolve("models/m@latest") == max(ra, rb)


def test_s3_cold_open_of_one_file_of_a_large_version_is_four_gets(s3_bucket, monkeypatch):
    """A version whose file list lives in Parquet parts (several parts, several row groups each):
    a fresh reader opens one file with the record, the part's footer, one row group and the file
    itself, and reads a tar member with one ranged GET more."""
    import artifact_store.file_lists as fl
    from tests.helpers import S3Requests

    monkeypatch.setattr(fl, "GROUP_ROWS", 8)
    monkeypatch.setattr(fl, "PART_ROWS", 32)
    monkeypatch.setattr(
        "artifact_store.backend.MATCH_WINDOW", 4
    )  # the commit's and verify's listing matched in a window
    store = ArtifactStore(s3_bucket)
    w = store.new_version("generations", "big")
    for row in range(80):
        rel = f"images/{row:06d}-64x64-abc.png"
        w.add_files({rel: w.put_bytes(rel, f"pixels of {row}".encode())}, row=row)
        del w.files[rel]  # listed in the parts, not in the record
    tar = w.put_bytes("shards/rows-000080-000081.tar", b"header" + b"member bytes" + b"end")
    del w.files["shards/rows-000080-000081.tar"]
    w.add_files({"shards/rows-000080-000081.tar": tar}, row=80)
    ref = w.commit()
    record = store.record(ref)
    assert len(record["file_lists"]) == 3 and record["file_count"] == 81 + 3  # the parts are files too

    fl._GROUPS.clear()
    requests = S3Requests()
    try:
        before = requests.snapshot()
        assert ArtifactStore(s3_bucket).read_bytes(ref, "images/000045-64x64-abc.png") == b"pixels of 45"
        assert requests.since(before, requests.snapshot()) == {"GET": 4}
        fl._GROUPS.clear()
        before = requests.snapshot()
        assert (
            ArtifactStore(s3_bucket).read_range(ref, "shards/rows-000080-000081.tar", 6, 18)
            == b"member bytes"
        )
        assert requests.since(before, requests.snapshot()) == {"GET": 4}
    finally:
        requests.close()
    assert store.verify(ref, shallow=True) == []  # one streamed listing against the parts
    store.fs.rm_file(store.path(ref.prefix, "images/000070-64x64-abc.png"))
    assert ArtifactStore(s3_bucket).verify(ref, shallow=True) == [
        f"{ref}: images/000070-64x64-abc.png: missing"
    ]


def test_s3_credentials_from_a_prefect_secret_block(prefect_harness, monkeypatch):
    """$ASD_STORE_BLOCK names a Prefect Secret block holding a JSON object of s3fs options;
    they are merged into the store's options. A block holding anything else is refused by
    name, without its value in the message."""
    from prefect.blocks.system import Secret

    from artifact_store.refs import StoreError
    from artifact_store.s3_options import s3_storage_options

    Secret(value={"key": "AKIAEXAMPLE", "secret": "s3cr3t"}).save("asd-store-test", overwrite=True)
    monkeypatch.setenv("ASD_STORE_BLOCK", "asd-store-test")
    opts = s3_storage_options()
    assert opts["key"] == "AKIAEXAMPLE" and opts["secret"] == "s3cr3t"
    assert opts["config_kwargs"], "the store's own options stay"

    Secret(value="not-an-object").save("asd-store-bad", overwrite=True)
    monkeypatch.setenv("ASD_STORE_BLOCK", "asd-store-bad")
    with pytest.raises(StoreError, match="asd-store-bad.*JSON object") as err:
        s3_storage_options()
    assert "not-an-object" not in str(err.value)

    monkeypatch.setenv("ASD_STORE_BLOCK", "no-such-block")
    with pytest.raises(StoreError, match="cannot load the Prefect Secret block 'no-such-block'"):
        s3_storage_options()

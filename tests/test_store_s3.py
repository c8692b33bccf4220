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
    bucket, _, prefix = s3_bucket[len("s3://"):].partition("/")
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

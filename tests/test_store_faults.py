"""Writers killed (SIGKILL) at every phase of a commit, on a local folder and on S3: readers
see the previous state or the whole new version, never a part; gc finds the leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from artifact_store import ArtifactStore

REPO = Path(__file__).resolve().parent.parent
PHASES = [
    "during-upload",
    "between-files",
    "before-commit-record",
    "during-commit-record",
    "before-catalog",
    "before-latest",
]
COMMITTED_BEFORE_DEATH = {"before-catalog", "before-latest"}

WRITER = """
import sys
from artifact_store import ArtifactStore
w = ArtifactStore(sys.argv[1]).new_version("models", "m")
w.put_bytes("a.bin", b"new-a" * 20000)
w.put_bytes("b.bin", b"new-b" * 20000)
w.commit(params={"try": 2})
print("COMMITTED", w.ref)
"""


def _first_version(url: str):
    w = ArtifactStore(url).new_version("models", "m")
    w.put_bytes("a.bin", b"old")
    return w.commit(params={"try": 1})


def _run_killed_writer(url: str, phase: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ASD_FAULT_AT": phase, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", WRITER, url], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )


def _check_reader_view(url: str, first, phase: str, object_store: bool = False) -> None:
    store = ArtifactStore(url)
    store.fs.invalidate_cache()
    versions = store.list_versions("models", "m")
    latest = store.resolve("models/m@latest")
    if phase in COMMITTED_BEFORE_DEATH:
        assert len(versions) == 2  # the commit record was written: the whole new version is there
        new = [v for v in versions if v != first][0]
        assert store.verify(new) == []
        assert store.read_bytes(new, "b.bin") == b"new-b" * 20000
        assert latest in (first, new)
        if phase == "before-catalog":
            assert str(new) not in store.catalog()["ref"].to_pylist()
            assert str(new) in store.catalog(rebuild=True)["ref"].to_pylist()
    else:
        assert versions == [first]
        assert latest == first
        assert store.read_bytes(latest, "a.bin") == b"old"
        leftovers = store.gc(grace_s=0)
        # an S3 object killed mid-upload never exists at all (PUT/multipart not completed)
        assert leftovers or (object_store and phase == "during-upload")
        assert all(first.version not in p for p in leftovers)
        store.gc(grace_s=0, delete=True)
        store.fs.invalidate_cache()
        assert store.gc(grace_s=0) == []
        assert store.list_versions("models", "m") == [first] and store.verify(first) == []


@pytest.mark.parametrize("phase", PHASES)
def test_killed_writer_local(tmp_path, phase):
    url = str(tmp_path / "store")
    first = _first_version(url)
    proc = _run_killed_writer(url, phase)
    assert proc.returncode == -9, proc.stderr[-2000:]
    if phase == "during-upload":  # a file is whole or absent: the half-written one has a temporary name
        new = [
            p.name
            for p in (tmp_path / "store" / "models" / "m").rglob("*")
            if p.is_file() and first.version not in str(p) and p.name != "LATEST"
        ]
        assert new and all(n.startswith("a.bin.") and n.endswith(".tmp") for n in new), new
    _check_reader_view(url, first, phase)


@pytest.mark.parametrize("phase", PHASES)
def test_killed_writer_s3(s3_bucket, phase):
    first = _first_version(s3_bucket)
    proc = _run_killed_writer(s3_bucket, phase)
    assert proc.returncode == -9, proc.stderr[-2000:]
    _check_reader_view(s3_bucket, first, phase, object_store=True)


def test_gc_respects_the_grace_period(tmp_path):
    store = ArtifactStore(str(tmp_path))
    w = store.new_version("datasets", "d")
    w.put_bytes("x", b"1")
    assert store.gc(grace_s=3600) == []
    assert len(store.gc(grace_s=0)) == 1


def test_server_stopped_mid_upload_leaves_previous_state(monkeypatch):
    """A multipart upload cut off by the server going away: the writer fails, nothing is visible."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from tests.helpers import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("ASD_S3_RETRIES", "1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="midupload")
    s3fs.S3FileSystem.clear_instance_cache()
    url = "s3://midupload/store"
    first = _first_version(url)
    w = ArtifactStore(url).new_version("models", "m")
    with pytest.raises(Exception):  # noqa: B017 - any connection error is the point
        with w.open("big.bin") as f:
            f.write(b"x" * (17 << 20))  # first multipart part goes out
            threading.Thread(target=server.stop).start()
            f.write(b"y" * (17 << 20))
        w.commit()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        store = ArtifactStore(url)
        assert store.list_versions("models", "m") == [first]
        assert store.resolve("models/m@latest") == first
        assert store.verify(first) == []
    finally:
        server.stop()

"""What a rerun finds in a pending version is checked before it is trusted, and gc never takes a
version a job is writing: a truncated, edited or injected per-image record means "render it
again"; a version written within the grace period is not a leftover, whatever its id says."""

from __future__ import annotations

import hashlib
import json
import os
import time

from artifact_store import ArtifactRef, ArtifactStore, PendingVersion
from tasks.generate import ShardOutput, _resumed

KEY = "000001-64x64-abcdef012345"


def _finished_image(store: ArtifactStore, pending: PendingVersion, png: bytes = b"\x89PNG pixels") -> dict:
    writer = store.writer(pending)
    meta = writer.put_bytes(f"images/{KEY}.png", png)
    heat = writer.put_bytes(f"images/{KEY}.seams.png", b"heat")
    record = {"row": {"key": KEY, "image": f"images/{KEY}.png", "prompt": "a cat"}, "file": meta,
              "extra": {f"images/{KEY}.seams.png": heat}}
    writer.put_bytes(f"images/{KEY}.json", json.dumps(record).encode())
    return record


def _write(store: ArtifactStore, pending: PendingVersion, rel: str, data: bytes) -> None:
    path = store.path(pending.ref.prefix, rel)
    store.ensure_parent(path)
    store.fs.pipe_file(path, data)


def test_a_rerun_takes_only_intact_images_of_their_own_key(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    pending = store.resume_or_new("generations", "g", "h")
    record = _finished_image(store, pending)
    out = ShardOutput()
    assert _resumed(store, pending, KEY, out) and out.rows == [record["row"]]

    evil = b"<script>alert(1)</script>"  # an injected page, listed with its correct hash
    _write(store, pending, "images/evil.html", evil)
    injected = {**record, "extra": {**record["extra"], "images/evil.html": {
        "sha256": hashlib.sha256(evil).hexdigest(), "size": len(evil)}}}
    _write(store, pending, f"images/{KEY}.json", json.dumps(injected).encode())
    assert not _resumed(store, pending, KEY, ShardOutput())

    _write(store, pending, f"images/{KEY}.json", json.dumps(record).encode()[:40])  # truncated by a kill
    assert not _resumed(store, pending, KEY, ShardOutput())

    _write(store, pending, f"images/{KEY}.json", json.dumps(record).encode())
    _write(store, pending, f"images/{KEY}.png", b"\x89PNG other pixels!")  # swapped image
    assert not _resumed(store, pending, KEY, ShardOutput())


def test_gc_never_takes_a_version_written_within_the_grace_period(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    old_id = "20200101T000000.000000Z-aaaaaaaa"  # a job first started long ago, resumed now
    pending = PendingVersion(ArtifactRef("generations", "g", old_id), "h")
    store.write_atomic(store.path(pending.ref.prefix, "_PENDING.json"), b'{"input_hash": "h"}')
    _finished_image(store, pending)
    assert store.gc(grace_s=3600) == []  # its files were written a moment ago
    past = time.time() - 7200
    for path in store.fs.find(store.path(pending.ref.prefix)):
        os.utime(path, (past, past))
    assert store.gc(grace_s=3600, delete=True) == [store.path(pending.ref.prefix)]  # abandoned: removed
    assert not store.fs.exists(store.path(pending.ref.prefix))

"""What a rerun finds in a pending version is checked before it is trusted, and gc never takes a
version a job is writing: a truncated fragment, an image whose file was swapped, a fragment that
lists an injected file: each means "render it again"; a version written within the grace period
is not a leftover, whatever its id says."""

from __future__ import annotations

import hashlib
import os
import time

from artifact_store import ArtifactRef, ArtifactStore, PendingVersion
from artifact_store.fragment_log import fragment_path, rows_id
from tasks.fragments import finished_entries, list_fragments, write_fragment

KEYS = {1: "000001-64x64-abcdef012345", 2: "000002-64x64-abcdef012345"}


def _finished_chunk(store: ArtifactStore, pending: PendingVersion) -> list[dict]:
    writer = store.writer(pending)
    entries = []
    for row, key in KEYS.items():
        files = [
            {
                "path": f"images/{key}.png",
                **writer.put_bytes(f"images/{key}.png", b"\x89PNG pixels %d" % row),
            },
            {"path": f"images/{key}.seams.png", **writer.put_bytes(f"images/{key}.seams.png", b"heat")},
        ]
        entries.append(
            {
                "key": key,
                "row": row,
                "prompt": "a cat",
                "status": "ok",
                "image": f"images/{key}.png",
                "files": files,
            }
        )
    write_fragment(store, pending, 0, 32, entries)
    return entries


def _write(store: ArtifactStore, pending: PendingVersion, rel: str, data: bytes) -> None:
    path = store.path(pending.ref.prefix, rel)
    store.ensure_parent(path)
    store.fs.pipe_file(path, data)


def _taken(store: ArtifactStore, pending: PendingVersion) -> set[int]:
    expected = {row: {"key": key, "prompt": "a cat"} for row, key in KEYS.items()}
    return set(finished_entries(store, pending, list_fragments(store, pending), expected, 0, 32)[0])


def test_a_rerun_takes_only_intact_images_of_their_own_key(tmp_path, caplog):
    store = ArtifactStore(str(tmp_path / "store"))
    pending = store.resume_or_new("generations", "g", "h")
    entries = _finished_chunk(store, pending)
    assert _taken(store, pending) == {1, 2}

    evil = b"<script>alert(1)</script>"  # an injected page, listed with its correct hash
    _write(store, pending, "images/evil.html", evil)
    entries[1]["files"].append(
        {"path": "images/evil.html", "sha256": hashlib.sha256(evil).hexdigest(), "size": len(evil)}
    )
    write_fragment(store, pending, 0, 32, entries)
    assert _taken(store, pending) == {1}
    assert "not a file of this image" in caplog.text

    entries[1]["files"].pop()
    entries[0]["prompt"] = "a forged prompt"  # a field the job decides, edited in the fragment
    write_fragment(store, pending, 0, 32, entries)
    assert _taken(store, pending) == {2}
    assert "its fragment's prompt is not this job's" in caplog.text

    entries[0]["prompt"] = "a cat"
    write_fragment(store, pending, 0, 32, entries)
    _write(store, pending, f"images/{KEYS[1]}.png", b"\x89PNG other pixels!")  # swapped image
    assert _taken(store, pending) == {2}

    rel = fragment_path("rows", rows_id(0, 32))
    _write(
        store, pending, rel, store.fs.cat_file(store.path(pending.ref.prefix, rel))[:40]
    )  # cut by a full disk
    assert _taken(store, pending) == set()
    assert f"{rel} of {pending.ref} does not read" in caplog.text


def test_gc_never_takes_a_version_written_within_the_grace_period(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    old_id = "20200101T000000.000000Z-aaaaaaaa"  # a job first started long ago, resumed now
    pending = PendingVersion(ArtifactRef("generations", "g", old_id), "h")
    store.write_atomic(store.path(pending.ref.prefix, "_PENDING.json"), b'{"input_hash": "h"}')
    _finished_chunk(store, pending)
    assert store.gc(grace_s=3600) == []  # its files were written a moment ago
    past = time.time() - 7200
    for path in store.fs.find(store.path(pending.ref.prefix)):
        os.utime(path, (past, past))
    assert store.gc(grace_s=3600, delete=True) == [store.path(pending.ref.prefix)]  # abandoned: removed
    assert not store.fs.exists(store.path(pending.ref.prefix))

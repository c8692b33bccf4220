"""The artifact store: commits are atomic, versions immutable, verify catches corruption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from artifact_store import (
    COMMIT_RECORD,
    ArtifactRef,
    ArtifactStore,
    CorruptRecord,
    InvalidReference,
    StoreError,
    VersionNotFound,
)
from flows.cli import main as asd_main


def _commit(store: ArtifactStore, name: str = "d", payload: bytes = b"hello", parents=None) -> ArtifactRef:
    w = store.new_version("datasets", name)
    w.put_bytes("a/file.bin", payload)
    w.put_bytes("manifest.parquet", b"x" * 10)
    return w.commit(parents=parents or [], params={"p": 1})


def test_commit_then_read_back(tmp_path):
    store = ArtifactStore(str(tmp_path / "s"))
    ref = _commit(store)
    assert store.resolve("datasets/d@latest") == ref
    assert store.read_bytes(ref, "a/file.bin") == b"hello"
    rec = store.record(ref)
    assert rec["files"]["a/file.bin"]["size"] == 5
    assert rec["params"] == {"p": 1}
    assert rec["code_version"]
    assert store.verify(ref) == []


def test_versions_are_sortable_and_latest_moves_forward(tmp_path):
    store = ArtifactStore(str(tmp_path))
    refs = [_commit(store, payload=bytes([i])) for i in range(3)]
    assert store.list_versions("datasets", "d") == sorted(refs)
    assert store.resolve(ArtifactRef("datasets", "d", "latest")) == refs[-1]
    assert [r.version for r in refs] == sorted(r.version for r in refs)


def test_version_invisible_until_commit_record(tmp_path):
    store = ArtifactStore(str(tmp_path))
    first = _commit(store)
    w = store.new_version("datasets", "d")
    w.put_bytes("big.bin", b"0" * 1000)
    # files are on disk, but no commit record: nobody sees the version
    assert store.list_versions("datasets", "d") == [first]
    assert store.resolve("datasets/d@latest") == first
    with pytest.raises(VersionNotFound):
        store.resolve(w.ref)


def test_writer_killed_before_commit_leaves_previous_state(tmp_path):
    store = ArtifactStore(str(tmp_path))
    first = _commit(store)
    script = f"""
import os, signal
from artifact_store import ArtifactStore
w = ArtifactStore({str(tmp_path)!r}).new_version("datasets", "d")
w.put_bytes("part-0.bin", b"1" * 100000)
with w.open("part-1.bin") as f:
    f.write(b"2" * 50000)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    assert proc.returncode == -9
    leftovers = [p for p in (tmp_path / "datasets" / "d").iterdir() if p.is_dir() and p.name != first.version]
    assert leftovers, "the killed writer should have left files behind"
    assert store.list_versions("datasets", "d") == [first]
    assert store.resolve("datasets/d@latest") == first


def test_damaged_commit_record_is_an_error_never_absent(tmp_path, capsys):
    """One byte cut from the newest commit record: @latest fails (no silent fall-back to the
    previous version), verify reports it and exits 1, gc never lists the version."""
    store = ArtifactStore(str(tmp_path))
    _commit(store)
    newest = _commit(store, payload=b"second")
    record = tmp_path / newest.prefix / COMMIT_RECORD
    record.write_bytes(record.read_bytes()[:-1])
    fresh = ArtifactStore(str(tmp_path))
    with pytest.raises(CorruptRecord, match="damaged"):
        fresh.resolve("datasets/d@latest")
    assert newest in fresh.list_versions("datasets", "d")
    assert any("damaged" in p for p in fresh.verify(newest))
    assert asd_main(["--store", str(tmp_path), "store", "verify"]) == 1
    assert "damaged" in capsys.readouterr().out
    assert fresh.gc(grace_s=0) == []


def test_tampered_commit_record_cannot_write_or_read_outside(tmp_path):
    """A record listing ../ paths (a shared bucket, edited) is refused before any file is touched."""
    import json

    store = ArtifactStore(str(tmp_path / "store"))
    ref = _commit(store)
    record = tmp_path / "store" / ref.prefix / COMMIT_RECORD
    rec = json.loads(record.read_text())
    rec["files"]["../../../../escaped.txt"] = {"sha256": "0" * 64, "size": 1}
    record.write_text(json.dumps(rec))
    fresh = ArtifactStore(str(tmp_path / "store"))
    dest = tmp_path / "cache" / "deep" / "dest"
    with pytest.raises(CorruptRecord, match="unsafe path"):
        fresh.download(ref, dest)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert any("unsafe path" in p for p in fresh.verify(ref))


def test_verify_catches_one_flipped_byte(tmp_path, capsys):
    store = ArtifactStore(str(tmp_path))
    ref = _commit(store, payload=b"abcdefgh" * 100)
    path = tmp_path / ref.prefix / "a" / "file.bin"
    data = bytearray(path.read_bytes())
    data[123] ^= 0x01
    path.write_bytes(bytes(data))
    problems = store.verify(ref)
    assert len(problems) == 1 and "a/file.bin" in problems[0] and "sha256" in problems[0]
    assert asd_main(["--store", str(tmp_path), "store", "verify", str(ref)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_verify_reports_missing_and_truncated_files(tmp_path):
    store = ArtifactStore(str(tmp_path))
    ref = _commit(store)
    (tmp_path / ref.prefix / "a" / "file.bin").unlink()
    (tmp_path / ref.prefix / "manifest.parquet").write_bytes(b"x")
    problems = store.verify(ref)
    assert any("missing" in p for p in problems)
    assert any("size 1 != recorded 10" in p for p in problems)


def test_two_concurrent_writers_never_collide(tmp_path):
    store = ArtifactStore(str(tmp_path))
    refs: list[ArtifactRef] = []
    barrier = threading.Barrier(8)

    def write(i: int) -> None:
        barrier.wait()
        w = ArtifactStore(str(tmp_path)).new_version("models", "m")
        w.put_bytes("weights.bin", bytes([i]) * 1000)
        refs.append(w.commit())

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.version for r in refs}) == 8
    assert sorted(refs) == store.list_versions("models", "m")
    assert store.resolve("models/m@latest") in refs
    for r in refs:
        assert store.verify(r) == []


def test_versions_are_immutable(tmp_path):
    store = ArtifactStore(str(tmp_path))
    w = store.new_version("datasets", "d")
    w.put_bytes("f", b"1")
    with pytest.raises(StoreError, match="written once"):
        w.put_bytes("f", b"2")
    w.commit()
    with pytest.raises(StoreError, match="immutable"):
        w.put_bytes("g", b"3")
    with pytest.raises(StoreError, match="read-only"):
        store.open(w.ref, "f", "wb")


@pytest.mark.parametrize("bad", ["../escape", "a/../../b", "/", "", COMMIT_RECORD])
def test_file_paths_cannot_escape_the_version(tmp_path, bad):
    w = ArtifactStore(str(tmp_path)).new_version("datasets", "d")
    with pytest.raises(InvalidReference):
        w.put_bytes(bad, b"x")


@pytest.mark.parametrize(
    "bad",
    ["datasets", "nokind/x@latest", "datasets/x@notaversion", "datasets/../x@latest", "datasets/a b@latest"],
)
def test_bad_references_are_rejected_with_a_message(bad):
    with pytest.raises(InvalidReference, match="bad|unknown"):
        ArtifactRef.parse(bad)


def test_lineage_and_show(tmp_path, capsys):
    store = ArtifactStore(str(tmp_path))
    d = _commit(store)
    w = store.new_version("models", "m")
    w.put_bytes("unet.safetensors", b"w")
    m = w.commit(parents=[d])
    lineage = store.lineage("models/m@latest")
    assert [r["ref"] for r in lineage] == [str(m), str(d)]
    assert asd_main(["--store", str(tmp_path), "store", "show", "models/m"]) == 0
    out = capsys.readouterr().out
    assert str(d) in out and json.loads(out.split("\nLineage:")[0])["ref"] == str(m)
    assert asd_main(["--store", str(tmp_path), "store", "ls"]) == 0
    assert str(m) in capsys.readouterr().out


def test_unknown_reference_exits_with_message(tmp_path, capsys):
    assert asd_main(["--store", str(tmp_path), "store", "show", "models/nothing"]) == 2
    assert "no committed version of models/nothing" in capsys.readouterr().err


def test_store_url_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ASD_STORE", str(tmp_path / "env-store"))
    store = ArtifactStore()
    _commit(store)
    assert (tmp_path / "env-store" / "datasets" / "d" / "LATEST").is_file()


def test_shallow_verify_reads_no_file_and_still_finds_overwrites_and_losses(tmp_path, capsys):
    import time as _time

    from flows.cli import main as asd_main

    store = ArtifactStore(str(tmp_path))
    w = store.new_version("models", "m")
    for i in range(40):
        w.put_bytes(f"f/{i}.bin", b"x" * i)
    ref = w.commit()
    assert store.verify(ref, shallow=True) == [] and store.verify(ref, workers=8) == []
    target = tmp_path / ref.prefix / "f" / "7.bin"
    target.write_bytes(b"y" * 7)  # same size, written after the commit
    later = _time.time() + 60
    os.utime(target, (later, later))
    (tmp_path / ref.prefix / "f" / "9.bin").unlink()
    shallow = store.verify(ref, shallow=True)
    assert any("f/7.bin: written after the commit record" in p for p in shallow)
    assert any("f/9.bin: missing" in p for p in shallow)
    deep = store.verify(ref, workers=8)
    assert any("f/7.bin: sha256" in p for p in deep) and any("f/9.bin: missing" in p for p in deep)
    assert asd_main(["--store", str(tmp_path), "store", "verify", "--shallow", str(ref)]) == 1
    assert "written after the commit record" in capsys.readouterr().out


def test_a_version_is_exactly_its_record(tmp_path, caplog):
    """A file in a version's folder that its record does not list is refused by every reader and
    reported by verify (full and shallow); a commit removes strays left in its pending folder; a
    link put where a listed file was is refused, never followed."""
    from artifact_store import FileNotListed

    store = ArtifactStore(str(tmp_path / "s"))
    w = store.new_version("datasets", "d")
    w.put_bytes("a/file.bin", b"hello")
    stray = Path(store.path(w.ref.prefix, "a/stray.bin"))
    stray.write_bytes(b"left by someone else")
    with caplog.at_level("WARNING", logger="asd.store"):
        ref = w.commit()
    assert not stray.exists() and "a/stray.bin" in caplog.text  # removed, and said so
    stray.write_bytes(b"put there after the commit")
    for read in (
        lambda: store.read_bytes(ref, "a/stray.bin"),
        lambda: store.open(ref, "a/stray.bin"),
        lambda: store.read_range(ref, "a/stray.bin", 0, 2),
    ):
        with pytest.raises(FileNotListed, match="does not list 'a/stray.bin'"):
            read()
    with pytest.raises(StoreError, match="not inside"):
        store.read_range(ref, "a/file.bin", 0, 99)  # past the recorded size
    for shallow in (False, True):
        assert [p for p in store.verify(ref, shallow=shallow) if "stray" in p], shallow
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"hello")  # same bytes and size as the listed file
    listed = Path(store.path(ref.prefix, "a/file.bin"))
    listed.unlink()
    listed.symlink_to(secret)
    with pytest.raises(FileNotListed, match="link"):
        store.read_bytes(ref, "a/file.bin")
    assert any("a link" in p for p in store.verify(ref))


def test_many_files_through_the_public_writer_keep_the_record_small(tmp_path):
    """Past INLINE_FILES_MAX files the record points at path-sorted file-list parts whatever call
    wrote them; any file is still found (by the path range of its row group) and listed."""
    from artifact_store.writer import INLINE_FILES_MAX

    store = ArtifactStore(str(tmp_path / "s"))
    w = store.new_version("datasets", "many")
    n = INLINE_FILES_MAX + 500
    for i in range(n):
        w.put_bytes(f"f/{i:06d}.txt", str(i).encode())
    ref = w.commit()
    rec = store.record(ref)
    assert len(rec["files"]) < 10 and rec["file_count"] == n + len(rec["files"])
    assert len(json.dumps(rec)) < 8_000
    fresh = ArtifactStore(str(tmp_path / "s"))
    assert (
        fresh.read_bytes(ref, "f/000007.txt") == b"7"
        and fresh.read_bytes(ref, f"f/{n - 1:06d}.txt") == str(n - 1).encode()
    )
    assert sum(1 for _ in fresh.iter_files(ref)) == n + len(rec["files"])
    assert fresh.verify(ref, shallow=True) == []

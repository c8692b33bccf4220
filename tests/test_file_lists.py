"""A large version's file list lives outside its commit record, in Parquet parts: the record
stays small, one file's lookup reads one row group of one part, listing streams them, and
verify, download and locate work through them, on a folder and on S3."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from artifact_store import ArtifactStore, file_lists
from artifact_store.refs import COMMIT_RECORD


@pytest.fixture(params=["folder", "s3"])
def store_url(request, tmp_path):
    return str(tmp_path / "store") if request.param == "folder" else request.getfixturevalue("s3_bucket")


def _listed_version(store: ArtifactStore, n: int):
    w = store.new_version("generations", "big")
    for row in range(n):
        for suffix in ("png", "seams.png"):
            rel = f"images/{row:06d}-64x64-abc.{suffix}"
            w.add_files({rel: w.put_bytes(rel, f"{row}.{suffix}".encode())}, row=row)
    w.files = {
        k: v for k, v in w.files.items() if not k.startswith("images/")
    }  # as the commit task adopts them
    w.put_bytes("manifest.parquet", b"rows")
    return w.commit(summary={"images_ok": n})


def test_the_record_stays_small_and_one_lookup_reads_one_row_group(store_url, monkeypatch, tmp_path):
    monkeypatch.setattr(file_lists, "GROUP_ROWS", 16)
    store = ArtifactStore(store_url)
    ref = _listed_version(store, 100)
    rec = store.record(ref)
    assert rec["file_count"] == 200 + 2 and set(rec["files"]) == {
        "manifest.parquet",
        "_files/part-00000.parquet",
    }
    assert rec["file_lists"][0]["rows"] == [0, 99] and rec["file_lists"][0]["count"] == 200
    assert len(store.fs.cat_file(store.path(ref.prefix, COMMIT_RECORD))) < 4096

    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, **kw: reads.append(i) or real(self, i, **kw)
    )
    fresh = ArtifactStore(store_url)
    assert fresh.read_bytes(ref, "images/000057-64x64-abc.seams.png") == b"57.seams.png"
    reads.clear()
    meta = fresh.file_meta(ref, "images/000005-64x64-abc.png")
    assert meta["size"] == len(b"5.png") and len(reads) == 1  # one row group, whatever the list's length
    assert (
        fresh.file_meta(ref, "images/000006-64x64-abc.png")["size"] == len(b"6.png") and len(reads) == 1
    )  # kept
    assert fresh.file_meta(ref, "images/000057-64x64-abc.txt") is None
    assert fresh.locate(fresh.uri(ref.prefix, "images/000003-64x64-abc.png")) == (
        ref,
        "images/000003-64x64-abc.png",
    )

    assert len(dict(fresh.iter_files(ref))) == 202
    assert fresh.verify(ref) == [] and fresh.verify(ref, shallow=True) == []
    fresh.download(ref, tmp_path / "out", prefix="images")
    assert (tmp_path / "out" / "000099-64x64-abc.png").read_bytes() == b"99.png"
    store.fs.pipe_file(store.path(ref.prefix, "images/000042-64x64-abc.png"), b"42.pnG")  # same size, changed
    assert any("000042-64x64-abc.png" in p for p in ArtifactStore(store_url).verify(ref))


def test_a_record_whose_file_lists_name_unlisted_parts_is_corrupt(tmp_path):
    from artifact_store import CorruptRecord

    store = ArtifactStore(str(tmp_path))
    ref = _listed_version(store, 3)
    path = tmp_path / ref.prefix / COMMIT_RECORD
    rec = json.loads(path.read_text())
    rec["file_lists"][0]["path"] = "../../elsewhere.parquet"
    path.write_text(json.dumps(rec))
    with pytest.raises(CorruptRecord, match="file_lists"):
        ArtifactStore(str(tmp_path)).record(ref)


def test_a_file_list_part_edited_after_the_commit_is_refused(store_url):
    """A part is store data read back: an entry rewritten (a file swapped, and its listed digest
    with it) is refused by every reader before any entry of that part is used (on a versioned
    bucket readers take the recorded object versions, and verify reports the overwrite)."""
    import io

    import pyarrow as pa

    from artifact_store.refs import CorruptFile

    store = ArtifactStore(store_url)
    ref = _listed_version(store, 5)
    part = store.path(ref.prefix, "_files/part-00000.parquet")
    table = pq.read_table(io.BytesIO(store.fs.cat_file(part)))
    rows = table.to_pylist()
    forged = b"forged!"
    rows[0].update(sha256=__import__("hashlib").sha256(forged).hexdigest(), size=len(forged))
    store.fs.pipe_file(store.path(ref.prefix, rows[0]["path"]), forged)
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out)
    store.fs.pipe_file(part, out.getvalue())
    fresh = ArtifactStore(store_url)
    if not fresh.is_local:  # a versioned bucket: readers take the recorded VersionIds, the forgery unseen
        assert fresh.read_bytes(ref, rows[0]["path"]) != forged
        assert any("part-00000.parquet" in p for p in fresh.verify(ref))  # overwritten after commit
        return
    with pytest.raises(CorruptFile, match="part-00000.parquet .*does not match the sha256"):
        fresh.read_bytes(ref, rows[0]["path"])
    with pytest.raises(CorruptFile):
        dict(fresh.iter_files(ref))
    assert any("part-00000.parquet" in p for p in fresh.verify(ref, shallow=True))

"""Catalog, lineage of a file, pinned S3 versions, versioning off, and no leaked credentials."""

from __future__ import annotations

import logging

import boto3
import polars as pl
import pytest

from artifact_store import ArtifactStore, redact
from flows.cli import main as asd_main


def _chain(url: str):
    store = ArtifactStore(url)
    d = store.new_version("datasets", "photos")
    d.put_bytes("manifest.parquet", b"rows")
    dref = d.commit(params={"source": "/data/photos"}, summary={"samples_ok": 10, "samples_failed": 1})
    m = store.new_version("models", "arad")
    m.put_bytes("unet/diffusion_pytorch_model.safetensors", b"w" * 100)
    mref = m.commit(parents=[dref], summary={"loss_last": 0.05})
    g = store.new_version("generations", "run")
    g.put_bytes("images/000000-1000x300.png", b"png")
    gref = g.commit(parents=[mref])
    return store, dref, mref, gref


def test_catalog_has_one_row_per_version_readable_with_polars(tmp_path, capsys):
    store, dref, mref, gref = _chain(str(tmp_path))
    df = pl.read_parquet(str(tmp_path / "_catalog" / "**" / "*.parquet"))
    assert sorted(df["ref"].to_list()) == sorted(map(str, (dref, mref, gref)))
    row = df.filter(pl.col("ref") == str(mref)).row(0, named=True)
    assert row["parents"] == [str(dref)] and row["size_bytes"] == 100 and row["file_count"] == 1
    assert dict(row["metrics"]) == {"loss_last": 0.05}
    assert asd_main(["--store", str(tmp_path), "store", "catalog"]) == 0
    assert str(gref) in capsys.readouterr().out


def test_lineage_of_a_file_leads_back_to_the_source(tmp_path, capsys):
    store, dref, mref, gref = _chain(str(tmp_path))
    image = tmp_path / gref.prefix / "images" / "000000-1000x300.png"
    assert store.locate(str(image)) == (gref, "images/000000-1000x300.png")
    assert asd_main(["--store", str(tmp_path), "store", "lineage", str(image)]) == 0
    out = capsys.readouterr().out
    assert f"is images/000000-1000x300.png of {gref}" in out
    assert out.index(str(gref)) < out.index(str(mref)) < out.index(str(dref))
    assert "source: /data/photos" in out
    assert asd_main(["--store", str(tmp_path), "store", "show", str(gref), "--lineage"]) == 0
    assert "source: /data/photos" in capsys.readouterr().out
    assert asd_main(["--store", str(tmp_path), "store", "lineage", "/elsewhere/x.png"]) == 2


def test_s3_reads_are_pinned_to_the_committed_version(s3_bucket, s3_server):
    store, _, mref, _ = _chain(s3_bucket)
    meta = store.record(mref)["files"]["unet/diffusion_pytorch_model.safetensors"]
    assert meta["version_id"]
    bucket, _, prefix = s3_bucket[len("s3://") :].partition("/")
    key = f"{prefix}/{mref.prefix}/unet/diffusion_pytorch_model.safetensors"
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=bucket, Key=key, Body=b"evil")
    fresh = ArtifactStore(s3_bucket)
    assert fresh.read_bytes(mref, "unet/diffusion_pytorch_model.safetensors") == b"w" * 100
    problems = fresh.verify(mref)
    assert len(problems) == 1 and "VersionId" in problems[0] and "overwritten" in problems[0]


def test_s3_bucket_without_versioning(s3_server):
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="plain-bucket")
    store, _, mref, gref = _chain("s3://plain-bucket/x")
    assert "version_id" not in store.record(mref)["files"]["unet/diffusion_pytorch_model.safetensors"]
    assert store.verify(gref) == [] and store.resolve("models/arad") == mref
    assert len(store.catalog()) == 3


def test_credentials_never_leak(s3_bucket, monkeypatch, caplog, capsys):
    secret = "SuperSecretValue0123456789abcdef"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any secret
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    caplog.set_level(logging.DEBUG)
    store, dref, mref, gref = _chain(s3_bucket)
    asd_main(["--store", s3_bucket, "store", "verify"])
    asd_main(["--store", s3_bucket, "store", "show", str(gref), "--lineage", "--files"])
    asd_main(["--store", s3_bucket, "store", "catalog"])
    with pytest.raises(Exception) as err:
        ArtifactStore("s3://no-such-bucket-here/x").read_bytes("models/arad@latest", "x")
    out = capsys.readouterr()
    everything = out.out + out.err + caplog.text + str(err.value) + repr(store)
    for path in store.fs.find(store.root):
        everything += store.fs.cat_file(path).decode("latin-1")
    assert secret not in everything
    assert secret not in redact(f"s3://AKIA:{secret}@bucket/x secret_access_key={secret}")


def test_redact_hides_userinfo_and_secret_values():
    assert redact("s3://user:pass@bucket/p") == "s3://***@bucket/p"
    assert "hunter2" not in redact("{'aws_secret_access_key': 'hunter2', 'token': 'abc'}")


def test_a_corrupt_catalog_file_is_skipped_with_a_warning_and_rebuilt(tmp_path, capsys, caplog):
    from dashboard.build import build_site

    store, dref, mref, gref = _chain(str(tmp_path))
    row = tmp_path / "_catalog" / "models" / "arad" / f"{mref.version}.parquet"
    row.write_bytes(row.read_bytes()[:40])  # cut mid-write (or tampered with)
    (tmp_path / "_catalog" / "models" / "arad" / "stray.parquet").write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING, logger="asd.store"):
        assert asd_main(["--store", str(tmp_path), "store", "catalog"]) == 0
    assert "(2 versions)" in capsys.readouterr().out
    assert f"{mref.version}.parquet is unreadable" in caplog.text
    assert build_site(ArtifactStore(str(tmp_path)), thumb_px=32).pages == 1 + 3  # rebuilt the row it needed
    assert asd_main(["--store", str(tmp_path), "store", "catalog", "--rebuild"]) == 0
    assert "(3 versions)" in capsys.readouterr().out
    assert "stray.parquet names no committed version" in caplog.text


def test_a_catalog_row_that_names_another_version_is_not_taken(tmp_path, caplog):
    """A catalog file is store data: a row whose fields do not name the version its path names
    (a forged ref or name, a row copied under another name, two rows) is skipped with a warning,
    and the rebuild writes the version's own row back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store, dref, mref, gref = _chain(str(tmp_path))
    path = tmp_path / "_catalog" / "models" / "arad" / f"{mref.version}.parquet"
    row = pq.read_table(path).to_pylist()[0]
    for forged in (
        [row | {"ref": "models/other@" + mref.version}],
        [row | {"name": "../../x"}],
        [row, row],
        [row | {"parents": ["a\nb"]}],
    ):
        pq.write_table(pa.Table.from_pylist(forged, schema=pq.read_schema(path)), path)
        with caplog.at_level(logging.WARNING, logger="asd.store"):
            refs = set(ArtifactStore(str(tmp_path)).catalog().column("ref").to_pylist())
        assert str(mref) not in refs and str(dref) in refs
        assert f"{mref.version}.parquet is unreadable" in caplog.text
        caplog.clear()
    refs = set(ArtifactStore(str(tmp_path)).catalog(rebuild=True).column("ref").to_pylist())
    assert str(mref) in refs and pq.read_table(path).to_pylist()[0]["ref"] == str(mref)

"""The trust boundary: inputs from strangers (folders, URL lists, shards, shared stores) cannot
read, write or exhaust what they should not. One test (or more) per numbered case of issue 11;
hostile fixtures are made here, servers are on loopback only."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from artifact_store import COMMIT_RECORD, ArtifactStore, CorruptRecord, InvalidReference
from data_engine import fetch as fetch_module
from data_engine.fetch import Fetcher, FetchError, FetchOptions
from tests.image_server import ImageServer, jpeg_bytes
from tests.ingest_helpers import ingest_ref

SMALL = {"bucket_base": 128, "bucket_step": 16}


def _manifest(store_url, ref):
    store = ArtifactStore(store_url)
    return pl.read_parquet(io.BytesIO(store.read_bytes(ref, "manifest.parquet")))


def _photo(path: Path, seed: int = 0, size=(160, 120)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _options(**kw) -> FetchOptions:
    base = dict(
        timeout_s=2.0,
        retries=0,
        backoff_s=0.0,
        max_bytes=1 << 20,
        concurrency=4,
        per_host=4,
        allow_schemes=("http", "https"),
        allow_private_addresses=False,
        source_credentials=None,
    )
    return FetchOptions(**{**base, **kw})


# 1. folder sources never read outside the folder -------------------------------------------------
def test_links_out_of_a_folder_are_failed_rows_and_read_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ASD_TEST_SECRET", "s3cr3t-value")
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "dog.png", 1)
    (folder / "dog.txt").symlink_to("/proc/self/environ")
    _photo(folder / "cat.png", 2)
    (folder / "cat.txt").symlink_to("/etc/passwd")
    outside = tmp_path / "outside"
    outside.mkdir()
    _photo(outside / "far.png", 3)
    (outside / "far.txt").write_text("from outside")
    (folder / "far.png").symlink_to(outside / "far.png")
    (folder / "far.txt").write_text("a linked image")
    (folder / "elsewhere").symlink_to(outside, target_is_directory=True)
    _photo(folder / "big.png", 4)
    (folder / "big.txt").write_text("x" * (70 << 10))
    _photo(folder / "latin.png", 5)
    (folder / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    _photo(folder / "ok.png", 6)
    (folder / "ok.txt").write_text("a fine caption")
    store_url = str(tmp_path / "store")
    ref = ingest_ref(store_url, [str(folder)], "d", SMALL)
    df = _manifest(store_url, ref)
    by = {r["source"].rsplit("/", 1)[-1]: r for r in df.iter_rows(named=True)}
    assert by["ok.png"]["status"] == "ok"
    assert "link to outside" in by["dog.png"]["error"] and "link to outside" in by["cat.png"]["error"]
    assert "link to outside" in by["far.png"]["error"]
    assert "folder link to outside" in by["elsewhere"]["error"]
    assert "over caption_max_bytes" in by["big.png"]["error"] and "not UTF-8" in by["latin.png"]["error"]
    everything = df.write_csv() + "".join(
        (tmp_path / "store").joinpath(p).read_bytes().decode("latin-1")
        for p in [str(x.relative_to(tmp_path / "store")) for x in (tmp_path / "store").rglob("*.tar")]
    )
    assert "s3cr3t-value" not in everything and "root:" not in everything and "from outside" not in everything


# 2. a tampered commit record cannot make the store read or write outside -------------------------
def test_tampered_record_is_refused_for_download_pinned_reads_and_cli(tmp_path, capsys):
    from flows.cli import main

    store = ArtifactStore(str(tmp_path / "store"))
    w = store.new_version("models", "m")
    w.put_bytes("model_index.json", b"{}")
    ref = w.commit()
    with pytest.raises(InvalidReference):  # a path asked of an intact version cannot leave it either
        store.read_bytes(str(ref), "../../../etc/passwd")
    record = tmp_path / "store" / ref.prefix / COMMIT_RECORD
    rec = json.loads(record.read_text())
    rec["files"]["../../../../../x"] = {"sha256": "0" * 64, "size": 1}
    record.write_text(json.dumps(rec))
    fresh = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(CorruptRecord, match="unsafe path"):
        fresh.download(str(ref), tmp_path / "cache" / "a" / "b")
    assert main(["--store", str(tmp_path / "store"), "store", "verify"]) == 1
    assert "unsafe path" in capsys.readouterr().out
    assert not (tmp_path / "x").exists() and not list(tmp_path.rglob("x"))


def test_cached_model_copy_is_checked_against_its_record(tmp_path, tiny_model_dir, monkeypatch):
    from tasks.model_cache import local_model_dir

    monkeypatch.setenv("ASD_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore(str(tmp_path / "store"))
    w = store.new_version("models", "tiny")
    w.put_dir(tiny_model_dir)
    ref = w.commit()
    folder = local_model_dir(store, ref)
    (folder / "model_index.json").write_text('{"tampered": true}')
    again = local_model_dir(store, ref)
    assert json.loads((again / "model_index.json").read_text()) == json.loads(
        (Path(tiny_model_dir) / "model_index.json").read_text()
    )


# 3. URL lists reach only public http(s) by default ------------------------------------------------
def test_schemes_and_private_addresses_are_refused_by_default(tmp_path):
    with ImageServer() as srv:
        rows = [
            f"{srv.url}/img/1.jpg",
            f"http://localhost:{srv.url.rsplit(':', 1)[1]}/img/2.jpg",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/x.jpg",
            "http://10.1.2.3/x.jpg",
            "file:///etc/passwd",
            (tmp_path / "no-such-file.jpg").as_uri(),
            "s3://bucket/key.jpg",
        ]
        pl.DataFrame({"url": rows, "caption": [f"c{i}" for i in range(len(rows))]}).write_parquet(
            tmp_path / "u.parquet"
        )
        ref = ingest_ref(
            str(tmp_path / "store"), [str(tmp_path / "u.parquet")], "web", {**SMALL, "retries": 0}
        )
        assert sum(srv.hits.values()) == 0  # nothing reached the loopback server
    df = _manifest(str(tmp_path / "store"), ref)
    errors = df["error"].to_list()
    assert df["status"].to_list() == ["failed"] * len(rows)
    assert "loopback" in errors[0] and "loopback" in errors[1] and "link-local" in errors[2]
    assert "loopback" in errors[3] and "private" in errors[4]
    assert errors[5] == errors[6] and "scheme 'file' is not allowed" in errors[5]  # existence never revealed
    assert "scheme 's3' is not allowed" in errors[7]


def test_every_redirect_hop_is_checked(tmp_path, monkeypatch):
    real = fetch_module.address_refusal
    monkeypatch.setattr(fetch_module, "address_refusal", lambda ip: None if ip == "127.0.0.1" else real(ip))
    with ImageServer() as srv:
        f = Fetcher(_options())
        assert f.fetch(f"{srv.url}/redirect?to=/img/3.jpg")[:2] == b"\xff\xd8"  # a public hop to a public hop
        for target in (
            "http://169.254.169.254/latest/meta-data/",
            "http://127.0.0.2:1/x",
            "file:///etc/passwd",
        ):
            with pytest.raises(FetchError, match="refused"):
                f.fetch(f"{srv.url}/redirect?to={target}")


def test_s3_entries_are_read_anonymously_unless_credentials_are_named(tmp_path, s3_bucket, s3_server):
    import boto3

    bucket = s3_bucket[len("s3://") :].split("/")[0]
    boto3.client("s3", endpoint_url=s3_server).put_object(
        Bucket=bucket, Key="private/a.jpg", Body=jpeg_bytes(200, 150, 1)
    )
    pl.DataFrame({"url": [f"s3://{bucket}/private/a.jpg"], "caption": ["x"]}).write_csv(tmp_path / "l.csv")
    anon = ingest_ref(
        str(tmp_path / "s1"), [str(tmp_path / "l.csv")], "d", {**SMALL, "allow_schemes": "s3", "retries": 0}
    )
    assert "permission denied" in _manifest(str(tmp_path / "s1"), anon)["error"][0]
    named = ingest_ref(
        str(tmp_path / "s2"),
        [str(tmp_path / "l.csv")],
        "d",
        {**SMALL, "allow_schemes": "s3", "source_credentials": "env"},
    )
    assert _manifest(str(tmp_path / "s2"), named)["status"].to_list() == ["ok"]


# 4. memory and time exhaustion -----------------------------------------------------------------------
def test_compression_layers_bombs_and_trickled_headers(tmp_path):
    with ImageServer() as srv:
        f = Fetcher(_options(allow_private_addresses=True, timeout_s=0.3))
        with pytest.raises(FetchError, match="2 content-encoding layers"):
            f.fetch(f"{srv.url}/gzip2.jpg")
        with pytest.raises(FetchError, match="over max_bytes .* once decoded"):  # 64 MiB of zeros in ~64 KB
            Fetcher(_options(allow_private_addresses=True, timeout_s=10)).fetch(
                f"{srv.url}/gzipbomb.jpg?mb=64"
            )
        t0 = time.monotonic()
        with pytest.raises(FetchError, match="too slow|timed out"):
            f.fetch(f"{srv.url}/trickle?every=0.1")
        assert time.monotonic() - t0 < 3.0  # 3 x timeout_s for the whole request, headers included


def test_decoder_never_inflates_past_the_cap():
    bomb = zlib.compress(b"\0" * (64 << 20))
    decoder = fetch_module._Decoder("deflate", 1 << 20)
    with pytest.raises(FetchError, match="once decoded"):
        for i in range(0, len(bomb), 1 << 16):
            decoder.feed(bomb[i : i + (1 << 16)])
    assert decoder.out <= (1 << 20) + 1


def test_oversized_tar_members_are_refused_before_reading(tmp_path):
    path = tmp_path / "00000.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for key, data in (("000", jpeg_bytes(160, 120, 1)), ("001", b"\0" * (32 << 20))):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            cap = tarfile.TarInfo(f"{key}.txt")
            cap.size = 3
            tar.addfile(cap, io.BytesIO(b"cap"))
        link = tarfile.TarInfo("002.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    assert path.stat().st_size < 1 << 20
    ref = ingest_ref(str(tmp_path / "store"), [str(path)], "d", {**SMALL, "max_bytes": 1 << 20})
    df = _manifest(str(tmp_path / "store"), ref).sort("source")
    assert df["status"].to_list() == ["ok", "failed", "failed"]
    assert "over max_bytes" in df["error"][1] and "not a regular file" in df["error"][2]


def test_one_samples_members_together_are_capped_through_the_gzip_layer(tmp_path):
    """20 members of 800 KB under one key (a 64 KB .tar.gz): each is under max_bytes, together
    they are over sample_max_bytes, so the sample is one failed row holding none of them, and the
    samples around it are ingested."""
    from asd_models.shard_reader import tar_stream_samples

    path = tmp_path / "00000.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        members = [("000.jpg", jpeg_bytes(160, 120, 1)), ("000.txt", b"a cat")]
        members += [(f"001.{i:02d}.bin", b"\0" * (800 << 10)) for i in range(20)]
        members += [
            ("001.jpg", jpeg_bytes(160, 120, 2)),
            ("002.jpg", jpeg_bytes(160, 120, 3)),
            ("002.txt", b"a dog"),
        ]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert path.stat().st_size < 1 << 17
    with open(path, "rb") as f:  # what the reader holds: never more than the cap of one sample
        held = [
            sum(len(v) for k, v in s.items() if not k.startswith("__"))
            for s in tar_stream_samples(f, 1 << 20, 2 << 20)
        ]
    assert max(held) <= 2 << 20 and held[1] == 0
    ref = ingest_ref(
        str(tmp_path / "store"),
        [str(path)],
        "d",
        {**SMALL, "max_bytes": 1 << 20, "sample_max_bytes": 2 << 20},
    )
    df = _manifest(str(tmp_path / "store"), ref).sort("source")
    assert df["status"].to_list() == ["ok", "failed", "ok"]
    assert "total over sample_max_bytes 2097152" in df["error"][1] and "none kept" in df["error"][1]


# 5. secrets in source URLs never reach a manifest, a shard or a log ----------------------------------
def test_url_credentials_and_signatures_are_redacted(tmp_path, caplog):
    with ImageServer() as srv:
        host = srv.url.split("://", 1)[1]
        urls = [
            f"http://alice:hunter2@{host}/img/1.jpg",
            f"{srv.url}/img/2.jpg?X-Amz-Signature=deadbeefcafe&X-Amz-Credential=AKIAXYZ&w=200",
            f"{srv.url}/missing.jpg?token=tok3n-secret",
        ]
        pl.DataFrame({"url": urls, "caption": ["a", "b", "c"]}).write_parquet(tmp_path / "u.parquet")
        with caplog.at_level(logging.INFO):
            ref = ingest_ref(
                str(tmp_path / "store"),
                [str(tmp_path / "u.parquet")],
                "d",
                {**SMALL, "allow_private_addresses": True, "retries": 0},
            )
    df = _manifest(str(tmp_path / "store"), ref)
    assert df["status"].to_list()[:2] == ["ok", "ok"]
    everything = (
        df.write_csv()
        + caplog.text
        + "".join(p.read_bytes().decode("latin-1") for p in (tmp_path / "store").rglob("*") if p.is_file())
    )
    for secret in ("hunter2", "deadbeefcafe", "AKIAXYZ", "tok3n-secret"):
        assert secret not in everything, secret


# 6. corrupt image data is a decode failure ------------------------------------------------------------
def test_png_damaged_mid_stream_is_a_decode_failure(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    img = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 1
    Image.fromarray(img).save(buf, format="PNG", exif=exif)
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT")
    for i in range(idat + 4000, idat + 4100):
        data[i] ^= 0x5A
    (folder / "broken.png").write_bytes(bytes(data))
    (folder / "broken.txt").write_text("damaged in the middle")
    _photo(folder / "fine.png")
    (folder / "fine.txt").write_text("fine")
    ref = ingest_ref(str(tmp_path / "store"), [str(folder)], "d", SMALL)
    by = {r["caption"]: r for r in _manifest(str(tmp_path / "store"), ref).iter_rows(named=True)}
    assert by["fine"]["status"] == "ok"
    assert (
        by["damaged in the middle"]["status"] == "failed"
        and by["damaged in the middle"]["failed_stage"] == "decode"
    )


# 8. everything is validated before any work -------------------------------------------------------------
def test_names_and_seeds_are_checked_before_work(tmp_path):
    from artifact_store import check_name
    from data_manifests.settings import PromptSpec

    for bad in ("bad name", "ok\n", "../x", "", "a" * 129):
        with pytest.raises(InvalidReference):
            check_name(bad)
    with pytest.raises(ValueError):
        PromptSpec(prompt="x", width=64, height=64, seed=2**70)
    assert PromptSpec(prompt="x", width=64, height=64, seed=2**64 - 1).seed == 2**64 - 1


# 9. no tracebacks; SIGTERM stops `asd` and its temporary server ------------------------------------------
def test_dead_s3_endpoint_is_one_line(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("ASD_S3_RETRIES", "1")
    rc = main(["--store", "s3://nobucket/store", "store", "ls"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("asd: "), err


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(x) for x in out.split()]


@pytest.mark.slow
def test_sigterm_stops_asd_and_its_temporary_server(tmp_path):
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "ASD_CACHE": str(tmp_path / "cache"),
        "PREFECT_API_URL": "",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PREFECT_API_URL")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--store", str(tmp_path / "store"), "demo", "--quick"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).parent.parent,
    )
    deadline = time.monotonic() + 120
    server: list[int] = []
    while time.monotonic() < deadline and not server:
        time.sleep(1)
        server = [c for c in _children(proc.pid)]
        assert proc.poll() is None
    assert server, "the temporary Prefect server never started"
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(2)
    alive = [
        p
        for p in server
        if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()
    ]
    assert alive == [], proc.stdout.read().decode()[-2000:]
    assert proc.returncode != 0


# 10. redaction never corrupts the store URL ------------------------------------------------------------
def test_access_key_id_equal_to_bucket_name_still_works(tmp_path, s3_server, monkeypatch):
    import boto3
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "asd")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="asd")
    s3fs.S3FileSystem.clear_instance_cache()
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "a.png")
    (folder / "a.txt").write_text("a")
    ref = ingest_ref("s3://asd/store", [str(folder)], "d", SMALL)
    store = ArtifactStore("s3://asd/store")
    assert store.url == "s3://asd/store" and store.verify(ref) == []


def test_cache_tampering_of_the_same_size_is_found_and_processes_share_one_download(
    tmp_path, commit_tiny_model
):
    """A cached file edited in place (same size) is hashed again and replaced; three processes
    filling the cache at once download the version once and all get the intact copy."""
    import subprocess
    import sys

    store_url = str(tmp_path / "store")
    ref = commit_tiny_model(store_url)
    env = {**os.environ, "ASD_CACHE": str(tmp_path / "cache")}
    code = f"""
import json, sys
from artifact_store import ArtifactStore
import tasks.model_cache as mc
store = ArtifactStore({store_url!r})
downloads = []
real = store.download
store.download = lambda *a, **k: downloads.append(1) or real(*a, **k)
folder = mc.local_model_dir(store, {ref!r})
print(json.dumps({{"folder": str(folder), "downloads": len(downloads)}}))
"""
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert len({r["folder"] for r in results}) == 1 and sum(r["downloads"] for r in results) == 1
    folder = Path(results[0]["folder"])
    weights = next(folder.rglob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # one byte flipped, same size
    weights.write_bytes(bytes(blob))
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(again.stdout.strip().splitlines()[-1])["downloads"] == 1  # found, fetched again
    rel = weights.relative_to(folder).as_posix()
    assert weights.read_bytes() == ArtifactStore(store_url).read_bytes(ref, rel)


def test_a_plan_edited_in_the_store_is_refused_by_its_task(tmp_path):
    """Plan files live in the pending version, which anyone sharing the store can write: a task
    reads its row group only if it is what the driver planned (a digest per partition)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from artifact_store import ArtifactStore
    from data_engine.partitions import PLAN, PlanChanged, partition_records, plan_partitions
    from data_engine.sources import open_source
    from tasks.ingest import IngestSettings

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(folder / f"p{i}.png")
    store = ArtifactStore(str(tmp_path / "store"))
    files = store.pending_files(store.resume_or_new("datasets", "d", "h"))
    parts = plan_partitions([open_source(str(folder), None, IngestSettings().source_options())], 4, files)
    assert [r.name for p in parts for r in partition_records(files, p)] == [f"p{i}.png" for i in range(6)]
    plan = parts[0].plan
    with files.open(plan, "rb") as f:
        table = pq.read_table(f)
    forged = table.set_column(
        PLAN.get_field_index("path"), "path", pa.array([b"/etc/passwd"] * table.num_rows, pa.binary())
    )
    buf = pa.BufferOutputStream()
    pq.write_table(forged, buf, row_group_size=max(1, parts[0].inputs or 1))
    files.write_atomic(plan, buf.getvalue().to_pybytes())
    with pytest.raises(PlanChanged, match="is not what this job planned"):
        partition_records(files, parts[0])


def test_a_committed_metadata_file_is_checked_against_its_record_before_use(tmp_path):
    """Manifests and prompt tables are acted on: their bytes are re-hashed against the commit
    record first (same size, other bytes included), and a prompts version edited after its
    commit is refused by what reads it."""
    from artifact_store import ArtifactStore
    from artifact_store.refs import CorruptFile
    from data_engine.prompts import read_prompts, validate_rows
    from tasks.prompts import store_prompts

    store = ArtifactStore(str(tmp_path / "store"))
    rows = validate_rows([{"prompt": "a cat", "width": 64, "height": 64}], "test")
    ref = store_prompts(store.url, rows, "p", "test")
    assert read_prompts(store, ref).num_rows == 1
    path = tmp_path / "store" / store.resolve(ref).prefix / "prompts.parquet"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(
        CorruptFile, match=r"prompts.parquet of prompts/p@.* does not match its recorded sha256"
    ):
        read_prompts(store, ref)

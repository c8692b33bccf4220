"""Pending versions are owned: one run writes a resumable version at a time (a lease with a
heartbeat), a second run waits, takes over an expired lease or refuses naming the holder, gc
never takes a leased version, and a commit checks the lease and leaves no lease files behind.
On a folder store and on the S3 test server; the end-to-end scenarios (gc, tampering and a
second run while a resumed job writes) run real `asd generate` processes."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from artifact_store import ArtifactRef, ArtifactStore, PendingVersion, StoreError, leases
from artifact_store.leases import LeaseHeld
from tasks.fragments import list_fragments, write_fragment


@pytest.fixture(params=["folder", "s3"])
def store_url(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


def test_a_second_run_is_refused_naming_the_holder_then_reuses_its_commit(store_url):
    store = ArtifactStore(store_url)
    pending = store.resume_or_new("generations", "g", "h")
    first = leases.acquire(store, pending, lease_s=60, flow_run_id="run-a")
    assert first.epoch == 1
    with pytest.raises(LeaseHeld, match=r"is being written by .*:\d+, flow run run-a \(heartbeat"):
        leases.acquire(store, pending, lease_s=60)
    with first:
        w = store.writer(pending)
        w.lease = first
        w.put_bytes("a.txt", b"a")
        committed = []
        assert (
            leases.acquire(
                store,
                pending,
                lease_s=60,
                wait_s=5,
                committed=lambda: committed.append(1) or len(committed) > 2,
            )
            is None
        )
        w.commit()
    listed = store.fs.find(store.path(pending.ref.prefix))
    assert not [
        p for p in listed if "_LEASES" in p or "_PENDING" in p
    ]  # nothing of the pending state survives


def test_an_expired_lease_is_taken_over_and_the_old_holder_cannot_commit(store_url, monkeypatch):
    store = ArtifactStore(store_url)
    pending = store.resume_or_new("generations", "g", "h")
    old = leases.acquire(store, pending, lease_s=30)
    w = store.writer(pending)
    w.lease = old
    w.put_bytes("a.txt", b"a")
    later = time.time() + 31  # the old run's heartbeat stopped (a hung or partitioned machine)
    monkeypatch.setattr(leases, "_now", lambda: later)
    new = leases.acquire(store, pending, lease_s=30)
    assert new.epoch == 2
    with pytest.raises(StoreError, match="taken over .*committed nothing"):
        w.commit()
    assert not store.has_commit_record(pending.ref)


def test_a_holder_whose_process_is_gone_is_taken_over_at_once(store_url):
    store = ArtifactStore(store_url)
    pending = store.resume_or_new("generations", "g", "h")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lease = leases.acquire(store, pending, lease_s=600)
    lease.owner["pid"] = int(gone.stdout)  # as a SIGKILLed run leaves it: fresh heartbeat, no process
    lease.renew()
    assert leases.acquire(store, pending, lease_s=600).epoch == 2


def test_gc_never_deletes_a_leased_version_even_with_no_grace(store_url):
    store = ArtifactStore(store_url)
    pending = store.resume_or_new("generations", "g", "h")
    with leases.acquire(store, pending, lease_s=60):
        store.writer(pending).put_bytes("a.txt", b"a")
        time.sleep(0.05)
        assert store.gc(grace_s=0, delete=True) == []
    assert store.gc(grace_s=0, delete=True) == [store.path(pending.ref.prefix)]  # released: a leftover now


def test_lease_files_are_not_version_files(tmp_path):
    store = ArtifactStore(str(tmp_path))
    w = store.new_version("generations", "g")
    with pytest.raises(StoreError, match="reserved"):
        w.put_bytes("_LEASES/0000000009.json", b"{}")


# --- end to end: real `asd generate` processes ------------------------------------------------------


def _prompts(path: Path, n: int) -> Path:
    pl.DataFrame(
        {
            "prompt": [f"picture {i}" for i in range(n)],
            "width": [96] * n,
            "height": [96] * n,
            "seed": list(range(n)),
        }
    ).write_parquet(path)
    return path


def _asd(store_url: str, *args: str, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "flows.cli", "--store", store_url, *args]
    kw = dict(
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).parent.parent,
    )
    return subprocess.run(cmd, timeout=300, **kw) if wait else subprocess.Popen(cmd, **kw)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.slow
def test_gc_tampering_and_a_second_run_while_a_resumed_job_writes(store_url, tmp_path, commit_tiny_model):
    commit_tiny_model(store_url)
    store = ArtifactStore(store_url)
    env = {"PREFECT_HOME": str(tmp_path / "ph")}
    job = [
        "generate",
        "--model",
        "tiny",
        "--name",
        "owned",
        "--prompts",
        str(_prompts(tmp_path / "p.parquet", 6)),
        "--steps",
        "2",
        "--shard-size",
        "3",
    ]
    killed = _asd(store_url, *job, env={**env, "ASD_FAULT_AT": "after-image-3"})  # one chunk durable
    assert killed.returncode == -9, killed.stderr[-3000:]
    (version,) = [
        p.rstrip("/").rsplit("/", 1)[-1]
        for p in store.fs.ls(store.path("generations", "owned"))
        if "LATEST" not in p
    ]
    pending = PendingVersion(ArtifactRef("generations", "owned", version), "")
    (rel,) = list_fragments(store, pending).values()
    entries = pq.read_table(io.BytesIO(store.fs.cat_file(store.path(pending.ref.prefix, rel)))).to_pylist()
    assert len(entries) == 3
    # tampering between the runs: one image swapped, another's fragment entry lists an injected page
    store.fs.pipe_file(store.path(pending.ref.prefix, entries[0]["image"]), b"\x89PNG not the rendered image")
    evil = b"<script>alert(document.cookie)</script>"
    store.fs.pipe_file(store.path(pending.ref.prefix, "images/evil.html"), evil)
    entries[1]["files"].append(
        {
            "path": "images/evil.html",
            "sha256": hashlib.sha256(evil).hexdigest(),
            "size": len(evil),
            "version_id": None,
        }
    )
    write_fragment(store, pending, 0, 3, entries)

    hold = tmp_path / "release"
    rerun = _asd(store_url, *job, env={**env, "ASD_FAULT_HOLD": f"after-image-1={hold}"}, wait=False)
    try:
        _wait_for(Path(f"{hold}.reached"), rerun)  # the rerun holds the lease and has written an image
        assert ArtifactStore(store_url).gc(grace_s=0, delete=True) == []  # gc leaves the leased version alone
        refused = _asd(store_url, *job, env=env)
        assert refused.returncode != 0 and refused.stdout.strip() == ""
        assert "is being written by" in refused.stderr and "flow run" in refused.stderr, refused.stderr[
            -2000:
        ]
        assert "Traceback" not in refused.stderr, refused.stderr[-3000:]  # the refusal is one line
        assert len([x for x in refused.stderr.splitlines() if x.startswith("asd: ")]) == 1
        waiter = _asd(store_url, *job, env={**env, "ASD_LEASE_WAIT_S": "240"}, wait=False)
        time.sleep(1)
        hold.touch()
        out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err[-3000:]
        w_out, w_err = waiter.communicate(timeout=300)
        assert waiter.returncode == 0, w_err[-3000:]
    finally:
        hold.touch()
        for p in (rerun,):
            if p.poll() is None:
                p.kill()
    ref = out.strip().splitlines()[-1]
    assert w_out.strip().splitlines()[-1] == ref  # the waiting run reused the commit it waited for
    store = ArtifactStore(store_url)
    assert [str(r) for r in store.list_versions("generations", "owned")] == [ref]
    assert store.verify(ref) == []
    files = dict(store.iter_files(ref))
    assert "images/evil.html" not in files and not any("_LEASES" in f or "_PENDING" in f for f in files)
    summary = store.record(ref)["summary"]
    assert summary["images_ok"] == 6 and summary["images_resumed"] == 1  # both tampered images rendered again
    manifest = pl.read_parquet(io.BytesIO(store.read_bytes(ref, "manifest.parquet")))
    assert manifest["status"].to_list() == ["ok"] * 6


@pytest.mark.parametrize(
    "forged",
    [
        {"heartbeat": "inf"},
        {"heartbeat": "nan"},
        {"heartbeat": 1e300},  # far in the future
        {"heartbeat": "soon"},
        {"lease_s": 1e12},  # a time-to-live no run is configured with
        {"lease_s": "inf"},
        {"owner": "not a table"},
    ],
    ids=["inf", "nan", "future", "text", "huge-ttl", "inf-ttl", "owner"],
)
def test_a_forged_lease_file_blocks_no_job(tmp_path, forged):
    """A lease file is store data: a heartbeat that is not a finite time or lies in the future,
    or a time-to-live over this run's configured one, is expired (taken over at once)."""
    import json

    store = ArtifactStore(str(tmp_path / "store"))
    pending = store.resume_or_new("generations", "g", "h")
    record = {
        "owner": {"host": "elsewhere", "pid": 1, "flow_run_id": "someone", "token": "t"},
        "heartbeat": time.time() - 120,  # two minutes old: expired for a 60 s lease, live for a forged TTL
        "lease_s": 60,
        **forged,
    }
    store.write_once(leases.lease_path(store, pending, 1), json.dumps(record).encode())
    lease = leases.acquire(store, pending, lease_s=60)
    assert lease.epoch == 2


def test_a_live_lease_says_how_to_take_over(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    pending = store.resume_or_new("generations", "g", "h")
    leases.acquire(store, pending, lease_s=60, flow_run_id="run-a")
    with pytest.raises(LeaseHeld, match=r"delete its lease file .*_LEASES.* and run again to take over"):
        leases.acquire(store, pending, lease_s=60)

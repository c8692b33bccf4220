"""Leases on pending versions: one run writes a resumable version at a time.

A lease is a file `_LEASES/<epoch>.json` in the pending version, holding its owner (host, pid,
flow run, a token) and a heartbeat time. Epoch files are created write-once (a hard link
locally, a conditional PUT on S3), so when two runs race for a free or expired lease exactly
one gets the next epoch; the holder rewrites its own epoch file every `lease_s / 3` seconds
(a heartbeat thread) and checks that no newer epoch exists. A lease is live while its heartbeat
is younger than `lease_s` and it is not released; the holder on this machine whose process is
gone has no live lease (a run killed with SIGKILL is resumed at once, not after `lease_s`).

A second run of the same job waits up to `wait_s` for the holder (and reuses its commit when it
lands), takes over an expired lease, or refuses with one line naming the holder. `gc` never
deletes a version whose lease is live. The commit checks the lease is still this run's, then
removes the lease files with the pending marker."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from artifact_store.refs import LEASE_DIR, PendingVersion, StoreError

if TYPE_CHECKING:
    from artifact_store.backend import StoreBackend

log = logging.getLogger("asd.store")
POLL_S = 2.0
CLOCK_SKEW_S = 300.0  # a heartbeat this far in the future is a clock gone wrong or a forged file


class LeaseHeld(StoreError):
    """Another run holds the pending version's lease."""


def _now() -> float:
    return time.time()


def lease_path(store: StoreBackend, pending: PendingVersion, epoch: int) -> str:
    return store.path(pending.ref.prefix, LEASE_DIR, f"{epoch:010d}.json")


def lease_epochs(store: StoreBackend, pending: PendingVersion) -> list[int]:
    """The lease epochs written into a pending version (one listing), oldest first."""
    try:
        names = store.fs.ls(store.path(pending.ref.prefix, LEASE_DIR), detail=False)
    except FileNotFoundError:
        return []
    epochs = []
    for n in names:
        stem = n.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
        if stem.isdigit() and n.endswith(".json"):
            epochs.append(int(stem))
    return sorted(epochs)


def read_lease(store: StoreBackend, pending: PendingVersion, epoch: int) -> dict[str, Any] | None:
    """A lease file's content (None: unreadable, e.g. cut by a crash: not a live lease)."""
    try:
        rec = json.loads(store.fs.cat_file(lease_path(store, pending, epoch)))
    except (FileNotFoundError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _process_gone(owner: dict[str, Any]) -> bool:
    """Whether the owner is a process of this machine that no longer exists."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def live_holder(lease: dict[str, Any] | None, lease_s: float | None = None) -> dict[str, Any] | None:
    """The lease's owner if the lease is live, else None. A lease file is store data anyone
    sharing the store may have written: a heartbeat that is not a finite time, or lies more than
    `CLOCK_SKEW_S` in the future, is expired, and its time-to-live is at most `lease_s` (this
    run's configured one) whatever the file claims, so no file can hold a job forever."""
    if not isinstance(lease, dict) or lease.get("released"):
        return None
    claimed_owner = lease.get("owner")
    owner: dict[str, Any] = claimed_owner if isinstance(claimed_owner, dict) else {}
    try:
        heartbeat = float(lease["heartbeat"])
        claimed = float(lease.get("lease_s", lease_s if lease_s is not None else 0.0))
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    if not (math.isfinite(heartbeat) and math.isfinite(claimed)) or claimed <= 0:
        return None
    ttl = min(claimed, lease_s) if lease_s is not None else claimed
    age = _now() - heartbeat
    if age > ttl or age < -CLOCK_SKEW_S or _process_gone(owner):
        return None
    return {**owner, "heartbeat_age_s": round(age, 1)}


def holder_text(owner: dict[str, Any]) -> str:
    run = f", flow run {owner['flow_run_id']}" if owner.get("flow_run_id") else ""
    return f"{owner.get('host')}:{owner.get('pid')}{run} (heartbeat {owner.get('heartbeat_age_s')} s ago)"


class Lease:
    """This run's lease on a pending version; `held()` keeps it renewed while the job writes."""

    def __init__(
        self, store: StoreBackend, pending: PendingVersion, epoch: int, owner: dict[str, Any], lease_s: float
    ) -> None:
        self.store, self.pending, self.epoch, self.owner, self.lease_s = store, pending, epoch, owner, lease_s
        self.lost: str | None = None
        self.done = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, released: bool = False) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "heartbeat": _now(),
                "lease_s": self.lease_s,
                "at": datetime.now(UTC).isoformat(),
                "released": released,
            }
        ).encode()

    def renew(self) -> None:
        """Rewrite the heartbeat; notice a newer epoch (the lease was taken over: this run lost it)."""
        newer = [e for e in lease_epochs(self.store, self.pending) if e > self.epoch]
        if newer:
            rec = read_lease(self.store, self.pending, newer[-1]) or {}
            owner = rec.get("owner") or {}
            self.lost = (
                f"{self.pending.ref}'s lease was taken over by {owner.get('host')}:{owner.get('pid')} "
                f"(this run's heartbeat had stopped for over {self.lease_s:.0f} s)"
            )
            self._stop.set()
            return
        self.store.write_atomic(lease_path(self.store, self.pending, self.epoch), self._record())

    def check(self) -> None:
        """Raise unless this run still holds the lease (called before the commit record)."""
        if self.lost is None and not self._stop.is_set():
            self.renew()
        if self.lost:
            raise StoreError(f"{self.lost}; this run committed nothing")

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a store hiccup: try again next beat
                log.warning("could not renew the lease of %s: %s", self.pending.ref, exc)

    def start(self) -> Lease:
        self._thread = threading.Thread(
            target=self._beat, name=f"asd-lease-{self.pending.ref.version}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def finish(self) -> None:
        """The version is committed: stop renewing; the commit removes the lease files."""
        self.done = True
        self.stop()

    def release(self) -> None:
        """Stop renewing and mark the lease free (a run that ends without committing)."""
        self.stop()
        if self.lost is None and not self.done:
            try:
                self.store.write_atomic(
                    lease_path(self.store, self.pending, self.epoch), self._record(released=True)
                )
            except Exception as exc:  # noqa: BLE001 - it expires on its own
                log.warning("could not release the lease of %s: %s", self.pending.ref, exc)

    def __enter__(self) -> Lease:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(
    store: StoreBackend,
    pending: PendingVersion,
    *,
    lease_s: float,
    wait_s: float = 0.0,
    flow_run_id: str | None = None,
    committed: Any = None,
) -> Lease | None:
    """This run's lease on `pending`: the next epoch when the newest lease is free, expired or
    its process gone; waits up to `wait_s` for a live one, then raises LeaseHeld naming it.
    Returns None when `committed()` turns true while waiting (the holder committed the job)."""
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "flow_run_id": flow_run_id,
        "token": uuid.uuid4().hex,
    }
    deadline = _now() + wait_s
    while True:
        epochs = lease_epochs(store, pending)
        newest = epochs[-1] if epochs else 0
        holder = live_holder(read_lease(store, pending, newest), lease_s) if newest else None
        if holder is None:
            lease = Lease(store, pending, newest + 1, owner, lease_s)
            try:
                store.write_once(lease_path(store, pending, newest + 1), lease._record())
            except FileExistsError:
                continue  # another run took this epoch first: look again
            if newest:
                log.info(
                    "took over the lease of %s (epoch %d) from an expired or ended run", pending.ref, newest
                )
            return lease
        if committed is not None and committed():
            return None
        if _now() >= deadline:
            raise LeaseHeld(
                f"{pending.ref} is being written by {holder_text(holder)}; this run did nothing. Wait for "
                f"it (ASD_LEASE_WAIT_S=seconds waits, then reuses its commit), run again after its "
                f"lease expires ({lease_s:.0f} s without a heartbeat), or, if you know that run is gone, "
                f"delete its lease file {lease_path(store, pending, newest)} and run again to take over"
            )
        time.sleep(min(POLL_S, max(0.05, deadline - _now())))

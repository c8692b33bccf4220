"""Fault points: tests SIGKILL a process at a named point (`$ASD_FAULT_AT`) to prove that a
writer killed at every phase of a commit, or a job killed after its N-th image, loses nothing;
or hold it there (`$ASD_FAULT_HOLD=<point>=<file>`: it creates `<file>.reached`, then waits until
`<file>` exists) to act on the store while a job is mid-way (gc, a second run, tampering)."""

from __future__ import annotations

import os

FAULT_ENV = "ASD_FAULT_AT"
FAULT_ONCE_ENV = "ASD_FAULT_ONCE_FILE"
HOLD_ENV = "ASD_FAULT_HOLD"
HOLD_MAX_S = 300


def fault_point(name: str) -> None:
    """SIGKILL this process here when $ASD_FAULT_AT names this point (tests only). With
    $ASD_FAULT_ONCE_FILE set, only the first process to get here dies (it creates that file).
    Held here instead when $ASD_FAULT_HOLD names this point."""
    point, _, release = os.environ.get(HOLD_ENV, "").partition("=")
    if point == name and release:
        _hold(release)
    if os.environ.get(FAULT_ENV) != name:
        return
    once = os.environ.get(FAULT_ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _hold(release: str) -> None:
    import time

    with open(f"{release}.reached", "a"):
        pass
    deadline = time.monotonic() + HOLD_MAX_S
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)


_COUNTS: dict[str, int] = {}


def counted_point(label: str) -> None:
    """One more `label` done by this process (an image rendered, an image upscaled): the fault
    point `<label>-<n>` for the n-th (tests kill a job after its n-th image). The count is this
    process's own: a Dask worker counts what it did."""
    _COUNTS[label] = _COUNTS.get(label, 0) + 1
    fault_point(f"{label}-{_COUNTS[label]}")

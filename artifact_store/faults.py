"""Fault points: tests SIGKILL a process at a named point (`$ASD_FAULT_AT`) to prove that a
writer killed at every phase of a commit, or a job killed after its N-th image, loses nothing."""

from __future__ import annotations

import os

FAULT_ENV = "ASD_FAULT_AT"
FAULT_ONCE_ENV = "ASD_FAULT_ONCE_FILE"


def fault_point(name: str) -> None:
    """SIGKILL this process here when $ASD_FAULT_AT names this point (tests only). With
    $ASD_FAULT_ONCE_FILE set, only the first process to get here dies (it creates that file)."""
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

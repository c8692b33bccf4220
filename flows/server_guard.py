"""Prefect's temporary server dies with the `asd` process that started it, even when that
process is SIGKILLed (a SIGKILL runs no cleanup, and the orphaned server would hold the
caller's pipes and a port forever).

After Prefect starts its temporary server (`SubprocessASGIServer.start`), a small watchdog
process is started beside it: it polls for the `asd` process and terminates the server when
that process is gone. The watchdog holds none of the caller's file descriptors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

log = logging.getLogger("asd")

_WATCHDOG = """
import os, signal, sys, time
owner, server = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
while alive(owner) and os.getppid() == owner:
    if not alive(server):
        sys.exit(0)
    time.sleep(0.5)
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        os.kill(server, sig)
    except ProcessLookupError:
        break
    time.sleep(3)
"""


def tie_temporary_server_to_this_process() -> None:
    """Wrap Prefect's temporary-server start so a watchdog follows it (once per process)."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:  # another Prefect layout: the server is then left as Prefect runs it
        log.debug("Prefect's SubprocessASGIServer not found: no watchdog for its temporary server")
        return
    if getattr(SubprocessASGIServer.start, "_asd_guarded", False):
        return
    original = SubprocessASGIServer.start

    def start(self, *args, **kwargs):
        was_running = getattr(self, "running", False)
        original(self, *args, **kwargs)
        proc = getattr(self, "server_process", None)
        if not was_running and proc is not None and proc.poll() is None:
            subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(proc.pid)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
            )

    start._asd_guarded = True  # type: ignore[attr-defined]  # a marker on a function object
    setattr(SubprocessASGIServer, "start", start)  # noqa: B010 - patching a method: mypy refuses `=`

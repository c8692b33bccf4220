"""What the benches and the tests both use to run things for real: a free local port, a count of
the requests an S3-compatible server answered, and a kill of a process tree. Tests import it
(through `tests.helpers`); the benches never import the tests."""

from __future__ import annotations

import logging
import re
import socket


def free_port() -> int:
    """A TCP port nothing listens on at the moment, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Requests:
    """Requests moto's server answered, by kind (a handler on its werkzeug log): GET, PUT, HEAD,
    POST, DELETE, and LIST for a GET of a listing."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        counts = self.counts

        class Count(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                msg = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # werkzeug colours some lines
                for m in ("GET", "PUT", "HEAD", "POST", "DELETE"):
                    if f'"{m} ' in msg:
                        key = (
                            "LIST"
                            if m == "GET" and ("list-type" in msg or "?prefix" in msg or "&prefix" in msg)
                            else m
                        )
                        counts[key] = counts.get(key, 0) + 1

        self._handler = Count()
        log = logging.getLogger("werkzeug")
        log.setLevel(logging.INFO)
        log.addHandler(self._handler)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    @staticmethod
    def since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0)}

    def close(self) -> None:
        logging.getLogger("werkzeug").removeHandler(self._handler)


def kill_tree(proc) -> None:
    """SIGKILL a launched process and every process under it (torchrun starts its ranks, and a
    flow its Dask workers, in sessions of their own: a kill of its group alone leaves them)."""
    import contextlib
    import signal

    import psutil

    tree = psutil.Process(proc.pid)
    victims = [tree, *tree.children(recursive=True)]
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait()

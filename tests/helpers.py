"""Small helpers the tests share (fixtures are in conftest.py)."""

from __future__ import annotations

import logging
import re
import socket

import numpy as np


def free_port() -> int:
    """A TCP port nothing listens on at the moment, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smooth_image(seed: int, n: int = 256) -> np.ndarray:
    """An n x n grey picture of smooth waves plus a little noise (no lines of its own)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:n].astype(float)
    field = 100 + 40 * np.sin(x / 13 + 1) * np.cos(y / 17) + 20 * np.sin((x + y) / 7) + rng.normal(0, 3, (n, n))
    return np.repeat(field[:, :, None], 3, axis=2)


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
                        key = "LIST" if m == "GET" and ("list-type" in msg or "?prefix" in msg or "&prefix" in msg) else m
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

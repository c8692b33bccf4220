"""Small helpers the tests share (fixtures are in conftest.py)."""

from __future__ import annotations

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

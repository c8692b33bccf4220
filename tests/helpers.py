"""Small helpers the tests share (fixtures are in conftest.py; what the benches use too is in
`bench.harness`)."""

from __future__ import annotations

import numpy as np

from bench.harness import S3Requests, free_port, kill_tree

__all__ = ["S3Requests", "free_port", "kill_tree", "smooth_image"]


def smooth_image(seed: int, n: int = 256) -> np.ndarray:
    """An n x n grey picture of smooth waves plus a little noise (no lines of its own)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:n].astype(float)
    field = (
        100 + 40 * np.sin(x / 13 + 1) * np.cos(y / 17) + 20 * np.sin((x + y) / 7) + rng.normal(0, 3, (n, n))
    )
    return np.repeat(field[:, :, None], 3, axis=2)

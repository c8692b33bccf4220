"""Small helpers the tests share (fixtures are in conftest.py; what the benches use too is in
`bench.harness`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.harness import S3Requests, free_port, kill_tree

__all__ = ["S3Requests", "asd_process", "free_port", "kill_tree", "smooth_image"]


def asd_process(
    store: str, *argv: str, env: dict[str, str] | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """`asd --store STORE ARGV...` in a fresh process (a real terminal's stderr, not capsys), with
    `env` over this environment; its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--store", store, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
        cwd=Path(__file__).parent.parent,
        timeout=timeout,
    )


def smooth_image(seed: int, n: int = 256) -> np.ndarray:
    """An n x n grey picture of smooth waves plus a little noise (no lines of its own)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:n].astype(float)
    field = (
        100 + 40 * np.sin(x / 13 + 1) * np.cos(y / 17) + 20 * np.sin((x + y) / 7) + rng.normal(0, 3, (n, n))
    )
    return np.repeat(field[:, :, None], 3, axis=2)

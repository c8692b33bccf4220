"""Aspect-ratio buckets (ARAD) and the nearest-bucket rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Our table of 9 ratios (w:h) around a square base area: the paper's exact table is not
# published. It spans portrait to landscape up to 21:9 and stays 9 distinct buckets at the
# usual 512/64 and at the demo's 128/16 (coarser steps may merge neighbours).
ASD_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (21, 9), (9, 21),
)


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def log_aspect(self) -> float:
        return math.log(self.width / self.height)

    @classmethod
    def parse(cls, name: str) -> Bucket:
        w, _, h = name.partition("x")
        return cls(int(w), int(h))


def asd_buckets(base: int = 512, step: int = 64) -> list[Bucket]:
    """The 9-ratio table with about `base`*`base` pixels, sides multiples of `step`."""
    if base <= 0 or step <= 0 or base % step:
        raise ValueError(f"bucket base {base} must be a positive multiple of step {step}")
    out = set()
    for rw, rh in ASD_RATIOS:
        r = rw / rh
        w = max(step, round(base * math.sqrt(r) / step) * step)
        h = max(step, round(base / math.sqrt(r) / step) * step)
        out.add(Bucket(w, h))
    return sorted(out, key=lambda b: b.log_aspect)


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """Bucket whose aspect ratio is nearest in log space (ties: the larger area)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets given")
    la = math.log(width / height)
    return min(buckets, key=lambda b: (abs(b.log_aspect - la), -b.width * b.height))

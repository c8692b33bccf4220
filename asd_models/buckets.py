"""Aspect-ratio buckets (ARAD): the tables, the nearest-bucket rule, vectorised bucketing.

Pure functions; the scalar rule (`nearest_bucket`) and the vectorised one (`assign_buckets`,
for manifests of millions of rows) give the same answer by construction: both cut the log
aspect axis at the midpoints between neighbouring buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Our table of 9 ratios (w:h) around a square base area: the paper's exact table is not
# published. It spans portrait to landscape up to 21:9 and stays 9 distinct buckets at the
# usual 512/64 and at the demo's 128/16 (coarser steps may merge neighbours).
ASD_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 1),
    (4, 3),
    (3, 4),
    (3, 2),
    (2, 3),
    (16, 9),
    (9, 16),
    (21, 9),
    (9, 21),
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


def _canonical(buckets: set[Bucket]) -> list[Bucket]:
    """Sorted by aspect; of buckets with the same aspect ratio only the largest is kept."""
    best: dict[float, Bucket] = {}
    for b in buckets:
        key = round(b.log_aspect, 12)
        if key not in best or b.width * b.height > best[key].width * best[key].height:
            best[key] = b
    return sorted(best.values(), key=lambda b: b.log_aspect)


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
    return _canonical(out)


def kohya_buckets(
    min_side: int = 256, max_side: int = 1024, step: int = 64, max_area: int = 512 * 512
) -> list[Bucket]:
    """kohya-ss / NovelAI style table: for every width from `min_side` to `max_side` in `step`s,
    the largest height (a multiple of `step`, at most `max_side`) with width*height <= `max_area`;
    mirrored for portrait."""
    if step <= 0 or min_side <= 0 or min_side % step or max_side % step:
        raise ValueError(
            f"min_side {min_side} and max_side {max_side} must be positive multiples of step {step}"
        )
    if max_side < min_side:
        raise ValueError(f"max_side {max_side} is below min_side {min_side}")
    if max_area < min_side * min_side:
        raise ValueError(f"max_area {max_area} is below min_side^2 = {min_side * min_side}")
    out = set()
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, (max_area // w) // step * step)
        if h >= min_side:
            out.add(Bucket(w, h))
            out.add(Bucket(h, w))
    return _canonical(out)


def _cuts(buckets: list[Bucket]) -> tuple[list[Bucket], np.ndarray]:
    if not buckets:
        raise ValueError("no buckets given")
    table = _canonical(set(buckets))
    la = np.array([b.log_aspect for b in table])
    return table, (la[1:] + la[:-1]) / 2


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """Bucket whose aspect ratio is nearest in log space (exactly halfway: the wider one)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    table, cuts = _cuts(buckets)
    return table[int(np.searchsorted(cuts, math.log(width / height), side="left"))]


def aspect_error(width: int, height: int, bucket: Bucket) -> float:
    """|log(image aspect) - log(bucket aspect)|: 0 for a perfect fit, 0.1 is about 10% crop."""
    return abs(math.log(width / height) - bucket.log_aspect)


def assign_buckets(
    widths: np.ndarray, heights: np.ndarray, buckets: list[Bucket]
) -> tuple[np.ndarray, np.ndarray, list[Bucket]]:
    """Vectorised `nearest_bucket` for millions of sizes: (bucket index, aspect error, table).

    Sizes must be positive; the caller masks bad rows out first."""
    table, cuts = _cuts(buckets)
    la = np.log(np.asarray(widths, dtype=np.float64) / np.asarray(heights, dtype=np.float64))
    idx = np.searchsorted(cuts, la, side="left")
    table_la = np.array([b.log_aspect for b in table])
    return idx, np.abs(la - table_la[idx]), table

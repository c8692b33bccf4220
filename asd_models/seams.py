"""Tile-seam score: how much sharper the image changes across tile borders than elsewhere."""

from __future__ import annotations

import math

import numpy as np


def seam_score(image: np.ndarray, xs: list[int], ys: list[int]) -> float:
    """Mean |gradient| across the given grid lines over the median |gradient| across all
    other pixel boundaries. About 1.0 for a seamless image, clearly above 1 where tiles
    meet visibly. `xs`/`ys` are pixel positions of vertical/horizontal lines (a line at x
    lies between columns x-1 and x). NaN when there is no line inside the image.
    """
    img = np.asarray(image, dtype=np.float32)
    gray = img.mean(axis=2) if img.ndim == 3 else img
    h, w = gray.shape
    col = np.abs(np.diff(gray, axis=1)).mean(axis=0)  # boundary j: between column j and j+1
    row = np.abs(np.diff(gray, axis=0)).mean(axis=1)
    xi = sorted({x - 1 for x in xs if 1 <= x < w})
    yi = sorted({y - 1 for y in ys if 1 <= y < h})
    if not xi and not yi:
        return math.nan
    line_vals = np.concatenate([col[xi], row[yi]])
    rest = np.concatenate([np.delete(col, xi), np.delete(row, yi)])
    base = float(np.median(rest)) if rest.size else 0.0
    if base <= 1e-12:
        return math.nan
    return float(line_vals.mean() / base)


def grid_lines(length: int, period: int, origin: int = 0) -> list[int]:
    """Positions origin + k*period (k >= 1 relative to the canvas) that fall inside (0, length)."""
    out = []
    k = 1
    while True:
        p = k * period - origin
        if p >= length:
            break
        if p > 0:
            out.append(p)
        k += 1
    return out

"""Tile-seam score: how much sharper the image changes across tile borders than elsewhere."""

from __future__ import annotations

import math

import numpy as np

SEAM_PERIOD = 8  # the SD VAE's factor: the lattice seam scores compare tile lines with


def seam_scores(
    image: np.ndarray, xs: list[int], ys: list[int], period: int = SEAM_PERIOD
) -> tuple[float, float, float]:
    """`seam_score` over both axes, vertical lines only, horizontal lines only."""
    return (
        seam_score(image, xs, ys, period),
        seam_score(image, xs, [], period),
        seam_score(image, [], ys, period),
    )


def seam_score(image: np.ndarray, xs: list[int], ys: list[int], period: int = 1) -> float:
    """Mean |gradient| across the given tile lines over the median |gradient| across the other
    lines of the same lattice and phase. About 1.0 for a seamless image, clearly above 1 where
    tiles meet visibly. `xs`/`ys` are pixel positions of vertical/horizontal lines (a line at x
    lies between columns x-1 and x). `period` is the VAE factor: decoders leave a faint pattern
    every `period` pixels, so tile lines (on that lattice) are compared with the other lines of
    the lattice, never with lines between two latent pixels. The lattice's phase is taken from
    the tile lines themselves: in an output cropped `c` pixels into its canvas both sit at
    k*period - c, not at multiples of `period` from the cropped corner. NaN when there is nothing
    to compare.
    """
    img = np.asarray(image, dtype=np.float32)
    gray = img.mean(axis=2) if img.ndim == 3 else img
    ratios, weights = [], []
    # per axis, since row and column gradients of one image can differ in scale
    for grad, lines in (
        (np.abs(np.diff(gray, axis=1)).mean(axis=0), xs),
        (np.abs(np.diff(gray, axis=0)).mean(axis=1), ys),
    ):
        n = grad.size + 1  # image side
        on = sorted({p for p in lines if 1 <= p < n})
        if not on:
            continue
        phases = {p % period for p in on}
        if len(phases) > 1:
            raise ValueError(f"tile lines {on[:6]}... are not on one lattice of period {period}")
        phase = phases.pop()
        on_set = set(on)
        rest = [grad[p - 1] for p in range(phase or period, n, period) if p not in on_set]
        if not rest:
            continue
        base = float(np.median(rest))
        if base <= 1e-12:
            continue
        ratios.append(float(np.mean([grad[p - 1] for p in on])) / base)
        weights.append(len(on))
    if not ratios:
        return math.nan
    return float(np.average(ratios, weights=weights))


def grid_lines(length: int, period: int, origin: int = 0) -> list[int]:
    """The canvas grid lines k*period (k >= 1) in the coordinates of an image cut `origin`
    pixels into the canvas, i.e. positions k*period - origin that fall inside (0, length)."""
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


def seam_heatmap(image: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Where the image changes abruptly, as a map of `out_size` (width, height): the larger of
    |d/dx| and |d/dy| at each pixel over the image's median gradient, max-pooled down (a 1-pixel
    seam survives the reduction). 1.0 = a typical edge; tile seams show as straight lines."""
    img = np.asarray(image, dtype=np.float32)
    gray = img.mean(axis=2) if img.ndim == 3 else img
    h, w = gray.shape
    grad = np.zeros((h, w), np.float32)
    grad[:, 1:] = np.abs(np.diff(gray, axis=1))
    grad[1:, :] = np.maximum(grad[1:, :], np.abs(np.diff(gray, axis=0)))
    base = float(np.median(grad[grad > 0])) if np.any(grad > 0) else 1.0
    ow, oh = max(1, min(out_size[0], w)), max(1, min(out_size[1], h))
    ys = np.linspace(0, h, oh + 1).astype(int)
    xs = np.linspace(0, w, ow + 1).astype(int)
    rows = np.maximum.reduceat(grad, ys[:-1], axis=0)
    pooled = np.maximum.reduceat(rows, xs[:-1], axis=1)
    return pooled / max(base, 1e-6)


HEATMAP_MAX_SIDE = 1024  # longest side of a seam heat-map
HEATMAP_MAX_PIXELS = 64 << 20  # larger images get none (the gradient map would not fit comfortably)


def seam_heatmap_rgb(
    image: np.ndarray, xs: list[int], ys: list[int], max_side: int = HEATMAP_MAX_SIDE
) -> np.ndarray:
    """The seam heat-map as an RGB picture (longest side at most `max_side`): `seam_heatmap`
    in the inferno colour map (4x the median gradient and above at full brightness), the tile
    lines `xs`/`ys` marked as cyan ticks on the borders, so the lines themselves stay visible."""
    from matplotlib import colormaps

    h, w = np.asarray(image).shape[:2]
    scale = min(1.0, max_side / max(w, h))
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    heat = seam_heatmap(image, (tw, th))
    th, tw = heat.shape
    rgb = (colormaps["inferno"](np.clip(heat / 4.0, 0, 1))[..., :3] * 255).astype(np.uint8)
    tick = max(2, min(th, tw) // 40)
    for x in xs:
        c = min(tw - 1, int(x * tw / w))
        rgb[:tick, c] = rgb[-tick:, c] = (0, 255, 255)
    for y in ys:
        r = min(th - 1, int(y * th / h))
        rgb[r, :tick] = rgb[r, -tick:] = (0, 255, 255)
    return rgb

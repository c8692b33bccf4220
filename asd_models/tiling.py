"""Tile geometry for tiled diffusion: shifted grids (FSTD), overlapping windows (baselines),
Gaussian weights.

All boxes are (top, left, height, width) in latent pixels.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

Box = tuple[int, int, int, int]  # top, left, height, width (latent units)


def tile_starts(length: int, tile: int, offset: int) -> list[int]:
    """Starts of a non-overlapping grid of `tile` shifted by `offset`, covering [0, length).

    Grid lines sit at offset + k*tile. The strip before the first line gets an edge tile at
    0, and the last tile is clamped inside, so every position is covered by a full-size tile
    (all tiles have one shape and batch together).
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if length <= tile:
        return [0]
    offset %= tile
    starts = {0}
    s = offset
    while s < length:
        starts.add(min(s, length - tile))
        if s + tile >= length:
            break
        s += tile
    return sorted(starts)


def cropped_segments(length: int, tile: int, offset: int, min_piece: int = 0) -> list[tuple[int, int]]:
    """(start, size) segments cut at offset + k*tile: a partition of [0, length), edge
    segments cropped. Same total area as the unshifted grid: the cost of naive tiling. An edge
    segment thinner than `min_piece` joins its neighbour (a sliver of a few latent rows has too
    little context to agree with the rest; a tile slightly over size does not)."""
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if length <= tile:
        return [(0, length)]  # one tile holds the whole side: nothing to shift
    offset %= tile
    cuts = [0] + [c for c in range(offset, length, tile) if c > 0] + [length]
    if len(cuts) > 2 and cuts[1] - cuts[0] < min_piece:
        del cuts[1]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] < min_piece:
        del cuts[-2]
    return [(a, b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def official_starts(length: int, tile: int, offset: int) -> list[int]:
    """The official ASD code: origins k*tile + offset clamped to [0, length - tile]; the strip
    [0, offset) stays uncovered (it reuses the previous step's prediction there)."""
    if length <= tile:
        return [0]
    n = math.ceil(length / tile)
    return sorted({min(k * tile + offset, length - tile) for k in range(n)})


def grid_boxes(
    height: int, width: int, tile: int, dy: int = 0, dx: int = 0, mode: str = "cropped", min_piece: int = 0
) -> list[Box]:
    """Tile boxes of the grid shifted by (dy, dx).

    mode "cropped": edge tiles cropped to fit (a partition; no overlap, naive-tiling cost),
    edge pieces thinner than `min_piece` joined to their neighbour;
    "edge-tile": full-size tiles, an extra edge tile covers the strip before the first line;
    "official": full-size clamped tiles, the strip before the first line left uncovered.
    """
    if mode == "cropped":
        ys, xs = cropped_segments(height, tile, dy, min_piece), cropped_segments(width, tile, dx, min_piece)
        return [(y, x, h, w) for y, h in ys for x, w in xs]
    th, tw = min(tile, height), min(tile, width)
    if mode == "edge-tile":
        starts_y, starts_x = tile_starts(height, th, dy), tile_starts(width, tw, dx)
    elif mode == "official":
        starts_y, starts_x = official_starts(height, th, dy), official_starts(width, tw, dx)
    else:
        raise ValueError(f"unknown grid mode {mode!r}: expected cropped, edge-tile or official")
    return [(y, x, th, tw) for y in starts_y for x in starts_x]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Overlapping windows every `stride`, the last one clamped to end at `length`
    (MultiDiffusion / Mixture of Diffusers); never leaves a position uncovered."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def overlap_boxes(height: int, width: int, window: int, stride: int) -> list[Box]:
    th, tw = min(window, height), min(window, width)
    return [
        (y, x, th, tw) for y in window_starts(height, th, stride) for x in window_starts(width, tw, stride)
    ]


@lru_cache(maxsize=64)
def gaussian_weights(height: int, width: int, var: float = 0.01) -> torch.Tensor:
    """Tile weight map peaking at the centre (Mixture of Diffusers' Gaussian, variance 0.01)."""

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64)
        mid = (n - 1) / 2
        return torch.exp(-(((x - mid) / n) ** 2) / (2 * var))

    return torch.outer(axis(height), axis(width)).float()


@lru_cache(maxsize=64)
def uniform_weights(height: int, width: int) -> torch.Tensor:
    return torch.ones(height, width)

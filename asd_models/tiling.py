"""Tile geometry for tiled diffusion: shifted grids, clamped edge tiles, Gaussian weights."""

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


def grid_boxes(height: int, width: int, tile: int, dy: int = 0, dx: int = 0) -> list[Box]:
    """All tile boxes of the grid shifted by (dy, dx); tiles are min(tile, side) big."""
    th, tw = min(tile, height), min(tile, width)
    return [(y, x, th, tw) for y in tile_starts(height, th, dy) for x in tile_starts(width, tw, dx)]


def count_fstd_tiles(height: int, width: int, tile: int) -> int:
    """Tiles per step on the unshifted grid: ceil(H/t) * ceil(W/t)."""
    return math.ceil(height / min(tile, height)) * math.ceil(width / min(tile, width))


@lru_cache(maxsize=32)
def gaussian_weights(height: int, width: int, var: float = 0.01) -> torch.Tensor:
    """Tile weight map peaking at the centre (Mixture of Diffusers' Gaussian, variance 0.01)."""

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64)
        mid = (n - 1) / 2
        return torch.exp(-((x - mid) / n) ** 2 / (2 * var))

    return torch.outer(axis(height), axis(width)).float()

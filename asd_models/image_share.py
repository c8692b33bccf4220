"""One image denoised by several processes (`asd generate --image-parallel N`): within a step
FSTD's pieces are independent and their places depend only on the job's salt and the step, so
every process computes the same pieces, runs its share of them (`assign`: balanced by area, the
same answer on every rank), and one all-reduce of the fused prediction per step (each position
written by exactly one process) gives every process the same latent; the scheduler step then
runs on every rank. The tiled VAE splits the same way: each rank encodes or decodes its share of
the tiles (latents all-reduced, pixels summed into rank 0's output). The share is set for the
process (`image_share`) and read by the sampling loop (`asd_models.fstd.sample_jobs`) and the
tiled VAE (`asd_models.tiled_vae`); without one, nothing changes."""

from __future__ import annotations

import contextvars
import heapq
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

_SHARE: contextvars.ContextVar[ImageShare | None] = contextvars.ContextVar("asd_image_share", default=None)


@dataclass(frozen=True)
class ImageShare:
    """This process's place among the processes rendering the same images."""

    rank: int
    world: int
    group: Any = None  # a torch.distributed process group (None: the default one)
    device: str = "cpu"  # where this rank's collectives run (NCCL: its GPU)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world}")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every rank, in place (every rank gets the sum)."""
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def mine(self, areas: list[int]) -> list[bool]:
        """Which of these pieces (by area) this rank runs (`assign`)."""
        return [owner == self.rank for owner in assign(areas, self.world)]

    def gather_pixels(self, out: Any, strip_bytes: int = 64 << 20) -> None:
        """Every rank's disjoint tiles of an H x W x 3 uint8 array (zeros elsewhere) summed into
        rank 0's `out` (a memory-mapped one too), a strip of rows at a time through this rank's
        device: the sum of disjoint tiles and zeros is exact."""
        import numpy as np
        import torch.distributed as dist

        rows = max(1, strip_bytes // max(1, out.shape[1] * out.shape[2]))
        for y in range(0, out.shape[0], rows):
            strip = torch.from_numpy(np.ascontiguousarray(out[y : y + rows])).to(self.device)
            dist.reduce(strip, dst=0, op=dist.ReduceOp.SUM, group=self.group)
            if self.rank == 0:
                out[y : y + rows] = strip.cpu().numpy()


@contextmanager
def image_share(share: ImageShare | None) -> Iterator[None]:
    """Sampling in this context runs this process's share of every step's pieces."""
    token = _SHARE.set(share if share is not None and share.world > 1 else None)
    try:
        yield
    finally:
        _SHARE.reset(token)


def current_share() -> ImageShare | None:
    return _SHARE.get()


def assign(areas: list[int], world: int) -> list[int]:
    """The rank of each piece: the largest first, each to the least loaded rank (ties: the lowest
    rank; equal areas keep their order). A pure function of the areas: every rank agrees."""
    owners = [0] * len(areas)
    load = [(0, r) for r in range(world)]
    for i in sorted(range(len(areas)), key=lambda i: (-areas[i], i)):
        total, rank = heapq.heappop(load)
        owners[i] = rank
        heapq.heappush(load, (total + areas[i], rank))
    return owners

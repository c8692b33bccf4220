"""Bounded windows over long streams, the one place they are written: a million-file version or
a million-image manifest is never a million futures or one list.

    windowed     items in order, at most `window` pulled ahead (submitted futures: a bound in flight)
    bounded_map  a function over items on threads, in order, at most 2 x threads in flight
    batched      items in lists of `size` (the last shorter)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def windowed(items: Iterable[T], window: int) -> Iterator[T]:
    """Yield `items` in order, pulling up to `window` ahead: with items that are submitted
    futures, at most `window` calls are in flight and memory stays flat."""
    pending: deque[T] = deque()
    for item in items:
        pending.append(item)
        if len(pending) >= window:
            yield pending.popleft()
    yield from pending


def bounded_map(fn: Callable[[Any], T], items: Iterable[Any], workers: int) -> Iterator[T]:
    """`fn` over `items` on `workers` threads, in order, with at most 2 x `workers` in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="asd-io") as pool:
        for future in windowed((pool.submit(fn, item) for item in items), 2 * workers):
            yield future.result()


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size`, the last one shorter (itertools.batched, Python 3.12, as lists)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch

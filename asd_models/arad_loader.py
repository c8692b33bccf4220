"""Streaming bucketed batches from per-bucket WebDataset shards (ARAD's data side).

Every batch holds samples of one bucket. Within an epoch, each batch draws its bucket with
probability proportional to the bucket's remaining samples (NovelAI's scheme), so buckets are
used up together and none is left to the end. A bucket's last partial batch follows an explicit
policy: `keep` (a smaller batch; every sample seen once per epoch) or `drop` (skipped).

Shards are read as streams (any opener: a local file, fsspec, the artifact store), never
downloaded whole; a per-bucket shuffle buffer of encoded samples mixes within a bucket.

Splitting: the stream is cut into `slots` = ranks x data-loader workers. A bucket with at least
as many shards as slots is split by shard; a smaller one by sample (slot k keeps every n-th
sample), so small buckets still reach every rank. For a given seed, slot count and shard set the
batch sequence is fixed, and `skip` replays a position without decoding a single image (resume).
"""

from __future__ import annotations

import io
import json
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

Opener = Callable[[str], AbstractContextManager[BinaryIO]]
LEFTOVER_POLICIES = ("keep", "drop")


@dataclass(frozen=True)
class ShardRef:
    url: str
    count: int


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int
    seed: int = 0
    shuffle_buffer: int = 256
    leftover: str = "keep"
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.leftover not in LEFTOVER_POLICIES:
            raise ValueError(f"leftover policy {self.leftover!r}: use one of {', '.join(LEFTOVER_POLICIES)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world_size {self.world_size}")


@dataclass
class RawBatch:
    bucket: str
    samples: list[dict[str, Any]]
    epoch: int


@dataclass
class _BucketPlan:
    shards: list[str]
    modulo: int | None  # keep sample i when i % modulo == slot (None: keep all)
    slot: int
    remaining: int
    buffer: list[dict[str, Any]] = field(default_factory=list)
    stream: Iterator[dict[str, Any]] | None = None
    exhausted: bool = False


def tar_samples(url: str, opener: Opener) -> Iterator[dict[str, Any]]:
    """Samples of one shard, streamed within the reader's caps (a sample that does not read
    whole is skipped with a warning)."""
    from asd_models.shard_reader import STORED_MAX_BYTES, sample_members, tar_stream_samples

    with opener(url) as stream:
        for sample in tar_stream_samples(stream, STORED_MAX_BYTES, STORED_MAX_BYTES):
            if sample["__problems__"]:
                warnings.warn(
                    f"{url}: sample {sample['__key__']} skipped: {'; '.join(sample['__problems__'])}",
                    stacklevel=2,
                )
                continue
            yield {**sample_members(sample), "__url__": url}


class BucketBatchStream:
    """Endless one-bucket batches for one slot (rank x worker), epoch after epoch."""

    def __init__(
        self,
        buckets: dict[str, list[ShardRef]],
        opener: Opener,
        config: LoaderConfig,
        slot: int = 0,
        slots: int = 1,
    ) -> None:
        self.buckets = {b: list(s) for b, s in sorted(buckets.items()) if sum(x.count for x in s) > 0}
        if not self.buckets:
            raise ValueError("no samples in any bucket")
        self.opener, self.config, self.slot, self.slots = opener, config, slot, slots

    def _plan(self, epoch: int) -> dict[str, _BucketPlan]:
        """The partition of this epoch: the same shard order on every slot (one RNG for all)."""
        rng = random.Random(f"{self.config.seed}:{epoch}:shards")
        plans = {}
        for b, shards in self.buckets.items():
            order = list(shards)
            rng.shuffle(order)
            if len(order) >= self.slots:
                mine = order[self.slot :: self.slots]
                plans[b] = _BucketPlan([s.url for s in mine], None, self.slot, sum(s.count for s in mine))
            else:
                total = sum(s.count for s in order)
                plans[b] = _BucketPlan(
                    [s.url for s in order], self.slots, self.slot, len(range(self.slot, total, self.slots))
                )
        return plans

    def _samples(self, plan: _BucketPlan) -> Iterator[dict[str, Any]]:
        i = 0
        for url in plan.shards:
            for sample in tar_samples(url, self.opener):
                if plan.modulo is None or i % plan.modulo == plan.slot:
                    yield sample
                i += 1

    def _take(self, plan: _BucketPlan, n: int, rng: random.Random) -> list[dict[str, Any]]:
        if plan.stream is None and not plan.exhausted:
            plan.stream = self._samples(plan)
        out: list[dict[str, Any]] = []
        while len(out) < n:
            while len(plan.buffer) < self.config.shuffle_buffer and plan.stream is not None:
                nxt = next(plan.stream, None)
                if nxt is None:
                    plan.stream, plan.exhausted = None, True
                    break
                plan.buffer.append(nxt)
            if not plan.buffer:
                break
            j = rng.randrange(len(plan.buffer))
            plan.buffer[j], plan.buffer[-1] = plan.buffer[-1], plan.buffer[j]
            out.append(plan.buffer.pop())
        return out

    def __iter__(self) -> Iterator[RawBatch]:
        bs, keep = self.config.batch_size, self.config.leftover == "keep"
        epoch = 0
        while True:
            rng = random.Random(f"{self.config.seed}:{epoch}:{self.slot}/{self.slots}")
            plans = self._plan(epoch)
            yielded = False
            while True:
                live = [b for b, p in plans.items() if p.remaining >= (1 if keep else bs)]
                if not live:
                    break
                b = rng.choices(live, weights=[plans[x].remaining for x in live])[0]
                plan = plans[b]
                samples = self._take(plan, min(bs, plan.remaining), rng)
                if len(samples) < min(bs, plan.remaining):  # the shards hold fewer than the index says
                    warnings.warn(
                        f"bucket {b}: its shards hold {plan.remaining - len(samples)} samples fewer than "
                        f"the bucket index says (epoch {epoch}, slot {self.slot}/{self.slots})",
                        stacklevel=2,
                    )
                    plan.remaining = 0
                    if not samples or (not keep and len(samples) < bs):
                        continue
                else:
                    plan.remaining -= len(samples)
                yield RawBatch(b, samples, epoch)
                yielded = True
            if not yielded:
                raise ValueError(
                    f"slot {self.slot}/{self.slots} gets no batch in an epoch: fewer samples than "
                    f"batch_size {bs} per bucket with leftover=drop, or empty shards"
                )
            epoch += 1


CROP_FIELDS = ("crop_left", "crop_top", "cover_width", "cover_height")


def sample_crop(sample: dict[str, Any], width: int, height: int) -> tuple[int, int, int, int] | None:
    """Where the sample's pixels were cut from the image ingest resized to cover its bucket:
    (left, top, cover width, cover height) from the sample's `.json` (None: a dataset from before
    ingest recorded it). The shard was read back from the store, so the box is checked: a crop
    that does not fit its cover is a ValueError naming the sample."""
    raw = sample.get("json")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
        values = [meta[k] for k in CROP_FIELDS] if all(k in meta for k in CROP_FIELDS) else None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"sample {sample.get('__key__')}: its .json does not read ({exc})") from exc
    if values is None:
        return None
    left, top, cover_w, cover_h = values
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values) or not (
        0 <= left and 0 <= top and left + width <= cover_w and top + height <= cover_h
    ):
        raise ValueError(
            f"sample {sample.get('__key__')}: crop {values} does not fit a {width}x{height} image in its cover"
        )
    return left, top, cover_w, cover_h


def decode_batch(raw: RawBatch) -> dict[str, Any]:
    """JPEG/PNG bytes -> float tensor B x 3 x H x W in [-1, 1]; captions; keys; where each was
    cropped from its cover image (`crops`, None for a sample without the record)."""
    import numpy as np
    from PIL import Image

    images, captions, keys, crops = [], [], [], []
    for s in raw.samples:
        data = next((s[k] for k in ("jpg", "jpeg", "png", "webp") if k in s), None)
        if data is None:
            raise ValueError(f"sample {s.get('__key__')} in bucket {raw.bucket} has no image")
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        images.append(torch.from_numpy(arr).permute(2, 0, 1))
        txt = s.get("txt", b"")
        captions.append(txt.decode("utf-8", "replace") if isinstance(txt, bytes) else str(txt))
        keys.append(str(s.get("__key__")))
        crops.append(sample_crop(s, arr.shape[1], arr.shape[0]))
    return {
        "bucket": raw.bucket,
        "pixels": torch.stack(images),
        "captions": captions,
        "keys": keys,
        "crops": crops,
        "epoch": raw.epoch,
    }


class BucketedShardDataset(torch.utils.data.IterableDataset):
    """`torch.utils.data.DataLoader(ds, batch_size=None, num_workers=W)` gives decoded
    one-bucket batches; worker w of rank r is slot r*W + w. `start_batch` resumes: it is the
    number of batches this rank's DataLoader already yielded (they are replayed undecoded)."""

    def __init__(
        self,
        buckets: dict[str, list[ShardRef]],
        opener: Opener,
        config: LoaderConfig,
        start_batch: int = 0,
        decode: Callable[[RawBatch], Any] = decode_batch,
    ) -> None:
        super().__init__()
        self.buckets, self.opener, self.config = buckets, opener, config
        self.start_batch, self.decode = start_batch, decode

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        slot = self.config.rank * nw + wid
        stream = iter(
            BucketBatchStream(self.buckets, self.opener, self.config, slot, self.config.world_size * nw)
        )
        for _ in range(len(range(wid, self.start_batch, nw))):  # batches of this worker already consumed
            next(stream)
        for raw in stream:
            yield self.decode(raw)


def make_loader(
    buckets: dict[str, list[ShardRef]],
    opener: Opener,
    config: LoaderConfig,
    num_workers: int = 0,
    start_batch: int = 0,
) -> torch.utils.data.DataLoader:
    """Workers are spawned, never forked: the training process runs Prefect's and fsspec's
    threads, and a fork can inherit their held locks."""
    ds = BucketedShardDataset(buckets, opener, config, start_batch)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
        multiprocessing_context="spawn" if num_workers else None,
    )

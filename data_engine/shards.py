"""Per-bucket WebDataset shard sets, written streaming into a store version, plus the
indexes trainers read: `bucket_index.json` and wids' `wids-index.json` (whole dataset and
one per bucket)."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from typing import Any

import webdataset as wds

from artifact_store import VersionWriter

TAR_MTIME = 0  # fixed member mtime: the same input gives byte-identical shards
WIDS_KIND = "wids-shard-index-v1"


class BucketShardWriter:
    """`buckets/<W>x<H>/<nnnnnn>.tar`, a new shard when one reaches `max_samples` or `max_bytes`.
    Memory is one open tar stream per bucket, flat in the dataset size."""

    def __init__(self, writer: VersionWriter, max_samples: int, max_bytes: int) -> None:
        self.writer = writer
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.open: dict[str, tuple[wds.TarWriter, contextlib.ExitStack, str]] = {}
        self.counts: Counter[str] = Counter()
        self.shard_no: Counter[str] = Counter()
        self.in_shard: Counter[str] = Counter()
        self.bytes_in_shard: Counter[str] = Counter()
        self.shards: dict[str, list[dict[str, Any]]] = {}

    def _rotate(self, bucket: str) -> None:
        self._close(bucket)
        rel = f"buckets/{bucket}/{self.shard_no[bucket]:06d}.tar"
        self.shard_no[bucket] += 1
        stack = contextlib.ExitStack()
        stream = stack.enter_context(self.writer.open(rel))
        self.open[bucket] = (wds.TarWriter(stream, mtime=TAR_MTIME), stack, rel)
        self.in_shard[bucket] = 0
        self.bytes_in_shard[bucket] = 0
        self.shards.setdefault(bucket, []).append({"shard": rel, "count": 0})

    def _close(self, bucket: str) -> None:
        if bucket in self.open:
            tar, stack, _ = self.open.pop(bucket)
            tar.close()
            stack.close()

    def write(self, bucket: str, sample: dict[str, Any]) -> str:
        """Write one sample (`__key__` + extension -> bytes); returns its shard path."""
        size = sum(len(v) + 512 for k, v in sample.items() if not k.startswith("__"))  # + tar headers
        if (
            bucket not in self.open
            or self.in_shard[bucket] >= self.max_samples
            or (self.in_shard[bucket] and self.bytes_in_shard[bucket] + size > self.max_bytes)
        ):
            self._rotate(bucket)
        tar, _, rel = self.open[bucket]
        tar.write(sample)
        self.in_shard[bucket] += 1
        self.bytes_in_shard[bucket] += size
        self.counts[bucket] += 1
        self.shards[bucket][-1]["count"] += 1
        return rel

    def close(self) -> None:
        for b in list(self.open):
            self._close(b)

    def wids_indexes(self, name: str) -> dict[str, bytes]:
        """wids index files (relative URLs, resolved against the index's own location)."""
        def doc(label: str, shards: list[dict[str, Any]], prefix: str) -> bytes:
            return json.dumps({
                "__kind__": WIDS_KIND, "wids_version": 1, "name": label,
                "shardlist": [{"url": s["shard"][len(prefix):], "nsamples": s["count"]} for s in shards],
            }, indent=1).encode()

        out = {}
        every = [s for b in sorted(self.shards) for s in self.shards[b]]
        if every:
            out["wids-index.json"] = doc(name, every, "")
        for b in sorted(self.shards):
            out[f"buckets/{b}/wids-index.json"] = doc(f"{name}/{b}", self.shards[b], f"buckets/{b}/")
        return out

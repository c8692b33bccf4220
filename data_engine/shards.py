"""Per-bucket WebDataset shard sets, written streaming into a store version, plus the
indexes trainers read: `bucket_index.json` and wids' `wids-index.json` (whole dataset and
one per bucket)."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections import Counter
from typing import Any

from artifact_store import VersionWriter
from asd_models.shard_reader import STORED_MAX_BYTES, sample_members, tar_stream_samples

TAR_MTIME = 0  # fixed member mtime: the same input gives byte-identical shards
WIDS_KIND = "wids-shard-index-v1"


class SampleTarWriter:
    """WebDataset samples into a tar stream, as `webdataset.TarWriter` writes them (USTAR,
    members `<key>.<ext>` in sorted order, mode 0444, fixed mtime), without importing
    webdataset, whose package imports torch: ingest's driver and workers never load torch."""

    def __init__(self, stream: Any) -> None:
        self.tar = tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT)

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("_")):
            data = sample[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
            info.uname = info.gname = "bigdata"
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


class BucketShardWriter:
    """`buckets/<W>x<H>/<stem>-<nnnn>.tar` (one partition's `stem`), a new shard when one reaches
    `max_samples` or `max_bytes`. Memory is one open tar stream per bucket."""

    def __init__(self, writer: VersionWriter, max_samples: int, max_bytes: int, stem: str) -> None:
        self.writer, self.stem = writer, stem
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.open: dict[str, tuple[SampleTarWriter, contextlib.ExitStack, str]] = {}
        self.counts: Counter[str] = Counter()
        self.shard_no: Counter[str] = Counter()
        self.in_shard: Counter[str] = Counter()
        self.bytes_in_shard: Counter[str] = Counter()
        self.shards: dict[str, list[dict[str, Any]]] = {}

    def _rotate(self, bucket: str) -> None:
        self._close(bucket)
        rel = f"buckets/{bucket}/{self.stem}-{self.shard_no[bucket]:04d}.tar"
        self.shard_no[bucket] += 1
        stack = contextlib.ExitStack()
        stream = stack.enter_context(self.writer.open(rel))
        self.open[bucket] = (SampleTarWriter(stream), stack, rel)
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


def wids_indexes(name: str, shards: dict[str, list[dict[str, Any]]]) -> dict[str, bytes]:
    """wids index files of bucket -> shards (relative URLs, resolved against the index's own
    location): one for the whole dataset and one per bucket."""

    def doc(label: str, listed: list[dict[str, Any]], prefix: str) -> bytes:
        return json.dumps(
            {
                "__kind__": WIDS_KIND,
                "wids_version": 1,
                "name": label,
                "shardlist": [{"url": s["shard"][len(prefix) :], "nsamples": s["count"]} for s in listed],
            },
            indent=1,
        ).encode()

    out = {}
    every = [s for b in sorted(shards) for s in shards[b]]
    if every:
        out["wids-index.json"] = doc(name, every, "")
    for b in sorted(shards):
        out[f"buckets/{b}/wids-index.json"] = doc(f"{name}/{b}", shards[b], f"buckets/{b}/")
    return out


def rewrite_shard(writer: VersionWriter, rel: str, data: Any, drop: set[str], rename: dict[str, str]) -> int:
    """Shard `rel` of `writer`'s version written again from `data` (its stream) without the
    samples of `drop` and with keys renamed by `rename`; returns the samples it keeps (0: the
    shard is gone). Byte-identical to a shard written with those samples in the first place."""
    kept = [
        sample_members(s)
        for s in tar_stream_samples(data, STORED_MAX_BYTES, STORED_MAX_BYTES)
        if s["__key__"] not in drop
    ]
    writer.discard(rel)
    if not kept:
        return 0
    with writer.open(rel) as stream:
        tar = SampleTarWriter(stream)
        for sample in kept:
            key = sample["__key__"]
            if key in rename:
                sample = {**sample, "__key__": rename[key]}
                if "json" in sample:
                    meta = json.loads(sample["json"])
                    sample["json"] = json.dumps({**meta, "key": rename[key]}, default=str).encode()
            tar.write(sample)
        tar.close()
    return len(kept)

"""Reading a committed dataset version back: its bucket index, its shards through the store,
and (for small datasets) every sample in memory."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image

from artifact_store import ArtifactRef, ArtifactStore
from asd_models.arad_loader import ShardRef, tar_samples


class StoreOpener:
    """Picklable opener of a dataset version's shards (data-loader workers re-create the store)."""

    def __init__(self, store_url: str, ref: str) -> None:
        self.store_url, self.ref = store_url, ref
        self._store: ArtifactStore | None = None

    def __call__(self, relpath: str):
        if self._store is None:
            self._store = ArtifactStore(self.store_url)
        return self._store.open(self.ref, relpath)

    def __getstate__(self) -> dict[str, Any]:
        return {"store_url": self.store_url, "ref": self.ref, "_store": None}


def dataset_buckets(store: ArtifactStore, dataset: ArtifactRef) -> dict[str, list[ShardRef]]:
    """Bucket name -> its shards (with sample counts), from `bucket_index.json`."""
    index = json.loads(store.read_bytes(dataset, "bucket_index.json"))
    buckets = {
        b: [ShardRef(s["shard"], s["count"]) for s in info["shards"]] for b, info in index["buckets"].items()
    }
    if not any(s.count for shards in buckets.values() for s in shards):
        raise ValueError(f"dataset {dataset} has no successful samples to train on")
    return buckets


def read_bucket_samples(
    store: ArtifactStore, dataset_ref: ArtifactRef | str
) -> dict[str, list[tuple[Image.Image, str]]]:
    """All samples of a (small) dataset version in memory, per bucket: for fitting the tiny
    VAE. Training streams instead (`make_loader`); evaluation samples (`sample_images`)."""
    ref = store.resolve(dataset_ref)
    opener = StoreOpener(store.url, str(ref))
    out: dict[str, list[tuple[Image.Image, str]]] = {}
    for bucket, shards in dataset_buckets(store, ref).items():
        for shard in shards:
            for s in tar_samples(shard.url, opener):
                img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
                out.setdefault(bucket, []).append((img, s["txt"].decode("utf-8")))
    return out


def sample_images(
    store: ArtifactStore, dataset_ref: ArtifactRef | str, n: int, seed: int
) -> list[Image.Image]:
    """`sample_encoded`, decoded."""
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in sample_encoded(store, dataset_ref, n, seed)]


def sample_encoded(store: ArtifactStore, dataset_ref: ArtifactRef | str, n: int, seed: int) -> list[bytes]:
    """A uniform, seeded sample of `n` images of a dataset version, encoded, streamed (reservoir
    sampling over its shards: memory holds `n` encoded images, whatever the dataset's size)."""
    import random

    ref = store.resolve(dataset_ref)
    opener = StoreOpener(store.url, str(ref))
    rng = random.Random(seed)
    kept: list[bytes] = []
    seen = 0
    for _, shards in sorted(dataset_buckets(store, ref).items()):
        for shard in shards:
            for s in tar_samples(shard.url, opener):
                seen += 1
                if len(kept) < n:
                    kept.append(s["jpg"])
                elif (j := rng.randrange(seen)) < n:
                    kept[j] = s["jpg"]
    return kept

"""Model versions in the store: local cache (one download per version), loading once per worker."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from artifact_store import ArtifactRef, ArtifactStore, StoreError
from asd_models.loading import ModelComponents, load_components
from asd_models.lora import ADAPTER_DIR, Adapter, apply_adapters
from asd_models.pipeline import AnySizePipeline
from data_manifests.runtime import runtime
from tasks.executors import worker_device
from tasks.render import split_lora
from tasks.runtime import run_logger

_LOCK = threading.Lock()


def cache_root() -> Path:
    return runtime().cache.expanduser()


VERIFIED = ".verified.json"  # beside a cached version: the stat of every file when it was last hashed


@contextlib.contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """One writer of a cached version at a time: threads of this process (a lock) and every
    process of the machine (an exclusive flock on a file beside it: Dask workers of one node
    share the cache)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK, open(folder.parent / f".{folder.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def local_model_dir(store: ArtifactStore, ref: ArtifactRef | str) -> Path:
    """Local copy of a committed model version (versions are immutable, so cached by id).
    Every file's sha256 is checked as it is downloaded; a cached copy is re-hashed when any
    file's size or modification time differs from when it was last verified."""
    ref = store.resolve(ref)
    target = cache_root() / "models" / ref.name / ref.version
    with _cache_lock(target):
        # a complete copy has its VERIFIED stats (written before the rename that makes it the copy)
        if (target / VERIFIED).is_file() and not cached_copy_intact(store, ref, target):
            run_logger().warning(
                "cached copy of %s at %s differs from its commit record: downloading again", ref, target
            )
            shutil.rmtree(target)
        if not (target / VERIFIED).is_file():
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".dl-"))
            try:
                store.download(ref, tmp)
                (tmp / VERIFIED).write_text(json.dumps(_stats(store, ref, tmp)))
                if target.exists():
                    shutil.rmtree(target)
                tmp.rename(target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    return target


def _stats(store: ArtifactStore, ref: ArtifactRef, folder: Path) -> dict[str, list[int]]:
    return {
        rel: [(folder / rel).stat().st_size, (folder / rel).stat().st_mtime_ns]
        for rel, _ in store.iter_files(ref)
    }


def cached_copy_intact(store: ArtifactStore, ref: ArtifactRef, folder: Path) -> bool:
    """Every recorded file present in `folder` with its recorded size and sha256 (a cache is
    a local copy anyone on the machine may have touched); files whose size and modification
    time are those of the last verification are not hashed again."""
    try:
        verified = json.loads((folder / VERIFIED).read_text())
    except (OSError, ValueError):
        verified = {}
    for rel, meta in store.iter_files(ref):
        path = folder / rel
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return False
        if verified.get(rel) == [path.stat().st_size, path.stat().st_mtime_ns]:
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        if h.hexdigest() != meta["sha256"]:
            return False
    (folder / VERIFIED).write_text(json.dumps(_stats(store, ref, folder)))
    return True


def resolve_base_model(store: ArtifactStore, base: str) -> Path | str:
    """A base model given as a store reference (`models/NAME@VERSION`), a local diffusers folder
    or a hub model id already in the local HF cache."""
    if base.startswith("models/"):
        try:
            return local_model_dir(store, base)
        except StoreError as exc:
            raise StoreError(f"base model {base!r}: {exc}") from exc
    return base


def load_model_components(store: ArtifactStore, base: str) -> ModelComponents:
    return load_components(resolve_base_model(store, base))


_LOAD_LOCK = (
    threading.Lock()
)  # diffusers loads through process-global meta-device patching: one load at a time
_LOADS = [0]


def model_loads() -> int:
    """How many pipelines this process has loaded (a worker should load each model once)."""
    return _LOADS[0]


def cached_pipeline(
    store_url: str,
    ref: str,
    upscaler: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    lora: tuple[str, ...] = (),
) -> AnySizePipeline:
    """Load a pipeline once per worker process, model version, upscaler, device, dtype and
    adapters (`lora`: pinned `models/NAME@V:WEIGHT` entries) (threads that ask at once wait for
    the one load; two concurrent `from_pretrained` calls corrupt each other)."""
    with _LOAD_LOCK:
        return _load_pipeline(store_url, ref, upscaler, worker_device(device), dtype, tuple(lora))


@lru_cache(maxsize=4)
def _load_pipeline(
    store_url: str, ref: str, upscaler: str | None, device: str, dtype: str, lora: tuple[str, ...]
) -> AnySizePipeline:
    from asd_models.devices import resolve_device, resolve_dtype

    if threads := runtime().torch_threads:  # set for Dask workers (they start with 1)
        import torch

        torch.set_num_threads(threads)
    store = ArtifactStore(store_url)
    up = resolve_base_model(store, upscaler) if upscaler else None
    pipe = AnySizePipeline.from_pretrained(local_model_dir(store, ref), upscaler=up)
    adapters = []
    for i, entry in enumerate(lora):
        adapter_ref, weight = split_lora(entry)
        adapters.append(Adapter(local_model_dir(store, adapter_ref) / ADAPTER_DIR, weight, f"lora{i}"))
    apply_adapters(pipe.c.unet, adapters, pipe.c.family.name)
    dev = resolve_device(device)
    pipe.to(dev, resolve_dtype(dtype, dev))
    _LOADS[0] += 1
    run_logger().info("loaded %s on %s (%s) in process %d", ref, pipe.device, pipe.dtype, os.getpid())
    return pipe

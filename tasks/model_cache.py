"""Model versions in the store: local cache (one download per version), loading once per worker."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

from artifact_store import ArtifactRef, ArtifactStore, StoreError
from asd_models.loading import SDComponents, load_components
from asd_models.pipeline import AnySizePipeline
from data_manifests.runtime import runtime
from tasks.runtime import run_logger

_LOCK = threading.Lock()


def cache_root() -> Path:
    return runtime().cache.expanduser()


def local_model_dir(store: ArtifactStore, ref: ArtifactRef | str) -> Path:
    """Local copy of a committed model version (versions are immutable, so cached by id;
    every file's sha256 is checked as it is downloaded)."""
    ref = store.resolve(ref)
    target = cache_root() / "models" / ref.name / ref.version
    with _LOCK:
        if (target / "model_index.json").is_file() and not cached_copy_intact(store, ref, target):
            run_logger().warning("cached copy of %s at %s differs from its commit record: downloading again",
                                 ref, target)
            shutil.rmtree(target)
        if not (target / "model_index.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".dl-"))
            try:
                store.download(ref, tmp)
                if target.exists():
                    shutil.rmtree(target)
                tmp.rename(target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    return target


def cached_copy_intact(store: ArtifactStore, ref: ArtifactRef, folder: Path) -> bool:
    """Every recorded file present in `folder` with its recorded size and sha256 (a cache is
    a local copy anyone on the machine may have touched)."""
    for rel, meta in store.record(ref)["files"].items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return False
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        if h.hexdigest() != meta["sha256"]:
            return False
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


def load_model_components(store: ArtifactStore, base: str) -> SDComponents:
    return load_components(resolve_base_model(store, base))


_LOAD_LOCK = threading.Lock()  # diffusers loads through process-global meta-device patching: one load at a time
_LOADS = [0]


def model_loads() -> int:
    """How many pipelines this process has loaded (a worker should load each model once)."""
    return _LOADS[0]


def cached_pipeline(store_url: str, ref: str, upscaler: str | None = None, device: str = "auto",
                    dtype: str = "auto") -> AnySizePipeline:
    """Load a pipeline once per worker process, model version, upscaler, device and dtype
    (threads that ask at once wait for the one load; two concurrent `from_pretrained` calls
    corrupt each other)."""
    with _LOAD_LOCK:
        return _load_pipeline(store_url, ref, upscaler, device, dtype)


@lru_cache(maxsize=4)
def _load_pipeline(store_url: str, ref: str, upscaler: str | None, device: str, dtype: str) -> AnySizePipeline:
    from asd_models.pipeline import resolve_device, resolve_dtype

    if threads := runtime().torch_threads:  # set for Dask workers (they start with 1)
        import torch

        torch.set_num_threads(threads)
    store = ArtifactStore(store_url)
    up = resolve_base_model(store, upscaler) if upscaler else None
    pipe = AnySizePipeline.from_pretrained(local_model_dir(store, ref), upscaler=up)
    dev = resolve_device(device)
    pipe.to(dev, resolve_dtype(dtype, dev))
    _LOADS[0] += 1
    run_logger().info("loaded %s on %s (%s) in process %d", ref, pipe.device, pipe.dtype, os.getpid())
    return pipe

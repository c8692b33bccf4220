"""Ingest a folder of image-caption pairs into a bucketed dataset version.

Output (one version of `datasets/<name>`): `manifest.parquet` (one row per input, failures
included with their reason), `buckets/<W>x<H>/<nnnnnn>.tar` WebDataset shards (`<key>.jpg`,
`<key>.txt`, `<key>.json`) and `bucket_index.json` (bucket -> shards and counts).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image, ImageOps
from prefect import get_run_logger, task

from asd_models.buckets import Bucket, asd_buckets, nearest_bucket
from asd_models.images import resize_cover_crop
from data_manifests.schemas import DATASET_MANIFEST, STATUS_FAILED, STATUS_OK
from tasks.progress import Progress
from tasks.runtime import current_flow_run_id
from tasks.store import ArtifactStore, VersionWriter, params_hash

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTS = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
TAR_MTIME = 0  # fixed member mtime: the same input gives byte-identical shards


@dataclass(frozen=True)
class IngestOptions:
    bucket_base: int = 512
    bucket_step: int = 64
    min_side: int = 64
    max_pixels: int = 64_000_000  # decompression-bomb guard
    shard_max_samples: int = 1000
    shard_max_bytes: int = 256 << 20
    jpeg_quality: int = 95


@dataclass
class SourceItem:
    path: Path
    caption: str | None
    caption_error: str | None = None


def sanitize_key(text: str, index: int) -> str:
    """Tar-member-safe key: index prefix (unique), then [A-Za-z0-9_-] only, no dots."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:64] or "sample"
    return f"{index:06d}-{stem}"


def read_folder(folder: Path) -> list[SourceItem]:
    """Images under `folder` with captions from metadata.{jsonl,csv,parquet} (`file_name`,
    `text`) or from sidecar `.txt`/`.caption` files."""
    if not folder.is_dir():
        raise FileNotFoundError(f"ingest source {folder} is not a folder")
    captions: dict[str, str] = {}
    for name in METADATA_FILES:
        meta = folder / name
        if not meta.is_file():
            continue
        if name.endswith(".jsonl"):
            df = pl.read_ndjson(meta)
        elif name.endswith(".csv"):
            df = pl.read_csv(meta)
        else:
            df = pl.read_parquet(meta)
        if "file_name" not in df.columns or "text" not in df.columns:
            raise ValueError(f"{meta} must have the columns file_name and text (diffusers ImageFolder convention)")
        for fn, text in df.select("file_name", "text").iter_rows():
            captions[str(fn)] = "" if text is None else str(text)
    items = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
            continue
        rel = p.relative_to(folder).as_posix()
        caption = captions.get(rel)
        if caption is None:
            for ext in CAPTION_EXTS:
                side = p.with_suffix(ext)
                if side.is_file():
                    caption = side.read_text(encoding="utf-8", errors="replace").strip()
                    break
        items.append(SourceItem(p, caption, None if caption is not None else "no caption found"))
    return items


def folder_input_hash(items: list[SourceItem], options: IngestOptions) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(str(it.path.name).encode())
        h.update(hashlib.sha256(it.path.read_bytes()).digest())
        h.update((it.caption or "\0").encode())
    h.update(params_hash(options.__dict__).encode())
    return h.hexdigest()


def load_image(path: Path, options: IngestOptions) -> Image.Image:
    """Fully decode, apply EXIF orientation, convert to RGB (alpha composited on white)."""
    Image.MAX_IMAGE_PIXELS = options.max_pixels
    with Image.open(path) as im:
        w, h = im.size
        if w * h > options.max_pixels:
            raise ValueError(f"too many pixels: {w}x{h} > {options.max_pixels}")
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # high bit depth: rescale to 8 bits
            arr = np.asarray(im, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
            im = Image.fromarray(arr.round().astype(np.uint8), "L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")


class BucketShardWriter:
    """One streaming WebDataset shard set per bucket, rotated by sample count and bytes."""

    def __init__(self, writer: VersionWriter, options: IngestOptions) -> None:
        self.writer = writer
        self.options = options
        self.stack = contextlib.ExitStack()
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
        tar = wds.TarWriter(stream, mtime=TAR_MTIME)
        self.open[bucket] = (tar, stack, rel)
        self.in_shard[bucket] = 0
        self.bytes_in_shard[bucket] = 0
        self.shards.setdefault(bucket, []).append({"shard": rel, "count": 0})

    def _close(self, bucket: str) -> None:
        if bucket in self.open:
            tar, stack, _ = self.open.pop(bucket)
            tar.close()
            stack.close()

    def write(self, bucket: str, sample: dict[str, Any]) -> str:
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        if (
            bucket not in self.open
            or self.in_shard[bucket] >= self.options.shard_max_samples
            or (self.in_shard[bucket] and self.bytes_in_shard[bucket] + size > self.options.shard_max_bytes)
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


def _failed_row(key: str, source: str, caption: str | None, error: str) -> dict[str, Any]:
    row = {f.name: None for f in DATASET_MANIFEST}
    row.update(key=key, source=source, caption=caption, status=STATUS_FAILED, error=error)
    return row


def ingest_items(
    items: list[SourceItem], writer: VersionWriter, options: IngestOptions, buckets: list[Bucket],
    progress: Progress | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Process every item into exactly one manifest row; write good ones into bucket shards."""
    shards = BucketShardWriter(writer, options)
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    try:
        for i, item in enumerate(items):
            key = sanitize_key(item.path.stem, i)
            source = str(item.path)
            try:
                if item.caption_error:
                    raise ValueError(item.caption_error)
                if not (item.caption or "").strip():
                    raise ValueError("empty caption")
                img = load_image(item.path, options)
                w, h = img.size
                if min(w, h) < options.min_side:
                    raise ValueError(f"too small: {w}x{h}, shorter side under {options.min_side}")
                digest = hashlib.sha256(np.asarray(img).tobytes() + f"{w}x{h}".encode()).hexdigest()
                if digest in seen:
                    raise ValueError(f"duplicate pixels of {seen[digest]}")
                seen[digest] = key
                bucket = nearest_bucket(w, h, buckets)
                out, box = resize_cover_crop(img, bucket.width, bucket.height)
                buf = io.BytesIO()
                out.save(buf, format="JPEG", quality=options.jpeg_quality)
                jpg = buf.getvalue()
                meta = {"key": key, "source": source, "original_width": w, "original_height": h,
                        "bucket": bucket.name, "crop_box": list(box)}
                shard = shards.write(bucket.name, {
                    "__key__": key, "jpg": jpg, "txt": item.caption.encode("utf-8"),
                    "json": json.dumps(meta).encode(),
                })
                rows.append({
                    "key": key, "source": source, "caption": item.caption, "status": STATUS_OK, "error": None,
                    "original_width": w, "original_height": h, "width": bucket.width, "height": bucket.height,
                    "bucket": bucket.name, "crop_left": box[0], "crop_top": box[1], "crop_right": box[2],
                    "crop_bottom": box[3], "sha256": digest, "shard": shard, "bytes": len(jpg),
                })
            except Exception as exc:  # noqa: BLE001 - a bad input is data, never the end of the run
                rows.append(_failed_row(key, source, item.caption, f"{type(exc).__name__}: {exc}"))
            if progress:
                progress.update(i + 1)
    finally:
        shards.close()
    table = pa.Table.from_pylist(rows, schema=DATASET_MANIFEST)
    index = {
        "buckets": {
            b: {"width": Bucket.parse(b).width, "height": Bucket.parse(b).height, "count": shards.counts[b],
                "shards": shards.shards[b]}
            for b in sorted(shards.shards)
        },
        "total_ok": sum(shards.counts.values()),
        "total_failed": sum(1 for r in rows if r["status"] == STATUS_FAILED),
    }
    return table, index


@task(name="ingest-folder")
def ingest_folder(store_url: str, source_dir: str, dataset: str, options: dict[str, Any], rerun: bool = False) -> str:
    """Ingest `source_dir` into a new version of `datasets/<dataset>`; reuse an identical one."""
    logger = get_run_logger()
    store = ArtifactStore(store_url)
    opts = IngestOptions(**options)
    items = read_folder(Path(source_dir))
    if not items:
        raise ValueError(f"ingest source {source_dir} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    input_hash = folder_input_hash(items, opts)
    if not rerun and (done := store.find_by_input_hash("datasets", dataset, input_hash)):
        logger.info("dataset %s already ingested from the same inputs: reusing it", done)
        return str(done)
    buckets = asd_buckets(opts.bucket_base, opts.bucket_step)
    writer = store.new_version("datasets", dataset)
    with Progress(f"ingest {dataset}", total=len(items), unit="img") as progress:
        table, index = ingest_items(items, writer, opts, buckets, progress)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    writer.put_bytes("manifest.parquet", buf.getvalue())
    writer.put_bytes("bucket_index.json", json.dumps(index, indent=2).encode())
    for row in table.filter(pc.equal(table["status"], STATUS_FAILED)).to_pylist():
        logger.warning("rejected %s (%s): %s", row["key"], row["source"], row["error"])
    ref = writer.commit(
        params={"source": str(source_dir), **opts.__dict__}, flow_run_id=current_flow_run_id(),
        input_hash=input_hash,
        summary={"samples_ok": index["total_ok"], "samples_failed": index["total_failed"],
                 "buckets": {b: v["count"] for b, v in index["buckets"].items()}},
    )
    logger.info("committed %s: %d ok, %d failed, buckets %s", ref, index["total_ok"], index["total_failed"],
                {b: v["count"] for b, v in index["buckets"].items()})
    return str(ref)

"""The images of a committed `generations/` or `upscales/` version, as an input source (of
`asd upscale`): one record per ok row of its manifest, in row order, its prompt the caption.

A version is immutable, so a record's identity is the version and the image's path in it; the
version is pinned as a parent of whatever is made from it. The manifest is streamed in row
batches (a million-image version is never held). An image is read from its file, or from its
tar shard by one ranged read (the `webdataset` layout), at most `max_bytes`; a file whose bytes
no longer match the version's recorded sha256 (tampered with, or half overwritten) is refused,
as is a shard member of another size than recorded (a shard's own sha256 is `asd verify`'s).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Iterator
from typing import Any, ClassVar

import pyarrow.parquet as pq

from artifact_store import ArtifactStore, StoreError
from artifact_store.paths import check_relpath
from data_engine.samples import STAGE_READ, STAGE_SOURCE, STAGE_VALIDATE, Rejected
from data_engine.sources import SourceRecord
from data_manifests.schemas import STATUS_OK

IMAGE_KINDS = ("generations", "upscales")
_COLUMNS = (
    "image",
    "prompt",
    "status",
    "shard",
    "shard_offset",
    "shard_size",
    "shard_sha256",
    "width",
    "height",
)
_BATCH_ROWS = 4096


class VersionImages:
    """Every image of a committed `generations/...` or `upscales/...` version (see the module doc)."""

    kind: ClassVar[str] = "version"
    needs_download: ClassVar[bool] = False

    def __init__(self, store: ArtifactStore, spec: str) -> None:
        self.store = store
        self.ref = store.resolve(spec)
        if self.ref.kind not in IMAGE_KINDS:
            raise ValueError(
                f"{spec}: a {self.ref.kind} version holds no images to upscale "
                f"(use {' or '.join(k + '/NAME@VERSION' for k in IMAGE_KINDS)})"
            )

    def records(self, skip_units: set[str] | None = None) -> Iterator[SourceRecord]:
        ref = str(self.ref)
        # checked against the record before a row of it is used (small: the rows, not the images)
        with io.BytesIO(self.store.read_checked(self.ref, "manifest.parquet")) as f:
            manifest = pq.ParquetFile(f)
            names = set(manifest.schema_arrow.names)
            n = -1
            for batch in manifest.iter_batches(_BATCH_ROWS, columns=[c for c in _COLUMNS if c in names]):
                for row in batch.to_pylist():
                    n += 1
                    if row.get("status") != STATUS_OK:
                        continue  # a failed row of the version has no image
                    try:
                        meta = _located(ref, row)
                    except (
                        StoreError,
                        TypeError,
                        ValueError,
                    ) as exc:  # a manifest edited by hand, or hostile
                        yield SourceRecord(
                            source=f"{ref}#row{n}",
                            name=f"row{n}",
                            caption=None,
                            fingerprint=f"{ref}#row{n}",
                            error=f"manifest row {n}: {exc}",
                            failed_stage=STAGE_SOURCE,
                        )
                        continue
                    size = (row.get("width"), row.get("height"))  # what the manifest says (a plan's estimate)
                    if all(isinstance(v, int) and v > 0 for v in size):
                        meta["listed_size"] = size
                    yield SourceRecord(
                        source=f"{ref}/{row['image']}",
                        name=posixpath.basename(row["image"]),
                        caption=row.get("prompt"),
                        fingerprint=f"{ref}/{row['image']}",
                        meta=meta,
                    )

    def fingerprint(self) -> str:
        return str(self.ref)

    def units(self) -> set[str] | None:
        return None


def _located(ref: str, row: dict[str, Any]) -> dict[str, Any]:
    """Where a manifest row's image is (ValueError / StoreError: not a safe place in the version)."""
    meta: dict[str, Any] = {"version": ref, "image": check_relpath(row.get("image") or "", ref)}
    if row.get("shard"):
        offset, size = int(row["shard_offset"]), int(row["shard_size"])
        if offset < 0 or size <= 0:
            raise ValueError(f"shard offset {offset} and size {size} are not a member's")
        meta.update(shard=check_relpath(row["shard"], ref), offset=offset, size=size)
        if row.get("shard_sha256"):
            meta["sha256"] = str(row["shard_sha256"])
    return meta


_INTACT: dict[tuple[str, str], bool] = {}  # (version, shard) -> re-hashed against the record, once a process


def _shard_intact(store: ArtifactStore, ref: str, shard: str) -> bool:
    """Whether a whole tar shard re-hashes to its recorded sha256 (once per process and shard)."""
    key = (ref, shard)
    if key not in _INTACT:
        recorded = store.file_meta(ref, shard) or {}
        _INTACT[key] = hashlib.sha256(store.read_bytes(ref, shard)).hexdigest() == recorded.get("sha256")
    return _INTACT[key]


def read_version_image(store: ArtifactStore, meta: dict[str, Any], max_bytes: int) -> bytes:
    """The bytes of a `VersionImages` record's image; Rejected when it is over `max_bytes`,
    unreadable, or not what the version recorded."""
    ref, image = meta["version"], meta["image"]
    try:
        if meta.get("shard"):
            if meta["size"] > max_bytes:
                raise Rejected(
                    STAGE_VALIDATE, f"image too large: {meta['size']} bytes, over max_bytes {max_bytes}"
                )
            data = store.read_range(ref, meta["shard"], meta["offset"], meta["offset"] + meta["size"])
            if len(data) != meta["size"]:
                raise Rejected(
                    STAGE_READ,
                    f"{image} in {meta['shard']} of {ref}: {len(data)} bytes where "
                    f"{meta['size']} are recorded",
                )
            if "sha256" in meta:  # the member's own digest, recorded at write
                if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                    raise Rejected(
                        STAGE_READ,
                        f"{image} in {meta['shard']} of {ref} does not match its recorded sha256 "
                        "(changed after the commit)",
                    )
            elif not _shard_intact(store, ref, meta["shard"]):  # a version from before member digests
                raise Rejected(
                    STAGE_READ,
                    f"{meta['shard']} of {ref} does not match its recorded sha256 (changed after the commit)",
                )
            return data
        recorded = store.file_meta(ref, image)
        if recorded is None:
            raise Rejected(STAGE_READ, f"{image} is not a recorded file of {ref}")
        if recorded["size"] > max_bytes:
            raise Rejected(
                STAGE_VALIDATE, f"image too large: {recorded['size']} bytes, over max_bytes {max_bytes}"
            )
        data = store.read_bytes(ref, image)
    except (OSError, StoreError) as exc:
        raise Rejected(STAGE_READ, f"{image} of {ref} cannot be read: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != recorded["sha256"]:
        raise Rejected(
            STAGE_READ, f"{image} of {ref} does not match its recorded sha256 (changed after the commit)"
        )
    return data

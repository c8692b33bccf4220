"""Existing WebDataset / img2dataset shards as an ingest source (`ShardSource`): one partition a
shard file, its samples read capped from the tar headers (`shard_records`)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import Any, ClassVar

import fsspec
from braceexpand import braceexpand

from artifact_store import redact_url
from asd_models.shard_reader import tar_stream_samples
from data_engine.samples import STAGE_DOWNLOAD, STAGE_SOURCE, STAGE_VALIDATE
from data_engine.source_records import (
    SHARD_EXTS,
    SHARD_IMAGE_KEYS,
    SourceOptions,
    SourceRecord,
    record_sha1,
)


class ShardSource:
    """Existing WebDataset / img2dataset shards: a brace pattern, a .tar, or a folder of .tar
    files, local or on S3. Each sample: an image member (.jpg/.png/.webp) + .txt (+ .json)."""

    kind: ClassVar[str] = "shards"
    needs_download: ClassVar[bool] = False

    def __init__(
        self, spec: str, options: SourceOptions, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.spec = spec
        self.options = options
        self.storage_options = storage_options if spec.startswith("s3://") else {}
        self.urls = self._expand(spec)
        if not self.urls:
            raise FileNotFoundError(f"ingest source {spec}: no .tar shards found")
        self._fps: dict[str, str] | None = None

    def _expand(self, spec: str) -> list[str]:
        if "{" in spec:
            return list(braceexpand(spec))
        if spec.lower().endswith(SHARD_EXTS):
            return [spec]
        fs, _, _ = fsspec.get_fs_token_paths(spec, storage_options=self.storage_options)
        protocol = spec.split("://", 1)[0] + "://" if "://" in spec else ""
        found = sorted(p for p in fs.find(spec) if p.lower().endswith(SHARD_EXTS))
        return [p if p.startswith(protocol) else protocol + p for p in found]

    def shard_fingerprints(self) -> dict[str, str]:
        if self._fps is None:
            self._fps = {}
            for url in self.urls:
                try:
                    fs, _, (path,) = fsspec.get_fs_token_paths(url, storage_options=self.storage_options)
                    info = fs.info(path)
                    ident: tuple[Any, ...] = (
                        info.get("size"),
                        info.get("ETag") or info.get("etag"),
                        info.get("mtime") or info.get("LastModified"),
                    )
                except Exception as exc:  # noqa: BLE001 - reported when the shard is read
                    ident = ("unlisted", type(exc).__name__)
                self._fps[url] = record_sha1("shard", url, ident)
        return self._fps

    def fingerprint(self) -> str:
        return record_sha1("shards", *sorted(self.shard_fingerprints().values()))

    def units(self) -> set[str]:
        return set(self.shard_fingerprints().values())

    def records(self, skip_units: set[str] | None = None) -> Iterator[SourceRecord]:
        skip_units = skip_units or set()
        for url, shard_fp in self.shard_fingerprints().items():
            if shard_fp in skip_units:
                continue
            yield from self._shard(url, shard_fp)

    def _shard(self, url: str, shard_fp: str) -> Iterator[SourceRecord]:
        return shard_records(url, shard_fp, self.options, self.storage_options)


def shard_records(
    url: str, shard_fp: str, options: SourceOptions, storage_options: dict[str, Any] | None
) -> Iterator[SourceRecord]:
    """Every sample of one shard file as an input (what a shard partition's task reads)."""
    n = 0
    try:
        with fsspec.open(url, "rb", **((storage_options or {}) if url.startswith("s3://") else {})) as stream:
            for sample in tar_stream_samples(stream, options.max_bytes, options.sample_max_bytes):
                n += 1
                yield shard_sample(url, shard_fp, sample)
    except Exception as exc:  # noqa: BLE001 - a broken shard is one failed row, the rest goes on
        yield SourceRecord(
            source=redact_url(url),
            name=posixpath.basename(url),
            caption=None,
            fingerprint=f"{shard_fp}#__shard_error__",
            error=(f"shard unreadable after {n} samples: {type(exc).__name__}: {exc}"),
            failed_stage=STAGE_DOWNLOAD,
        )


def shard_sample(url: str, shard_fp: str, sample: dict[str, Any]) -> SourceRecord:
    key = str(sample.get("__key__", ""))
    fields = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
    img_key = next((k for k in SHARD_IMAGE_KEYS if k in fields), None)
    caption = fields.get("txt") or fields.get("caption")
    caption = caption.decode("utf-8", "replace").strip() if isinstance(caption, bytes) else caption
    meta: dict[str, Any] = {"shard": redact_url(url), "shard_key": key}
    if "json" in fields:
        try:
            src = json.loads(fields["json"])
            if isinstance(src, dict):
                meta["source_json"] = {
                    k: src[k] for k in ("url", "key", "width", "height", "status") if k in src
                }
        except (ValueError, UnicodeDecodeError):
            meta["source_json"] = "unparseable"
    source = f"{redact_url(url)}#{key}"
    fp = f"{shard_fp}#{record_sha1(key)}"
    problems = sample.get("__problems__") or []
    if sample.get("__over__"):
        return SourceRecord(
            source=source,
            name=posixpath.basename(key),
            caption=None,
            fingerprint=fp,
            error="; ".join(problems),
            failed_stage=STAGE_VALIDATE,
            meta=meta,
        )
    if img_key is None:
        if problems:
            return SourceRecord(
                source=source,
                name=posixpath.basename(key),
                caption=caption,
                fingerprint=fp,
                error="; ".join(problems),
                failed_stage=STAGE_VALIDATE,
                meta=meta,
            )
        return SourceRecord(
            source=source,
            name=posixpath.basename(key),
            caption=caption,
            fingerprint=fp,
            error=f"sample has no image member (has {', '.join(sorted(fields)) or 'nothing'})",
            failed_stage=STAGE_SOURCE,
            meta=meta,
        )
    return SourceRecord(
        source=source,
        name=posixpath.basename(key),
        caption=caption,
        fingerprint=fp,
        data=fields[img_key],
        meta=meta,
    )

"""Where ingest inputs come from: a folder tree, a URL list, or existing WebDataset /
img2dataset shards. Every reader is a `Source` (the protocol below): one constructor shape
`(spec, options, storage_options)`, its inputs as `SourceRecord`s (one per manifest row), a
fingerprint that changes when its inputs do (for incremental re-ingest), and `SOURCES` is the
table `open_source` picks from; a new kind of source is one class plus a row there.

Nothing is dropped: a file listed in metadata but missing, a caption with no image, a shard
sample with no image, an unreadable shard all come out as records with an error.

Inputs come from strangers (README: Trust boundary). A folder source reads only what lies
inside it: a link (to a file, a caption, a metadata file or a folder) whose real path leaves the
folder is a failed `source` row naming the link, unless `follow_links_outside`. Caption files are
capped and must be UTF-8 text. Shard members are read only when they are regular files within
`max_bytes` (checked from the tar header, before reading), and one sample's members together
within `sample_max_bytes` (`asd_models.shard_reader`). URLs are stored and shown without
credentials or signatures.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from artifact_store import redact_url
from data_engine.folder_source import FolderSource
from data_engine.samples import STAGE_SOURCE
from data_engine.shard_source import ShardSource
from data_engine.source_records import (
    IMAGE_EXTS,
    SHARD_EXTS,
    Source,
    SourceOptions,
    SourceRecord,
    record_sha1,
)
from data_engine.url_lists import LIST_EXTS, UrlTable


class UrlListSource:
    """A table of URLs (and captions), as img2dataset takes it: http(s)://, s3:// or file://,
    streamed (`data_engine.url_lists`): a list of any length is read a batch at a time."""

    kind: ClassVar[str] = "url-list"
    needs_download: ClassVar[bool] = True

    def __init__(
        self, spec: str, options: SourceOptions, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.path = spec
        self.table = UrlTable(spec, options.url_col, options.caption_col, storage_options)
        self._fingerprint: str | None = None

    def records(self, skip_units: set[str] | None = None) -> Iterator[SourceRecord]:
        i = 0
        for batch in self.table.batches():
            for url, caption, error in batch:
                yield url_record(redact_url(self.path), i, url, caption, error)
                i += 1

    def fingerprint(self) -> str:
        """The list's bytes and the columns read (streamed: not the rows in memory)."""
        if self._fingerprint is None:
            self._fingerprint = record_sha1(
                "url-list", self.table.content_sha256(), self.table.url_col, self.table.caption_col
            )
        return self._fingerprint

    def units(self) -> None:
        return None


def url_record(
    list_name: str, i: int, url: str | None, caption: str | None, error: str | None = None
) -> SourceRecord:
    """Row `i` of a URL list as an input."""
    url = "" if url is None else url.strip()
    fp = record_sha1("url", url, caption)
    if error or not url:
        return SourceRecord(
            source=f"{list_name}#row{i}",
            name=f"row{i}",
            caption=caption,
            fingerprint=fp,
            error=error or "empty URL",
            failed_stage=STAGE_SOURCE,
        )
    name = posixpath.basename(url.split("?", 1)[0].rstrip("/")) or f"row{i}"
    shown = redact_url(url)  # what the manifest, the shard metadata and the logs may hold
    return SourceRecord(
        source=shown, name=name, caption=caption, fingerprint=fp, url=url, meta={"url": shown, "row": i}
    )


SOURCES: dict[str, type[Source]] = {cls.kind: cls for cls in (FolderSource, UrlListSource, ShardSource)}


def source_kind(spec: str) -> tuple[str, str]:
    """(kind, spec to open) from the spec alone: braces or .tar -> shards; a table file -> URL
    list; a remote prefix -> shards; a local folder -> images (or, when it holds .tar files and
    no images, shards)."""
    low = spec.lower()
    if "{" in spec or low.endswith(SHARD_EXTS):
        return ShardSource.kind, spec
    if low.endswith(LIST_EXTS):
        return UrlListSource.kind, spec
    if "://" in spec and not spec.startswith("file://"):
        return ShardSource.kind, spec
    local = Path(spec.removeprefix("file://")).expanduser()
    if not local.exists():
        raise FileNotFoundError(f"ingest source {spec}: no such file or folder")
    if local.is_dir():
        names = [p.name.lower() for p in local.iterdir() if p.is_file()]
        if any(n.endswith(SHARD_EXTS) for n in names) and not any(n.endswith(IMAGE_EXTS) for n in names):
            return ShardSource.kind, str(local.resolve())
        return FolderSource.kind, str(local)
    raise ValueError(
        f"ingest source {spec}: not a folder, a .tar / {{a..b}} shard pattern, "
        f"or a URL list ({', '.join(LIST_EXTS)})"
    )


def open_source(spec: str, storage_options: dict[str, Any] | None, options: SourceOptions) -> Source:
    """The reader of `spec`, chosen by `source_kind` from `SOURCES`."""
    kind, target = source_kind(spec)
    return SOURCES[kind](target, options, storage_options)

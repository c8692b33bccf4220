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

import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any, ClassVar, Protocol

import fsspec
import polars as pl
from braceexpand import braceexpand

from artifact_store import redact_url
from asd_models.shard_reader import printable, tar_stream_samples
from data_engine.samples import STAGE_DOWNLOAD, STAGE_SOURCE, STAGE_VALIDATE
from data_engine.url_lists import CAPTION_COLUMNS, LIST_EXTS, UrlTable

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTS = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHARD_EXTS = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class SourceOptions:
    """What the readers need from the ingest settings (built once, by `IngestSettings.source_options`)."""

    url_col: str | None
    caption_col: str | None
    max_bytes: int
    sample_max_bytes: int
    caption_max_bytes: int
    follow_links_outside: bool


def _sha1(*parts: object) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class SourceRecord:
    """One input. `fingerprint` identifies it with its content's identity (for reuse);
    its `unit` (the part before '#') is what a listing knows without reading data."""

    source: str
    name: str
    caption: str | None
    fingerprint: str
    path: str | None = None  # a local file the worker reads
    url: str | None = None  # to download
    data: bytes | None = None  # already read (a shard sample)
    error: str | None = None
    failed_stage: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return self.fingerprint.split("#", 1)[0]


class Source(Protocol):
    """An ingest source. `needs_download`: its records carry URLs the engine fetches.
    `units()`: the pieces a re-ingest reuses whole (a shard's samples), or None when inputs are
    reused one record at a time."""

    kind: ClassVar[str]
    needs_download: ClassVar[bool]

    def __init__(
        self, spec: str, options: SourceOptions, storage_options: dict[str, Any] | None = None
    ) -> None: ...
    def records(self, skip_units: set[str] | None = None) -> Iterator[SourceRecord]: ...
    def fingerprint(self) -> str: ...
    def units(self) -> set[str] | None: ...


class FolderSource:
    """A local folder tree: captions from metadata.{jsonl,csv,parquet} (`file_name` + `text`,
    the diffusers ImageFolder convention) or sidecar `.txt` / `.caption` files."""

    kind: ClassVar[str] = "folder"
    needs_download: ClassVar[bool] = False

    def __init__(
        self, spec: str | Path, options: SourceOptions, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.root = Path(str(spec).removeprefix("file://")).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"ingest source {spec}: not a folder")
        self.options = options
        self._records: list[SourceRecord] | None = None
        self.bad_lines: list[tuple[int, str]] = []  # (line, error) of every metadata.jsonl

    def outside(self, path: Path | str) -> bool:
        """True when `path`'s real location (links resolved) is outside the folder and
        links out of the folder are not allowed."""
        if self.options.follow_links_outside:
            return False
        return not Path(os.path.realpath(path)).is_relative_to(self.root)

    def _metadata(self, meta_rels: list[str]) -> tuple[dict[str, str | None], list[tuple[str, str]]]:
        """Captions from every metadata file of the tree (diffusers ImageFolder: `file_name` is
        relative to the metadata file's folder). A metadata file that cannot be used is reported,
        not fatal: its images fall back to sidecar captions."""
        captions: dict[str, str | None] = {}
        broken: list[tuple[str, str]] = []
        for rel in meta_rels:
            meta = self.root / rel
            folder = posixpath.dirname(rel)
            if self.outside(meta):
                broken.append((rel, "metadata file is a link to outside the source folder; not read"))
                continue
            try:
                df = (
                    read_jsonl_lenient(meta, self.bad_lines)
                    if rel.endswith(".jsonl")
                    else read_table(str(meta))
                )
            except Exception as exc:  # noqa: BLE001
                broken.append(
                    (
                        rel,
                        f"metadata file unreadable as a table ({type(exc).__name__}: {exc}); "
                        "its captions are not used",
                    )
                )
                continue
            text_col = next((c for c in ("text", *CAPTION_COLUMNS) if c in df.columns), None)
            if "file_name" not in df.columns or text_col is None:
                broken.append(
                    (
                        rel,
                        f"metadata file must have the columns file_name and text (diffusers ImageFolder "
                        f"convention); it has {df.columns}; its captions are not used",
                    )
                )
                continue
            for fn, text in df.select("file_name", text_col).iter_rows():
                if fn is not None:
                    key = posixpath.normpath(posixpath.join(folder, str(fn).replace("\\", "/")))
                    captions[key] = None if text is None else str(text)
        return captions, broken

    def records(self, skip_units: set[str] | None = None) -> Iterator[SourceRecord]:
        if self._records is None:
            self._records = self._list()
        yield from self._records

    def _list(self) -> list[SourceRecord]:
        files: list[str] = []
        unreadable: list[tuple[str, str]] = []
        visited: set[str] = set()

        def walk_error(exc: OSError) -> None:
            unreadable.append((str(exc.filename), f"folder not readable: {exc.strerror or exc}"))

        links_out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True, onerror=walk_error):
            real = os.path.realpath(dirpath)
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            if self.outside(real):  # a linked folder that leaves the source: not walked
                dirnames[:] = []
                links_out.append(rel_dir)
                continue
            if real in visited:  # a symlink loop, or the same folder linked twice
                dirnames[:] = []
                continue
            visited.add(real)
            dirnames.sort()
            for fn in sorted(filenames):
                files.append(fn if rel_dir == "." else f"{rel_dir}/{fn}")
        meta_rels = [r for r in files if posixpath.basename(r) in METADATA_FILES]
        captions, broken_meta = self._metadata(meta_rels)
        files = [r for r in files if r not in set(meta_rels)]
        present = set(files)
        sidecar_of: dict[str, str] = {}
        for rel in files:  # a caption file is a sidecar when some other file shares its stem
            stem, ext = posixpath.splitext(rel)
            if ext.lower() in CAPTION_EXTS:
                sidecar_of[rel] = stem
        stems_with_image = {posixpath.splitext(r)[0] for r in files if r not in sidecar_of}
        out: list[SourceRecord] = []
        for rel in files:
            path = self.root / rel
            if rel in sidecar_of:
                if sidecar_of[rel] in stems_with_image:
                    continue
                out.append(self._record(rel, path, None, error="caption file without an image beside it"))
                continue
            caption, error = (captions[rel], None) if rel in captions else self._sidecar(path)
            out.append(self._record(rel, path, caption, error=error))
        for rel in links_out:
            out.append(
                SourceRecord(
                    source=printable(str(self.root / rel)),
                    name=posixpath.basename(rel),
                    caption=None,
                    fingerprint=_sha1("link-out", self.root, rel),
                    error="folder link to outside the source folder; not followed "
                    "(--follow-links-outside allows it)",
                    failed_stage=STAGE_SOURCE,
                )
            )
        for rel, error in broken_meta:
            out.append(
                SourceRecord(
                    source=printable(str(self.root / rel)),
                    name=posixpath.basename(rel),
                    caption=None,
                    fingerprint=_sha1("bad-metadata", self.root, rel, error),
                    error=error,
                    failed_stage=STAGE_SOURCE,
                )
            )
        for where, error in unreadable:
            out.append(
                SourceRecord(
                    source=printable(where),
                    name=posixpath.basename(where) or "folder",
                    caption=None,
                    fingerprint=_sha1("unreadable", where, error),
                    error=error,
                    failed_stage=STAGE_SOURCE,
                )
            )
        for lineno, error in self.bad_lines:
            out.append(
                SourceRecord(
                    source=printable(error.split(" line ", 1)[0]) + f":{lineno}",
                    name=f"metadata-line{lineno}",
                    caption=None,
                    fingerprint=_sha1("bad-line", self.root, lineno, error),
                    error=error,
                    failed_stage=STAGE_SOURCE,
                )
            )
        for rel in sorted(set(captions) - present):
            inside = not (rel.startswith("../") or rel == ".." or posixpath.isabs(rel))
            error = (
                "listed in metadata but missing"
                if inside
                else "listed in metadata with a path outside the source folder"
            )
            out.append(
                SourceRecord(
                    source=printable(str(self.root / rel) if inside else rel),
                    name=posixpath.basename(rel),
                    caption=captions[rel],
                    fingerprint=_sha1("missing", self.root, rel),
                    error=error,
                    failed_stage=STAGE_SOURCE,
                )
            )
        return out

    def _sidecar(self, path: Path) -> tuple[str | None, str | None]:
        """(caption, error) from `<stem>.txt` or `<stem>.caption` beside the image: a regular
        file inside the folder, at most `caption_max_bytes`, UTF-8 text."""
        for ext in CAPTION_EXTS:
            side = path.with_suffix(ext)
            if not os.path.lexists(side):
                continue
            if self.outside(side):
                return None, f"caption file {side.name} is a link to outside the source folder; not read"
            cap = self.options.caption_max_bytes
            try:
                st = side.stat()
                if not S_ISREG(st.st_mode):
                    return None, f"caption file {side.name} is not a regular file"
                with open(side, "rb") as f:
                    data = f.read(cap + 1)
            except OSError as exc:
                return None, f"caption file {side.name} unreadable: {exc.strerror or exc}"
            if len(data) > cap:
                return None, f"caption file {side.name} is over caption_max_bytes {cap}"
            try:
                return data.decode("utf-8").strip(), None
            except UnicodeDecodeError:
                return None, f"caption file {side.name} is not UTF-8 text"
        return None, None

    def _record(self, rel: str, path: Path, caption: str | None, error: str | None = None) -> SourceRecord:
        try:
            st = path.stat()
            stat = (st.st_size, st.st_mtime_ns)
            if not error and self.outside(path):
                error = "a link to outside the source folder; not read (--follow-links-outside allows it)"
            if not error and not S_ISREG(st.st_mode):
                error = "not a regular file (a pipe, socket or device)"
        except OSError as exc:
            stat, error = None, error or f"cannot stat (a broken link?): {exc.strerror or exc}"
        return SourceRecord(
            source=printable(str(path)),
            name=printable(posixpath.basename(rel)),
            caption=caption,
            fingerprint=_sha1("file", path, stat, caption),
            path=str(path),
            error=error,
            failed_stage=STAGE_SOURCE if error else None,
        )

    def units(self) -> None:
        return None

    def fingerprint(self) -> str:
        return _sha1("folder", self.root, *(r.fingerprint for r in self.records()))


def read_jsonl_lenient(path: Path, bad_lines: list[tuple[int, str]]) -> pl.DataFrame:
    """metadata.jsonl line by line: a broken line becomes a recorded failure, not the end."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
            except ValueError as exc:
                bad_lines.append((lineno, f"{path} line {lineno} is not a JSON object: {exc}"))
                continue
            rows.append({k: None if v is None else str(v) for k, v in row.items()})
    return (
        pl.DataFrame(rows, schema={k: pl.String for r in rows for k in r})
        if rows
        else pl.DataFrame({"file_name": [], "text": []}, schema={"file_name": pl.String, "text": pl.String})
    )


def read_table(path: str, storage_options: dict[str, Any] | None = None) -> pl.DataFrame:
    """Parquet / CSV / TSV / JSONL / JSON (records) / TXT (one URL a line), local or fsspec."""
    opts = storage_options if path.startswith("s3://") else {}
    with fsspec.open(path, "rb", **(opts or {})) as f:
        data = f.read()
    low = path.lower()
    if low.endswith(".parquet"):
        return pl.read_parquet(io.BytesIO(data))
    if low.endswith(".csv"):
        return pl.read_csv(
            io.BytesIO(data), infer_schema_length=0, truncate_ragged_lines=True, encoding="utf8-lossy"
        )
    if low.endswith(".tsv"):
        return pl.read_csv(
            io.BytesIO(data),
            separator="\t",
            infer_schema_length=0,
            truncate_ragged_lines=True,
            encoding="utf8-lossy",
        )
    if low.endswith(".jsonl"):
        return pl.read_ndjson(io.BytesIO(data))
    if low.endswith(".json"):
        return pl.DataFrame(json.loads(data))
    if low.endswith(".txt"):
        lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines()]
        return pl.DataFrame({"url": [ln for ln in lines if ln]}, schema={"url": pl.String})
    raise ValueError(f"{path}: unknown table format (use {', '.join(LIST_EXTS)})")


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
            self._fingerprint = _sha1(
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
    fp = _sha1("url", url, caption)
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
                    ident = (
                        info.get("size"),
                        info.get("ETag") or info.get("etag"),
                        info.get("mtime") or info.get("LastModified"),
                    )
                except Exception as exc:  # noqa: BLE001 - reported when the shard is read
                    ident = ("unlisted", type(exc).__name__)
                self._fps[url] = _sha1("shard", url, ident)
        return self._fps

    def fingerprint(self) -> str:
        return _sha1("shards", *sorted(self.shard_fingerprints().values()))

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
        with fsspec.open(url, "rb", **(storage_options if url.startswith("s3://") else {})) as stream:
            for sample in tar_stream_samples(stream, options.max_bytes, options.sample_max_bytes):
                n += 1
                yield _shard_sample(url, shard_fp, sample)
    except Exception as exc:  # noqa: BLE001 - a broken shard is one failed row, the rest goes on
        yield SourceRecord(
            source=redact_url(url),
            name=posixpath.basename(url),
            caption=None,
            fingerprint=f"{shard_fp}#__shard_error__",
            error=(f"shard unreadable after {n} samples: {type(exc).__name__}: {exc}"),
            failed_stage=STAGE_DOWNLOAD,
        )


def _shard_sample(url: str, shard_fp: str, sample: dict[str, Any]) -> SourceRecord:
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
    fp = f"{shard_fp}#{_sha1(key)}"
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

"""A local folder tree as an ingest source (`FolderSource`), behind the trust boundary: links
leaving the folder are failed rows unless followed by flag, captions capped and UTF-8."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from stat import S_ISREG
from typing import Any, ClassVar

from asd_models.shard_reader import printable
from data_engine.samples import STAGE_SOURCE
from data_engine.source_records import (
    CAPTION_EXTS,
    METADATA_FILES,
    SourceOptions,
    SourceRecord,
    read_jsonl_lenient,
    read_table,
    record_sha1,
)
from data_engine.url_lists import CAPTION_COLUMNS


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
                    fingerprint=record_sha1("link-out", self.root, rel),
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
                    fingerprint=record_sha1("bad-metadata", self.root, rel, error),
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
                    fingerprint=record_sha1("unreadable", where, error),
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
                    fingerprint=record_sha1("bad-line", self.root, lineno, error),
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
                    fingerprint=record_sha1("missing", self.root, rel),
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
            fingerprint=record_sha1("file", path, stat, caption),
            path=str(path),
            error=error,
            failed_stage=STAGE_SOURCE if error else None,
        )

    def units(self) -> None:
        return None

    def fingerprint(self) -> str:
        return record_sha1("folder", self.root, *(r.fingerprint for r in self.records()))

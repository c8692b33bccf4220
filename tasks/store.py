"""Versioned artifact store over any fsspec URL (local folder by default, S3 via s3fs).

Layout under the root URL (see DESIGN.md)::

    <kind>/<name>/<version>/...               files, written once
    <kind>/<name>/<version>/_COMMITTED.json   commit record, written last
    <kind>/<name>/LATEST                      pointer, written after the commit record
    runs/<flow_run_id>.json                   what a flow run read and wrote

A version is visible only once its commit record exists, so a writer that dies
half-way leaves nothing a reader can pick up. Versions are never overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

COMMIT_RECORD = "_COMMITTED.json"
CATALOG_DIR = "_catalog"
LATEST_POINTER = "LATEST"
KINDS = ("datasets", "models", "checkpoints", "generations", "evaluations")
DEFAULT_STORE = "./asd-store"
STORE_ENV = "ASD_STORE"
RECORD_FORMAT = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}$")
_REF_RE = re.compile(r"^(?P<kind>[a-z]+)/(?P<name>[^/@]+)@(?P<version>[^/@]+)$")


class StoreError(Exception):
    """Base class for artifact store errors."""


class VersionNotFound(StoreError):
    """The reference names no committed version."""


class InvalidReference(StoreError):
    """A reference or name that the store does not accept."""


@dataclass(frozen=True, order=True)
class ArtifactRef:
    """`kind/name@version`; version may be `latest` before resolution."""

    kind: str
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}@{self.version}"

    @property
    def prefix(self) -> str:
        return f"{self.kind}/{self.name}/{self.version}"

    @classmethod
    def parse(cls, text: str) -> ArtifactRef:
        """Parse `kind/name@version` or `kind/name` (meaning `@latest`)."""
        text = text.strip()
        if "@" not in text:
            text = f"{text}@latest"
        m = _REF_RE.match(text)
        if not m:
            raise InvalidReference(
                f"bad artifact reference {text!r}: expected KIND/NAME@VERSION or KIND/NAME@latest, "
                f"with KIND one of {', '.join(KINDS)}"
            )
        ref = cls(m["kind"], m["name"], m["version"])
        check_kind(ref.kind)
        check_name(ref.name)
        if ref.version != "latest" and not _VERSION_RE.match(ref.version):
            raise InvalidReference(f"bad version {ref.version!r} in {text!r}: expected 'latest' or a version id")
        return ref


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidReference(f"unknown artifact kind {kind!r}: expected one of {', '.join(KINDS)}")


def check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise InvalidReference(
            f"bad artifact name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def new_version_id() -> str:
    """Sortable (UTC time to the microsecond) and unique (random suffix) version id."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(4)


def params_hash(params: Any) -> str:
    """Stable hash of JSON-serialisable parameters (used to find finished work)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


_CODE_VERSION: str | None = None


def code_version() -> str:
    """Package version plus the git commit of the checkout, when there is one."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            pkg = version("any-size-diffusion")
        except PackageNotFoundError:
            pkg = "0+unknown"
        sha = ""
        repo = Path(__file__).resolve().parent.parent
        if (repo / ".git").exists():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                    capture_output=True, text=True, timeout=5,
                )
                if out.returncode == 0:
                    sha = out.stdout.strip()
                    dirty = subprocess.run(
                        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                        capture_output=True, text=True, timeout=5,
                    )
                    if dirty.returncode == 0 and dirty.stdout.strip():
                        sha += "-dirty"
        _CODE_VERSION = f"{pkg}+{sha}" if sha else pkg
    return _CODE_VERSION


STORE_BLOCK_ENV = "ASD_STORE_BLOCK"
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "session", "key_id", "access_key")


def s3_storage_options() -> dict[str, Any]:
    """s3fs options: endpoint from the AWS environment (or a Prefect JSON block named by
    $ASD_STORE_BLOCK holding s3fs options), retries with backoff, version-aware reads."""
    opts: dict[str, Any] = {
        "version_aware": False,
        # s3fs' own retry loop (exponential backoff) and botocore's adaptive mode, for
        # throttling and connection errors; $ASD_S3_RETRIES overrides the attempt count.
        "config_kwargs": {"retries": {"max_attempts": int(os.environ.get("ASD_S3_RETRIES", "8")), "mode": "adaptive"},
                          "connect_timeout": 10, "read_timeout": 120},
        "default_block_size": 16 << 20,  # multipart upload part size for large files
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    block = os.environ.get(STORE_BLOCK_ENV)
    if block:
        from prefect.blocks.system import JSON

        try:
            value = JSON.load(block).value
        except Exception as exc:  # noqa: BLE001 - re-raised with the block name only, never its value
            raise StoreError(f"cannot load the Prefect JSON block {block!r} named by ${STORE_BLOCK_ENV}") from exc
        if not isinstance(value, dict):
            raise StoreError(f"Prefect JSON block {block!r} must hold an object of s3fs options")
        opts.update(value)
    return opts


def redact(text: str) -> str:
    """Remove credentials from a URL or message (user:secret@ and secret-looking key=values)."""
    text = re.sub(r"(?<=://)[^/@\s]+:[^/@\s]+@", "***@", text)
    for word in _SECRET_WORDS:
        text = re.sub(rf"({word}[A-Za-z_]*['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}}]+", r"\1***", text, flags=re.I)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        val = os.environ.get(var)
        if val and len(val) >= 4:
            text = text.replace(val, "***")
    return text


def _filesystems(url: str) -> tuple[fsspec.AbstractFileSystem, fsspec.AbstractFileSystem, str]:
    """(lister, versioned, root) for a store URL. On S3, a version-aware client writes (to
    learn each object's VersionId) and reads pinned versions; a plain one lists, since version
    listings keep showing prefixes whose objects were deleted. Elsewhere both are one client."""
    if url.startswith(("s3://", "s3a://")):
        opts = s3_storage_options()
        fs, root = url_to_fs(url, **opts)
        vfs, _ = url_to_fs(url, **{**opts, "version_aware": True})
        for client in (fs, vfs):
            client.retries = int(os.environ.get("ASD_S3_RETRIES", "8"))  # s3fs' backoff loop (class attribute)
        return fs, vfs, root
    if "://" not in url:
        url = str(Path(url).expanduser().resolve())
    fs, root = url_to_fs(url)
    return fs, fs, root


# Fault points, so tests can kill a writer (SIGKILL) at each phase of a commit.
FAULT_ENV = "ASD_FAULT_AT"


def fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class _HashingWriter:
    """File wrapper that hashes and counts bytes as they are written."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self._raw.write(data)
        return len(data)

    def flush(self) -> None:
        self._raw.flush()

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    @property
    def version_id(self) -> str | None:
        """S3 VersionId of the object once closed (None without bucket versioning)."""
        vid = getattr(self._raw, "version_id", None)
        return vid if vid and vid != "null" else None


class VersionWriter:
    """Writes the files of one new version, then commits it.

    Files are written straight to their final keys under a fresh, unique version prefix;
    the version stays invisible until :meth:`commit` writes the commit record.
    """

    def __init__(self, store: ArtifactStore, kind: str, name: str, version: str | None = None) -> None:
        check_kind(kind)
        check_name(name)
        if version is not None and not _VERSION_RE.match(version):
            raise InvalidReference(f"bad version id {version!r}")
        self.store = store
        self.ref = ArtifactRef(kind, name, version or new_version_id())
        self.files: dict[str, dict[str, Any]] = {}
        self.committed = False

    def _target(self, relpath: str) -> str:
        rel = relpath.replace("\\", "/").lstrip("/")
        parts = rel.split("/")
        if not rel or any(p in ("", ".", "..") for p in parts) or rel == COMMIT_RECORD:
            raise InvalidReference(f"bad file path {relpath!r} inside {self.ref}")
        if self.committed:
            raise StoreError(f"{self.ref} is committed; versions are immutable")
        if rel in self.files:
            raise StoreError(f"{rel!r} was already written in {self.ref}; files are written once")
        return rel

    @contextlib.contextmanager
    def open(self, relpath: str) -> Iterator[_HashingWriter]:
        """Open a new file of this version for binary writing; its hash is recorded on close."""
        rel = self._target(relpath)
        path = self.store.path(self.ref.prefix, rel)
        self.store._ensure_parent(path)
        with self.store.vfs.open(path, "wb") as raw:
            writer = _HashingWriter(raw)
            yield writer
            fault_point("during-upload")
        meta: dict[str, Any] = {"sha256": writer.sha256.hexdigest(), "size": writer.size}
        if writer.version_id:
            meta["version_id"] = writer.version_id
        self.files[rel] = meta
        fault_point("between-files")

    def put_bytes(self, relpath: str, data: bytes) -> None:
        with self.open(relpath) as f:
            f.write(data)

    def put_file(self, relpath: str, local_path: str | Path, chunk: int = 8 << 20) -> None:
        with open(local_path, "rb") as src, self.open(relpath) as dst:
            while block := src.read(chunk):
                dst.write(block)

    def add_files(self, files: dict[str, dict[str, Any]]) -> None:
        """Adopt files that other workers wrote into this same version (fan-out writers)."""
        for rel, meta in files.items():
            if rel in self.files and self.files[rel] != meta:
                raise StoreError(f"{rel!r} was written twice in {self.ref} with different content")
            self.files[rel] = dict(meta)

    def put_dir(self, local_dir: str | Path, prefix: str = "") -> None:
        """Upload every file under `local_dir` (sorted, so records are reproducible)."""
        local_dir = Path(local_dir)
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                rel = p.relative_to(local_dir).as_posix()
                self.put_file(f"{prefix.rstrip('/')}/{rel}" if prefix else rel, p)

    def commit(
        self,
        *,
        parents: list[ArtifactRef | str] | None = None,
        params: dict[str, Any] | None = None,
        flow_run_id: str | None = None,
        summary: dict[str, Any] | None = None,
        input_hash: str | None = None,
    ) -> ArtifactRef:
        """Write the commit record (last), then move `LATEST`. Returns the committed reference."""
        if self.committed:
            raise StoreError(f"{self.ref} is already committed")
        record = {
            "format": RECORD_FORMAT,
            "ref": str(self.ref),
            "kind": self.ref.kind,
            "name": self.ref.name,
            "version": self.ref.version,
            "committed_at": datetime.now(UTC).isoformat(),
            "parents": [str(p) for p in (parents or [])],
            "params": params or {},
            "input_hash": input_hash,
            "flow_run_id": flow_run_id,
            "code_version": code_version(),
            "summary": summary or {},
            "files": dict(sorted(self.files.items())),
        }
        data = json.dumps(record, indent=2, sort_keys=True, default=str).encode()
        fault_point("before-commit-record")
        self.store._write_atomic(self.store.path(self.ref.prefix, COMMIT_RECORD), data)
        self.committed = True
        fault_point("before-catalog")
        self.store._write_catalog_row(record)
        fault_point("before-latest")
        self.store._advance_latest(self.ref)
        return self.ref


class ArtifactStore:
    """Root of the versioned artifact store (`file://`, a local path, or `s3://bucket/prefix`)."""

    def __init__(self, url: str | None = None) -> None:
        raw_url = url or os.environ.get(STORE_ENV) or DEFAULT_STORE
        self.url = redact(raw_url)
        self.fs, self.vfs, self.root = _filesystems(raw_url)
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = self.protocol in ("file", "local")
        self._records: dict[str, dict[str, Any]] = {}  # commit records are immutable: cache them

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # paths -----------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """Full URL of a path inside the store (what a user or another tool opens)."""
        p = self.path(*parts)
        return p if self.is_local else f"{self.protocol}://{p}"

    def _ensure_parent(self, path: str) -> None:
        if self.is_local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Whole-or-nothing write: rename on a local disk, a single PUT on object stores."""
        self._ensure_parent(path)
        if self.is_local:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
                fault_point("during-commit-record")
                f.write(data[len(data) // 2 :])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            fault_point("during-commit-record")  # a single PUT: all or nothing
            self.fs.pipe_file(path, data)

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            rec = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a torn record is no record: the version stays invisible
        return rec if isinstance(rec, dict) and isinstance(rec.get("files"), dict) else None

    # writing ---------------------------------------------------------------
    def new_version(self, kind: str, name: str, version: str | None = None) -> VersionWriter:
        """Writer of a new version; pass `version` (from `new_version_id()`) to let several
        workers write parts of one version, each through its own writer."""
        return VersionWriter(self, kind, name, version)

    def _advance_latest(self, ref: ArtifactRef) -> None:
        pointer = self.path(ref.kind, ref.name, LATEST_POINTER)
        current = self._read_latest(ref.kind, ref.name)
        if current is None or current < ref.version:
            self._write_atomic(pointer, ref.version.encode())

    def write_run_record(self, flow_run_id: str, record: dict[str, Any]) -> str:
        """Record what one flow run read and wrote; one immutable file per run."""
        path = self.path("runs", f"{flow_run_id}.json")
        record = {"flow_run_id": flow_run_id, "code_version": code_version(), **record}
        self._write_atomic(path, json.dumps(record, indent=2, sort_keys=True, default=str).encode())
        return self.uri("runs", f"{flow_run_id}.json")

    # reading ---------------------------------------------------------------
    def _read_latest(self, kind: str, name: str) -> str | None:
        try:
            text = self.fs.cat_file(self.path(kind, name, LATEST_POINTER)).decode().strip()
        except FileNotFoundError:
            return None
        return text if _VERSION_RE.match(text) else None

    def record(self, ref: ArtifactRef | str) -> dict[str, Any]:
        """Commit record of a committed version (resolving `@latest`)."""
        ref = self.resolve(ref)
        rec = self._committed_record(ref)
        if rec is None:
            raise VersionNotFound(f"{ref} has no commit record in {self.url}")
        return rec

    def _committed_record(self, ref: ArtifactRef) -> dict[str, Any] | None:
        """The commit record, read once per store object (records never change once written)."""
        key = str(ref)
        if key not in self._records:
            rec = self._read_json(self.path(ref.prefix, COMMIT_RECORD))
            if rec is None:
                return None
            self._records[key] = rec
        return self._records[key]

    def _pinned(self, ref: ArtifactRef, relpath: str) -> str:
        """Path of a committed file; on a versioned S3 bucket, pinned to the recorded VersionId."""
        path = self.path(ref.prefix, relpath)
        meta = self.record(ref)["files"].get(relpath)
        if meta and meta.get("version_id") and not self.is_local:
            return f"{path}?versionId={meta['version_id']}"
        return path

    def is_committed(self, ref: ArtifactRef) -> bool:
        return self._committed_record(ref) is not None

    def resolve(self, ref: ArtifactRef | str) -> ArtifactRef:
        """Turn `kind/name@latest` into the committed version it names; check others exist."""
        if isinstance(ref, str):
            ref = ArtifactRef.parse(ref)
        if ref.version == "latest":
            version = self._read_latest(ref.kind, ref.name)
            if version and self.is_committed(ArtifactRef(ref.kind, ref.name, version)):
                return ArtifactRef(ref.kind, ref.name, version)
            versions = self.list_versions(ref.kind, ref.name)
            if not versions:
                raise VersionNotFound(f"no committed version of {ref.kind}/{ref.name} in {self.url}")
            return versions[-1]
        if not self.is_committed(ref):
            raise VersionNotFound(f"{ref} is not a committed version in {self.url}")
        return ref

    def list_artifacts(self) -> list[tuple[str, str]]:
        out = []
        for kind in KINDS:
            try:
                entries = self.fs.ls(self.path(kind), detail=False)
            except FileNotFoundError:
                continue
            out += [(kind, e.rstrip("/").rsplit("/", 1)[-1]) for e in sorted(entries)]
        return out

    def list_versions(self, kind: str, name: str) -> list[ArtifactRef]:
        """Committed versions of one artifact, oldest first."""
        try:
            entries = self.fs.ls(self.path(kind, name), detail=False)
        except FileNotFoundError:
            return []
        refs = []
        for e in sorted(entries):
            v = e.rstrip("/").rsplit("/", 1)[-1]
            if _VERSION_RE.match(v):
                ref = ArtifactRef(kind, name, v)
                if self.is_committed(ref):
                    refs.append(ref)
        return refs

    def find_by_input_hash(self, kind: str, name: str, input_hash: str) -> ArtifactRef | None:
        """Newest committed version made from the same inputs, if any (finished work to reuse)."""
        for ref in reversed(self.list_versions(kind, name)):  # list_versions already read (cached) each record
            rec = self._committed_record(ref)
            if rec and rec.get("input_hash") == input_hash:
                return ref
        return None

    def open(self, ref: ArtifactRef | str, relpath: str, mode: str = "rb") -> Any:
        if "w" in mode or "a" in mode:
            raise StoreError("committed versions are read-only; write with new_version()")
        ref = self.resolve(ref)
        return self.vfs.open(self._pinned(ref, relpath), mode)

    def read_bytes(self, ref: ArtifactRef | str, relpath: str) -> bytes:
        ref = self.resolve(ref)
        return self.vfs.cat_file(self._pinned(ref, relpath))

    def file_uri(self, ref: ArtifactRef, relpath: str) -> str:
        return self.uri(ref.prefix, relpath)

    def download(self, ref: ArtifactRef | str, dest: str | Path, prefix: str = "") -> Path:
        """Copy the committed files of a version (optionally under `prefix`) to a local folder."""
        ref = self.resolve(ref)
        rec = self.record(ref)
        dest = Path(dest)
        for rel in rec["files"]:
            if prefix and not rel.startswith(prefix.rstrip("/") + "/"):
                continue
            target = dest / (rel[len(prefix.rstrip("/")) + 1 :] if prefix else rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.vfs.get_file(self._pinned(ref, rel), str(target))
        return dest

    def verify(self, ref: ArtifactRef | str) -> list[str]:
        """Re-hash every recorded file (the recorded S3 VersionId, where there is one, and
        check it is still the current object); one line per problem, empty when intact."""
        ref = self.resolve(ref)
        rec = self.record(ref)
        problems = []
        for rel, meta in rec["files"].items():
            vid = meta.get("version_id")
            if vid and not self.is_local:
                try:
                    current = self.vfs.info(self.path(ref.prefix, rel), refresh=True).get("VersionId")
                except FileNotFoundError:
                    current = None
                if current != vid:
                    problems.append(f"{ref}: {rel}: current S3 VersionId {current} != recorded {vid} "
                                    "(overwritten or deleted after commit)")
            h = hashlib.sha256()
            size = 0
            try:
                with self.vfs.open(self._pinned(ref, rel), "rb") as f:
                    while block := f.read(8 << 20):
                        h.update(block)
                        size += len(block)
            except FileNotFoundError:
                problems.append(f"{ref}: {rel}: missing")
                continue
            if size != meta["size"]:
                problems.append(f"{ref}: {rel}: size {size} != recorded {meta['size']}")
            if h.hexdigest() != meta["sha256"]:
                problems.append(f"{ref}: {rel}: sha256 {h.hexdigest()[:16]}… != recorded {meta['sha256'][:16]}…")
        return problems

    # leftovers ---------------------------------------------------------------
    def uncommitted(self, grace_s: float = 24 * 3600) -> list[str]:
        """Version prefixes (and temp files) without a commit record, older than `grace_s`:
        what killed writers left behind. Age comes from the version id's timestamp."""
        now = datetime.now(UTC)
        out = []
        for kind, name in self.list_artifacts():
            try:
                entries = self.fs.ls(self.path(kind, name), detail=False)
            except FileNotFoundError:
                continue
            for e in entries:
                base = e.rstrip("/").rsplit("/", 1)[-1]
                stamp = base.split("-", 1)[0] if _VERSION_RE.match(base) else None
                if stamp is None and ".tmp" not in base:
                    continue
                if stamp is not None:
                    if self.is_committed(ArtifactRef(kind, name, base)):
                        continue
                    born = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
                    if (now - born).total_seconds() < grace_s:
                        continue
                    if not [f for f in self.fs.find(e) if f.startswith(e.rstrip("/") + "/")]:
                        continue  # nothing left under it (some S3 servers list emptied prefixes)
                elif (now.timestamp() - self._mtime(e)) < grace_s:
                    continue
                out.append(e)
        return sorted(out)

    def _mtime(self, path: str) -> float:
        info = self.fs.info(path)
        m = info.get("mtime") or info.get("LastModified") or info.get("created")
        return m.timestamp() if isinstance(m, datetime) else float(m or 0)

    def gc(self, grace_s: float = 24 * 3600, delete: bool = False) -> list[str]:
        """List (and with `delete`, remove) leftovers of uncommitted versions."""
        found = self.uncommitted(grace_s)
        if delete:
            for path in found:
                self.fs.rm(path, recursive=True)
        return found

    # catalog -----------------------------------------------------------------
    def _write_catalog_row(self, record: dict[str, Any]) -> None:
        """One immutable Parquet file per committed version: appends never race."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from data_manifests.schemas import CATALOG

        metrics = {k: float(v) for k, v in (record.get("summary") or {}).items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and v == v}
        row = {
            "kind": record["kind"], "name": record["name"], "version": record["version"], "ref": record["ref"],
            "committed_at": datetime.fromisoformat(record["committed_at"]),
            "size_bytes": sum(f["size"] for f in record["files"].values()), "file_count": len(record["files"]),
            "parents": record.get("parents", []), "flow_run_id": record.get("flow_run_id"),
            "code_version": record.get("code_version"), "metrics": list(metrics.items()),
            "uri": self.uri(record["kind"], record["name"], record["version"]),
        }
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([row], schema=CATALOG), buf)
        self._write_atomic(self.path(CATALOG_DIR, record["kind"], record["name"], f"{record['version']}.parquet"),
                           buf.getvalue())

    def catalog(self, rebuild: bool = False) -> Any:
        """The catalog as a pyarrow Table (one row per committed version). With `rebuild`,
        first write the rows missing for committed versions (a writer killed after its commit
        record and before its catalog row)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from data_manifests.schemas import CATALOG

        if rebuild:
            have = set(self.fs.glob(self.path(CATALOG_DIR, "*", "*", "*.parquet")))
            for kind, name in self.list_artifacts():
                for ref in self.list_versions(kind, name):
                    if self.path(CATALOG_DIR, kind, name, f"{ref.version}.parquet") not in have:
                        self._write_catalog_row(self.record(ref))
        tables = []
        for path in sorted(self.fs.glob(self.path(CATALOG_DIR, "*", "*", "*.parquet"))):
            with self.fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, schema=CATALOG))
        return pa.concat_tables(tables) if tables else CATALOG.empty_table()

    # locating files ------------------------------------------------------------
    def locate(self, file_or_uri: str) -> tuple[ArtifactRef, str]:
        """Which committed version holds this file (a path or URI inside the store)."""
        text = file_or_uri.split("?versionId=", 1)[0]
        if "://" in text and not text.startswith("file://"):
            text = text.split("://", 1)[1]
        elif text.startswith("file://"):
            text = text[len("file://"):]
        if self.is_local:
            text = str(Path(text).expanduser().resolve())
        root = self.root.rstrip("/") + "/"
        if not text.startswith(root):
            raise InvalidReference(f"{file_or_uri} is not inside the store {self.url}")
        parts = text[len(root):].split("/")
        if len(parts) < 4 or parts[0] not in KINDS or not _VERSION_RE.match(parts[2]):
            raise InvalidReference(f"{file_or_uri} is not a file of a version (KIND/NAME/VERSION/PATH)")
        ref = ArtifactRef(parts[0], parts[1], parts[2])
        if not self.is_committed(ref):
            raise VersionNotFound(f"{file_or_uri} belongs to {ref}, which is not committed")
        rel = "/".join(parts[3:])
        if rel not in self.record(ref)["files"]:
            raise VersionNotFound(f"{file_or_uri} is not a recorded file of {ref}")
        return ref, rel

    def lineage(self, ref: ArtifactRef | str) -> list[dict[str, Any]]:
        """The version and all its ancestors (depth-first), each as its commit record."""
        seen: set[str] = set()
        out: list[dict[str, Any]] = []

        def walk(r: str, depth: int) -> None:
            if r in seen:
                return
            seen.add(r)
            try:
                rec = self.record(r)
            except StoreError as exc:
                out.append({"ref": r, "depth": depth, "missing": str(exc)})
                return
            out.append({**rec, "depth": depth})
            for p in rec.get("parents", []):
                walk(p, depth + 1)

        walk(str(self.resolve(ref)), 0)
        return out

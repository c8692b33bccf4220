"""Names, references and version ids of the artifact store, and its errors."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

COMMIT_RECORD = "_COMMITTED.json"
PENDING_MARKER = "_PENDING.json"  # in an uncommitted version that a rerun of the same inputs resumes
LEASE_DIR = "_LEASES"  # in a pending version: who writes it now (artifact_store.leases)
FRAGMENT_DIR = "_fragments"  # in a pending generation: one Parquet fragment per finished chunk of rows
SITE_DIR = "_site"  # at the store root: the dashboard built from the catalog (dashboard.build)
CATALOG_DIR = "_catalog"
LATEST_POINTER = "LATEST"
KINDS = ("datasets", "models", "checkpoints", "prompts", "generations", "upscales", "evaluations")
RECORD_FORMAT = 1

# fullmatch everywhere: `$` would also accept a trailing newline
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_RE = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}")
_REF_RE = re.compile(r"(?P<kind>[a-z]+)/(?P<name>[^/@]+)@(?P<version>[^/@]+)")


class StoreError(Exception):
    """Base class for artifact store errors."""


class VersionNotFound(StoreError):
    """The reference names no committed version."""


class InvalidReference(StoreError):
    """A reference, name or path that the store does not accept."""


class CorruptFile(StoreError):
    """A committed file whose bytes are not the ones its commit record lists."""


class CorruptRecord(StoreError):
    """A commit record exists but cannot be read: an error, never 'absent'."""


class FileNotListed(StoreError):
    """A path inside a committed version's folder that its commit record does not list (a
    version's content is exactly its record), or a link where a file should be."""


PENDING_STATE = (PENDING_MARKER, LEASE_DIR, FRAGMENT_DIR)  # what a pending version holds besides its files


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
        m = _REF_RE.fullmatch(text)
        if not m:
            raise InvalidReference(
                f"bad artifact reference {text!r}: expected KIND/NAME@VERSION or KIND/NAME@latest, "
                f"with KIND one of {', '.join(KINDS)}"
            )
        ref = cls(m["kind"], m["name"], m["version"])
        check_kind(ref.kind)
        check_name(ref.name)
        if ref.version != "latest":
            check_version(ref.version)
        return ref


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidReference(f"unknown artifact kind {kind!r}: expected one of {', '.join(KINDS)}")


def check_name(name: str) -> str:
    """Validate an artifact name (before any work is done under it); returns it."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidReference(
            f"bad artifact name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise InvalidReference(
            f"bad version id {version!r}: expected 'latest' or an id like 20261126T153000.123456Z-1a2b3c4d"
        )
    return version


def new_version_id() -> str:
    """Sortable (UTC time to the microsecond) and unique (random suffix) version id."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(4)


def params_hash(params: Any) -> str:
    """Stable hash of JSON-serialisable parameters (used to find finished work)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class PendingVersion:
    """A version to be built: its reference and the hash of the inputs it is built from.

    Plain data (picklable, JSON-able), so it can be handed from a flow to the tasks that write
    parts of it, and committed once by whoever holds the finished file list."""

    ref: ArtifactRef
    input_hash: str

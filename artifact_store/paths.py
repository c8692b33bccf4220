"""Validation of every path the store takes from outside: commit records, references, catalog
rows and callers. A path inside a version is relative, '/'-separated, with no '.', '..', empty
or control-character parts; a local target must resolve inside its destination folder."""

from __future__ import annotations

import re
from pathlib import Path

from artifact_store.refs import COMMIT_RECORD, FRAGMENT_DIR, LEASE_DIR, PENDING_MARKER, InvalidReference

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_relpath(rel: str, where: str = "", store_state: bool = False) -> str:
    """Return `rel` if it is a safe file path inside a version, else raise InvalidReference.
    `store_state`: the store's own files of a pending version (fragments, leases, its marker)
    are allowed too."""
    at = f" in {where}" if where else ""
    if not isinstance(rel, str) or not rel:
        raise InvalidReference(f"empty file path{at}")
    if rel.startswith("/") or "\\" in rel or _CONTROL.search(rel) or re.match(r"[A-Za-z]:", rel):
        raise InvalidReference(f"unsafe file path {rel!r}{at}: absolute, backslash or control character")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidReference(f"unsafe file path {rel!r}{at}: empty, '.' or '..' part")
    if not store_state and (rel in (COMMIT_RECORD, PENDING_MARKER) or parts[0] in (LEASE_DIR, FRAGMENT_DIR)):
        raise InvalidReference(f"file path {rel!r}{at} is reserved for the store")
    return rel


def local_target(dest: str | Path, rel: str, where: str = "") -> Path:
    """`dest / rel`, checked to stay inside `dest` once links are resolved."""
    check_relpath(rel, where)
    root = Path(dest).resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise InvalidReference(f"file path {rel!r}{' in ' + where if where else ''} resolves outside {root}")
    return target

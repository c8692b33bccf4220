"""Where a file comes from, the part of `ArtifactStore` that follows references: the committed
version holding a path or URI, and a version's ancestors through the parents of its records."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from artifact_store.refs import (
    KINDS,
    VERSION_RE,
    ArtifactRef,
    InvalidReference,
    StoreError,
    VersionNotFound,
    check_name,
)

if TYPE_CHECKING:
    from artifact_store.host import StoreHost
else:
    StoreHost = object


class Lineage(StoreHost):
    """Locating files and walking parents (a part of `ArtifactStore`)."""

    def locate(self, file_or_uri: str) -> tuple[ArtifactRef, str]:
        """Which committed version holds this file (a path or URI inside the store)."""
        text = file_or_uri.split("?versionId=", 1)[0]
        if "://" in text and not text.startswith("file://"):
            text = text.split("://", 1)[1]
        elif text.startswith("file://"):
            text = text[len("file://") :]
        if self.is_local:
            text = str(Path(text).expanduser().resolve())
        root = self.root.rstrip("/") + "/"
        if not text.startswith(root):
            raise InvalidReference(f"{file_or_uri} is not inside the store {self.display_url}")
        parts = text[len(root) :].split("/")
        if len(parts) < 4 or parts[0] not in KINDS or not VERSION_RE.fullmatch(parts[2]):
            raise InvalidReference(f"{file_or_uri} is not a file of a version (KIND/NAME/VERSION/PATH)")
        ref = ArtifactRef(parts[0], check_name(parts[1]), parts[2])
        if not self.is_committed(ref):
            raise VersionNotFound(f"{file_or_uri} belongs to {ref}, which is not committed")
        rel = "/".join(parts[3:])
        if self.file_meta(ref, rel) is None:
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

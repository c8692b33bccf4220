"""What the store's parts (reading, maintenance, lineage) call on the whole `ArtifactStore`.

`ArtifactStore` is `StoreBackend` plus the mixins `VersionReading`, `Maintenance` and
`Lineage`; each mixin calls a few methods the assembled store defines. `StoreHost` names
those methods once, for the type-checker: the mixins derive from it only under
`TYPE_CHECKING` (from `object` at run time), so nothing here ever runs."""

from __future__ import annotations

from typing import Any

from artifact_store.backend import StoreBackend
from artifact_store.refs import ArtifactRef


class StoreHost(StoreBackend):
    def record(self, ref: ArtifactRef | str) -> dict[str, Any]:
        raise NotImplementedError

    def resolve(self, ref: ArtifactRef | str) -> ArtifactRef:
        raise NotImplementedError

    def is_committed(self, ref: ArtifactRef) -> bool:
        raise NotImplementedError

    def has_commit_record(self, ref: ArtifactRef) -> bool:
        raise NotImplementedError

    def list_artifacts(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def list_versions(self, kind: str, name: str) -> list[ArtifactRef]:
        raise NotImplementedError

    def file_meta(self, ref: ArtifactRef | str, relpath: str) -> dict[str, Any] | None:
        raise NotImplementedError

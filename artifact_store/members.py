"""Small files of a version packed into WebDataset tar shards (img2dataset's and webdataset's
layout: `<key>.png`, `<key>.json`, ... of one sample side by side), each member's data offset and
size recorded, so one member is read with one ranged request and the tar stays readable by
`webdataset.WebDataset`, `tar` and any other reader. A generations version in the `webdataset`
layout names its images this way (manifest columns `shard`, `shard_offset`, `shard_size`);
`image_bytes` and `image_uri` read either layout."""

from __future__ import annotations

import io
import tarfile
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from artifact_store.refs import ArtifactRef
    from artifact_store.store import ArtifactStore

SPOOL_BYTES = 64 << 20  # a shard is built in memory up to this, then in a temporary file


class TarPacker:
    """Members appended to a tar with fixed headers (mtime 0, uid/gid 0, mode 0644: the same
    members give the same bytes); each `add` returns the member's data offset and size."""

    def __init__(self) -> None:
        self.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self._tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
        self.members = 0

    def add(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
        self._tar.addfile(info, io.BytesIO(data))
        self.members += 1
        end = self._tar.offset  # after the data and its padding to 512 bytes
        return end - ((len(data) + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, len(data)

    def finish(self) -> Any:
        """The finished tar (end blocks written), rewound: a binary file object to upload."""
        self._tar.close()
        self.file.seek(0)
        return self.file


def image_bytes(store: ArtifactStore, ref: ArtifactRef | str, row: dict[str, Any]) -> bytes:
    """The image of a generations manifest row: a ranged read of its tar shard, or its file."""
    if row.get("shard"):
        start = int(row["shard_offset"])
        return store.read_range(ref, row["shard"], start, start + int(row["shard_size"]))
    return store.read_bytes(ref, row["image"])


def image_uri(store: ArtifactStore, ref: ArtifactRef | str, row: dict[str, Any]) -> str:
    """Where a manifest row's image is, for people: its file, or `<shard URI>#<member>`."""
    ref = store.resolve(ref)
    if row.get("shard"):
        return f"{store.file_uri(ref, row['shard'])}#{row['image']}"
    return store.file_uri(ref, row["image"])

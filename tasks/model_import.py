"""`asd model import`: a model users already have -> `models/<name>`, usable by every stage's
`--model` (and `asd train --base-model models/<name>`) exactly as a trained one.

SOURCE is a local diffusers pipeline folder (its `model_index.json` names the family:
`asd_models.families`) or a hub id already in the local Hugging Face cache (its snapshot is
read; nothing is downloaded). A pickled checkpoint is refused with how to convert it, never
unpickled. No weight is loaded: each component's files are checked (configs read, safetensors
headers parsed) and copied streamed, one file at a time, so memory stays flat whatever the
model's size. The version's identity is the content (every kept file's sha256): importing the
same bytes again, under the same name, reuses the version; a file that changes between the
hashing and the copy fails the import. The record keeps the family, the source, each
component's config and the weights' size."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from artifact_store import ArtifactStore, redact_url
from asd_models.families.base import ModelNotFoundError
from asd_models.model_files import ModelFiles, cached_snapshot, model_files, refuse_pickle
from tasks.stage import Built, Inputs, Stage, StageRun

HASH_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def open_model_source(source: str) -> ModelFiles:
    """The files of SOURCE: a local folder, or a hub id's snapshot in the local cache."""
    refuse_pickle(source)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors":
            raise ModelNotFoundError(
                f"{source} is a single-file checkpoint; import takes a diffusers folder: convert it "
                "with diffusers where its config is at hand (`StableDiffusionPipeline.from_single_file"
                "(path, config=FOLDER).save_pretrained(out)`, or the XL pipeline for SDXL), then import `out`"
            )
        raise ModelNotFoundError(f"{source} is a file, not a model folder in diffusers layout")
    if path.is_dir() or source.startswith((".", "/", "~")):
        return model_files(path.resolve() if path.is_dir() else path)
    snapshot = cached_snapshot(source)
    return model_files(snapshot, links_within=snapshot.parents[1])


@dataclass(frozen=True)
class ModelImport(Stage):
    """A model folder or cached hub id, copied into the store as it is (see the module doc)."""

    flow: ClassVar[str] = "asd-model-import"
    output_param: ClassVar[str] = "name"
    kind: ClassVar[str] = "models"
    source: str

    def resolve(self, store: ArtifactStore) -> Inputs:
        files = open_model_source(self.source)
        hashes = {rel: _sha256(p) for rel, p in sorted(files.files.items())}
        content = hashlib.sha256("".join(f"{r}\0{h}\n" for r, h in hashes.items()).encode()).hexdigest()
        return Inputs(
            reads=[],
            parents=[],
            identity={"kind": "model-import", "content": content},
            extra={"files": files, "hashes": hashes, "content": content},
        )

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        files: ModelFiles = inputs.extra["files"]
        hashes: dict[str, str] = inputs.extra["hashes"]
        for rel, path in sorted(files.files.items()):
            run.writer.put_file(rel, path)
            if run.writer.files[rel]["sha256"] != hashes[rel]:
                raise ModelNotFoundError(
                    f"{path} changed while it was imported (its sha256 is not the one hashed "
                    "before the copy): import it again once nothing writes it"
                )
        run.logger.info(
            "imported %s (%s, %d files, %.1f MB of weights)",
            redact_url(self.source),
            files.family.name,
            len(files.files),
            files.weight_bytes / 1e6,
        )
        params: dict[str, Any] = {
            "source": redact_url(self.source),
            "family": files.family.name,
            "content_sha256": inputs.extra["content"],
            "components": files.configs,
        }
        return Built(
            params=params,
            summary={
                "family": files.family.name,
                "files": len(files.files),
                "weight_bytes": files.weight_bytes,
            },
        )

"""`asd model import`: a model users already have -> `models/<name>`, usable by every stage's
`--model` (and `asd train --base-model models/<name>`) exactly as a trained one.

SOURCE is a local diffusers pipeline folder (its `model_index.json` names the family:
`asd_models.families`), a hub id already in the local Hugging Face cache (its snapshot is read;
nothing is downloaded), or a single-file checkpoint `.safetensors` as A1111 and ComfyUI keep
them (its family read from its keys, converted one component at a time with the configs of
`--config`: `asd_models.single_file`). A pickled checkpoint is refused with how to convert it,
never unpickled.

A folder's weights are not loaded: each component's files are checked (configs read,
safetensors headers parsed) and copied streamed, one file at a time, so memory stays flat
whatever the model's size. The version's identity is the content (every file read's sha256:
the folder's, or the single file's and its config folder's): importing the same bytes again,
under the same name, reuses the version; a file that changes between the hashing and the copy
(or the conversion) fails the import. The record keeps the family, the source, each
component's config and the weights' size."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from artifact_store import ArtifactStore, redact_url
from asd_models.families.base import ModelNotFoundError
from asd_models.model_files import ModelFiles, cached_snapshot, model_files, refuse_pickle
from asd_models.single_file import SingleFile, config_files, convert_single_file, inspect_single_file
from tasks.stage import Built, Inputs, Stage, StageRun

HASH_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def _folder(source: str) -> tuple[Path, Path | None]:
    """A local folder (links followed within it), or a hub id's snapshot in the local cache
    (links followed within the cache's repo folder)."""
    path = Path(source).expanduser()
    if path.is_dir() or source.startswith((".", "/", "~")):
        return (path.resolve() if path.is_dir() else path), None
    snapshot = cached_snapshot(source)
    return snapshot, snapshot.parents[1]


@dataclass(frozen=True)
class SingleFileSource:
    """A single-file checkpoint and the config folder it is converted with."""

    checkpoint: SingleFile
    config: Path
    config_source: str
    files: dict[str, Path]  # what the conversion reads of the config folder


def open_model_source(source: str, config: str | None = None) -> ModelFiles | SingleFileSource:
    """What SOURCE is: a single-file checkpoint (with its config folder), or the files of a
    local folder or of a hub id's snapshot in the local cache."""
    refuse_pickle(source)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelNotFoundError(
                f"{source} is a file, neither a single-file .safetensors checkpoint nor a model folder"
            )
        checkpoint = inspect_single_file(path.resolve())
        config_source = config or checkpoint.default_config
        try:
            folder, within = _folder(config_source)
            return SingleFileSource(
                checkpoint, folder, config_source, config_files(checkpoint, folder, within)
            )
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(
                f"{source} is a {checkpoint.family.description} checkpoint ({checkpoint.model_type}); "
                f"converting it needs the configs of a diffusers folder of its family (--config FOLDER "
                f"or HUB_ID, default {checkpoint.default_config}): {exc}"
            ) from exc
    if config is not None:
        raise ModelNotFoundError(f"--config is for a single-file checkpoint; {source} is a model folder")
    folder, within = _folder(source)
    return model_files(folder, links_within=within)


def _changed(path: Path) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{path} changed while it was imported (its sha256 is not the one hashed before the "
        "copy): import it again once nothing writes it"
    )


@dataclass(frozen=True)
class ModelImport(Stage):
    """A model folder or cached hub id, copied into the store as it is (see the module doc)."""

    flow: ClassVar[str] = "asd-model-import"
    output_param: ClassVar[str] = "name"
    kind: ClassVar[str] = "models"
    source: str
    config: str | None = None  # a single file's config folder or hub id (default: diffusers')

    def resolve(self, store: ArtifactStore) -> Inputs:
        files = open_model_source(self.source, self.config)
        read = (
            files.files
            if isinstance(files, ModelFiles)
            else {"checkpoint": files.checkpoint.path, **files.files}
        )
        hashes = {rel: _sha256(p) for rel, p in sorted(read.items())}
        content = hashlib.sha256("".join(f"{r}\0{h}\n" for r, h in hashes.items()).encode()).hexdigest()
        return Inputs(
            reads=[],
            parents=[],
            identity={"kind": "model-import", "content": content},
            extra={"files": files, "hashes": hashes, "content": content},
        )

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        source: ModelFiles | SingleFileSource = inputs.extra["files"]
        hashes: dict[str, str] = inputs.extra["hashes"]
        if isinstance(source, SingleFileSource):
            with tempfile.TemporaryDirectory(prefix="asd-import-") as tmp:
                files = self._converted(run, source, hashes, Path(tmp))
                weight_bytes = files.weight_bytes
                for rel, path in sorted(files.files.items()):
                    run.writer.put_file(rel, path)
        else:
            files, weight_bytes = source, source.weight_bytes
            for rel, path in sorted(files.files.items()):
                run.writer.put_file(rel, path)
                if run.writer.files[rel]["sha256"] != hashes[rel]:
                    raise _changed(path)
        run.logger.info(
            "imported %s (%s, %d files, %.1f MB of weights)",
            redact_url(self.source),
            files.family.name,
            len(files.files),
            weight_bytes / 1e6,
        )
        params: dict[str, Any] = {
            "source": redact_url(self.source),
            "family": files.family.name,
            "content_sha256": inputs.extra["content"],
            "components": files.configs,
        }
        if isinstance(source, SingleFileSource):
            params |= {
                "checkpoint_sha256": hashes["checkpoint"],
                "checkpoint_type": source.checkpoint.model_type,
                "config_source": redact_url(source.config_source),
            }
        return Built(
            params=params,
            summary={
                "family": files.family.name,
                "files": len(files.files),
                "weight_bytes": weight_bytes,
            },
        )

    @staticmethod
    def _converted(run: StageRun, source: SingleFileSource, hashes: dict[str, str], out: Path) -> ModelFiles:
        """The single file converted into `out`, checked unchanged since it was hashed."""
        sf = source.checkpoint
        run.logger.info(
            "%s: a %s checkpoint (%s); converting with the configs of %s",
            sf.path,
            sf.family.description,
            sf.model_type,
            redact_url(source.config_source),
        )
        convert_single_file(sf, source.config, source.files, out, log=run.logger.info)
        for rel, path in [("checkpoint", sf.path), *source.files.items()]:
            if _sha256(path) != hashes[rel]:
                raise _changed(path)
        return model_files(out)

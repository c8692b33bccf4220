"""A model folder's files as an import takes them, without loading a weight: its family (from
`model_index.json`), every component it needs, and per component the files to keep (configs,
tokenizer files, safetensors weights). Pickled weights (`.bin`, `.ckpt`, `.pt`, `.pth`,
`.pkl`) are never read: left out when safetensors sit beside them, refused when they are all
a component has. Each safetensors file's header is checked (a JSON table of tensors, read
alone), so a damaged or renamed file is refused before anything is copied."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from asd_models.families import family_of_folder
from asd_models.families.base import ModelFamily, ModelNotFoundError

PICKLE_EXTS = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
HEADER_MAX = 100 << 20  # a safetensors header is a few MB even for the largest models
CONVERT_HINT = (
    "convert it to safetensors where you trust it (diffusers: "
    "`DiffusionPipeline.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`; "
    "a single checkpoint: `safetensors.torch.save_file(torch.load(path, weights_only=True)['state_dict'], "
    "'out.safetensors')`), then import `out`"
)


@dataclass(frozen=True)
class ModelFiles:
    """What an import copies: relative path -> local file, the family, and each component's
    config (for the record)."""

    folder: Path
    family: ModelFamily
    files: dict[str, Path]
    configs: dict[str, dict]

    @property
    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for rel, p in self.files.items() if rel.endswith(".safetensors"))


def refuse_pickle(source: str) -> None:
    """A single pickled checkpoint given as a model: one line saying how to convert it."""
    if source.lower().endswith(PICKLE_EXTS):
        raise ModelNotFoundError(
            f"{source} is a pickled checkpoint: this pipeline never unpickles (loading one runs "
            f"whatever code it holds); {CONVERT_HINT}"
        )


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's table of tensors (name -> dtype, shape, offsets), read alone: the
    file starts with an 8-byte length, then that much JSON. ModelNotFoundError when it does not."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(HEADER_MAX, os.path.getsize(path) - 8):
            raise ModelNotFoundError(f"{path} is not a safetensors file (its header length is {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ModelNotFoundError(f"{path} is not a safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("shape"), list)
        for k, v in header.items()
        if k != "__metadata__"
    ):
        raise ModelNotFoundError(f"{path} is not a safetensors file (its header is not a table of tensors)")
    header.pop("__metadata__", None)
    return header


def model_files(folder: Path, links_within: Path | None = None) -> ModelFiles:
    """The files of a diffusers model folder an import keeps (see the module doc). A link is
    followed only when it resolves inside `links_within` (default: the folder itself; the HF
    cache's snapshots link into the cache's blobs beside them)."""
    within = (links_within or folder).resolve()
    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder {folder} does not exist")
    family = family_of_folder(folder)
    family.check_folder(folder)
    files: dict[str, Path] = {}
    if (folder / "model_index.json").is_file():
        files["model_index.json"] = folder / "model_index.json"
    configs = {}
    for sub, config in family.folders.items():
        if sub in family.optional and not (folder / sub).is_dir():
            continue  # a component the family may leave out (SD3 without T5)
        found = sorted(p for p in (folder / sub).rglob("*") if p.is_file())
        outside = [p for p in found if not p.resolve().is_relative_to(within)]
        if outside:
            raise ModelNotFoundError(
                f"{outside[0]} is a link to {outside[0].resolve()}, outside {within}: an import "
                "copies only the model folder's own files"
            )
        weights = [p for p in found if p.suffix == ".safetensors"]
        pickles = [p for p in found if p.suffix in PICKLE_EXTS]
        if config == "config.json" and not weights:
            what = f"only pickled weights ({', '.join(p.name for p in pickles)})" if pickles else "no weights"
            raise ModelNotFoundError(
                f"{folder / sub} holds {what}: this pipeline loads safetensors only and never unpickles; "
                + CONVERT_HINT
            )
        for p in found:
            if p.suffix in PICKLE_EXTS or "/." in f"/{p.relative_to(folder)}":
                continue
            if p.suffix == ".safetensors":
                read_header(p)
            files[p.relative_to(folder).as_posix()] = p
        if config:
            try:
                configs[sub] = json.loads((folder / sub / config).read_text())
            except ValueError as exc:
                raise ModelNotFoundError(f"{folder / sub / config} does not read as JSON ({exc})") from exc
    return ModelFiles(folder, family, files, configs)


def cached_snapshot(model_id: str) -> Path:
    """The local HF cache's snapshot folder of a hub id (never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise not_cached(model_id) from exc


def not_cached(model_id: str) -> ModelNotFoundError:
    """The error for a hub id that is not in the local cache: where the cache is, how to fill it."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return ModelNotFoundError(
        f"model {model_id!r} is not in the local Hugging Face cache ({cache}) and this pipeline never "
        f"downloads at run time: download it first (`hf download {model_id}`) or use a local folder "
        "in diffusers layout"
    )

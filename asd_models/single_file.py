"""Single-file checkpoints, one original-format `.safetensors` as A1111 and ComfyUI users keep
them, turned into a diffusers folder one component at a time.

The family is read from the file's keys alone (its header: names, dtypes and shapes; no weight
is read), by diffusers' own key inference, and each family names the model types it takes and
where each component's keys sit in such a file (`ModelFamily.single_file_parts`). Configs come
from a diffusers folder of the same family (`--config`, or diffusers' default model of that
type in the local Hugging Face cache): a component found in the file is converted by
diffusers' single-file loaders with that folder's config; the tokenizers, the scheduler and any
component the file lacks (FLUX files hold only the transformer) are taken from the folder.

Memory: a component's tensors are read, converted, saved in shards and freed before the next
is read, so the peak is about one component (the largest, the denoiser), never the file."""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asd_models.families import family_of_checkpoint_type, family_of_folder
from asd_models.families.base import WEIGHTLESS, ModelFamily, ModelNotFoundError
from asd_models.model_files import PICKLE_EXTS, read_header

SHARD = "1GB"  # the converted weights' shard size: the save holds one shard's bytes at a time
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,  # FLUX files kept in fp8 (ComfyUI): stored as bfloat16
    "F8_E5M2": torch.float8_e5m2,
}
STORED_AS = {torch.float8_e4m3fn: torch.bfloat16, torch.float8_e5m2: torch.bfloat16}


@dataclass(frozen=True)
class SingleFile:
    """What a single-file checkpoint holds, read from its header: the family, diffusers' model
    type, and per component its keys and the dtype of its floating weights."""

    path: Path
    family: ModelFamily
    model_type: str
    parts: dict[str, list[str]]
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def default_config(self) -> str:
        """The hub id of diffusers' default model of this type (whose configs it converts with)."""
        from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

        return str(DIFFUSERS_DEFAULT_PIPELINE_PATHS[self.model_type]["pretrained_model_name_or_path"])


def inspect_single_file(path: Path) -> SingleFile:
    """The family and components of a single-file checkpoint, from its header alone."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    header = read_header(path)
    unknown = sorted({str(v.get("dtype")) for v in header.values()} - set(DTYPES))
    if unknown:
        raise ModelNotFoundError(
            f"{path}: tensors of dtype {', '.join(map(str, unknown))}, which this import does not read"
        )
    meta = {k: torch.empty(v["shape"], dtype=DTYPES[v["dtype"]], device="meta") for k, v in header.items()}
    try:
        model_type = infer_diffusers_model_type(meta)
    except Exception as exc:  # diffusers' inference indexes shapes it expects: any surprise is "unknown"
        raise ModelNotFoundError(f"{path}: its keys do not say which model it is ({exc})") from exc
    family = family_of_checkpoint_type(model_type, str(path))
    parts: dict[str, list[str]] = {}
    claimed: set[str] = set()
    for comp, prefixes in family.single_file_parts.items():
        keys = [k for k in header if any(p and k.startswith(p) for p in prefixes)]
        if keys:
            parts[comp] = keys
            claimed.update(keys)
    for comp, prefixes in family.single_file_parts.items():  # "": what no other component claimed
        if "" in prefixes and comp not in parts:
            rest = [k for k in header if k not in claimed]
            if rest:
                parts[comp] = rest
    if family.denoiser not in parts:
        expected = " or ".join(f"{p}*" for p in family.single_file_parts[family.denoiser] if p)
        raise ModelNotFoundError(
            f"{path}: its keys match no model family this pipeline imports: a {family.description} "
            f"checkpoint has its {family.denoiser} under {expected}; its first keys are "
            f"{', '.join(sorted(header)[:3]) or '(none)'}"
        )
    dtypes = {}
    for comp, keys in parts.items():
        floating = [DTYPES[header[k]["dtype"]] for k in keys if DTYPES[header[k]["dtype"]].is_floating_point]
        if floating:
            most = max(set(floating), key=floating.count)
            dtypes[comp] = STORED_AS.get(most, most)
    return SingleFile(path, family, model_type, parts, dtypes)


def config_files(sf: SingleFile, config: Path, links_within: Path | None = None) -> dict[str, Path]:
    """The files of the config folder a conversion reads (relative path -> file): the pipeline
    config, each converted component's config, every file of the other components. A link is
    followed only when it resolves inside `links_within` (default: the folder)."""
    within = (links_within or config).resolve()
    if not (config / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"config folder {config} has no model_index.json: pass --config a diffusers folder of a "
            f"{sf.family.description} model (e.g. a local download of {sf.default_config})"
        )
    folder_family = family_of_folder(config)
    if folder_family.name != sf.family.name:
        raise ModelNotFoundError(
            f"config folder {config} is a {folder_family.description} pipeline, but {sf.path} holds a "
            f"{sf.family.description} checkpoint: pass --config a folder of its own family"
        )
    files = {"model_index.json": config / "model_index.json"}
    for comp, cfg in sf.family.folders.items():
        if comp in sf.parts:
            if not (config / comp / str(cfg)).is_file():
                raise ModelNotFoundError(
                    f"config folder {config} lacks {comp}/{cfg}, which converting {sf.path} needs"
                )
            found = [config / comp / str(cfg)]
        elif (config / comp).is_dir():
            found = sorted(p for p in (config / comp).rglob("*") if p.is_file())
            found = [
                p for p in found if p.suffix not in PICKLE_EXTS and "/." not in f"/{p.relative_to(config)}"
            ]
            if (
                comp not in WEIGHTLESS
                and cfg == "config.json"
                and not any(p.suffix == ".safetensors" for p in found)
            ):
                raise _missing(sf, comp, config)
        elif comp in sf.family.optional:
            continue
        else:
            raise _missing(sf, comp, config)
        for p in found:
            if not p.resolve().is_relative_to(within):
                raise ModelNotFoundError(f"{p} is a link to {p.resolve()}, outside {within}: not read")
            files[p.relative_to(config).as_posix()] = p
    return files


def _missing(sf: SingleFile, comp: str, config: Path) -> ModelNotFoundError:
    prefixes = " or ".join(f"{p}*" for p in sf.family.single_file_parts.get(comp, ()) if p) or "(no keys)"
    return ModelNotFoundError(
        f"{sf.path} holds no {comp} (no keys {prefixes}) and the config folder {config} has no "
        f"safetensors weights for it: pass --config a full diffusers folder of the family (e.g. a "
        f"local download of {sf.default_config})"
    )


def convert_single_file(
    sf: SingleFile,
    config: Path,
    files: dict[str, Path],
    out: Path,
    log: Callable[[str], None] = lambda _: None,
) -> Path:
    """`sf` as a diffusers folder in `out`: its components converted one at a time with the
    configs of `config`, everything else copied from `files` (`config_files`)."""
    import diffusers
    from diffusers.loaders.single_file import load_single_file_sub_model
    from safetensors import safe_open

    for rel, src in files.items():
        if rel.split("/")[0] not in sf.parts:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / rel)
    for comp, keys in sf.parts.items():
        module, class_name = sf.family.classes[comp]
        log(f"converting {comp} ({len(keys)} tensors, {sf.dtypes.get(comp)})")
        with safe_open(str(sf.path), framework="pt") as f:
            sub = {k: f.get_tensor(k) for k in keys}
        try:
            model = load_single_file_sub_model(
                module,
                class_name,
                comp,
                sub,
                diffusers.pipelines,
                False,
                str(config),
                local_files_only=True,
                torch_dtype=sf.dtypes.get(comp),
            )
        except Exception as exc:  # diffusers' converters raise what they meet: one line naming the part
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFoundError(
                f"{sf.path}: its {comp} weights do not convert with {config / comp} ({first[:300]})"
            ) from exc
        del sub
        model.save_pretrained(str(out / comp), safe_serialization=True, max_shard_size=SHARD)
        del model
        gc.collect()
    return out

"""Model families as plug-ins (`asd_models.families.base.ModelFamily`): one module each, one row
in `FAMILIES`. A model folder's family is read from its `model_index.json` (`_class_name`); a
folder without one is taken as Stable Diffusion."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from asd_models.families.base import ModelComponents, ModelFamily, ModelNotFoundError
from asd_models.families.flux import Flux, build_tiny_flux
from asd_models.families.sd import StableDiffusion, build_tiny_sd
from asd_models.families.sd3 import StableDiffusion3, build_tiny_sd3
from asd_models.families.sdxl import StableDiffusionXL, build_tiny_sdxl

FAMILIES: dict[str, type[ModelFamily]] = {
    f.name: f for f in (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)
}
# each family's tiny model built in code (tests, `asd demo --family`, benches)
TINY: dict[str, Callable[..., ModelComponents]] = {
    "sd": build_tiny_sd,
    "sdxl": build_tiny_sdxl,
    "sd3": build_tiny_sd3,
    "flux": build_tiny_flux,
}
FAMILY_NAMES = tuple(TINY)


def save_tiny(family: str, folder: Path, seed: int = 0, latent_size: int = 16) -> Path:
    """A tiny model of `family`, saved by its diffusers pipeline's own `save_pretrained`."""
    if family not in TINY:
        raise ValueError(f"no tiny model of family {family!r}: expected one of {', '.join(TINY)}")
    c = TINY[family](seed, latent_size)
    return c.family.save(c, Path(folder))


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]()


def family_of_index(index: dict, where: str) -> ModelFamily:
    """The family a pipeline config (`model_index.json`'s content) names."""
    cls = index.get("_class_name") if isinstance(index, dict) else None
    for family in FAMILIES.values():
        if cls in family.pipeline_classes:
            return family()
    known = ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise ModelNotFoundError(
        f"{where}: model_index.json names the pipeline class {cls!r}, which no model family here "
        f"takes (known: {known})"
    )


def family_of_checkpoint_type(model_type: str, where: str) -> ModelFamily:
    """The family that takes a single-file checkpoint of `model_type` (diffusers' name for what
    the file's keys say it is)."""
    for family in FAMILIES.values():
        if model_type in family.single_file_types:
            return family()
    known = "; ".join(f"{f.name}: {', '.join(f.single_file_types)}" for f in FAMILIES.values())
    raise ModelNotFoundError(
        f"{where}: its keys say a {model_type!r} checkpoint (as diffusers names them), which no model "
        f"family here imports (known: {known})"
    )


def family_of_folder(folder: Path) -> ModelFamily:
    """The family of a diffusers folder (Stable Diffusion when it has no model_index.json)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return StableDiffusion()
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{index} does not read as JSON ({exc})") from exc
    return family_of_index(data, str(folder))


def pipeline_extra(folder: Path) -> dict:
    """The pipeline config's fields that are not components (e.g. SDXL's
    force_zeros_for_empty_prompt)."""
    try:
        data = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if not k.startswith("_") and not isinstance(v, list)}

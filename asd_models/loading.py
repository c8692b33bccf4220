"""Load a model's components from a local diffusers folder or the local HF cache, through its
family (`asd_models.families`): the folder's `model_index.json` names it. Weights load from
safetensors only: a pickled checkpoint is never unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffusers import DDPMScheduler

from asd_models.families import family_of_folder, family_of_index, pipeline_extra
from asd_models.families.base import ModelComponents, ModelFamily, ModelNotFoundError
from asd_models.model_files import CONVERT_HINT, not_cached

__all__ = ["ModelComponents", "ModelNotFoundError", "load_components", "load_upscaler_components"]


def _cached_family(model_id: str) -> ModelFamily | None:
    """The family of a hub id's pipeline config in the local HF cache (None: not cached)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_id, "model_index.json")
    if not isinstance(found, str):
        return None
    try:
        return family_of_index(json.loads(Path(found).read_text()), model_id)
    except ValueError:
        return None


def load_upscaler_components(source: str | Path) -> ModelComponents:
    """An SD-x4-upscaler-style model (StableDiffusionUpscalePipeline layout): the usual
    components plus `low_res_scheduler`, which noises the low-res condition image."""
    c = load_components(source)
    path = Path(str(source)).expanduser()
    base, kw = (str(path), {}) if path.exists() else (str(source), {"local_files_only": True})
    try:
        c.low_res_scheduler = DDPMScheduler.from_pretrained(base, subfolder="low_res_scheduler", **kw)
    except OSError as exc:
        raise ModelNotFoundError(
            f"{source} has no low_res_scheduler/: an upscaler must be in the StableDiffusionUpscalePipeline layout "
            "(e.g. a local download of stabilityai/stable-diffusion-x4-upscaler)"
        ) from exc
    if c.unet.config.in_channels != c.vae.config.latent_channels + 3:
        raise ModelNotFoundError(
            f"{source}: UNet takes {c.unet.config.in_channels} channels, an upscaler's takes latent "
            f"{c.vae.config.latent_channels} + 3 image channels"
        )
    return c


def load_components(source: str | Path) -> ModelComponents:
    """Load from a local diffusers folder, or a hub model id already in the local HF cache.

    Never downloads: a model that is not on disk raises ModelNotFoundError naming what was
    looked for.
    """
    src = str(source)
    path = Path(src).expanduser()
    looks_like_path = (
        path.exists() or src.startswith((".", "/", "~")) or os.sep in src and src.count("/") != 1
    )
    if looks_like_path:
        if not path.is_dir():
            raise ModelNotFoundError(f"model folder {path} does not exist")
        of_folder = family_of_folder(path)
        of_folder.check_folder(path)
        found: ModelFamily | None = of_folder
        base, kw, extra = str(path), {}, pipeline_extra(path)
    else:
        found, base, kw, extra = _cached_family(src), src, {"local_files_only": True}, {}
    try:
        if found is None:
            raise OSError(f"no model_index.json of {src} in the cache")
        family = found
        c = family.load(base, kw, src)
        c.extra.update(extra)
        return c
    except OSError as exc:
        if "safetensors" in str(exc).lower() or _pickled_only(path if looks_like_path else None):
            raise ModelNotFoundError(
                f"{src} holds its weights as pickles (.bin/.ckpt/.pt), which this pipeline never "
                f"unpickles (loading one runs whatever code it holds): {CONVERT_HINT}"
            ) from exc
        if looks_like_path:
            raise ModelNotFoundError(f"cannot load the model in {path}: {exc}") from exc
        raise not_cached(src) from exc


def _pickled_only(folder: Path | None) -> bool:
    """Whether a folder's weights are pickles with no safetensors beside them."""
    if folder is None or not folder.is_dir():
        return False
    pickles = [p for ext in ("*.bin", "*.ckpt", "*.pt", "*.pth") for p in folder.glob(f"*/{ext}")]
    return bool(pickles) and not any(folder.glob("*/*.safetensors"))

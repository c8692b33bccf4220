"""Load Stable-Diffusion-style components from a local folder or the local HF cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

SUBFOLDERS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,
    "scheduler": "scheduler_config.json",
}


class ModelNotFoundError(FileNotFoundError):
    """A model folder or model id that cannot be loaded offline, with what was expected."""


@dataclass
class SDComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: Any
    source: str
    low_res_scheduler: Any = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_multiple(self) -> int:
        """Latent sizes must be multiples of this for the UNet's down/up-sampling."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder {folder} does not exist")
    missing = [
        f"{sub}/{cfg}" if cfg else f"{sub}/"
        for sub, cfg in SUBFOLDERS.items()
        if not ((folder / sub / cfg).is_file() if cfg else (folder / sub).is_dir())
    ]
    if missing:
        raise ModelNotFoundError(
            f"model folder {folder} lacks {', '.join(missing)}: expected a diffusers Stable Diffusion "
            "layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), e.g. a local "
            "download of stabilityai/stable-diffusion-2-1-base"
        )


def load_upscaler_components(source: str | Path) -> SDComponents:
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


def load_components(source: str | Path) -> SDComponents:
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
        _check_folder(path)
        base, kw = str(path), {}
    else:
        base, kw = src, {"local_files_only": True}
    try:
        return SDComponents(
            unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kw),
            vae=AutoencoderKL.from_pretrained(base, subfolder="vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kw),
            scheduler=DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kw),
            source=src,
        )
    except OSError as exc:
        if looks_like_path:
            raise ModelNotFoundError(f"cannot load the model in {path}: {exc}") from exc
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise ModelNotFoundError(
            f"model {src!r} is not in the local Hugging Face cache ({cache}) and this pipeline never "
            f"downloads at run time: download it first (`hf download {src}`) or pass a local folder "
            "in diffusers layout"
        ) from exc

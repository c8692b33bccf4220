"""Stable Diffusion 1.x / 2.x (epsilon and v-prediction), and the SD x4 upscaler's layout: one
CLIP text encoder whose last hidden states are the UNet's cross-attention; nothing placed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from asd_models.families.base import (
    Conditioning,
    ModelComponents,
    ModelFamily,
    Place,
    UNetCall,
)


class StableDiffusion(ModelFamily):
    name: ClassVar[str] = "sd"
    description: ClassVar[str] = "Stable Diffusion 1.x/2.x"
    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionUpscalePipeline",
    )
    folders: ClassVar[dict[str, str | None]] = {
        "unet": "config.json",
        "vae": "config.json",
        "text_encoder": "config.json",
        "tokenizer": None,
        "scheduler": "scheduler_config.json",
    }
    example: ClassVar[str] = "stabilityai/stable-diffusion-2-1-base"

    def load(self, base: str, kw: dict[str, Any], source: str) -> ModelComponents:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        weights = {**kw, "use_safetensors": True}
        return ModelComponents(
            unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet", **weights),
            vae=AutoencoderKL.from_pretrained(base, subfolder="vae", **weights),
            text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **weights),
            tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kw),
            scheduler=DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kw),
            source=source,
            family=self,
        )

    def save(self, c: ModelComponents, folder: Path) -> Path:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline(
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            unet=c.unet,
            scheduler=c.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(str(folder), safe_serialization=True)
        return folder

    @torch.no_grad()
    def encode_prompts(self, c: ModelComponents, prompts: list[str]) -> Conditioning:
        tok = c.tokenizer
        ids = tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(c.text_encoder.device)
        return {"text": c.text_encoder(ids)[0]}

    def predict(
        self,
        c: ModelComponents,
        unet: Any,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning,
        places: list[Place],
        **kwargs: Any,
    ) -> torch.Tensor:
        return UNetCall(unet)(x, t, cond, places, **kwargs)


def build_tiny_sd(seed: int = 0, latent_size: int = 16) -> ModelComponents:
    """The tiny SD model of `asd_models.tiny_model` as components of this family."""
    from asd_models.tiny_model import build_tiny_components

    parts = build_tiny_components(seed, latent_size)
    return ModelComponents(**parts, source="tiny-sd", family=StableDiffusion())

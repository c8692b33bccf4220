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
    token_ids,
)


class StableDiffusion(ModelFamily):
    name: ClassVar[str] = "sd"
    description: ClassVar[str] = "Stable Diffusion 1.x/2.x"
    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionUpscalePipeline",
    )
    example: ClassVar[str] = "stabilityai/stable-diffusion-2-1-base"
    single_file_types: ClassVar[tuple[str, ...]] = ("v1", "v2")
    single_file_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "unet": ("model.diffusion_model.",),
        "vae": ("first_stage_model.",),
        "text_encoder": ("cond_stage_model.",),
    }
    classes: ClassVar[dict[str, tuple[str, str]]] = {
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "scheduler": ("diffusers", "DDPMScheduler"),
    }

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
        return {"text": c.text_encoder(token_ids(c.tokenizer, prompts, c.text_encoder.device))[0]}

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

"""SDXL-class UNets: two CLIP text encoders (the penultimate hidden states of both, side by
side, as cross-attention; the second's projected pooled embedding), and the added time ids
(original size, crop top-left, target size) that SDXL was trained with.

Where a piece is in the whole image is said through those ids (`tile_crops`): "offset" (the
default) gives each piece what SDXL saw in training for that region of an image of the whole's
size, cropped at the piece's offset to the piece's size; "constant" gives every piece the ids of
an uncropped image of its own size (each tile as a picture of its own, as the tiled-diffusion
peers do). Stage 1 and ARAD training run whole latents: original = target = the latent's size,
crop (0, 0)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from asd_models.families.base import Conditioning, ModelComponents, ModelFamily, Place, token_ids

TILE_CROPS = ("offset", "constant")


@dataclass(frozen=True)
class StableDiffusionXL(ModelFamily):
    name: ClassVar[str] = "sdxl"
    description: ClassVar[str] = "Stable Diffusion XL"
    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
    )
    example: ClassVar[str] = "stabilityai/stable-diffusion-xl-base-1.0"
    single_file_types: ClassVar[tuple[str, ...]] = ("xl_base",)
    single_file_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "unet": ("model.diffusion_model.",),
        "vae": ("first_stage_model.",),
        "text_encoder": ("conditioner.embedders.0.",),
        "text_encoder_2": ("conditioner.embedders.1.",),
    }
    classes: ClassVar[dict[str, tuple[str, str]]] = {
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "scheduler": ("diffusers", "DDPMScheduler"),
    }
    tile_crops: Literal["offset", "constant"] = "offset"

    def __post_init__(self) -> None:
        if self.tile_crops not in TILE_CROPS:
            raise ValueError(f"tile_crops {self.tile_crops!r}: expected one of {', '.join(TILE_CROPS)}")

    def check_loaded(self, c: ModelComponents) -> None:
        if c.unet.config.addition_embed_type != "text_time":
            raise ValueError(
                f"{c.source}: an SDXL pipeline whose UNet has addition_embed_type "
                f"{c.unet.config.addition_embed_type!r}, not 'text_time' (the added time ids)"
            )

    def save(self, c: ModelComponents, folder: Path) -> Path:
        from diffusers import StableDiffusionXLPipeline

        StableDiffusionXLPipeline(
            vae=c.vae,
            text_encoder=c.text_encoder,
            text_encoder_2=c.text_encoder_2,
            tokenizer=c.tokenizer,
            tokenizer_2=c.tokenizer_2,
            unet=c.unet,
            scheduler=c.scheduler,
            force_zeros_for_empty_prompt=bool(c.extra.get("force_zeros_for_empty_prompt", True)),
        ).save_pretrained(str(folder), safe_serialization=True)
        return folder

    @torch.no_grad()
    def encode_prompts(self, c: ModelComponents, prompts: list[str]) -> Conditioning:
        hidden: list[torch.Tensor] = []
        pooled = torch.empty(0)  # set by the second encoder below
        for tok, enc in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
            out = enc(token_ids(tok, prompts, enc.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled embedding
        return {"text": torch.cat(hidden, dim=-1), "pooled": pooled}

    def negative(self, c: ModelComponents, negative_prompt: str) -> Conditioning:
        """As SDXL's own pipeline: an empty negative prompt is zeros when the model asks for it."""
        cond = self.encode_prompts(c, [negative_prompt])
        if not negative_prompt and c.extra.get("force_zeros_for_empty_prompt", True):
            return {k: torch.zeros_like(v) for k, v in cond.items()}
        return cond

    def time_ids(self, places: list[Place], f: int) -> torch.Tensor:
        """(original h, w, crop top, left, target h, w) in pixels for each piece."""
        rows = []
        for ry, rx, rh, rw, H, W in places:
            if self.tile_crops == "offset":
                rows.append((H * f, W * f, ry * f, rx * f, rh * f, rw * f))
            else:
                rows.append((rh * f, rw * f, 0, 0, rh * f, rw * f))
        return torch.tensor(rows, dtype=torch.float32)

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
        ids = self.time_ids(places, c.vae_scale_factor).to(x.device, cond["pooled"].dtype)
        added = {"text_embeds": cond["pooled"], "time_ids": ids}
        return unet(x, t, encoder_hidden_states=cond["text"], added_cond_kwargs=added, **kwargs).sample


def build_tiny_sdxl(seed: int = 0, latent_size: int = 16) -> ModelComponents:
    """A tiny SDXL-shaped model (two text encoders, the second with a projection, a UNet with
    the added time ids), randomly initialised from `seed` without touching the global RNG."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from asd_models.tiny_model import build_tiny_components, build_tiny_tokenizer

    base = build_tiny_components(seed, latent_size)  # the SD tiny model's shapes, made SDXL-shaped
    encoder_config = base["text_encoder"].config
    hidden, time_dim = encoder_config.hidden_size, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            **{
                **{k: v for k, v in base["unet"].config.items() if not k.startswith("_")},
                "cross_attention_dim": 2 * hidden,  # both encoders' hidden states side by side
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": time_dim,
                "projection_class_embeddings_input_dim": encoder_config.projection_dim + 6 * time_dim,
            }
        )
        return ModelComponents(
            unet=unet,
            vae=base["vae"],
            text_encoder=CLIPTextModel(encoder_config),
            text_encoder_2=CLIPTextModelWithProjection(encoder_config),
            tokenizer=build_tiny_tokenizer(),
            tokenizer_2=build_tiny_tokenizer(),
            scheduler=base["scheduler"],
            source="tiny-sdxl",
            family=StableDiffusionXL(),
            extra={"force_zeros_for_empty_prompt": True},
        )

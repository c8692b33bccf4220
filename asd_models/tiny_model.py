"""A tiny Stable-Diffusion-shaped model built in code (tests, demo, CPU).

Same component classes and folder layout as a real SD checkpoint, so everything downstream
loads it through the real `from_pretrained` path. Its VAE has 4 levels (scale factor 8, as
in SD). Its tokenizer is character-level BPE (a CLIP tokenizer with no merges), because no
real vocabulary can be downloaded here.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77


def char_vocab() -> dict[str, int]:
    """CLIP-style vocabulary of single characters, each also in its end-of-word form."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {BOS: 0, EOS: 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return vocab


def build_tiny_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=char_vocab(), merges=[], model_max_length=MAX_TOKENS)


def build_tiny_components(seed: int = 0, latent_size: int = 16, vae_size: int = 128) -> dict:
    """Randomly initialised UNet, VAE, text encoder, tokenizer and scheduler (weights drawn
    from `seed` in a forked RNG: the caller's global RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_tiny_components(latent_size, vae_size)


def _build_tiny_components(latent_size: int, vae_size: int) -> dict:
    tokenizer = build_tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=32,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=vae_size,
        layers_per_block=1,
        block_out_channels=(16, 32, 32, 32),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_components(components: dict, folder: str | Path) -> Path:
    """Save in the diffusers Stable Diffusion layout (safetensors only)."""
    pipe = StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=components["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def build_tiny_upscaler_components(seed: int = 0, latent_size: int = 32) -> dict:
    """A tiny SD-x4-upscaler-shaped model: UNet input 4 latent + 3 low-res image channels,
    noise level as class label, VAE with 3 levels (scale factor 4)."""
    base = build_tiny_components(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_tiny_upscaler(base, latent_size)


def _build_tiny_upscaler(base: dict, latent_size: int) -> dict:
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=7,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        num_class_embeds=1000,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=128,
        layers_per_block=1,
        block_out_channels=(16, 32, 32),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=0.08333,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": base["text_encoder"],
        "tokenizer": base["tokenizer"],
        "scheduler": base["scheduler"],
        "low_res_scheduler": DDPMScheduler(num_train_timesteps=1000),
    }


def save_upscaler_components(components: dict, folder: str | Path) -> Path:
    """Save in the diffusers `StableDiffusionUpscalePipeline` layout (safetensors only)."""
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        low_res_scheduler=components["low_res_scheduler"],
        scheduler=components["scheduler"],
        max_noise_level=350,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)

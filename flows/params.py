"""Flow parameters (pydantic): validated before any work starts."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator


class IngestSettings(BaseModel):
    bucket_base: int = Field(512, ge=64, description="bucket side for a square image, pixels")
    bucket_step: int = Field(64, ge=8, description="bucket sides are multiples of this")
    min_side: int = Field(64, ge=1)
    max_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb guard")
    shard_max_samples: int = Field(1000, ge=1)
    shard_max_bytes: int = Field(256 << 20, ge=1 << 16)
    jpeg_quality: int = Field(95, ge=1, le=100)

    @field_validator("bucket_base")
    @classmethod
    def _multiple(cls, v: int, info) -> int:
        step = info.data.get("bucket_step", 64)
        if v % step:
            raise ValueError(f"bucket_base {v} must be a multiple of bucket_step {step}")
        return v


class TrainSettings(BaseModel):
    base_model: str = Field(
        "tiny",
        description="'tiny' (built in code, VAE fitted to the data), a store ref models/NAME@VERSION, "
        "a local diffusers folder, or a hub id already in the local HF cache",
    )
    vae_steps: int = Field(400, ge=0, description="VAE fitting steps for the tiny base model")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    caption_dropout: float = Field(0.1, ge=0, le=1)
    seed: int = 0


class PromptSpec(BaseModel):
    prompt: str
    width: int = Field(ge=64, le=16384)
    height: int = Field(ge=64, le=16384)
    seed: int = 0


class GenerateSettings(BaseModel):
    steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(5.0, ge=0)
    strength: float = Field(0.6, gt=0, le=1, description="how much stage 2 re-noises the enlarged image")
    tile: int | None = Field(None, ge=1, description="FSTD tile in latent pixels (default: the UNet's sample size)")
    tile_batch_size: int = Field(16, ge=1)
    upscaler: str | None = Field(
        None, description="stage 2 with an SD-x4-upscaler-style model (local folder, cached hub id or "
        "models/NAME@VERSION) instead of img2img with the same model",
    )
    noise_level: int = Field(20, ge=0, le=1000, description="noise on the low-res image (upscaler stage 2)")
    shard_size: int = Field(100, ge=1, description="prompts per generation task")


class EvaluateSettings(BaseModel):
    patch_size: int = Field(96, ge=16, description="patch-FID/KID crop size at native resolution")
    patches_per_image: int = Field(8, ge=1)
    seed: int = 0
    seam_period: int = Field(8, ge=1, description="VAE factor: seams are compared with lines on this lattice")
    clip_model: str = Field("openai/clip-vit-base-patch16", description="local folder or cached hub id")

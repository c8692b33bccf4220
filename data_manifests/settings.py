"""One typed settings model per stage: every default is written here, once.

Each model travels whole from the `asd` CLI (whose flags are generated from these fields) to
the flow, the task and the science; the science builds its own small frozen configs from it
in one place (`IngestSettings.sample_spec`, `TrainSettings.train_config`, ...). Cross-field
checks run in `model_validator(mode="after")`, after every field is valid on its own.
"""

from __future__ import annotations

import os
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2^64)
URL_SCHEMES = ("http", "https", "s3", "file")


class StageSettings(BaseModel):
    """Base: unknown fields are a mistake, not something to drop silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestSettings(StageSettings):
    """The data stage: sources -> validated, bucketed samples -> manifest + WebDataset shards."""

    bucket_table: Literal["asd", "kohya"] = Field(
        "asd", description="asd: our 9-ratio table around bucket_base^2; kohya: every width from "
        "bucket_min_side to bucket_max_side with the largest height under bucket_max_area")
    bucket_base: int = Field(512, ge=64, description="bucket side for a square image, pixels")
    bucket_step: int = Field(64, ge=8, description="bucket sides are multiples of this")
    bucket_min_side: int = Field(256, ge=8, description="kohya table: shortest bucket side")
    bucket_max_side: int = Field(1024, ge=8, description="kohya table: longest bucket side")
    bucket_max_area: int | None = Field(None, ge=64, description="kohya table: max pixels (default bucket_base^2)")
    crop: Literal["center", "random"] = Field("center", description="crop after resize-to-cover")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of random crops (per sample key: reproducible)")
    min_side: int = Field(64, ge=1, description="reject images whose shorter side is smaller")
    max_pixels: int = Field(64_000_000, ge=1, le=178_956_970,
                            description="decompression-bomb guard: reject larger images (at most PIL's own ceiling)")
    max_aspect: float = Field(4.0, ge=1, description="reject images more elongated than this ratio")
    empty_caption: Literal["reject", "keep"] = Field("reject", description="missing or blank captions")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of the bucket images")
    draft: bool = Field(True, description="JPEG draft decoding at the smallest scale covering the bucket")
    resample: Literal["bilinear", "bicubic", "lanczos"] = Field(
        "bilinear", description="resize filter (antialiased when shrinking); bilinear as diffusers' SD training")
    shard_max_samples: int = Field(1000, ge=1, description="samples per shard before it rotates")
    shard_max_bytes: int = Field(256 << 20, ge=1 << 16, description="bytes per shard before it rotates")
    workers: int = Field(1, ge=1, description="decode processes (all cores: os.cpu_count())")
    download_concurrency: int = Field(16, ge=1, description="downloads in flight")
    per_host: int = Field(4, ge=1, description="concurrent requests per host")
    timeout_s: float = Field(20.0, gt=0, description="deadline of one request, headers included, seconds")
    retries: int = Field(3, ge=0, description="retries of a download that may pass (timeouts, 5xx, 429)")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay, doubled each retry")
    max_bytes: int = Field(64 << 20, ge=1, description="largest input accepted: download, file or shard member")
    url_col: str | None = Field(None, description="URL column of URL lists (default: url)")
    caption_col: str | None = Field(None, description="caption column of URL lists (default: caption or text)")
    caption_max_bytes: int = Field(64 << 10, ge=1, description="largest caption file read (UTF-8 text only)")
    # the trust boundary: each of these widens what a stranger's input can reach (README: Trust boundary)
    allow_schemes: str = Field("http,https", description="URL schemes a URL list may use, comma-separated, "
                               "from http, https, s3, file (s3 and file reach your machine's data)")
    allow_private_addresses: bool = Field(False, description="let URL lists reach loopback, private, link-local "
                                          "(cloud metadata) and other non-public addresses")
    source_credentials: str | None = Field(None, description="credentials for s3:// URL-list entries: an AWS "
                                           "profile name, or 'env' for the environment's (default: anonymous)")
    follow_links_outside: bool = Field(False, description="follow links in folder sources whose target lies "
                                       "outside the folder")

    # knobs that never change the outputs (left out of the output hash)
    EXECUTION: ClassVar[tuple[str, ...]] = ("workers", "download_concurrency", "per_host", "timeout_s", "retries", "backoff_s")

    @field_validator("allow_schemes")
    @classmethod
    def _known_schemes(cls, value: str) -> str:
        schemes = [x.strip().lower() for x in value.split(",") if x.strip()]
        unknown = [x for x in schemes if x not in URL_SCHEMES]
        if unknown or not schemes:
            raise ValueError(f"unknown scheme(s) {', '.join(unknown) or '(none)'}: use some of {', '.join(URL_SCHEMES)}")
        return ",".join(dict.fromkeys(schemes))

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(self.allow_schemes.split(","))

    @model_validator(mode="after")
    def _bucket_geometry(self) -> IngestSettings:
        if self.bucket_table == "asd" and self.bucket_base % self.bucket_step:
            raise ValueError(f"bucket_base {self.bucket_base} must be a multiple of bucket_step {self.bucket_step}")
        if self.bucket_table == "kohya" and self.bucket_min_side > self.bucket_max_side:
            raise ValueError(f"bucket_min_side {self.bucket_min_side} > bucket_max_side {self.bucket_max_side}")
        return self

    def output_options(self) -> dict:
        """The options that shape the outputs (execution knobs excluded)."""
        return self.model_dump(exclude=set(self.EXECUTION))


class TrainSettings(StageSettings):
    """ARAD fine-tuning (`asd_models.arad_training.TrainConfig`), plus where to start from."""

    base_model: str = Field(
        "tiny",
        description="'tiny' (built in code, VAE fitted to the data), a store ref models/NAME@VERSION, "
        "a local diffusers folder, or a hub id already in the local HF cache",
    )
    vae_steps: int = Field(400, ge=0, description="VAE fitting steps for the tiny base model")
    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="samples per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up, then cosine")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine ends at this fraction of the peak")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="share of empty captions (for CFG)")
    grad_clip: float = Field(1.0, ge=0, description="gradient-norm clip (0: off)")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="EMA of the weights, with warm-up (0: off)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description="auto: bf16 on a GPU")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field("auto", description="auto: on a GPU")
    cache_latents: bool = Field(False, description="encode each image once (memory grows with the data)")
    shuffle_buffer: int = Field(256, ge=1, description="encoded samples held per bucket for shuffling")
    leftover: Literal["keep", "drop"] = Field("keep", description="a bucket's last partial batch per epoch")
    num_workers: int = Field(0, ge=0, description="data-loader processes (changes the data order)")
    checkpoint_every: int = Field(500, ge=0, description="a resumable checkpoint in the store every N steps (0: none)")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of weights, noise, timesteps and data order")

    TRAINER_FIELDS: ClassVar[tuple[str, ...]] = (
        "steps", "batch_size", "learning_rate", "weight_decay", "warmup_steps", "min_lr_ratio", "caption_dropout",
        "grad_clip", "grad_accum", "ema_decay", "mixed_precision", "gradient_checkpointing", "cache_latents",
        "shuffle_buffer", "leftover", "num_workers", "seed")

    def train_config(self):
        """The trainer's frozen config (the one place it is built)."""
        from asd_models.arad_training import TrainConfig

        return TrainConfig(**{k: getattr(self, k) for k in self.TRAINER_FIELDS})


class GenerateSettings(StageSettings):
    """FSTD generation: how every prompt of a job is rendered."""

    steps: int = Field(20, ge=1, le=1000, description="denoising steps (stage 1 and stage 2)")
    guidance_scale: float = Field(5.0, ge=0, le=100, description="classifier-free guidance scale")
    strength: float = Field(0.6, gt=0, le=1, description="how much stage 2 re-noises the enlarged image")
    tile: int | None = Field(None, ge=1, description="FSTD tile in latent pixels (default: the UNet's sample size)")
    tile_batch_size: int | None = Field(None, ge=1, description="tiles per UNet call (default: the sampler's own)")
    upscaler: str | None = Field(
        None, description="stage 2 with an SD-x4-upscaler-style model (local folder, cached hub id or "
        "models/NAME@VERSION) instead of img2img with the same model",
    )
    noise_level: int = Field(20, ge=0, le=1000, description="noise on the low-res image (upscaler stage 2)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto (a GPU when there is one), cpu, cuda or cuda:N")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp16 on a GPU, fp32 on the CPU")
    shard_size: int = Field(100, ge=1, description="prompts per generation task")
    pack: bool = Field(True, description="images of a shard advance together, their tiles sharing UNet calls")
    pack_max_pixels: int = Field(16 << 20, ge=4096, description="output pixels rendered together at most "
                                 "(a larger image renders alone)")
    executor: Literal["threads", "dask"] = Field(
        default_factory=lambda: os.environ.get("ASD_EXECUTOR", "threads"),  # type: ignore[arg-type]
        description="shard tasks in threads of this process, or on Dask worker processes ($ASD_EXECUTOR)")
    workers: int = Field(1, ge=1, description="threads, or Dask worker processes of a local cluster")
    dask_address: str | None = Field(
        default_factory=lambda: os.environ.get("ASD_DASK_ADDRESS") or None,
        description="an existing Dask scheduler, e.g. tcp://host:8786 ($ASD_DASK_ADDRESS; default: a local cluster)")
    retries: int = Field(2, ge=0, description="retries of a failed shard task (a lost worker, an error)")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads of torch in each Dask worker "
                                      "(default: cores / workers)")
    large_image_pixels: int = Field(
        64_000_000, ge=1, description="outputs above this many pixels are decoded into a memory-mapped file and "
        "written to the store as they are encoded (never held twice in memory), with a Deep Zoom pyramid")
    large_image_format: Literal["png", "tiff"] = Field(
        "png", description="file of a large output: png (streamed; S3: a multipart upload) or tiff (tiled 256 px, "
        "deflate, pyramidal, BigTIFF past 3.5 GB; written to a local temporary file, then streamed up)")
    deep_zoom: bool = Field(True, description="a DZI pyramid and a zoomable viewer page beside each large output")

    EXECUTION: ClassVar[tuple[str, ...]] = ("shard_size", "pack", "pack_max_pixels", "executor", "workers",
                                            "dask_address", "retries", "tile_batch_size", "device", "dtype",
                                            "torch_threads")

    def render_options(self) -> dict:
        """What changes the pixels of an image (execution knobs excluded)."""
        return self.model_dump(exclude=set(self.EXECUTION))


class EvaluateSettings(StageSettings):
    """Scores of a generations version against the dataset it descends from."""

    patch_size: int = Field(96, ge=16, description="patch-FID/KID crop size at native resolution")
    patches_per_image: int = Field(8, ge=1, description="random patches taken from each image")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the patch positions")
    seam_period: int = Field(8, ge=1, description="VAE factor: seams are compared with lines on this lattice")
    clip_model: str = Field("openai/clip-vit-base-patch16", description="CLIP for CLIP score: local folder or cached hub id")


class PromptSpec(StageSettings):
    """One prompt of a generation job; steps / guidance_scale / strength override the job's."""

    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    width: int = Field(ge=64, le=16384)
    height: int = Field(ge=64, le=16384)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    strength: float | None = Field(None, gt=0, le=1)

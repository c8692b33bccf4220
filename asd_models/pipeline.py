"""AnySizePipeline: text to image at any width x height (ARAD stage 1 + FSTD stage 2)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from asd_models.buckets import Bucket, asd_buckets, nearest_bucket
from asd_models.fstd import FSTDConfig, count_tiles, fstd_sample
from asd_models.images import pil_to_tensor_m11, resize_cover_crop, tensor_m11_to_pil
from asd_models.loading import SDComponents, load_components, load_upscaler_components
from asd_models.seams import grid_lines
from asd_models.tiled_vae import tiled_decode, tiled_encode

MIN_SIDE, MAX_SIDE = 64, 16384

# stage name, step, total steps, tiles done in this step, tiles in this step
PipelineProgress = Callable[[str, int, int, int, int], None]


@dataclass
class AnySizeResult:
    image: Image.Image
    bucket: Bucket
    canvas: tuple[int, int]  # (width, height) in pixels that stage 2 denoised
    tile_px: int
    seam_lines: dict[str, list[int]] = field(default_factory=dict)  # unshifted grid lines, final coords
    fstd_tiles: int = 0  # tiles FSTD ran through the UNet over all stage-2 steps (x2 with guidance)


class AnySizePipeline:
    """Diffusers-style two-stage pipeline.

    1. ARAD: render the prompt at the training bucket nearest the requested aspect ratio.
    2. FSTD: upsample that image to cover the requested size, re-noise it to `strength`,
       denoise with implicit-overlap tiles, decode, and crop to exactly width x height.
    """

    memmap_pixels = 64_000_000  # larger outputs are decoded straight into a file on disk
    vae_whole_below = 256 * 256  # latents up to this many pixels go through the VAE in one piece

    def __init__(self, components: SDComponents, buckets: list[Bucket] | None = None,
                 upscaler: SDComponents | None = None) -> None:
        self.c = components
        self.upscaler = upscaler
        if upscaler is not None:
            upscaler.unet.eval().requires_grad_(False)
            upscaler.vae.eval().requires_grad_(False)
            upscaler.text_encoder.eval().requires_grad_(False)
        # scheduler configs only: every call builds its own scheduler (they hold per-run state)
        self.scheduler_config = DDIMScheduler.from_config(components.scheduler.config).config
        self.upscale_scheduler_config = (DDIMScheduler.from_config(upscaler.scheduler.config).config
                                         if upscaler is not None else None)
        self.buckets = buckets or asd_buckets(
            base=components.unet.config.sample_size * components.vae_scale_factor,
            step=components.vae_scale_factor * components.unet_multiple,
        )
        for m in (self.c.unet, self.c.vae, self.c.text_encoder):
            m.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, source: str | Path, buckets: list[Bucket] | None = None,
                        upscaler: str | Path | None = None) -> AnySizePipeline:
        """Load components; use the model's training buckets (`buckets.json`) when it has them.
        `upscaler`: an SD-x4-upscaler-style model for stage 2 instead of img2img."""
        listed = Path(source) / "buckets.json"
        if buckets is None and listed.is_file():
            buckets = [Bucket.parse(b) for b in json.loads(listed.read_text())]
        return cls(load_components(source), buckets, load_upscaler_components(upscaler) if upscaler else None)

    def _output_array(self, width: int, height: int) -> np.ndarray:
        if width * height <= self.memmap_pixels:
            return np.zeros((height, width, 3), dtype=np.uint8)
        handle = tempfile.NamedTemporaryFile(prefix="asd-output-", suffix=".u8", delete=False)
        handle.close()
        out = np.memmap(handle.name, dtype=np.uint8, mode="w+", shape=(height, width, 3))
        os.unlink(handle.name)  # the mapping keeps the pages; the disk space goes with the last reference
        return out

    def _enlarge_with_upscaler(self, prompt: str, image: Image.Image, cw: int, ch: int, steps: int, guidance: float,
                               noise_level: int, fstd: FSTDConfig, generator: torch.Generator,
                               progress: Callable | None) -> tuple[torch.Tensor, int]:
        """SD-x4-upscaler stage 2: the low-res image (noised to `noise_level`) is concatenated to
        the latent; FSTD denoises from pure noise at the upscaler's latent size."""
        up = self.upscaler
        f = up.vae_scale_factor
        low, _ = resize_cover_crop(image, cw // f, ch // f)
        low_t = pil_to_tensor_m11(low)
        level = torch.tensor([noise_level], dtype=torch.long)
        low_t = up.low_res_scheduler.add_noise(low_t, torch.randn(low_t.shape, generator=generator), level)
        tok = up.tokenizer
        ids = tok([prompt, ""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        emb = up.text_encoder(ids)[0]
        sched = DDIMScheduler.from_config(self.upscale_scheduler_config)
        sched.set_timesteps(steps)
        latents = torch.randn((1, up.vae.config.latent_channels, ch // f, cw // f), generator=generator)
        latents = latents * sched.init_noise_sigma
        cfg = FSTDConfig(tile=up.unet.config.sample_size, tile_batch_size=fstd.tile_batch_size,
                         reset_every=fstd.reset_every, mode=fstd.mode, size_multiple=up.unet_multiple)
        latents, offsets = fstd_sample(up.unet, sched, latents, sched.timesteps, emb[:1], emb[1:], guidance, cfg,
                                       generator, condition=low_t, unet_kwargs={"class_labels": level}, progress=progress)
        return latents, count_tiles(latents.shape, cfg, offsets)

    def default_fstd(self, tile: int | None = None, tile_batch_size: int | None = None) -> FSTDConfig:
        """FSTD at the UNet's native size (or `tile`), offsets on the UNet's down-sampling
        lattice; `tile_batch_size` None: FSTDConfig's default."""
        extra = {"tile_batch_size": tile_batch_size} if tile_batch_size else {}
        return FSTDConfig(tile=tile or self.c.unet.config.sample_size, size_multiple=self.c.unet_multiple, **extra)

    @property
    def pixel_multiple(self) -> int:
        return self.c.vae_scale_factor * self.c.unet_multiple

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.c.tokenizer
        ids = tok([prompt, ""], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        emb = self.c.text_encoder(ids)[0]
        return emb[:1], emb[1:]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> Image.Image:
        x = self.c.vae.decode(latents / self.c.vae.config.scaling_factor).sample
        return tensor_m11_to_pil(x.float())

    def _check_size(self, width: int, height: int) -> None:
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or not MIN_SIDE <= v <= MAX_SIDE:
                raise ValueError(f"{name} must be an integer in [{MIN_SIDE}, {MAX_SIDE}], got {v!r}")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        width: int,
        height: int,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        strength: float = 0.6,
        seed: int = 0,
        fstd: FSTDConfig | None = None,
        progress: PipelineProgress | None = None,
        noise_level: int = 20,
        vae_tile: int = 64,
    ) -> AnySizeResult:
        """Render `prompt` at exactly `width` x `height`.

        strength: how far stage 2 re-noises the enlarged image (img2img path). noise_level:
        noise added to the low-res condition (upscaler path). vae_tile: tiled VAE tile in
        latent pixels. Outputs over `memmap_pixels` are decoded into a memory-mapped file.
        """
        self._check_size(width, height)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        f = self.c.vae_scale_factor
        fstd = fstd or self.default_fstd()
        if fstd.tile % self.c.unet_multiple or fstd.size_multiple % self.c.unet_multiple:
            raise ValueError(f"FSTD tile {fstd.tile} and size_multiple {fstd.size_multiple} must be multiples "
                             f"of the UNet's {self.c.unet_multiple} latent pixels")
        generator = torch.Generator().manual_seed(seed)
        cond, uncond = self.encode_prompt(prompt)

        # 1. ARAD: the bucket nearest the requested ratio, sampled whole.
        bucket = nearest_bucket(width, height, self.buckets)
        shape = (1, self.c.unet.config.in_channels, bucket.height // f, bucket.width // f)
        latents = torch.randn(shape, generator=generator)
        scheduler = DDIMScheduler.from_config(self.scheduler_config)  # one per call: never shared state
        scheduler.set_timesteps(num_inference_steps)
        latents = latents * scheduler.init_noise_sigma
        whole = FSTDConfig(tile=max(shape[2:]), tile_batch_size=1, size_multiple=1)
        latents, _ = fstd_sample(
            self.c.unet, scheduler, latents, scheduler.timesteps, cond, uncond, guidance_scale,
            whole, generator, progress=(lambda s, n, d, t: progress("arad", s, n, d, t)) if progress else None,
        )
        image = self.decode_latents(latents)

        # 2. FSTD: enlarge to a canvas that covers the target (sides multiple of the UNet's
        # pixel multiple), then crop the exact size: the aspect ratio is never stretched.
        up = self.upscaler
        f2 = up.vae_scale_factor if up else f
        m = (up.vae_scale_factor * up.unet_multiple) if up else self.pixel_multiple
        cw, ch = -(-width // m) * m, -(-height // m) * m
        box = ((cw - width) // 2, (ch - height) // 2, (cw - width) // 2 + width, (ch - height) // 2 + height)
        out = self._output_array(width, height)
        stage2 = (lambda s, n, d, t: progress("fstd", s, n, d, t)) if progress else None
        if up is not None:
            latents, fstd_tiles = self._enlarge_with_upscaler(prompt, image, cw, ch, num_inference_steps,
                                                              guidance_scale, noise_level, fstd, generator, stage2)
            final = tiled_decode(up.vae, latents, tile=vae_tile, out=out, crop=box, whole_below=self.vae_whole_below)
        else:
            canvas_img, _ = resize_cover_crop(image, cw, ch)
            x0 = tiled_encode(self.c.vae, pil_to_tensor_m11(canvas_img).to(self.c.vae.dtype), tile=vae_tile * f,
                              whole_below=self.vae_whole_below)
            del canvas_img
            scheduler = DDIMScheduler.from_config(self.scheduler_config)
            scheduler.set_timesteps(num_inference_steps)
            start = int(round(num_inference_steps * (1 - strength)))
            timesteps = scheduler.timesteps[min(start, num_inference_steps - 1):]
            noise = torch.randn(x0.shape, generator=generator)
            latents = scheduler.add_noise(x0, noise, timesteps[:1])
            latents, offsets = fstd_sample(self.c.unet, scheduler, latents, timesteps, cond, uncond, guidance_scale,
                                           fstd, generator, progress=stage2)
            fstd_tiles = count_tiles(latents.shape, fstd, offsets)
            final = tiled_decode(self.c.vae, latents, tile=vae_tile, out=out, crop=box,
                                 whole_below=self.vae_whole_below)
        final = Image.frombuffer("RGB", (width, height), np.ascontiguousarray(final), "raw", "RGB", 0, 1)
        tile_px = (up.unet.config.sample_size if up else fstd.tile) * f2
        return AnySizeResult(
            image=final, bucket=bucket, canvas=(cw, ch), tile_px=tile_px,
            seam_lines={"x": grid_lines(width, tile_px, box[0]), "y": grid_lines(height, tile_px, box[1])},
            fstd_tiles=fstd_tiles,
        )

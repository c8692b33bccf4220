"""AnySizePipeline: text to image at any width x height (ARAD stage 1 + FSTD stage 2).

Reads as a diffusers pipeline: components in, `from_pretrained` to load, `.to(device, dtype)`,
and one call that goes top to bottom: encode prompts, stage 1 (each prompt at its nearest
training bucket, sampled whole), decode, enlarge and re-noise, stage 2 (FSTD), decode and crop.
`generate_many` takes several requests at once and advances them together, so tiles of one
shape from different images share a UNet call; `__call__` is one request.

Randomness comes only from a per-request `torch.Generator` on the CPU (noise drawn there and
moved to the device, as diffusers' `randn_tensor` does): a seed gives the same image on any
device, up to float precision. Every call builds its own schedulers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from asd_models.buckets import Bucket, asd_buckets, nearest_bucket
from asd_models.devices import auto_tile_batch_size, vae_upcast_dtype
from asd_models.families.base import Conditioning, Denoiser
from asd_models.fidelity import FIDELITY
from asd_models.fstd import TiledJob, img2img_start, sample_jobs
from asd_models.images import CoverCanvas, pil_to_tensor_m11, shrunk_for, tensor_m11_to_pil
from asd_models.large_images import output_array
from asd_models.latent_scale import from_latents
from asd_models.loading import ModelComponents, load_components, load_upscaler_components
from asd_models.memory import release_free_heap
from asd_models.render_request import (
    MAX_SIDE,
    MIN_SIDE,
    AnySizeResult,
    BatchProgress,
    PipelineProgress,
    RenderRequest,
)
from asd_models.samplers import FSTD, BoxPlan, TiledSampler, sampler_named
from asd_models.seams import grid_lines
from asd_models.tiled_vae import tiled_decode, tiled_encode


@dataclass
class _Render:
    """One request's state between the stages."""

    req: RenderRequest
    generator: torch.Generator
    cond: Conditioning
    uncond: Conditioning | None
    guidance_scale: float  # classifier-free guidance (1.0: none)
    bucket: Bucket
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    canvas: tuple[int, int] = (0, 0)
    plan: BoxPlan | None = None  # stage 2's boxes, counting the tiles run
    unet_evals: int = 0


class AnySizePipeline:
    """Diffusers-style two-stage pipeline.

    1. ARAD: render the prompt at the training bucket nearest the requested aspect ratio.
    2. FSTD: upsample that image to cover the requested size, re-noise it to `strength`,
       denoise with implicit-overlap tiles, decode, and crop to exactly width x height.
    """

    memmap_pixels = 64_000_000  # larger outputs are decoded straight into a file on disk
    vae_whole_below = 256 * 256  # latents up to this many pixels go through the VAE in one piece

    def __init__(
        self,
        components: ModelComponents,
        buckets: list[Bucket] | None = None,
        upscaler: ModelComponents | None = None,
    ) -> None:
        self.c = components
        self.upscaler = upscaler  # every call builds its own schedulers (they hold per-run state)
        self.buckets = buckets or asd_buckets(
            base=components.native_latent * components.vae_scale_factor,
            step=components.vae_scale_factor * components.unet_multiple,
        )
        for c in (components, upscaler):
            if c is not None:
                for m in c.modules():
                    m.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls, source: str | Path, buckets: list[Bucket] | None = None, upscaler: str | Path | None = None
    ) -> AnySizePipeline:
        """Load components; use the model's training buckets (`buckets.json`) when it has them.
        `upscaler`: an SD-x4-upscaler-style model for stage 2 instead of img2img."""
        listed = Path(source) / "buckets.json"
        if buckets is None and listed.is_file():
            buckets = [Bucket.parse(b) for b in json.loads(listed.read_text())]
        return cls(load_components(source), buckets, load_upscaler_components(upscaler) if upscaler else None)

    # -- device and dtype ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.c.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.c.unet.dtype

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> AnySizePipeline:
        """Move every model to `device` in `dtype` (as diffusers pipelines). In fp16 a VAE whose
        config asks for it (`force_upcast`, as SD's: its decoder overflows in fp16) runs in bf16
        where the device has it (fp32's exponent range at half the bytes), else in fp32."""

        def move(m: torch.nn.Module, want: torch.dtype | None) -> None:
            # only what changes: diffusers warns on every dtype cast, even a no-op one
            if want is not None and want != m.dtype:
                m.to(dtype=want)
            if device is not None and torch.device(device) != m.device:
                m.to(device=device)

        for c in (self.c, self.upscaler):
            if c is None:
                continue
            for m in (c.unet, *c.text_encoders()):
                move(m, dtype)
            upcast = dtype == torch.float16 and bool(getattr(c.vae.config, "force_upcast", False))
            move(
                c.vae,
                vae_upcast_dtype(torch.device(device) if device is not None else c.vae.device)
                if upcast
                else dtype,
            )
            if c.unet.device.type == "cuda":  # tensor cores read NHWC convolutions without transposes
                for m in (c.unet, c.vae):
                    m.to(memory_format=torch.channels_last)
        return self

    # -- pieces --------------------------------------------------------------------------------
    def default_sampler(
        self,
        name: str = FSTD.name,
        tile: int | None = None,
        tile_batch_size: int | None = None,
        salt: int = 0,
        pieces: str | None = None,
    ) -> TiledSampler:
        """Stage 2's sampler (`asd_models.samplers`) at the UNet's native size (or `tile`), on the
        UNet's down-sampling lattice; `tile_batch_size` None: from free GPU memory on a GPU, 8 on
        the CPU. `salt`: the job's offset salt (every image of a job shifts alike, so a pack of
        same-size images shares its UNet input shapes and an image is the same alone or packed).
        `pieces`: how cropped pieces grow (`asd_models.fstd.PIECE_SHAPES`; None: the cheaper on
        the UNet's device, exact on a CPU, bucketed on CUDA)."""
        tile = tile or self.c.native_latent
        batch = tile_batch_size or auto_tile_batch_size(self.device, tile, self.dtype) or 8
        return sampler_named(name, tile, batch, self.c.unet_multiple, salt).with_pieces(pieces)

    @property
    def pixel_multiple(self) -> int:
        return self.c.vae_scale_factor * self.c.unet_multiple

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str,
        negative_prompt: str = "",
        c: ModelComponents | None = None,
        guidance_scale: float = 5.0,
    ) -> tuple[Conditioning, Conditioning | None, float]:
        """The prompt's and the negative prompt's conditioning and the classifier-free guidance
        scale, as the model's family guides (a guidance-distilled model takes the scale as an
        input instead: no unconditional branch, scale 1)."""
        c = c or self.c
        return c.family.guided(
            c, c.family.encode_prompts(c, [prompt]), c.family.negative(c, negative_prompt), guidance_scale
        )

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> Image.Image:
        vae = self.c.vae
        x = vae.decode(from_latents(vae, latents)).sample
        return tensor_m11_to_pil(x.float())

    def _renders(self, requests: list[RenderRequest]) -> list[_Render]:
        """Each request's prompts encoded, its generator seeded, its bucket chosen."""
        out = []
        for req in requests:
            cond, uncond, scale = self.encode_prompt(
                req.prompt, req.negative_prompt, guidance_scale=req.guidance_scale
            )
            bucket = nearest_bucket(req.width, req.height, self.buckets)
            out.append(_Render(req, torch.Generator().manual_seed(req.seed), cond, uncond, scale, bucket))
        return out

    def _noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(self.device)

    def check_request(self, r: RenderRequest) -> None:
        for name, v in (("width", r.width), ("height", r.height)):
            if not isinstance(v, int) or not MIN_SIDE <= v <= MAX_SIDE:
                raise ValueError(f"{name} must be an integer in [{MIN_SIDE}, {MAX_SIDE}], got {v!r}")
        if not 0.0 < r.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {r.strength}")
        if r.steps < 1:
            raise ValueError(f"steps must be >= 1, got {r.steps}")

    # -- the two stages ------------------------------------------------------------------------
    def _stage1_job(self, r: _Render, progress: Callable | None) -> TiledJob:
        """ARAD: the bucket nearest the requested ratio, sampled whole (one box per step)."""
        f = self.c.vae_scale_factor
        shape = (1, self.c.vae.config.latent_channels, r.bucket.height // f, r.bucket.width // f)
        family = self.c.family
        scheduler = family.sampling_scheduler(self.c, r.req.steps, shape[2:])
        latents = family.start_latents(scheduler, self._noise(shape, r.generator))
        whole = [(0, 0, shape[2], shape[3])]
        return TiledJob(
            latents,
            scheduler,
            scheduler.timesteps,
            r.cond,
            r.uncond,
            r.guidance_scale,
            lambda i: whole,
            r.generator,
            "uniform",
            progress=progress,
            partition=True,
        )

    def _stage2_job(
        self,
        r: _Render,
        image: Image.Image,
        sampler: TiledSampler,
        vae_tile: int,
        progress: Callable | None,
        memmap_pixels: int,
    ) -> TiledJob:
        """FSTD on a canvas covering the target (sides multiples of the UNet's pixel multiple)."""
        up, req = self.upscaler, r.req
        m = (up.vae_scale_factor * up.unet_multiple) if up else self.pixel_multiple
        cw, ch = -(-req.width // m) * m, -(-req.height // m) * m
        r.canvas = (cw, ch)
        r.box = (
            (cw - req.width) // 2,
            (ch - req.height) // 2,
            (cw - req.width) // 2 + req.width,
            (ch - req.height) // 2 + req.height,
        )
        if up is not None:
            return self._upscaler_job(up, r, image, sampler, progress)
        # the box (what is kept) shows the image exactly; the margin up to the canvas continues it
        cover = CoverCanvas(
            pil_to_tensor_m11(shrunk_for(image, cw, ch, r.box)).to(self.device), cw, ch, r.box
        )
        # a large canvas is enlarged tile by tile as the encoder asks for it: never whole
        canvas = cover.whole() if cw * ch <= memmap_pixels else cover
        x0 = tiled_encode(
            self.c.vae, canvas, tile=vae_tile * self.c.vae_scale_factor, whole_below=self.vae_whole_below
        )
        if isinstance(canvas, CoverCanvas) and x0.device.type == "cpu":  # once, not per tile: each costs
            release_free_heap()  # time, and the decode's peak, not the encode's, is the job's
        family = self.c.family
        scheduler = family.sampling_scheduler(self.c, req.steps, (x0.shape[2], x0.shape[3]))
        timesteps = scheduler.timesteps[img2img_start(req.steps, req.strength) :]
        noise = self._noise(tuple(x0.shape), r.generator)
        latents = family.noised(scheduler, x0, noise, timesteps[:1])
        job, r.plan = sampler.job(
            latents,
            scheduler,
            timesteps,
            r.cond,
            r.uncond,
            r.guidance_scale,
            r.generator,
            progress=progress,
        )
        return job

    @staticmethod
    def upscaler_sampler(up: ModelComponents, sampler: TiledSampler) -> TiledSampler:
        """Stage 2's sampler at the upscaler UNet's own tile and lattice."""
        return sampler.at_tile(up.unet.config.sample_size, up.unet_multiple).on_unet(up.unet)

    def _upscaler_job(
        self,
        up: ModelComponents,
        r: _Render,
        image: Image.Image,
        sampler: TiledSampler,
        progress: Callable | None,
    ) -> TiledJob:
        """SD-x4-upscaler stage 2: the low-res image (noised to `noise_level`) is concatenated to
        the latent; FSTD denoises from pure noise at the upscaler's latent size."""
        req = r.req
        f = up.vae_scale_factor
        cw, ch = r.canvas
        low_t = CoverCanvas(
            pil_to_tensor_m11(shrunk_for(image, cw // f, ch // f, r.box, f)), cw // f, ch // f, r.box, scale=f
        ).whole()
        level = torch.tensor([req.noise_level], dtype=torch.long)
        low_t = up.low_res_scheduler.add_noise(low_t, torch.randn(low_t.shape, generator=r.generator), level)
        cond, uncond, scale = self.encode_prompt(req.prompt, req.negative_prompt, up, req.guidance_scale)
        scheduler = up.family.sampling_scheduler(up, req.steps, (ch // f, cw // f))
        noise = self._noise((1, up.vae.config.latent_channels, ch // f, cw // f), r.generator)
        latents = up.family.start_latents(scheduler, noise)
        job, r.plan = self.upscaler_sampler(up, sampler).job(
            latents,
            scheduler,
            scheduler.timesteps,
            cond,
            uncond,
            scale,
            r.generator,
            condition=low_t.to(self.device),
            unet_kwargs={"class_labels": level.to(self.device)},
            progress=progress,
        )
        return job

    @torch.no_grad()
    def generate_many(
        self,
        requests: list[RenderRequest],
        sampler: TiledSampler | None = None,
        progress: BatchProgress | None = None,
        vae_tile: int = 64,
        memmap_pixels: int | None = None,
        on_stage: Callable[[str], None] | None = None,
    ) -> list[AnySizeResult]:
        """Render every request at exactly its width x height. The requests advance through
        their steps together (stage 1, then stage 2 with `sampler`, default FSTD), tiles of one
        shape from all of them sharing UNet calls of up to `sampler.tile_batch_size` tiles. vae_tile: tiled VAE tile in
        latent pixels. Outputs over `memmap_pixels` (default: the class attribute) are decoded
        into a memory-mapped file, and their stage-2 canvas is enlarged and encoded tile by tile,
        never whole: memory stays bounded at any size. `on_stage(name)` is called as each stage
        starts ("arad"; "canvas": stage 2's enlarged, encoded canvas; "fstd"; "decode") and with
        "done" at the end (timings, memory peaks)."""
        memmap_pixels = self.memmap_pixels if memmap_pixels is None else memmap_pixels
        stage = on_stage or (lambda name: None)
        for req in requests:
            self.check_request(req)
        sampler = (sampler or self.default_sampler()).on_unet(self.c.unet)

        def report(i: int, stage: str) -> Callable | None:
            return (lambda s, n, d, t: progress(i, stage, s, n, d, t)) if progress else None

        # 1. prompts, and ARAD: each request at its nearest bucket, all sampled together
        stage("arad")
        renders = self._renders(requests)
        jobs = sample_jobs(
            Denoiser(self.c),
            [self._stage1_job(r, report(i, "arad")) for i, r in enumerate(renders)],
            sampler.tile_batch_size,
        )
        images = []
        for r, job in zip(renders, jobs, strict=True):
            r.unet_evals += job.unet_tiles
            images.append(self.decode_latents(job.latents))
        del jobs
        return self._stage2_many(renders, images, sampler, report, vae_tile, memmap_pixels, stage)

    @torch.no_grad()
    def upscale_many(
        self,
        requests: list[RenderRequest],
        images: list[Image.Image],
        sampler: TiledSampler | None = None,
        progress: BatchProgress | None = None,
        vae_tile: int = 64,
        memmap_pixels: int | None = None,
        on_stage: Callable[[str], None] | None = None,
        fidelity: str = "backproject",
    ) -> list[AnySizeResult]:
        """Stage 2 alone on existing images (ASD-upscale): each image enlarged to cover its
        request's exact width x height, re-noised to `strength` and denoised with `sampler`
        (default FSTD) under the request's prompt, or, with an upscaler, denoised from noise with
        the image as its low-res condition. The requests advance together as in `generate_many`.
        `fidelity` names how each output is made to keep its input (`asd_models.fidelity`)."""
        if fidelity not in FIDELITY:
            raise ValueError(f"fidelity {fidelity!r}: not one of {', '.join(FIDELITY)}")
        memmap_pixels = self.memmap_pixels if memmap_pixels is None else memmap_pixels
        stage = on_stage or (lambda name: None)
        if len(images) != len(requests):
            raise ValueError(f"{len(requests)} requests and {len(images)} images")
        for req in requests:
            self.check_request(req)
        sampler = (sampler or self.default_sampler()).on_unet(self.c.unet)

        def report(i: int, stage: str) -> Callable | None:
            return (lambda s, n, d, t: progress(i, stage, s, n, d, t)) if progress else None

        renders = self._renders(requests)
        results = self._stage2_many(
            renders, [im.convert("RGB") for im in images], sampler, report, vae_tile, memmap_pixels, stage
        )
        for res, image in zip(results, images, strict=True):
            FIDELITY[fidelity](res.pixels, image)
        return results

    def _stage2_many(
        self,
        renders: list[_Render],
        images: list[Image.Image],
        sampler: TiledSampler,
        report: Callable[[int, str], Callable | None],
        vae_tile: int,
        memmap_pixels: int,
        stage: Callable[[str], None],
    ) -> list[AnySizeResult]:
        """FSTD: every request's image enlarged to its canvas, re-noised, denoised together, decoded."""
        stage("canvas")
        jobs = [
            self._stage2_job(r, img, sampler, vae_tile, report(i, "fstd"), memmap_pixels)
            for i, (r, img) in enumerate(zip(renders, images, strict=True))
        ]
        del images
        stage("fstd")
        sample_jobs(Denoiser(self.upscaler or self.c), jobs, sampler.tile_batch_size)
        stage("decode")
        results = []
        for r, job in zip(renders, jobs, strict=True):
            r.unet_evals += job.unet_tiles
            results.append(self._finish(r, job, sampler, vae_tile, memmap_pixels))
        stage("done")
        return results

    def _finish(
        self, r: _Render, job: TiledJob, sampler: TiledSampler, vae_tile: int, memmap_pixels: int
    ) -> AnySizeResult:
        up, req = self.upscaler, r.req
        vae = up.vae if up else self.c.vae
        out = output_array(req.width, req.height, memmap_pixels)
        final = tiled_decode(
            vae,
            job.latents,
            tile=vae_tile,
            out=out,
            crop=r.box,
            whole_below=self.vae_whole_below,
            release_heap=isinstance(out, np.memmap),
        )
        f2 = up.vae_scale_factor if up else self.c.vae_scale_factor
        tile_px = (up.unet.config.sample_size if up else sampler.tile) * f2
        return AnySizeResult(
            pixels=final,
            bucket=r.bucket,
            canvas=r.canvas,
            tile_px=tile_px,
            seam_lines={
                "x": grid_lines(req.width, tile_px, r.box[0]),
                "y": grid_lines(req.height, tile_px, r.box[1]),
            },
            fstd_tiles=r.plan.tiles if r.plan else 0,
            unet_evals=r.unet_evals,
            piece_shapes="bucketed" if job.run_sizes else "exact",
        )

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
        sampler: TiledSampler | None = None,
        progress: PipelineProgress | None = None,
        noise_level: int = 20,
        vae_tile: int = 64,
        negative_prompt: str = "",
    ) -> AnySizeResult:
        """Render `prompt` at exactly `width` x `height` (one request of `generate_many`)."""
        req = RenderRequest(
            prompt,
            width,
            height,
            seed,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            strength,
            noise_level,
        )
        report = (lambda i, stage, s, n, d, t: progress(stage, s, n, d, t)) if progress else None
        return self.generate_many([req], sampler, report, vae_tile)[0]

"""What generation and upscaling share about rendering an image: the render settings (sampler,
steps, device, how large outputs are written) and their adapter to the pipeline's sampler, how
rows are packed to render together, and the peak memory a pack reports. Output writing lives in
`tasks.outputs`."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import model_validator

from asd_models.lora import LoraError
from asd_models.memory import peak_rss_mb
from asd_models.samplers import SAMPLER_NAMES, parse_sampler_options, sampler_named
from data_manifests.settings import FanOutSettings, execution, output

MAX_PACK_PIXELS = 1 << 30  # a pack's latents, conditioning and decode stay far inside one GPU's memory
MAX_JOB_PIXELS = 64 << 30  # 64 gigapixels: ~64k images of 1024^2 (--max-job-pixels raises it)


class RenderSettings(FanOutSettings):
    """How FSTD renders an image (shared by generation and upscaling): sampler, steps, model,
    device, and how large outputs are written."""

    steps: int = output(20, ge=1, le=1000, description="denoising steps (stage 1 and stage 2)")
    guidance_scale: float = output(5.0, ge=0, le=100, description="classifier-free guidance scale")
    strength: float = output(0.6, gt=0, le=1, description="how much stage 2 re-noises the enlarged image")
    sampler: Literal[SAMPLER_NAMES] = output(  # type: ignore[valid-type]  # Literal of the plug-in table's names
        "fstd",
        description="stage 2's tiled sampler (asd_models.samplers): fstd (ours), official (the ASD code's "
        "scheme), naive tiles, multidiffusion / mixture (50%-overlap windows), full (no tiles)",
    )
    tile: int | None = output(
        None,
        ge=1,
        description="stage 2's tile in latent pixels (default: the UNet's "
        "sample size; an upscaler uses its own)",
    )
    sampler_options: str = output(
        "",
        description="the sampler's own knobs, k=v separated by commas: fstd: mode (cropped, edge-tile, official), "
        "shift_range, reset_every, min_piece, offset_multiple; multidiffusion and mixture: stride (all in latent "
        "pixels); e.g. 'stride=16'",
    )
    offset_salt: int = output(
        0,
        ge=0,
        le=2**62,
        description="salt of FSTD's per-step grid offsets, shared by every "
        "image of the job (so a pack shares its UNet input shapes)",
    )
    pieces: Literal["auto", "exact", "bucketed"] = output(
        "auto",
        description="how FSTD's cropped pieces grow before the UNet runs them: exact (to the UNet's size "
        "multiple: the least area), bucketed (to half a tile, a tile or 5/4 of one: at most 3 x 3 shapes a job, for "
        "CUDA graphs and compiled kernels); auto: bucketed on CUDA, exact elsewhere. Recorded per image",
    )
    tile_batch_size: int | None = execution(
        None, ge=1, description="tiles per UNet call (default: the sampler's own)"
    )
    upscaler: str | None = output(
        None,
        description="stage 2 with an SD-x4-upscaler-style model (local folder, cached hub id or "
        "models/NAME@VERSION) instead of img2img with the same model",
    )
    noise_level: int = output(20, ge=0, le=1000, description="noise on the low-res image (upscaler stage 2)")
    lora: list[str] = output(
        [],
        description="LoRA adapters applied to the denoiser on every tile: models/NAME@VERSION[:WEIGHT] (an "
        "`asd train --lora-rank` result, weight 1.0 by default); repeat the flag to mix several",
    )
    device: str = execution(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (a GPU when there is one), cpu, cuda or cuda:N",
    )
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = output(
        "auto", description="auto: fp16 on a GPU, fp32 on the CPU"
    )
    pack: bool = execution(
        True, description="images of a shard advance together, their tiles sharing UNet calls"
    )
    max_job_pixels: int = execution(
        MAX_JOB_PIXELS,
        ge=1,
        description="a job of more output pixels than this is "
        "refused before anything is written (raise it for a larger job)",
    )
    pack_max_pixels: int = execution(
        16 << 20,
        ge=4096,
        le=MAX_PACK_PIXELS,
        description="output pixels rendered together at most (a larger image renders alone)",
    )
    large_image_pixels: int = output(
        64_000_000,
        ge=1,
        description="outputs above this many pixels are decoded into a memory-mapped file and "
        "written to the store as they are encoded (never held twice in memory), with a Deep Zoom pyramid",
    )
    large_image_format: Literal["png", "tiff"] = output(
        "png",
        description="file of a large output: png (streamed; S3: a multipart upload) or tiff (tiled 256 px, "
        "deflate, pyramidal, BigTIFF past 3.5 GB; written to a local temporary file, then streamed up)",
    )
    deep_zoom: bool = output(
        True, description="a DZI pyramid and a zoomable viewer page beside each large output"
    )

    def sampler_on(self, pipe: Any) -> Any:
        """Stage 2's sampler on `pipe` (an `AnySizePipeline`) as these settings ask for it."""
        sampler = pipe.default_sampler(
            self.sampler,
            self.tile,
            self.tile_batch_size,
            self.offset_salt,
            None if self.pieces == "auto" else self.pieces,
        )
        return sampler.with_options(**parse_sampler_options(self.sampler_options))

    @model_validator(mode="after")
    def _sampler_options_known(self) -> RenderSettings:
        """Options the sampler does not have, or values it refuses, fail here, before any work."""
        sampler_named(self.sampler, self.tile or 64).with_options(
            **parse_sampler_options(self.sampler_options)
        )
        return self

    @model_validator(mode="after")
    def _lora_entries(self) -> RenderSettings:
        """Each adapter reference is a model version with an optional finite weight."""
        for entry in self.lora:
            ref, weight = split_lora(entry)
            check_ref_text(ref)
            if not math.isfinite(weight) or abs(weight) > 100:
                raise ValueError(f"lora {entry!r}: weight {weight} must be a finite number in [-100, 100]")
        return self

    def adapters(self) -> list[tuple[str, float]]:
        """(reference, weight) of each adapter, in the order given."""
        return [split_lora(e) for e in self.lora]

    @model_validator(mode="after")
    def _tile_with_upscaler(self) -> RenderSettings:
        if self.upscaler and self.tile is not None:
            raise ValueError(
                "tile: an upscaler's stage 2 runs at that model's own sample size; leave tile unset "
                "with upscaler"
            )
        return self


def split_lora(entry: str) -> tuple[str, float]:
    """`models/NAME@V:0.8` -> ("models/NAME@V", 0.8); no weight: 1.0."""
    ref, sep, weight = entry.rpartition(":")
    if not sep or "/" in weight or "@" in weight:
        return entry, 1.0
    try:
        return ref, float(weight)
    except ValueError:
        raise ValueError(f"lora {entry!r}: {weight!r} after ':' is not a weight") from None


def check_ref_text(ref: str) -> None:
    """A model reference's text: models/NAME[@VERSION] or NAME[@VERSION]."""
    from artifact_store import ArtifactRef

    ArtifactRef.parse(ref if ref.startswith("models/") else f"models/{ref}")


def stored_model_refs(store: Any, settings: RenderSettings) -> dict[str, str]:
    """The stored models the settings name besides the job's model, each resolved to its version
    by role: "upscaler", "lora0", "lora1", ... (the job's parents). An adapter that is not an
    `asd train --lora-rank` result is refused naming it."""
    refs: dict[str, str] = {}
    if settings.upscaler and settings.upscaler.startswith("models/"):
        refs["upscaler"] = str(store.resolve(settings.upscaler))
    for i, (ref, _) in enumerate(settings.adapters()):
        resolved = str(store.resolve(ref if ref.startswith("models/") else f"models/{ref}"))
        if not (store.record(resolved).get("params") or {}).get("lora"):
            raise LoraError(
                f"lora {ref}: {resolved} is not a LoRA adapter (one is made by `asd train --lora-rank R`)"
            )
        refs[f"lora{i}"] = resolved
    return refs


def pinned_to(settings: RenderSettings, refs: dict[str, str]) -> dict[str, Any]:
    """The settings' fields that `refs` (`stored_model_refs`) pin to versions: what the workers load."""
    update: dict[str, Any] = {}
    if "upscaler" in refs:
        update["upscaler"] = refs["upscaler"]
    if settings.lora:
        update["lora"] = [f"{refs[f'lora{i}']}:{w}" for i, (_, w) in enumerate(settings.adapters())]
    return update


def packs(rows: list[dict[str, Any]], settings: RenderSettings) -> list[list[dict[str, Any]]]:
    """Consecutive rows rendered together, up to `pack_max_pixels` output pixels (at least one)."""
    if not settings.pack:
        return [[r] for r in rows]
    packs: list[list[dict[str, Any]]] = []
    pixels = 0
    for r in rows:
        n = r["width"] * r["height"]
        if packs and pixels + n <= settings.pack_max_pixels:
            packs[-1].append(r)
            pixels += n
        else:
            packs.append([r])
            pixels = n
    return packs


def peak_memory_mb(device: Any) -> float:
    """Peak memory of what was rendered: the GPU's allocations on CUDA, else this process's peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()

"""What an upscale job is asked for (`UpscaleSettings`: the target size, the inputs' caps, the
render's settings) and what its tasks share and report (`UpscaleJob`, `PartitionDone`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import model_validator

from artifact_store import PendingVersion
from asd_models.fidelity import FIDELITY_NAMES
from data_engine.samples import SampleSpec
from data_manifests.settings import SEED_MAX, execution, output
from tasks.ingest import SourceSettings
from tasks.render import RenderSettings

MIN_SIDE, MAX_SIDE = 64, 16384


STAGE_TARGET = "target"


STAGE_RENDER = "render"


class UpscaleSettings(RenderSettings, SourceSettings):
    """ASD-upscale: existing images enlarged to an exact size by FSTD's stage 2."""

    scale: float | None = output(
        None,
        gt=1,
        le=256,
        description="enlarge every image by this factor (the default, "
        "2, when neither size nor long_side is given)",
    )
    size: str | None = output(
        None,
        pattern=r"^[1-9][0-9]*x[1-9][0-9]*$",
        description="every output exactly WxH (the input resized to cover it, then cropped)",
    )
    long_side: int | None = output(
        None, ge=MIN_SIDE, le=MAX_SIDE, description="every output's longer side, the aspect ratio kept"
    )
    prompt: str = output(
        "",
        description="prompt of an image without a caption of its own (a sidecar .txt, a URL "
        "list's caption column, a shard's .txt); with --same-prompt, of every image",
    )
    same_prompt: bool = output(False, description="use `prompt` for every image, not the images' captions")
    seed: int = output(0, ge=0, le=SEED_MAX, description="seed of every image's noise")
    strength: float = output(
        0.3,
        gt=0,
        le=1,
        description="how far the enlarged image is re-noised: low keeps the "
        "picture, high lets the model redraw it",
    )
    fidelity: Literal[FIDELITY_NAMES] = output(  # type: ignore[valid-type]  # Literal of the plug-in table's names
        "backproject",
        description="how an output is made to keep its input: backproject (its downscale is made "
        "the input: structure and colour from the input, only finer detail from the model) or none (the model's "
        "output as it is)",
    )
    partition_inputs: int = execution(
        8, ge=1, description="images a task takes (on average; rendered together)"
    )

    @model_validator(mode="after")
    def _one_target(self) -> UpscaleSettings:
        given = [n for n in ("scale", "size", "long_side") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of scale, size and long_side, not {' and '.join(given)}")
        if self.size and not all(MIN_SIDE <= int(v) <= MAX_SIDE for v in self.size.split("x")):
            raise ValueError(f"size {self.size}: each side must be {MIN_SIDE}..{MAX_SIDE} pixels")
        return self

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The output size of an input of `width` x `height` (ValueError: not an upscale here)."""
        if self.size:
            w, h = (int(v) for v in self.size.split("x"))
        elif self.long_side:
            f = self.long_side / max(width, height)
            w, h = max(1, round(width * f)), max(1, round(height * f))
        else:
            f = self.scale or 2.0
            w, h = round(width * f), round(height * f)
        if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
            raise ValueError(f"target {w}x{h} is outside {MIN_SIDE}..{MAX_SIDE} pixels a side")
        if w < width or h < height:
            raise ValueError(f"target {w}x{h} is smaller than the input {width}x{height}: not an upscale")
        return w, h

    def sample_spec(self) -> SampleSpec:
        """The decoder's limits (the data stage's decode: caps, EXIF orientation, RGB)."""
        return SampleSpec(
            buckets=(),
            min_side=1,
            max_pixels=self.max_pixels,
            max_aspect=float("inf"),
            crop="center",
            seed=0,
            jpeg_quality=95,
            draft=False,
            max_bytes=self.max_bytes,
            resample="bicubic",
        )


@dataclass(frozen=True)
class UpscaleJob:
    """What every partition task of one upscale job shares (small, picklable)."""

    store_url: str
    model: str  # resolved models/NAME@VERSION
    pending: PendingVersion
    settings: UpscaleSettings
    storage_options: dict[str, Any] | None = None


@dataclass
class PartitionDone:
    """What a partition task tells the flow: its inputs, and what became of them."""

    index: int
    stem: str
    inputs: int
    ok: int = 0
    failed: int = 0
    rendered: int = 0
    resumed: int = 0
    worker: str = ""
    large: bool = False  # a large output with a viewer page: the viewer's assets go into the version once

"""What an upscale job will do, before it starts: its inputs, their output sizes and pixels, and
the UNet evaluations of FSTD's stage 2 on them. `asd upscale --dry-run` prints it; the stage
refuses a job over `max_job_pixels` before any version exists.

Sizes come from what is known without decoding an image: a local file's or shard sample's header
(EXIF orientation applied), a store version's manifest. A URL's size is known only once it is
downloaded: such inputs are counted, not sized, and the cap applies to the sized ones."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from artifact_store import ArtifactStore
from data_engine.source_records import SourceRecord
from tasks.job_plan import JobTooLarge, ModelGeometry, image_unet_evals, over_cap

EXIF_ORIENTATION = 0x0112


@dataclass
class UpscalePlan:
    inputs: int = 0
    sized: int = 0
    unsized: int = 0  # URLs: sized when downloaded
    failed: int = 0  # an input that fails before rendering (unreadable header, not an upscale)
    pixels: int = 0
    largest: tuple[int, int] = (0, 0)
    unet_evals: int = 0
    max_job_pixels: int = 0
    with_upscaler: bool = False
    first_failures: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        w, h = self.largest
        out = [
            f"inputs: {self.inputs:,} ({self.sized:,} sized, {self.unsized:,} URLs sized when downloaded, "
            f"{self.failed:,} that will fail)",
            f"output pixels: {self.pixels:,} ({self.pixels / 1e9:.2f} gigapixels; largest {w}x{h}); "
            f"max_job_pixels {self.max_job_pixels:,}",
            f"UNet evaluations (FSTD stage 2 tiles, guidance counted): {self.unet_evals:,}",
        ]
        out += [f"will fail: {why}" for why in self.first_failures]
        if self.with_upscaler:
            out.append(
                "UNet evaluations are counted as img2img with the model: an upscaler runs at its own size"
            )
        if self.pixels > self.max_job_pixels:
            out.append(self.refusal())
        return out

    def refusal(self) -> str:
        return over_cap(self.pixels, self.max_job_pixels)

    def check(self) -> None:
        if self.pixels > self.max_job_pixels:
            raise JobTooLarge(self.refusal())


def header_size(rec: SourceRecord) -> tuple[int, int] | None:
    """An input's upright size from what is at hand without decoding (None: a URL, not read yet).
    ValueError: the header does not read as an image."""
    from PIL import Image, UnidentifiedImageError

    listed = rec.meta.get("listed_size")
    if listed:
        return int(listed[0]), int(listed[1])
    if rec.data is not None:
        where: io.BytesIO | str = io.BytesIO(rec.data)
    elif rec.path is not None:
        where = rec.path
    else:
        return None
    try:
        with Image.open(where) as im:
            w, h = im.size
            turned = im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not an image PIL can read ({exc})") from exc
    return (h, w) if turned else (w, h)


def plan_upscale(store: ArtifactStore, model_ref: str, sources: list[Any], settings: Any) -> UpscalePlan:
    """Every input of `sources` (opened readers) sized and costed as the job would run it."""
    geo = ModelGeometry.of(store, model_ref)
    plan = UpscalePlan(max_job_pixels=settings.max_job_pixels, with_upscaler=bool(settings.upscaler))
    cfg = settings.guidance_scale != 1.0
    for source in sources:
        for rec in source.records():
            plan.inputs += 1
            try:
                if rec.error:
                    raise ValueError(rec.error)
                size = header_size(rec)
                if size is None:
                    plan.unsized += 1
                    continue
                tw, th = settings.target(*size)
            except ValueError as exc:
                plan.failed += 1
                if len(plan.first_failures) < 5:
                    plan.first_failures.append(f"{rec.source}: {exc}")
                continue
            plan.sized += 1
            plan.pixels += tw * th
            plan.largest = max(plan.largest, (tw, th), key=lambda s: s[0] * s[1])
            plan.unet_evals += image_unet_evals(
                geo,
                settings.sampler,
                settings.tile,
                settings.offset_salt,
                tw,
                th,
                settings.steps,
                settings.strength,
                cfg,
                settings.sampler_options,
                stage1=False,
            )
    return plan

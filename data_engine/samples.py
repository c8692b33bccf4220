"""One sample through decoding, validation, bucketing and re-encoding.

The resizer of the data engine. Runs inline or in worker processes (spawned: this module
imports only PIL, numpy and the geometry of `asd_models`). Every failure comes back as a value with its stage and reason;
nothing here raises for bad input.
"""

from __future__ import annotations

import hashlib
import io
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from asd_models.buckets import Bucket, aspect_error, nearest_bucket
from asd_models.images import cover_size, resize_cover_crop

# Failure stages recorded in the manifest's `failed_stage`.
STAGE_SOURCE = "source"  # the listing itself: missing file, path outside the source, no url
STAGE_CAPTION = "caption"  # no caption / empty caption under the reject policy
STAGE_DOWNLOAD = "download"  # network or object-store read (retried by --retry-failed)
STAGE_READ = "read"  # a local file that could not be read
STAGE_DECODE = "decode"  # not an image, truncated, corrupt
STAGE_VALIDATE = "validate"  # decoded fine but outside the limits (size, pixels, aspect)
STAGE_DUPLICATE = "duplicate"

ORIENTATION_TAG = 0x0112
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
}
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class SampleSpec:
    """What processing one sample needs (picklable, sent to workers once per job)."""

    buckets: tuple[tuple[int, int], ...]
    min_side: int
    max_pixels: int
    max_aspect: float
    crop: str  # center | random
    seed: int
    jpeg_quality: int
    draft: bool
    max_bytes: int  # largest file read (local files; downloads have their own cap)
    resample: str  # bilinear | bicubic | lanczos (PIL filters, antialiased when shrinking)

    def bucket_list(self) -> list[Bucket]:
        return [Bucket(w, h) for w, h in self.buckets]


class Rejected(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def _fail(stage: str, message: str) -> dict[str, Any]:
    return {"ok": False, "failed_stage": stage, "error": message}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or "no detail"
    return f"{type(exc).__name__}: {text}"[:500]


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        return 1


def to_rgb(im: Image.Image) -> Image.Image:
    """Every PIL mode to 8-bit RGB: high bit depth rescaled, alpha composited on white."""
    if im.mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(arr.round().astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def decode(
    data: bytes, spec: SampleSpec, buckets: list[Bucket] | None = None
) -> tuple[Image.Image, int, int]:
    """Decode once and fully (every scan; `verify` alone misses truncation), apply EXIF
    orientation, convert to RGB. Returns (image, original width, original height) upright.
    With `spec.draft`, a JPEG is decoded at the smallest 1/2^k scale that still covers the
    bucket (libjpeg's DCT scaling), which is what makes big JPEGs cheap. PIL's process-wide
    pixel limit is left alone: the header size is checked against `spec.max_pixels` here,
    before any pixel is decoded (settings cap it below PIL's own hard ceiling)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Rejected(STAGE_VALIDATE, f"too many pixels (decompression-bomb guard): {exc}") from exc
        except UnidentifiedImageError as exc:
            raise Rejected(STAGE_DECODE, "not an image PIL can identify") from exc
        except Exception as exc:  # noqa: BLE001
            raise Rejected(STAGE_DECODE, _describe(exc)) from exc
        w, h = im.size
        if w <= 0 or h <= 0:
            raise Rejected(STAGE_DECODE, f"image header says {w}x{h}")
        if w * h > spec.max_pixels:
            raise Rejected(
                STAGE_VALIDATE,
                f"too many pixels: {w}x{h} = {w * h} > {spec.max_pixels} (decompression-bomb guard)",
            )
        try:
            # a JPEG's EXIF sits in its header; any other format's may follow the pixel data, so
            # its orientation is read only after the one full decode (a read before would decode
            # half an image, swallow the error and keep the half)
            swap = im.format == "JPEG" and _orientation(im) in (5, 6, 7, 8)
            ow, oh = (h, w) if swap else (w, h)
            if im.format == "JPEG":
                check_size(ow, oh, spec)
                if spec.draft and buckets:
                    target = nearest_bucket(ow, oh, buckets)
                    cw, ch = cover_size(ow, oh, target.width, target.height)
                    im.draft(im.mode, (ch, cw) if swap else (cw, ch))
            im.load()
            if im.format != "JPEG":
                swap = _orientation(im) in (5, 6, 7, 8)
                ow, oh = (h, w) if swap else (w, h)
                check_size(ow, oh, spec)
            upright = ImageOps.exif_transpose(im) or im
            return to_rgb(upright), ow, oh
        except Rejected:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated, corrupt, unsupported mode
            raise Rejected(STAGE_DECODE, _describe(exc)) from exc


def check_size(w: int, h: int, spec: SampleSpec) -> None:
    if min(w, h) < spec.min_side:
        raise Rejected(STAGE_VALIDATE, f"too small: {w}x{h}, shorter side under {spec.min_side}")
    ratio = max(w / h, h / w)
    if ratio > spec.max_aspect:
        raise Rejected(
            STAGE_VALIDATE, f"extreme aspect ratio: {w}x{h} is {ratio:.2f}:1 > {spec.max_aspect:g}:1"
        )


def read_capped(path: str, max_bytes: int) -> bytes:
    """A local input file's bytes, at most `max_bytes` (Rejected: too large, or unreadable)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except Exception as exc:  # noqa: BLE001
        raise Rejected(STAGE_READ, _describe(exc)) from exc
    if len(data) > max_bytes:
        raise Rejected(STAGE_VALIDATE, f"file too large: over max_bytes {max_bytes}")
    return data


def process_sample(job: tuple[str, bytes | str, SampleSpec]) -> dict[str, Any]:
    """(key, image bytes or a local path, spec) -> a result dict: `ok` True with the bucket
    image (JPEG bytes) and its geometry, or `ok` False with `failed_stage` and `error`."""
    key, data, spec = job
    if isinstance(data, str):
        try:
            data = read_capped(data, spec.max_bytes)
        except Rejected as exc:
            return _fail(exc.stage, str(exc))
    if not data:
        return _fail(STAGE_DECODE, "empty file (0 bytes)")
    buckets = spec.bucket_list()
    try:
        img, ow, oh = decode(data, spec, buckets)
        bucket = nearest_bucket(ow, oh, buckets)
        pixels = np.ascontiguousarray(np.asarray(img))
        digest = hashlib.sha256(pixels.tobytes() + f"{img.width}x{img.height}".encode()).hexdigest()
        rng = random.Random(f"{spec.seed}:{key}") if spec.crop == "random" else None
        out, box = resize_cover_crop(img, bucket.width, bucket.height, rng, RESAMPLE[spec.resample])
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=spec.jpeg_quality)
    except Rejected as exc:
        return _fail(exc.stage, str(exc))
    except Exception as exc:  # noqa: BLE001 - whatever else a hostile file triggers is still data
        return _fail(STAGE_DECODE, _describe(exc))
    # crop box in the resized-to-cover image; the cover size lets a trainer map it back
    cw, ch = cover_size(img.width, img.height, bucket.width, bucket.height)
    return {
        "ok": True,
        "jpg": buf.getvalue(),
        "original_width": ow,
        "original_height": oh,
        "bucket": bucket.name,
        "width": bucket.width,
        "height": bucket.height,
        "crop_left": box[0],
        "crop_top": box[1],
        "crop_right": box[2],
        "crop_bottom": box[3],
        "cover_width": cw,
        "cover_height": ch,
        "sha256": digest,
        "aspect_error": aspect_error(ow, oh, bucket),
    }

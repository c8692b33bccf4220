"""A plan before a generation job renders anything: images, output pixels, the UNet evaluations
both stages will make (counted with the job's own sampler geometry, read from the model's
configs in the store, no weights loaded), and, where the store holds a generations version this
model rendered on the same kind of device, an estimated time from that job's measured rate.

`asd generate --dry-run` prints it; the generate flow publishes it as its first artifact and
refuses a job over `max_job_pixels` before anything is written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from asd_models.buckets import asd_buckets, nearest_bucket

if TYPE_CHECKING:
    from artifact_store import ArtifactStore

RATE_METRIC = "unet_evals_per_s_{}"  # a generations summary's measured rate on one kind of device


class JobTooLarge(ValueError):
    """A job over `max_job_pixels`."""


@dataclass(frozen=True)
class ModelGeometry:
    """What the plan needs of a model: its UNet tile, latent factor and lattice."""

    sample_size: int
    vae_scale_factor: int
    unet_multiple: int

    @property
    def pixel_multiple(self) -> int:
        return self.vae_scale_factor * self.unet_multiple

    @classmethod
    def of(cls, store: ArtifactStore, model_ref: str) -> ModelGeometry:
        """From the stored model's configs, as its family reads them (no weight loaded)."""
        from asd_models.families import family_of_index
        from asd_models.families.sd import StableDiffusion

        family = (
            family_of_index(json.loads(store.read_bytes(model_ref, "model_index.json")), model_ref)
            if store.file_meta(model_ref, "model_index.json") is not None
            else StableDiffusion()
        )
        denoiser = json.loads(store.read_bytes(model_ref, f"{family.denoiser}/config.json"))
        vae = json.loads(store.read_bytes(model_ref, "vae/config.json"))
        return cls(
            family.native_latent(denoiser),
            2 ** (len(vae["block_out_channels"]) - 1),
            family.latent_multiple(denoiser),
        )


@lru_cache(maxsize=4096)
def image_unet_evals(
    geo: ModelGeometry,
    sampler: str,
    tile: int | None,
    salt: int,
    width: int,
    height: int,
    steps: int,
    strength: float,
    cfg: bool,
    options: str = "",
    stage1: bool = True,
) -> int:
    """UNet evaluations of one image: stage 1 (one bucket, every step) plus stage 2 (the
    sampler's boxes, with its `options`, over the canvas latent, for the steps strength leaves),
    x2 with guidance."""
    from asd_models.fstd import img2img_start
    from asd_models.samplers import parse_sampler_options, sampler_named

    f, m = geo.vae_scale_factor, geo.pixel_multiple
    first = steps if stage1 else 0  # an upscale is stage 2 alone
    lat_w, lat_h = -(-width // m) * m // f, -(-height // m) * m // f
    stage2_steps = steps - img2img_start(steps, strength)
    s = sampler_named(sampler, tile or geo.sample_size, 8, geo.unet_multiple, salt).with_options(
        **parse_sampler_options(options)
    )
    stage2 = s.evals_per_step(lat_h, lat_w, stage2_steps) * stage2_steps
    return int(round((first + stage2) * (2 if cfg else 1)))


def over_cap(pixels: int, cap: int) -> str:
    """The one-line refusal of a job of `pixels` output pixels over `max_job_pixels`."""
    return (
        f"refused: {pixels:,} output pixels is over max_job_pixels {cap:,}; "
        "raise it (--max-job-pixels N) to run a job this large"
    )


@dataclass
class JobPlan:
    images: int
    failed_rows: int
    pixels: int
    largest: tuple[int, int]
    unet_evals: int
    device: str
    workers: int
    max_job_pixels: int
    rate: float | None = None  # UNet evaluations per second per worker, measured
    rate_from: str | None = None  # the generations version it was measured on
    row_evals: Any = None  # UNet evaluations of each prompt row (0 for an invalid one), a numpy array

    def shard_ranges(self, shard_size: int | None, workers: int) -> list[tuple[int, int]]:
        """The job's shard tasks (`plan_shards` over each row's UNet evaluations)."""
        return plan_shards(self.row_evals.tolist() if self.row_evals is not None else [], shard_size, workers)

    @property
    def seconds(self) -> float | None:
        return self.unet_evals / (self.rate * self.workers) if self.rate else None

    def lines(self) -> list[str]:
        w, h = self.largest
        out = [
            f"images: {self.images:,} to render ({self.failed_rows:,} prompt rows invalid)",
            f"output pixels: {self.pixels:,} ({self.pixels / 1e9:.2f} gigapixels; largest {w}x{h}); "
            f"max_job_pixels {self.max_job_pixels:,}",
            f"UNet evaluations (tiles, both stages, guidance counted): {self.unet_evals:,}",
        ]
        if self.rate:
            out.append(
                f"estimated time: {_duration(self.seconds or 0)} on {self.workers} {self.device} worker(s) "
                f"at {self.rate:.1f} UNet evals/s each (measured by {self.rate_from})"
            )
        else:
            out.append(
                f"estimated time: unknown (no generations version of this model rendered on {self.device} "
                f"in the store yet)"
            )
        if self.pixels > self.max_job_pixels:
            out.append(self.refusal())
        return out

    def refusal(self) -> str:
        return over_cap(self.pixels, self.max_job_pixels)

    def check(self) -> None:
        if self.pixels > self.max_job_pixels:
            raise JobTooLarge(self.refusal())

    def table(self) -> list[dict[str, Any]]:
        return [{"what": line.split(": ", 1)[0], "value": line.split(": ", 1)[-1]} for line in self.lines()]


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def device_kind(device: str) -> str:
    """cuda or cpu: what `auto` resolves to here."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":", 1)[0]


def measured_rate(store: ArtifactStore, model_ref: str, kind: str) -> tuple[float, str] | None:
    """The newest measured rate of this model version on this kind of device (catalog rows)."""
    import polars as pl

    cat = pl.DataFrame(store.catalog())
    if cat.height == 0:
        return None
    metric = RATE_METRIC.format(kind)
    rows = cat.filter((pl.col("kind") == "generations") & pl.col("parents").list.contains(model_ref))
    for row in rows.sort("committed_at", descending=True).iter_rows(named=True):
        rate = dict(row["metrics"] or []).get(metric)
        if rate:
            return float(rate), row["ref"]
    return None


PLAN_COLUMNS = ("width", "height", "steps", "guidance_scale", "strength", "error")
_PLANNED: dict[
    str, JobPlan
] = {}  # the last plans of this process: the CLI's check and the stage's resolve share one
_PLANS_KEPT = 2


def plan_job(store: ArtifactStore, model_ref: str, table: pa.Table, settings: Any) -> JobPlan:
    """The plan of rendering `table` (a validated prompt table) with `model_ref` and `settings`
    (a `tasks.generate.GenerateSettings`), made once per process for the same job: `asd generate`
    plans before it starts the flow (to refuse a job too large in one line), and the flow's stage
    finds that plan instead of costing every row again (the prompts stored in between are the
    same rows: the key hashes the planned columns themselves)."""
    # the planned columns' values (their bytes differ with chunking, metadata and what lies under nulls)
    cols = {c: table.column(c).to_pylist() for c in PLAN_COLUMNS}
    digest = hashlib.sha256(json.dumps(list(cols.values())).encode())
    key = json.dumps(
        [store.url, model_ref, digest.hexdigest(), settings.model_dump(mode="json")], sort_keys=True
    )
    if key not in _PLANNED:
        while len(_PLANNED) >= _PLANS_KEPT:
            _PLANNED.pop(next(iter(_PLANNED)))
        _PLANNED[key] = _costed(store, model_ref, cols, settings)
    plan = dataclasses.replace(_PLANNED[key])  # the rows' costs once; the measured rate as it is now
    found = measured_rate(store, model_ref, plan.device)
    if found:
        plan.rate, plan.rate_from = found
    return plan


def _costed(store: ArtifactStore, model_ref: str, cols: dict[str, list[Any]], settings: Any) -> JobPlan:
    """Every row of the job costed (no measured rate: that is read at each plan)."""
    geo = ModelGeometry.of(store, model_ref)
    buckets = asd_buckets(base=geo.sample_size * geo.vae_scale_factor, step=geo.pixel_multiple)
    pixels = evals = images = 0
    largest = (0, 0)
    rows = len(cols["width"])
    row_evals = np.zeros(rows, dtype=np.int64)
    for i, (w, h, st, g, sg, err) in enumerate(zip(*cols.values(), strict=True)):
        if err is not None:
            continue
        nearest_bucket(w, h, buckets)  # the same rule stage 1 uses (a size it cannot take fails here)
        images += 1
        pixels += w * h
        largest = max(largest, (w, h), key=lambda s: s[0] * s[1])
        guidance = settings.guidance_scale if g is None else g
        row_evals[i] = image_unet_evals(
            geo,
            settings.sampler,
            settings.tile,
            settings.offset_salt,
            w,
            h,
            st or settings.steps,
            sg or settings.strength,
            guidance != 1.0,
            settings.sampler_options,
        )
        evals += int(row_evals[i])
    kind = device_kind(settings.device)
    plan = JobPlan(
        images,
        rows - images,
        pixels,
        largest,
        evals,
        kind,
        settings.workers,
        settings.max_job_pixels,
        row_evals=row_evals,
    )
    return plan


MAX_SHARD_ROWS = 1000


def plan_shards(costs: list[int], shard_size: int | None, workers: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of the shard tasks, largest first. `shard_size` given: that many
    rows each. Else about 4 shards per worker (so a straggler or a lost worker costs little),
    at most `MAX_SHARD_ROWS` rows each, cut where the running cost (pixels x steps) crosses
    equal shares, so mixed sizes do not leave workers idle behind one heavy shard."""
    n_rows = len(costs)
    if n_rows == 0:
        return []
    if shard_size:
        ranges = [(i, min(n_rows, i + shard_size)) for i in range(0, n_rows, shard_size)]
    else:
        n = min(n_rows, max(4 * workers, -(-n_rows // MAX_SHARD_ROWS)))
        weights = costs if sum(costs) else [1] * n_rows
        ranges, start, acc, remaining = [], 0, 0, sum(weights)
        for i, c in enumerate(weights):
            left = n - len(ranges)  # shards still to make, the open one included
            if (
                i > start
                and left > 1
                and (
                    acc + c / 2 > remaining / left  # this row would overfill the share
                    or n_rows - i < left  # every shard left needs a row
                    or i - start >= MAX_SHARD_ROWS
                )
            ):
                ranges.append((start, i))
                start, remaining, acc = i, remaining - acc, 0
            acc += c
        ranges.append((start, n_rows))
    return sorted(ranges, key=lambda r: -sum(costs[r[0] : r[1]]))

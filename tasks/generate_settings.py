"""What a generation job is asked for (`GenerateSettings`) and how each image is named from it
(`image_identity`, `image_key`: exactly once), what its shard tasks share and report
(`GenerationJob`, `ShardResult`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from artifact_store import PendingVersion
from data_manifests.schemas import GENERATIONS_MANIFEST, STATUS_FAILED
from data_manifests.settings import execution, output
from tasks.fragments import (
    FragmentRef,
)
from tasks.render import RenderSettings

if TYPE_CHECKING:
    from asd_models.pipeline import RenderRequest


class GenerateSettings(RenderSettings):
    """FSTD generation: how every prompt of a job is rendered."""

    shard_size: int | None = execution(
        None,
        ge=1,
        description="prompts per generation task (default: about 4 "
        "tasks per worker, equal in pixels x steps, at most 1000 rows each)",
    )
    chunk_rows: int = execution(
        32,
        ge=1,
        le=4096,
        description="prompt rows per durability point: a chunk's "
        "fragment is written once its images are (a killed worker loses at most one chunk)",
    )
    retries: int = execution(2, ge=0, description="retries of a failed shard task (a lost worker, an error)")
    image_parallel: int = execution(
        1,
        ge=1,
        le=64,
        description="processes that render each pack together, each taking a share of every step's "
        "pieces (one per GPU, rank k on the k-th visible GPU; gloo on CPUs): for images too large for one "
        "device's time. The images are the one-process images (equal with --tile-batch-size 1; a batch's "
        "float rounding may move a pixel by one level otherwise)",
    )
    layout: Literal["files", "webdataset"] = output(
        "files",
        description="files: one PNG object per image (what dashboards and S3 readers link to); webdataset: "
        "each chunk's images, seam heat-maps and JSON in one tar shard `shards/rows-<first>-<last>.tar` (two writes a "
        "chunk instead of two an image: for jobs of millions); outputs over large_image_pixels stay separate files",
    )

    def render_request(self, row: dict[str, Any]) -> RenderRequest:
        """A prompt row as the pipeline's request (the row's own steps, guidance and strength win)."""
        from asd_models.pipeline import RenderRequest

        return RenderRequest(
            row["prompt"],
            row["width"],
            row["height"],
            row["seed"],
            row["negative_prompt"] or "",
            row["steps"] or self.steps,
            self.guidance_scale if row["guidance_scale"] is None else row["guidance_scale"],
            row["strength"] or self.strength,
            self.noise_level,
        )


@dataclass(frozen=True)
class GenerationJob:
    """Everything a shard task needs, small and picklable (no prompt text: tasks read their
    rows from the stored prompts artifact, so a 100k-prompt job fits Prefect's parameter cap)."""

    store_url: str
    model: str  # resolved models/NAME@VERSION
    prompts: str  # resolved prompts/NAME@VERSION
    pending: PendingVersion
    settings: GenerateSettings


@dataclass
class ShardResult:
    """What one shard task tells the flow (a few hundred bytes whatever its size): the fragments
    that hold its rows, counts, the UNet evaluations and device seconds of what it rendered now,
    and where it ran."""

    fragments: list[FragmentRef] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    rendered: int = 0
    rendered_evals: int = 0
    rendered_seconds: float = 0.0
    device_kind: str = ""  # cuda or cpu, where it rendered
    worker: str = ""
    model_loads: int = 0


def image_identity(model: str, row: dict[str, Any], settings: GenerateSettings) -> str:
    """Hash of what decides an image's pixels: model version, prompt row, render settings."""
    fields = {
        k: row[k]
        for k in (
            "prompt",
            "negative_prompt",
            "width",
            "height",
            "seed",
            "steps",
            "guidance_scale",
            "strength",
        )
    }
    blob = json.dumps(
        {"model": model, "row": fields, "settings": settings.identity()}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def image_key(row: dict[str, Any], identity: str) -> str:
    return f"{row['row']:06d}-{row['width']}x{row['height']}-{identity[:12]}"


def invalid_row(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {f.name: None for f in GENERATIONS_MANIFEST}
    out.update(
        key=f"{row['row']:06d}-invalid",
        row=row["row"],
        prompt=row.get("prompt"),
        width=row.get("width"),
        height=row.get("height"),
        seed=row.get("seed"),
        status=STATUS_FAILED,
        error=f"prompt row {row['row']}: {row['error']}",
    )
    return out

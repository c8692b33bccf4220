"""FSTD generation tasks: one task per shard of prompts, one model load per worker, and the
commit of the whole generations version once every shard is done."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from artifact_store import ArtifactRef, ArtifactStore, PendingVersion
from data_manifests.schemas import GENERATIONS_MANIFEST, STATUS_FAILED, STATUS_OK
from data_manifests.settings import GenerateSettings, PromptSpec
from tasks.model_cache import cached_pipeline
from tasks.progress import Progress
from tasks.runtime import commit_in_run, run_logger


def image_key(index: int, width: int, height: int) -> str:
    return f"{index:06d}-{width}x{height}"


@dataclass
class ShardOutput:
    """What one shard task wrote into the pending version: manifest rows (failures included)
    and the files it put, with their sha256 and size (for the commit record)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)


def _render_one(pipe: Any, p: PromptSpec, key: str, settings: GenerateSettings, fstd: Any) -> Any:
    with Progress(f"generate {key}", total=settings.steps, unit="step") as progress:
        def on_step(stage: str, step: int, total: int, done: int, tiles: int) -> None:
            if stage != "fstd":
                return
            if progress.total != total:
                progress.set_total(total)
            progress.update(step + (done == tiles))
            progress.note(f"tiles {done}/{tiles}")

        res = pipe(p.prompt, p.width, p.height, num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance_scale, strength=settings.strength, seed=p.seed, fstd=fstd,
                   progress=on_step, noise_level=settings.noise_level)
    if res.image.size != (p.width, p.height):
        raise RuntimeError(f"pipeline returned {res.image.size}, expected {(p.width, p.height)}")
    return res


@task(name="generate-shard")
def generate_shard(store_url: str, model_ref: str, pending: PendingVersion, shard: list[tuple[int, PromptSpec]],
                   settings: GenerateSettings) -> ShardOutput:
    """Render one shard of (index, prompt) into the pending generations version."""
    logger = run_logger()
    store = ArtifactStore(store_url)
    pipe = cached_pipeline(store_url, model_ref, settings.upscaler)
    writer = store.writer(pending)
    fstd = pipe.default_fstd(settings.tile, settings.tile_batch_size)
    out = ShardOutput()
    for index, p in shard:
        key = image_key(index, p.width, p.height)
        row = {f.name: None for f in GENERATIONS_MANIFEST}
        row.update(key=key, prompt=p.prompt, width=p.width, height=p.height, seed=p.seed)
        t0 = time.perf_counter()
        try:
            res = _render_one(pipe, p, key, settings, fstd)
            buf = io.BytesIO()
            res.image.save(buf, format="PNG")
            rel = f"images/{key}.png"
            out.files[rel] = writer.put_bytes(rel, buf.getvalue())
            row.update(status=STATUS_OK, image=rel, bucket=res.bucket.name, canvas_width=res.canvas[0],
                       canvas_height=res.canvas[1], tile_px=res.tile_px, fstd_tiles=res.fstd_tiles,
                       seam_x=res.seam_lines["x"], seam_y=res.seam_lines["y"])
        except (ValueError, RuntimeError) as exc:
            logger.error("prompt %s failed: %s", key, exc)
            row.update(status=STATUS_FAILED, error=f"{type(exc).__name__}: {exc}")
        row["seconds"] = time.perf_counter() - t0
        out.rows.append(row)
        logger.info("%s %s in %.1f s", key, row["status"], row["seconds"])
    return out


@task(name="commit-generations")
def commit_generations(store_url: str, pending: PendingVersion, outputs: list[ShardOutput], parents: list[str],
                       params: dict[str, Any]) -> str:
    """Adopt the shards' files, write the generations manifest, commit the version once."""
    store = ArtifactStore(store_url)
    writer = store.writer(pending)
    rows = []
    for o in outputs:
        writer.add_files(o.files)
        rows += o.rows
    rows.sort(key=lambda r: r["key"])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATIONS_MANIFEST), buf)
    writer.put_bytes("manifest.parquet", buf.getvalue())
    ok = sum(r["status"] == STATUS_OK for r in rows)
    ref: ArtifactRef = commit_in_run(writer, parents=parents, params=params,
                                     summary={"images_ok": ok, "images_failed": len(rows) - ok})
    return str(ref)

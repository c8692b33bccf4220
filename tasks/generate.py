"""FSTD generation tasks: one task per shard of prompts, one model load per worker."""

from __future__ import annotations

import io
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from data_manifests.schemas import GENERATIONS_MANIFEST, STATUS_FAILED, STATUS_OK
from tasks.models import cached_pipeline
from tasks.progress import Progress
from tasks.runtime import current_flow_run_id
from tasks.store import ArtifactStore


def image_key(index: int, width: int, height: int) -> str:
    return f"{index:06d}-{width}x{height}"


@task(name="generate-shard")
def generate_shard(
    store_url: str, model_ref: str, generations: str, version: str, shard: list[dict[str, Any]],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Render one shard of prompts (each with its `index`) into the given generations version.
    Returns the files written and one manifest row per prompt (failures included)."""
    logger = get_run_logger()
    store = ArtifactStore(store_url)
    pipe = cached_pipeline(store_url, model_ref, settings.get("upscaler"))
    writer = store.new_version("generations", generations, version)
    fstd = pipe.default_fstd(settings.get("tile"), settings.get("tile_batch_size", 16))
    rows = []
    for p in shard:
        key = image_key(p["index"], p["width"], p["height"])
        row = {f.name: None for f in GENERATIONS_MANIFEST}
        row.update(key=key, prompt=p["prompt"], width=p["width"], height=p["height"], seed=p["seed"])
        t0 = time.perf_counter()
        try:
            with Progress(f"generate {key}", total=settings["steps"], unit="step") as progress:
                def on_step(stage: str, step: int, total: int, done: int, tiles: int) -> None:
                    if stage != "fstd":
                        return
                    if progress.total != total:
                        progress.set_total(total)
                    progress.update(step + (done == tiles))
                    progress.note(f"tiles {done}/{tiles}")

                res = pipe(p["prompt"], p["width"], p["height"], num_inference_steps=settings["steps"],
                           guidance_scale=settings["guidance_scale"], strength=settings["strength"],
                           seed=p["seed"], fstd=fstd, progress=on_step,
                           noise_level=settings.get("noise_level", 20))
            if res.image.size != (p["width"], p["height"]):
                raise RuntimeError(f"pipeline returned {res.image.size}, expected {(p['width'], p['height'])}")
            buf = io.BytesIO()
            res.image.save(buf, format="PNG")
            rel = f"images/{key}.png"
            writer.put_bytes(rel, buf.getvalue())
            row.update(status=STATUS_OK, image=rel, bucket=res.bucket.name, canvas_width=res.canvas[0],
                       canvas_height=res.canvas[1], tile_px=res.tile_px, tiles_per_step=res.tiles_per_step,
                       seam_x=res.seam_lines["x"], seam_y=res.seam_lines["y"])
        except (ValueError, RuntimeError) as exc:
            logger.error("prompt %s failed: %s", key, exc)
            row.update(status=STATUS_FAILED, error=f"{type(exc).__name__}: {exc}")
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        logger.info("%s %s in %.1f s", key, row["status"], row["seconds"])
    return {"files": writer.files, "rows": rows}


@task(name="commit-generations")
def commit_generations(
    store_url: str, generations: str, version: str, shard_results: list[dict[str, Any]], parents: list[str],
    params: dict[str, Any], input_hash: str,
) -> str:
    """Merge the shards' files, write the generations manifest, commit the version."""
    store = ArtifactStore(store_url)
    writer = store.new_version("generations", generations, version)
    rows = []
    for r in shard_results:
        writer.add_files(r["files"])
        rows += r["rows"]
    rows.sort(key=lambda r: r["key"])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATIONS_MANIFEST), buf)
    writer.put_bytes("manifest.parquet", buf.getvalue())
    ok = sum(r["status"] == STATUS_OK for r in rows)
    ref = writer.commit(
        parents=parents, params=params, flow_run_id=current_flow_run_id(), input_hash=input_hash,
        summary={"images_ok": ok, "images_failed": len(rows) - ok},
    )
    return str(ref)

"""Writing rendered images into a pending version, shared by generation and upscaling: the image
file (PNG, or for a large output a streamed PNG / tiled TIFF with its Deep Zoom pyramid and
viewer page), its seam heat-map, the manifest fields every rendered image has, the members of a
webdataset tar, and the viewer's assets once per version. The only module of the stages that
imports the dashboard's viewer."""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from artifact_store.members import TarPacker
from asd_models.large_images import write_deep_zoom, write_png_stream, write_tiff
from asd_models.seams import HEATMAP_MAX_PIXELS, seam_heatmap_rgb, seam_scores
from dashboard.viewer import ASSETS_DIR as VIEWER_ASSETS
from dashboard.viewer import vendor_files, viewer_page
from data_manifests.schemas import STATUS_OK


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def seam_heatmap_png(pixels: np.ndarray, xs: list[int], ys: list[int]) -> bytes | None:
    """The image's seam heat-map (`<key>.seams.png`; none for images over HEATMAP_MAX_PIXELS)."""
    if pixels.shape[0] * pixels.shape[1] > HEATMAP_MAX_PIXELS:
        return None
    return png_bytes(seam_heatmap_rgb(np.asarray(pixels), xs, ys))


def rendered_fields(res: Any) -> dict[str, Any]:
    """The manifest fields every rendered image has (an `AnySizeResult`), whichever layout stores
    it; its seam scores where it is small enough to score where the pixels are (evaluate then
    reads only its sample)."""
    fields = {
        "status": STATUS_OK,
        "bucket": res.bucket.name,
        "canvas_width": res.canvas[0],
        "canvas_height": res.canvas[1],
        "tile_px": res.tile_px,
        "fstd_tiles": res.fstd_tiles,
        "seam_x": res.seam_lines["x"],
        "seam_y": res.seam_lines["y"],
        "unet_evals": res.unet_evals,
        "piece_shapes": res.piece_shapes,
    }
    h, w, _ = res.pixels.shape
    if w * h <= HEATMAP_MAX_PIXELS:
        fields["seam_score"], fields["seam_score_x"], fields["seam_score_y"] = seam_scores(
            res.pixels, res.seam_lines["x"], res.seam_lines["y"]
        )
    return fields


def write_image(writer: Any, key: str, pixels: np.ndarray, settings: Any) -> tuple[str, str, dict[str, Any]]:
    """The image file: (path, format, files written beside it). Outputs over
    `settings.large_image_pixels` go from the (memory-mapped) pixels to the store as they are
    encoded, with a Deep Zoom pyramid and viewer page when `settings.deep_zoom`; the rest are PNG."""
    h, w, _ = pixels.shape
    if w * h <= settings.large_image_pixels:
        rel = f"images/{key}.png"
        writer.put_bytes(rel, png_bytes(pixels))
        return rel, "png", {}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="asd-large-") as tmp:
        if (
            settings.large_image_format == "tiff"
        ):  # libvips seeks while writing a TIFF: a local file, then streamed
            rel, fmt = f"images/{key}.tif", "tiff"
            write_tiff(pixels, Path(tmp) / "image.tif")
            writer.put_file(rel, Path(tmp) / "image.tif")
            (Path(tmp) / "image.tif").unlink()
        else:
            rel, fmt = f"images/{key}.png", "png-stream"
            with writer.open(rel) as f:
                write_png_stream(pixels, f)
        if settings.deep_zoom:
            dz = write_deep_zoom(pixels, Path(tmp) / "dz", key)
            before = set(writer.files)
            writer.put_dir(Path(tmp) / "dz", prefix="images")
            page = viewer_page(f"{key} ({w}x{h})", dz, f"{key}_files", f"../{VIEWER_ASSETS}")
            writer.put_bytes(f"images/{key}.html", page.encode())
            extra = {k: writer.files[k] for k in set(writer.files) - before}
            extra[f"images/{key}.html"] = writer.files[f"images/{key}.html"]
    return rel, fmt, extra


def file_entries(files: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Files as a fragment lists them (path, sha256, size, S3 VersionId), in path order."""
    return [
        {"path": k, "sha256": m["sha256"], "size": m["size"], "version_id": m.get("version_id")}
        for k, m in sorted(files.items())
    ]


def store_rendered(writer: Any, row: dict[str, Any], key: str, res: Any, settings: Any) -> dict[str, Any]:
    """A rendered image as files of the pending version: the image (`write_image`) and its seam
    heat-map beside it; `row` filled with the rendered fields, the image's path, format, pyramid
    and viewer, and `files` (what a fragment lists for it). Returns `row`."""
    rel, fmt, extra = write_image(writer, key, res.pixels, settings)
    files = {rel: writer.files[rel], **extra}
    row.update(
        rendered_fields(res),
        image=rel,
        image_format=fmt,
        deep_zoom=f"images/{key}.dzi" if f"images/{key}.dzi" in extra else None,
        viewer=f"images/{key}.html" if f"images/{key}.html" in extra else None,
    )
    heat = seam_heatmap_png(res.pixels, row["seam_x"], row["seam_y"])
    if heat is not None:  # beside the image: where its tile lines are and how they look
        files[f"images/{key}.seams.png"] = writer.put_bytes(f"images/{key}.seams.png", heat)
    row["files"] = file_entries(files)
    return row


def tar_members(row: dict[str, Any], key: str, res: Any) -> list[tuple[str, bytes]]:
    """A rendered image's members in a webdataset tar (`<key>.png`, `<key>.seams.png`, `<key>.json`:
    prompt, size, seed); `row` filled with the rendered fields and its member as `image`."""
    row.update(rendered_fields(res), image=f"{key}.png", image_format="png")
    members = [(f"{key}.png", png_bytes(res.pixels))]
    heat = seam_heatmap_png(res.pixels, row["seam_x"], row["seam_y"])
    if heat is not None:
        members.append((f"{key}.seams.png", heat))
    caption = {k: row[k] for k in ("key", "row", "prompt", "width", "height", "seed")}
    members.append((f"{key}.json", json.dumps(caption, sort_keys=True).encode()))
    return members


def shard_tar_name(rows: list[dict[str, Any]]) -> str:
    """The tar of a chunk's images in the webdataset layout, named after the first and last rows
    it holds (the file list lists it with its first row: `artifact_store.file_lists` finds it)."""
    return f"shards/rows-{min(r['row'] for r in rows):06d}-{max(r['row'] for r in rows):06d}.tar"


def write_shard_tar(writer: Any, entries: list[dict[str, Any]]) -> None:
    """Pack the entries' members (`_members`: each image's PNG, seam heat-map and JSON, in row
    order) into their tar, set each entry's offset and size in it, and list the tar with the
    first entry's files."""
    packed = sorted((e for e in entries if e.get("_members")), key=lambda e: e["row"])
    if not packed:  # every image of the chunk failed, or is a large output stored apart
        return
    packer, rel = TarPacker(), shard_tar_name(packed)
    for e in packed:
        for name, data in e.pop("_members"):
            at = packer.add(name, data)
            if name == e["image"]:
                e["shard"], (e["shard_offset"], e["shard_size"]) = rel, at
                e["shard_sha256"] = hashlib.sha256(data).hexdigest()
    with writer.open(rel) as f:
        tar = packer.finish()
        while block := tar.read(8 << 20):
            f.write(block)
    packed[0]["files"] = [*packed[0]["files"], *file_entries({rel: writer.files[rel]})]


def add_viewer_assets(writer: Any) -> None:
    """The viewer pages' OpenSeadragon, once per version that has a large output."""
    for rel, path in vendor_files().items():
        writer.put_file(rel, path)

"""Arrow schemas of every manifest the pipeline writes. Defined once, used everywhere."""

from __future__ import annotations

import pyarrow as pa

STATUS_OK = "ok"
STATUS_FAILED = "failed"

DATASET_MANIFEST = pa.schema(
    [
        ("key", pa.string()),  # sanitized sample key (tar member basename)
        ("source", pa.string()),  # where the input came from (path or URL)
        ("caption", pa.string()),
        ("status", pa.string()),  # ok | failed
        ("error", pa.string()),  # reason when failed, else null
        ("failed_stage", pa.string()),  # source | caption | download | read | decode | validate | duplicate
        ("original_width", pa.int32()),  # upright (EXIF applied) size of the input
        ("original_height", pa.int32()),
        ("width", pa.int32()),  # final (bucket) size
        ("height", pa.int32()),
        ("bucket", pa.string()),  # "WxH"
        ("aspect_error", pa.float64()),  # |log aspect(image) - log aspect(bucket)|
        ("cover_width", pa.int32()),  # the image resized to cover the bucket (crop box is inside it)
        ("cover_height", pa.int32()),
        ("crop_left", pa.int32()),  # crop box in the resized-to-cover image
        ("crop_top", pa.int32()),
        ("crop_right", pa.int32()),
        ("crop_bottom", pa.int32()),
        ("sha256", pa.string()),  # sha256 of the decoded RGB pixels (duplicate detection)
        ("shard", pa.string()),  # shard path relative to the version
        ("bytes", pa.int64()),  # encoded image size in the shard
        ("fingerprint", pa.string()),  # input identity (path+stat+caption, url+caption, shard+key): reuse key
        ("reused", pa.bool_()),  # copied from the previous version instead of processed again
    ]
)

PROMPTS = pa.schema(
    [  # prompts/<name>/<v>/prompts.parquet: every row of the file given
        ("row", pa.int64()),  # 1-based row number in that file
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("seed", pa.uint64()),
        ("steps", pa.int32()),  # null: the job's setting
        ("guidance_scale", pa.float64()),
        ("strength", pa.float64()),
        ("error", pa.string()),  # why the row cannot be rendered (null when it can)
    ]
)

GENERATIONS_MANIFEST = pa.schema(
    [
        ("key", pa.string()),  # <row>-<W>x<H>-<image id>: the image id hashes model, prompt row, settings
        ("row", pa.int64()),  # row of the prompts artifact
        ("prompt", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("seed", pa.uint64()),  # [0, 2^64): what torch.Generator.manual_seed takes
        ("status", pa.string()),
        ("error", pa.string()),
        ("image", pa.string()),  # path relative to the version
        ("bucket", pa.string()),  # ARAD stage-1 bucket
        ("canvas_width", pa.int32()),  # FSTD canvas before the exact crop
        ("canvas_height", pa.int32()),
        ("tile_px", pa.int32()),
        ("fstd_tiles", pa.int64()),  # tiles FSTD ran through the UNet over all stage-2 steps
        ("seam_x", pa.list_(pa.int32())),  # unshifted tile grid lines in the final image
        ("seam_y", pa.list_(pa.int32())),
        ("seconds", pa.float64()),
        ("unet_evals", pa.int64()),  # UNet samples evaluated, both stages (guidance counts twice)
        ("peak_memory_mb", pa.float64()),  # peak GPU memory of the batch it rendered in (CPU: peak RSS)
        ("device", pa.string()),
        ("worker", pa.string()),  # host:pid that rendered it
        ("image_format", pa.string()),  # png | png-stream (streamed as encoded) | tiff (tiled pyramidal)
        ("deep_zoom", pa.string()),  # DZI pyramid of a large output (path relative to the version), or null
        ("viewer", pa.string()),  # its zoomable viewer page (OpenSeadragon), or null
        ("peak_rss_mb", pa.float64()),  # peak resident memory of the worker while rendering and writing it
        ("shard", pa.string()),  # layout webdataset: the tar holding the image (member `image`), else null
        ("shard_offset", pa.int64()),  # the image member's data offset in that tar
        ("shard_size", pa.int64()),  # and its size in bytes
        ("shard_sha256", pa.string()),  # and the sha256 of its bytes (a reader checks the member alone)
        (
            "seam_score",
            pa.float64(),
        ),  # tile-seam score (asd_models.seams, VAE lattice), computed where the pixels were
        ("seam_score_x", pa.float64()),  # the same for vertical tile lines only
        ("seam_score_y", pa.float64()),  # and horizontal ones
        ("piece_shapes", pa.string()),  # how FSTD's pieces grew: exact (CPU) | bucketed (CUDA: few shapes)
    ]
)

UPSCALES_MANIFEST = pa.schema(
    [  # upscales/<name>: the generation fields (key, image, seams, ...) plus the input's
        *GENERATIONS_MANIFEST,
        ("source", pa.string()),  # where the input came from (path, URL without credentials, shard#key)
        ("input_sha256", pa.string()),  # sha256 of the input file's bytes
        ("input_width", pa.int32()),  # upright (EXIF applied) size of the input
        ("input_height", pa.int32()),
        ("strength", pa.float64()),
        ("steps", pa.int32()),
        ("failed_stage", pa.string()),  # source | download | read | decode | validate | target | render
        (
            "roundtrip_ssim",
            pa.float64(),
        ),  # the output downscaled to the input's size against the input: SSIM (grey)
        ("roundtrip_color_error", pa.float64()),  # and mean |difference| of the RGB channel means, in 0..255
    ]
)

FILE_ENTRY = pa.struct(
    [("path", pa.string()), ("sha256", pa.string()), ("size", pa.int64()), ("version_id", pa.string())]
)  # one file of a version (version_id: S3 only)

# a chunk of a generation job, durable in its pending version (`_fragments/rows-<a>-<b>.parquet`):
# the chunk's manifest rows, each with the files it wrote
GENERATION_FRAGMENT = pa.schema([*GENERATIONS_MANIFEST, ("files", pa.list_(FILE_ENTRY))])
# one finished image of an upscale job (`_fragments/img-<partition>-<n>.parquet`)
UPSCALE_FRAGMENT = pa.schema([*UPSCALES_MANIFEST, ("files", pa.list_(FILE_ENTRY))])

# the file list of a large version, in parts the commit record points at (`_files/part-<n>.parquet`),
# in row order of the version's manifest (`row`: the manifest row a file belongs to; null for none)
FILE_LIST = pa.schema(
    [
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("size", pa.int64()),
        ("version_id", pa.string()),
        ("row", pa.int64()),
    ]
)

METRICS = pa.schema(
    [
        ("metric", pa.string()),
        ("value", pa.float64()),  # null when skipped
        ("status", pa.string()),  # ok | skipped
        ("detail", pa.string()),  # sample counts, seeds, or why it was skipped
    ]
)

CATALOG = pa.schema(
    [
        ("kind", pa.string()),
        ("name", pa.string()),
        ("version", pa.string()),
        ("ref", pa.string()),
        ("committed_at", pa.timestamp("us", tz="UTC")),
        ("size_bytes", pa.int64()),
        ("file_count", pa.int32()),
        ("parents", pa.list_(pa.string())),
        ("flow_run_id", pa.string()),
        ("code_version", pa.string()),
        ("metrics", pa.map_(pa.string(), pa.float64())),  # numeric summary: losses, sample counts, KID...
        ("uri", pa.string()),
    ]
)

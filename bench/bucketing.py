"""Bucketing a whole manifest at once (polars + numpy): millions of rows in seconds.

Used to re-bucket an existing manifest with another table without decoding a single image,
and for bucket statistics. Same rule as `asd_models.buckets.nearest_bucket`.
"""

from __future__ import annotations

import polars as pl

from asd_models.buckets import Bucket, assign_buckets


def bucket_frame(
    df: pl.DataFrame, buckets: list[Bucket], width: str = "original_width", height: str = "original_height"
) -> pl.DataFrame:
    """Adds `bucket`, `width`, `height` and `aspect_error` for every row with a positive size
    (others get nulls)."""
    w = df[width].cast(pl.Float64)
    h = df[height].cast(pl.Float64)
    good = (w > 0) & (h > 0) & w.is_not_null() & h.is_not_null()
    good = good.fill_null(False)
    wn = w.fill_null(1.0).to_numpy().copy()
    hn = h.fill_null(1.0).to_numpy().copy()
    bad = ~good.to_numpy()
    wn[bad] = 1.0
    hn[bad] = 1.0
    idx, err, table = assign_buckets(wn, hn, buckets)
    names = pl.Series("bucket", [b.name for b in table], dtype=pl.String)
    widths = pl.Series([b.width for b in table], dtype=pl.Int32)
    heights = pl.Series([b.height for b in table], dtype=pl.Int32)
    idx_s = pl.Series("idx", idx, dtype=pl.UInt32)
    return df.with_columns(
        pl.when(good).then(names.gather(idx_s)).otherwise(None).alias("bucket"),
        pl.when(good).then(widths.gather(idx_s)).otherwise(None).alias("width"),
        pl.when(good).then(heights.gather(idx_s)).otherwise(None).alias("height"),
        pl.when(good).then(pl.Series(err)).otherwise(None).alias("aspect_error"),
    )


def bucket_stats(df: pl.DataFrame) -> pl.DataFrame:
    """Per bucket: count, share of rows, mean and max aspect error (rows with a bucket only)."""
    out = (
        df.filter(pl.col("bucket").is_not_null())
        .group_by("bucket")
        .agg(
            pl.len().alias("count"),
            pl.col("aspect_error").mean().alias("mean_aspect_error"),
            pl.col("aspect_error").max().alias("max_aspect_error"),
        )
    )
    total = out["count"].sum() or 1
    return out.with_columns((pl.col("count") / total).alias("share")).sort("bucket")

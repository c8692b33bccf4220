"""Buckets, tile geometry and the seam score."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asd_models.buckets import Bucket, asd_buckets, nearest_bucket
from asd_models.images import resize_cover_crop
from asd_models.seams import grid_lines, seam_score
from asd_models.tiling import grid_boxes, tile_starts
from tests.helpers import smooth_image


def test_asd_table_has_nine_ratios_around_the_base_area():
    buckets = asd_buckets(512, 64)
    assert len(buckets) == 9
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert 0.75 < b.width * b.height / 512**2 < 1.25
    assert Bucket(512, 512) in buckets


@pytest.mark.parametrize(
    "size,expected",
    [
        ((1000, 1000), (512, 512)),
        ((1920, 1080), (704, 384)),
        ((1080, 1920), (384, 704)),
        ((600, 400), (640, 448)),
    ],
)
def test_nearest_bucket_by_log_aspect(size, expected):
    b = nearest_bucket(*size, asd_buckets(512, 64))
    assert (b.width, b.height) == expected


def test_nearest_bucket_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        nearest_bucket(0, 10, asd_buckets())


def test_resize_cover_crop_never_stretches():
    from PIL import Image

    img = Image.new("RGB", (300, 100))
    out, box = resize_cover_crop(img, 128, 128)
    assert out.size == (128, 128)
    assert box == (128, 0, 256, 128)  # resized to 384x128, centre crop


@pytest.mark.parametrize(
    "length,tile,offset", [(64, 16, 0), (64, 16, 5), (70, 16, 3), (10, 16, 4), (17, 16, 15)]
)
def test_tiles_cover_every_position_with_one_shape(length, tile, offset):
    starts = tile_starts(length, tile, offset)
    t = min(tile, length)
    covered = np.zeros(length, bool)
    for s in starts:
        assert 0 <= s <= length - t
        covered[s : s + t] = True
    assert covered.all()


def test_unshifted_grid_costs_ceil_tiles_and_shift_adds_an_edge_row():
    assert len(grid_boxes(128, 128, 64)) == 4
    assert len(grid_boxes(135, 240, 16)) == math.ceil(135 / 16) * math.ceil(240 / 16)
    assert len(grid_boxes(128, 128, 64, 10, 10)) == 9  # edge tile + 2 shifted per axis


def test_seam_score_catches_a_planted_seam_and_not_asmooth_image():
    smooth = smooth_image(0)
    lines = grid_lines(256, 64)
    assert lines == [64, 128, 192]
    clean = seam_score(smooth, lines, lines)
    seamed = smooth.copy()
    seamed[:, 128:] += 25  # brightness steps at tile borders
    seamed[128:, :] += 25
    assert 0.8 < clean < 1.2
    assert seam_score(seamed, lines, lines) > 1.5
    assert math.isnan(seam_score(smooth, [], []))


def test_seam_score_ignores_the_vae_lattice_but_not_a_seam_on_it():
    img = smooth_image(1)
    img[:, ::8] += 15  # a decoder pattern every 8 px, tile lines included
    img[::8, :] += 15
    lines = grid_lines(256, 64)
    assert seam_score(img, lines, lines, period=1) > 1.5  # naive baseline is fooled
    assert 0.8 < seam_score(img, lines, lines, period=8) < 1.2
    for p in lines:  # a step at every vertical tile border
        img[:, p:] += 20
    assert seam_score(img, lines, lines, period=8) > 1.3


def test_seam_score_of_a_cropped_output_uses_the_lattice_of_its_tile_lines():
    """An output cropped 4 px into its canvas: the decoder lattice and the tile lines both sit at
    8k - 4. The same pixels must score the same cropped or not (the 1920x1080 finding)."""
    canvas = smooth_image(2, 264)
    canvas[:, ::8] += 15  # the decoder's lattice in canvas coordinates
    canvas[::8, :] += 15
    whole = seam_score(canvas, grid_lines(264, 64), grid_lines(264, 64), period=8)
    cropped = canvas[4:, 4:]
    lines = grid_lines(260, 64, origin=4)
    assert lines == [60, 124, 188, 252]
    score = seam_score(cropped, lines, lines, period=8)
    assert 0.8 < score < 1.2 and abs(score - whole) < 0.1
    cropped = cropped.copy()
    for p in lines:  # real seams on a cropped output are still found
        cropped[p:, :] += 20
    assert seam_score(cropped, lines, lines, period=8) > 1.3


def test_kohya_table_respects_its_limits():
    from asd_models.buckets import kohya_buckets

    table = kohya_buckets(256, 1024, 64, 512 * 512)
    assert Bucket(512, 512) in table and Bucket(256, 1024) in table and Bucket(1024, 256) in table
    for b in table:
        assert 256 <= min(b.width, b.height) and max(b.width, b.height) <= 1024
        assert b.width % 64 == 0 and b.height % 64 == 0 and b.width * b.height <= 512 * 512
    assert len({round(b.log_aspect, 9) for b in table}) == len(table)  # one bucket per aspect ratio
    with pytest.raises(ValueError, match="max_side"):
        kohya_buckets(512, 256)


def test_vectorised_bucketing_matches_the_scalar_rule():
    import polars as pl

    from asd_models.buckets import kohya_buckets
    from bench.bucketing import bucket_frame, bucket_stats

    rng = np.random.default_rng(0)
    w = rng.integers(1, 5000, 20000)
    h = rng.integers(1, 5000, 20000)
    for table in (asd_buckets(512, 64), kohya_buckets()):
        df = bucket_frame(pl.DataFrame({"original_width": w, "original_height": h}), table)
        for wi, hi, name, err in (
            df.head(3000).select("original_width", "original_height", "bucket", "aspect_error").iter_rows()
        ):
            b = nearest_bucket(wi, hi, table)
            assert b.name == name and abs(err - abs(math.log(wi / hi) - b.log_aspect)) < 1e-12
    df = bucket_frame(
        pl.DataFrame({"original_width": [100, 0, None], "original_height": [100, 5, 7]}), asd_buckets()
    )
    assert df["bucket"].to_list() == ["512x512", None, None]
    stats = bucket_stats(df)
    assert stats["count"].to_list() == [1] and stats["share"].to_list() == [1.0]


def test_random_crop_is_reproducible_and_inside():
    import random

    from PIL import Image

    img = Image.new("RGB", (300, 100))
    boxes = {resize_cover_crop(img, 128, 128, random.Random(f"0:{k}"))[1] for k in range(20)}
    assert len(boxes) > 5
    assert all(0 <= b[0] and b[2] <= 384 and b[2] - b[0] == 128 and b[1] == 0 for b in boxes)
    assert (
        resize_cover_crop(img, 128, 128, random.Random("0:a"))[1]
        == resize_cover_crop(img, 128, 128, random.Random("0:a"))[1]
    )

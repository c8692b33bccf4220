"""The synthetic layout world of bench.composition: its scorer reads back what its renderer drew,
at every aspect ratio the bench uses, after the JPEG round trip ingest applies; and it catches
what it is there to catch (a duplicated sun, a wrong horizon, a missing tree)."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image, ImageDraw

from bench.layout_world import PALETTE, SUN_RADIUS, Scene, layout_errors, random_scene, render, score_image

SIZES = [(80, 240), (96, 192), (128, 128), (192, 96), (240, 80), (112, 144), (176, 96)]


def _jpeg(img: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("size", SIZES)
def test_scorer_reads_back_every_rendered_scene(size):
    rng = random.Random(sum(size))
    for _ in range(40):
        scene = random_scene(rng)
        errors = layout_errors(scene, score_image(_jpeg(render(scene, *size, rng))))
        assert errors["sun_count_ok"] == 1 and errors["sun_thirds_ok"] == 1, (scene, size)
        assert errors["extra_suns"] == 0 and errors["tree_count_error"] == 0, (scene, size)
        assert errors["horizon_error"] < 0.03, (scene, size)


def test_scorer_catches_a_duplicated_sun_a_wrong_horizon_and_a_missing_tree():
    scene = Scene(("left",), 60, 2)
    img = render(scene, 240, 80)
    r = SUN_RADIUS * 80
    ImageDraw.Draw(img).ellipse(
        [200 - r, 10 - r / 2, 200 + r, 10 + r * 1.5], fill=PALETTE["sun"]
    )  # a second sun
    errors = layout_errors(scene, score_image(img))
    assert errors["extra_suns"] == 1 and errors["sun_count_ok"] == 0 and errors["sun_thirds_ok"] == 0

    wrong = render(Scene(("left",), 40, 1), 240, 80)  # horizon 40%, one tree, for a 60% / two-tree caption
    errors = layout_errors(scene, score_image(wrong))
    assert errors["horizon_error"] == pytest.approx(0.2, abs=0.02)
    assert errors["tree_count_error"] == 1


def test_captions_state_the_layout_and_fit_the_tokenizer():
    assert Scene(("left",), 70, 3).caption == "one red sun top left, horizon at 70%, three trees"
    assert (
        Scene(("centre", "right"), 40, 0).caption
        == "two red suns top centre and right, horizon at 40%, no trees"
    )
    assert Scene(("right",), 50, 1).caption.endswith("one tree")
    rng = random.Random(0)
    assert (
        max(len(random_scene(rng).caption) for _ in range(500)) <= 75
    )  # the tiny tokenizer: a token a character


def test_the_world_is_a_dataset_the_pipeline_ingests_into_aspect_buckets_or_one_square(tmp_path):
    from artifact_store import ArtifactStore
    from bench.composition import ingest_settings, write_dataset
    from tasks.ingest import ingest

    folder = write_dataset(tmp_path / "world", 24, seed=0)
    store = ArtifactStore(str(tmp_path / "store"))
    arad = ingest(store.url, [str(folder)], "world-arad", ingest_settings(square=False))
    square = ingest(store.url, [str(folder)], "world-square", ingest_settings(square=True))
    arad_buckets = store.record(arad)["summary"]["buckets"]
    assert sum(arad_buckets.values()) == 24 and len(arad_buckets) >= 4
    assert any(int(b.split("x")[0]) > 2 * int(b.split("x")[1]) for b in arad_buckets)  # wide ones kept wide
    assert store.record(square)["summary"]["buckets"] == {"128x128": 24}

"""The evaluation's seam summary: mean, per axis, the worst image."""

from __future__ import annotations

import polars as pl

from asd_models.seams import grid_lines
from tasks.evaluate_report import metrics_markdown, seam_rows
from tests.helpers import smooth_image


def test_seam_summary_names_the_axis_and_the_worst_image():
    clean, seamed = smooth_image(3), smooth_image(4)
    lines = grid_lines(256, 64)
    for p in lines:
        seamed[:, p:] += 20  # vertical seams only
    generated = pl.DataFrame(
        {"key": ["clean", "seamed"], "seam_x": [lines, lines], "seam_y": [lines, lines], "tile_px": [64, 64]}
    )
    rows = {r["metric"]: r for r in seam_rows(generated, [clean, seamed], period=8)}
    assert rows["seam_score_x"]["value"] > 1.3 > rows["seam_score_y"]["value"]
    assert rows["seam_score_max"]["value"] == rows["seam_score/seamed"]["value"]
    assert "worst image seamed" in rows["seam_score_max"]["detail"]
    report = metrics_markdown(list(rows.values()), "generations/g@v", "datasets/d@v")
    assert "| seam_score_x |" in report and "| seam_score/seamed |" in report

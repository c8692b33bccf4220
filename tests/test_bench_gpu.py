"""The GPU bench's dry run: every arm (reference sweep, FSTD cases with per-call efficiency,
diffusers' pipeline from the same modules, the memory case) runs on the CPU with a tiny model
and writes its JSON, so the script is known to work before GPU time is spent on it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_dry_run_of_every_arm(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--size", "tiny", "--device", "cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["first_image_s"]
    assert report["reference_start"]["R_ref"] > 0 and report["reference_drift"] >= 0
    for name in ("128^2", "256^2", "4 x 128^2 packed", "512^2"):
        row = report["summary"][name]
        assert 0 < row["U"] <= 1 and row["calls_per_step"] >= 1 and row["shapes"] <= 9
        assert (
            abs(row["E_run"] * row["U"] - row["E"]) < 2e-3
        )  # E_run: the efficiency over the area really run
    assert (
        report["summary"]["4 x 128^2 packed"]["calls_per_step"]
        <= report["summary"]["128^2"]["calls_per_step"]
    )
    assert all(r["diffusers 256^2"]["seconds_at_steps"] > 0 for r in report["repetitions"])
    assert report["memory"]["sizes_ok"]
    assert "R_ref drift <= 5%" in proc.stdout  # PASS or FAIL: on a shared CPU the drift means nothing

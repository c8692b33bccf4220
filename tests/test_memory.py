"""Resident memory: the peak since a reset, and freed heap given back to the system (each in a
fresh interpreter, whose heap no other test has shaped)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc and glibc's heap")


def _run(code: str) -> dict:
    # glibc's defaults: importing Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in this process's
    # environment, and any MALLOC_* tunable switches off the dynamic mmap threshold these tests rely on
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env=env
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_rss_restarts_at_the_current_rss_after_a_reset():
    r = _run("""
import json, numpy as np
from asd_models.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
a = np.ones(300 * 2**20, dtype=np.uint8); del a
before = peak_rss_mb()
ok = reset_peak_rss()
print(json.dumps({"before": before, "after": peak_rss_mb(), "current": current_rss_mb(), "ok": ok}))
""")
    assert r["ok"] and r["before"] >= r["current"] + 250
    assert r["after"] < r["current"] + 50


@pytest.mark.parametrize("release", [False, True])
def test_release_free_heap_returns_freed_tensors_below_the_heap_top(release):
    """Tensors freed in the middle of glibc's heap stay resident (the heap cannot shrink past
    the one still alive at its top) until `release_free_heap`."""
    r = _run(f"""
import json, torch
from asd_models.memory import current_rss_mb, release_free_heap
big = torch.ones(16 * 2**18); del big   # a freed 16 MiB mmap raises glibc's mmap threshold
blocks = [torch.ones(2**20) for _ in range(100)]   # 100 x 4 MiB, now on the heap
del blocks[:-1]
freed = current_rss_mb()
released = release_free_heap() if {release} else None
print(json.dumps({{"freed": freed, "after": current_rss_mb(), "released": released}}))
""")
    if release:
        assert r["released"] is True and r["after"] < r["freed"] - 300
    else:
        assert r["after"] > r["freed"] - 50  # without it, nothing goes back: the case the call is for


def test_peak_windows_of_overlapping_work_never_wipe_each_other():
    """Two packs measured at once (threads of one worker): the second window must not reset the
    first's peak; once every window is closed, the next one starts afresh."""
    r = _run("""
import json, numpy as np
from asd_models.memory import current_rss_mb, peak_rss_window
with peak_rss_window() as first:
    a = np.ones(300 * 2**20, dtype=np.uint8); del a   # the first pack's peak
    with peak_rss_window() as second:                  # another thread's pack starts now
        inner = second()
    outer = first()
with peak_rss_window() as fresh:
    later = fresh()
print(json.dumps({"outer": outer, "inner": inner, "later": later, "current": current_rss_mb()}))
""")
    assert r["outer"] >= r["current"] + 250 and r["inner"] >= r["current"] + 250  # nothing was reset
    assert r["later"] < r["current"] + 50  # no window open: a new one restarts the peak

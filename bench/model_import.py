"""`asd model import`'s memory on a large checkpoint: a tiny SD folder whose UNet weights are
replaced by a synthetic safetensors file of --gb gigabytes (one tensor, written in chunks, so
this bench itself never holds it), imported into a fresh store in a child process; its peak RSS
is compared with the largest component's size.

    python -m bench.model_import [--gb 2] [--json PATH]

Target (issue "The models users already have"): peak RSS under 1.5x the largest component. The
import never loads a weight (configs read, safetensors headers parsed, files copied streamed),
so its peak should be the interpreter and its libraries, whatever the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from pathlib import Path

from bench.report import child_arm, table, write_json

CHUNK = 64 << 20


def write_synthetic_safetensors(path: Path, nbytes: int) -> None:
    """One float32 tensor of `nbytes` bytes (zeros), written chunk by chunk."""
    n = nbytes // 4
    header = json.dumps({"weight": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        left = n * 4
        block = bytes(CHUNK)
        while left > 0:
            f.write(block[: min(CHUNK, left)])
            left -= min(CHUNK, left)


def arm(folder: str, store: str) -> dict:
    from asd_models.memory import peak_rss_mb
    from flows.cli import main

    t0 = time.perf_counter()
    main(["--store", store, "model", "import", folder, "--name", "big"])
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="size of the synthetic UNet weights")
    ap.add_argument("--json", default="bench/results/model_import.json")
    ap.add_argument("--arm", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(arm(*args.arm)))
        return
    from asd_models.families import save_tiny

    with tempfile.TemporaryDirectory(prefix="asd-bench-import-") as tmp:
        folder = save_tiny("sd", Path(tmp) / "model")
        for f in (folder / "unet").glob("*.safetensors"):
            f.unlink()
        big = folder / "unet" / "diffusion_pytorch_model.safetensors"
        write_synthetic_safetensors(big, int(args.gb * (1 << 30)))
        largest_mb = big.stat().st_size / (1 << 20)
        r = child_arm("bench.model_import", "--arm", str(folder), str(Path(tmp) / "store"))
    row = {
        "largest_component_mb": round(largest_mb, 1),
        **r,
        "peak_over_largest": round(r["peak_rss_mb"] / largest_mb, 3),
        "throughput_mb_s": round(largest_mb / r["seconds"], 1),
    }
    table(
        [row],
        {
            "largest component (MB)": "{largest_component_mb}",
            "import peak RSS (MB)": "{peak_rss_mb}",
            "peak / largest": "{peak_over_largest}",
            "seconds": "{seconds}",
            "MB/s": "{throughput_mb_s}",
        },
    )
    write_json(args.json, row)


if __name__ == "__main__":
    main()

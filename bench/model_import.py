"""`asd model import`'s memory on large checkpoints, each imported into a fresh store in a child
process whose peak RSS is compared with the largest component's size:

- folder: a tiny SD folder whose UNet weights are replaced by a synthetic safetensors file of
  --gb gigabytes (one tensor, written in chunks, so this bench itself never holds it). The
  import never loads a weight (configs read, headers parsed, files copied streamed): its peak
  should be the interpreter and its libraries, whatever the size.
- single-file (--single-file): the tiny SD pipeline with a UNet of SD 1.5's shape
  (--base-channels 320: 320/640/1280/1280 channels, two layers a level; zeros, float32), written
  as one A1111-style original-format checkpoint and converted by the import one component at a
  time: its peak should be about the UNet's tensors plus one saved shard.

    python -m bench.model_import [--gb 2] [--single-file] [--base-channels 320] [--json PATH]

Target (issue "The models users already have"): peak RSS under 1.5x the largest component.
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


def arm(source: str, store: str, *config: str) -> dict:
    from asd_models.memory import peak_rss_mb
    from flows.cli import main

    t0 = time.perf_counter()
    main(
        [
            "--store",
            store,
            "model",
            "import",
            source,
            "--name",
            "big",
            *(("--config", config[0]) if config else ()),
        ]
    )
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def folder_case(root: Path, gb: float) -> tuple[list[str], float]:
    """A tiny SD folder with a synthetic UNet file of `gb` GB: (the arm's arguments, its MB)."""
    from asd_models.families import save_tiny

    folder = save_tiny("sd", root / "model")
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    big = folder / "unet" / "diffusion_pytorch_model.safetensors"
    write_synthetic_safetensors(big, int(gb * (1 << 30)))
    return [str(folder), str(root / "store")], big.stat().st_size / (1 << 20)


def single_file_case(root: Path, base_channels: int) -> tuple[list[str], float]:
    """The tiny SD pipeline with an SD-1.5-shaped UNet, as one original-format file: (the arm's
    arguments, the UNet's MB)."""
    import torch
    from diffusers import UNet2DConditionModel

    from asd_models.families import save_tiny
    from bench.original_format import write_sd_single_file

    folder = save_tiny("sd", root / "config")
    config = json.loads((folder / "unet" / "config.json").read_text())
    config.update(
        block_out_channels=[base_channels * m for m in (1, 2, 4, 4)],
        layers_per_block=2,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        norm_num_groups=32,
        attention_head_dim=8,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet = unet.to_empty(device="cpu")
    for p in unet.parameters():
        p.data.zero_()
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    mb = sum(p.numel() * p.element_size() for p in unet.parameters()) / (1 << 20)
    del unet
    single = write_sd_single_file(folder, root / "big.safetensors")
    return [str(single), str(root / "store"), str(folder)], mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="size of the synthetic UNet weights (folder)")
    ap.add_argument("--single-file", action="store_true", help="also import an SD-1.5-sized single file")
    ap.add_argument("--base-channels", type=int, default=320, help="the single file UNet's first width")
    ap.add_argument("--json", default="bench/results/model_import.json")
    ap.add_argument("--arm", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(arm(*args.arm)))
        return

    cases = {"folder": lambda root: folder_case(root, args.gb)}
    if args.single_file:
        cases["single-file"] = lambda root: single_file_case(root, args.base_channels)
    rows = []
    for name, case in cases.items():
        with tempfile.TemporaryDirectory(prefix="asd-bench-import-") as tmp:
            argv, largest_mb = case(Path(tmp))
            r = child_arm("bench.model_import", "--arm", *argv)
        rows.append(
            {
                "source": name,
                "largest_component_mb": round(largest_mb, 1),
                **r,
                "peak_over_largest": round(r["peak_rss_mb"] / largest_mb, 3),
                "throughput_mb_s": round(largest_mb / r["seconds"], 1),
            }
        )
    table(
        rows,
        {
            "source": "{source}",
            "largest component (MB)": "{largest_component_mb}",
            "import peak RSS (MB)": "{peak_rss_mb}",
            "peak / largest": "{peak_over_largest}",
            "seconds": "{seconds}",
            "MB/s": "{throughput_mb_s}",
        },
    )
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()

"""Tiled VAE decode: ours (shared GroupNorm statistics, padded tiles) vs diffusers'
`vae.enable_tiling()` vs plain per-tile decoding, against one whole-image decode.

    python -m bench.tiled_vae [--json PATH]

The VAE is the tiny 4-level one, fitted for a few minutes to the demo photos (cached under
bench/.cache; a random VAE decodes everything to noise). The test image is a real photo
(scikit-image's hubble_deep_field) resized to 1024x1024. Seam score: mean |gradient| across
the tile borders over the median across other 8-px lattice lines (1.0 = seamless); colour
error: mean |pixel - whole-image decode| (0-255).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.fstd import peak_rss_mb

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


def fitted_vae(steps: int):
    from diffusers import AutoencoderKL
    from PIL import Image

    from asd_models.arad_training import fit_vae
    from asd_models.images import pil_to_tensor_m11, resize_cover_crop
    from asd_models.tiny_model import build_tiny_components
    from data_manifests.demo import materialize_demo_photos

    folder = CACHE / f"vae-{steps}"
    if (folder / "config.json").is_file():
        return AutoencoderKL.from_pretrained(folder).eval()
    photos = materialize_demo_photos(CACHE / "photos")
    images = [
        pil_to_tensor_m11(resize_cover_crop(Image.open(p).convert("RGB"), 256, 256)[0])
        for p in sorted(photos.glob("*"))
        if p.suffix in (".png", ".jpg")
    ]
    vae = build_tiny_components()["vae"]
    fit_vae(vae, images, steps, crop=64)
    vae.save_pretrained(folder)
    return vae.eval()


def to_u8(x: torch.Tensor) -> np.ndarray:
    return ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def main() -> None:
    from diffusers import AutoencoderKL  # noqa: F401 - imported for from_pretrained in fitted_vae
    from PIL import Image

    from asd_models.images import pil_to_tensor_m11, resize_cover_crop
    from asd_models.seams import seam_score
    from asd_models.tiled_vae import tiled_decode
    from data_manifests.demo import materialize_demo_photos

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="bench/results/tiled_vae.json")
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=32, help="decoder tile in latent pixels")
    args = ap.parse_args()

    vae = fitted_vae(args.vae_steps)
    photo = materialize_demo_photos(CACHE / "photos") / "hubble_deep_field.jpg"
    img = pil_to_tensor_m11(resize_cover_crop(Image.open(photo).convert("RGB"), args.size, args.size)[0])
    with torch.no_grad():
        z = vae.encode(img).latent_dist.mean * vae.config.scaling_factor
        t0 = time.perf_counter()
        whole = to_u8(vae.decode(z / vae.config.scaling_factor).sample)
        results = [{"method": "whole", "seconds": time.perf_counter() - t0}]
        images = {"whole": whole}

        t0 = time.perf_counter()
        images["ours"] = tiled_decode(vae, z, tile=args.tile)
        results.append({"method": "ours", "seconds": time.perf_counter() - t0})

        t = args.tile
        h, w = z.shape[2:]
        per_tile = np.zeros_like(whole)
        t0 = time.perf_counter()
        for y in range(0, h, t):
            for x in range(0, w, t):
                per_tile[y * 8 : (y + t) * 8, x * 8 : (x + t) * 8] = to_u8(
                    vae.decode(z[:, :, y : y + t, x : x + t] / vae.config.scaling_factor).sample
                )
        images["per_tile"] = per_tile
        results.append({"method": "per_tile", "seconds": time.perf_counter() - t0})

        vae.enable_tiling()
        vae.tile_sample_min_size = t * 8
        vae.tile_latent_min_size = t
        t0 = time.perf_counter()
        images["diffusers_enable_tiling"] = to_u8(vae.decode(z / vae.config.scaling_factor).sample)
        results.append({"method": "diffusers_enable_tiling", "seconds": time.perf_counter() - t0})
        vae.disable_tiling()

    lines = list(range(t * 8, args.size, t * 8))
    # diffusers' tiles overlap by 25%: its borders sit at multiples of 0.75 * tile
    d_step = int(t * 8 * 0.75)
    d_lines = list(range(d_step, args.size, d_step))
    for r in results:
        im = images[r["method"]].astype(np.float64)
        ls = d_lines if r["method"] == "diffusers_enable_tiling" else lines
        r["seam_score"] = round(seam_score(im, ls, ls, period=8), 4)
        r["colour_error"] = round(float(np.abs(im - whole.astype(np.float64)).mean()), 3)
        r["mean_rgb_shift"] = [round(float(v), 2) for v in (im.mean(axis=(0, 1)) - whole.mean(axis=(0, 1)))]
        r["seconds"] = round(r["seconds"], 3)
    print(
        f"tiny VAE (4 levels, fitted {args.vae_steps} steps), {args.size}x{args.size} hubble_deep_field, "
        f"tile {t} latent ({t * 8} px)"
    )
    print(f"{'method':26s} {'seconds':>8s} {'seam':>7s} {'colour err':>10s}  mean RGB shift")
    for r in results:
        print(
            f"{r['method']:26s} {r['seconds']:>8.2f} {r['seam_score']:>7.3f} {r['colour_error']:>10.2f}  {r['mean_rgb_shift']}"
        )
    out = {
        "size": args.size,
        "tile": t,
        "vae_steps": args.vae_steps,
        "results": results,
        "peak_rss_mb": peak_rss_mb(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

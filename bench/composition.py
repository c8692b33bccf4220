"""The paper's composition claim, measured: does training on aspect-ratio buckets (ARAD) keep
the layout a caption asks for at off-square sizes, where square-crop training duplicates
subjects and loses the layout?

    python -m bench.composition [--json PATH] [--train-images 1600] [--steps 3000] [--prompts 24]

1. Renders a synthetic layout world (`bench.layout_world`: suns, horizon, trees, captions that
   state them) at aspect ratios drawn log-uniformly from 1:3 to 3:1, as a local folder of
   PNGs with `.txt` captions, and ingests it with the pipeline's own ingest twice: into the
   ASD aspect-ratio buckets (base 128 px) and into one 128x128 bucket (resize to cover, centre
   crop: square-crop training).
2. Builds one tiny base model (its VAE fitted to the images) and trains its UNet twice with
   the same settings, steps and seed: once per dataset (`tasks.train.train_to_store`).
3. Renders held-out captions with both models at 1:3, 1:2, 1:1, 2:1 and 3:1 (direct
   full-latent sampling at the size, DDIM, classifier-free guidance, the same noise for both).
4. Scores each image against its caption (sun count, extra suns = duplicated subjects, sun
   positions, horizon height, tree count) and computes KID (TF-Inception features) against
   renders of the same captions at the same size.

Everything lives in a store under bench/.cache/composition (same inputs -> reused: a rerun
only re-samples and re-scores). The models are tiny and trained for minutes on a CPU: the
table compares two training schemes on equal terms, not image quality in absolute terms.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = [(80, 240), (96, 192), (128, 128), (192, 96), (240, 80)]  # width x height: 1:3 ... 3:1
BASE = 128


def write_dataset(folder: Path, n: int, seed: int) -> Path:
    """`n` scenes at random aspect ratios (1:3 to 3:1, about 192^2 pixels) as PNG + .txt."""
    from bench.layout_world import random_scene, render

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        scene = random_scene(rng)
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        w, h = round(192 * math.sqrt(aspect)), round(192 / math.sqrt(aspect))
        render(scene, w, h, rng).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(scene.caption)
    return folder


def ingest_settings(square: bool):
    from tasks.ingest import IngestSettings

    if square:  # one square bucket: resize to cover, centre crop (how SD-style models are trained)
        return IngestSettings(
            bucket_table="kohya",
            bucket_min_side=BASE,
            bucket_max_side=BASE,
            bucket_max_area=BASE * BASE,
            bucket_step=16,
            bucket_base=BASE,
        )
    return IngestSettings(bucket_table="asd", bucket_base=BASE, bucket_step=16)


def train_settings(steps: int):
    from tasks.train import TrainSettings

    return TrainSettings(
        steps=steps,
        batch_size=8,
        learning_rate=1e-3,
        warmup_steps=50,
        ema_decay=0.999,
        checkpoint_every=0,
        seed=0,
        cache_latents=True,
    )


def prepare(store_url: str, train_images: int, steps: int, vae_steps: int) -> dict[str, str]:
    """Dataset, base model and both trained models in the store (reused when already there)."""
    from artifact_store import ArtifactStore
    from tasks.ingest import ingest
    from tasks.train import build_tiny_base, train_to_store

    store = ArtifactStore(store_url)
    folder = write_dataset(HERE / ".cache" / "composition" / f"world-{train_images}", train_images, seed=0)
    refs = {}
    for scheme, square in (("arad", False), ("square", True)):
        refs[f"data-{scheme}"] = ingest(store.url, [str(folder)], f"world-{scheme}", ingest_settings(square))
    base = build_tiny_base(store_url, refs["data-arad"], "world-base", vae_steps=vae_steps)
    for scheme in ("arad", "square"):
        t0 = time.time()
        refs[scheme] = train_to_store(
            store_url, refs[f"data-{scheme}"], base, f"world-{scheme}", train_settings(steps)
        ).model
        print(f"  {scheme}: {refs[scheme]} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return refs


def load_pipeline(store_url: str, model_ref: str):
    from artifact_store import ArtifactStore
    from asd_models.pipeline import AnySizePipeline
    from tasks.model_cache import load_model_components

    return AnySizePipeline(load_model_components(ArtifactStore(store_url), model_ref))


def sample_images(
    pipe, prompts: list[str], width: int, height: int, steps: int, guidance: float, seed: int
) -> list:
    """Each prompt rendered at width x height by direct full-latent sampling (no tiling)."""
    import torch

    from asd_models.families.base import Denoiser
    from asd_models.samplers import Full, sample_with

    c, f = pipe.c, pipe.c.vae_scale_factor
    shape = (1, c.vae.config.latent_channels, height // f, width // f)
    out = []
    for i, prompt in enumerate(prompts):
        cond, uncond, scale = pipe.encode_prompt(prompt, guidance_scale=guidance)
        sched = c.family.sampling_scheduler(c, steps, shape[2:])
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
        lat = sample_with(
            Full(),
            Denoiser(c),
            sched,
            c.family.start_latents(sched, noise),
            sched.timesteps,
            cond,
            uncond,
            scale,
        )
        out.append(pipe.decode_latents(lat))
    return out


def kid(real: list, fake: list, features) -> float:
    import numpy as np
    import torch

    from asd_models.metrics import fid_kid

    def stack(images):
        return torch.stack(
            [
                torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                for im in images
            ]
        )

    return fid_kid(stack(real), stack(fake), features, seed=0, patch_size=0).kid_mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="bench/results/composition.json")
    ap.add_argument("--store", default=str(HERE / ".cache" / "composition" / "store"))
    ap.add_argument("--train-images", type=int, default=1600)
    ap.add_argument("--steps", type=int, default=3000, help="UNet training steps (each model)")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--prompts", type=int, default=24, help="held-out captions rendered at each size")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    args = ap.parse_args()

    import logging

    import numpy as np
    from transformers.utils import logging as hf_logging

    from asd_models.metrics import InceptionFeatures, MetricWeightsMissing
    from bench.layout_world import layout_errors, random_scene, render, score_image

    logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stderr)
    hf_logging.disable_progress_bar()
    t0 = time.time()
    refs = prepare(args.store, args.train_images, args.steps, args.vae_steps)
    rng = random.Random(12345)  # held-out captions: a different stream from the training set's
    scenes = [random_scene(rng) for _ in range(args.prompts)]
    prompts = [s.caption for s in scenes]
    try:
        features = InceptionFeatures()
    except MetricWeightsMissing as exc:
        features = None
        print(f"KID skipped: {exc}", file=sys.stderr)
    pipes = {scheme: load_pipeline(args.store, refs[scheme]) for scheme in ("arad", "square")}
    rows = []
    print(
        f"\n{'model':7s} {'size':>7s} {'ratio':>5s} {'suns ok':>7s} {'extra suns':>10s} {'sun pos ok':>10s} "
        f"{'horizon err':>11s} {'tree err':>8s} {'KID':>8s}"
    )
    for w, h in SIZES:
        real = [render(s, w, h, random.Random(1000 + i)) for i, s in enumerate(scenes)]
        for scheme in ("arad", "square"):
            images = sample_images(pipes[scheme], prompts, w, h, args.sample_steps, args.guidance, seed=7)
            errs = [layout_errors(s, score_image(im)) for s, im in zip(scenes, images, strict=True)]
            mean = {k: round(float(np.mean([e[k] for e in errs])), 4) for k in errs[0]}
            row = {
                "model": scheme,
                "width": w,
                "height": h,
                "aspect": round(w / h, 3),
                **mean,
                "kid": round(kid(real, images, features), 5) if features else None,
                "n": len(images),
            }
            rows.append(row)
            ratio = f"{w // math.gcd(w, h)}:{h // math.gcd(w, h)}" if w != h else "1:1"
            print(
                f"{scheme:7s} {w:>3d}x{h:<3d} {ratio:>5s} {row['sun_count_ok']:7.2f} {row['extra_suns']:10.2f} "
                f"{row['sun_thirds_ok']:10.2f} {row['horizon_error']:11.3f} {row['tree_count_error']:8.2f} "
                f"{row['kid'] if row['kid'] is not None else 'n/a':>8}",
                flush=True,
            )
            grid = HERE / ".cache" / "composition" / f"samples-{scheme}-{w}x{h}.png"
            _contact_sheet(images[:8], grid)
    summary = {}
    for scheme in ("arad", "square"):
        off = [r for r in rows if r["model"] == scheme and r["width"] != r["height"]]
        summary[scheme] = {
            k: round(float(np.mean([r[k] for r in off])), 4)
            for k in ("sun_count_ok", "extra_suns", "sun_thirds_ok", "horizon_error", "tree_count_error")
        }
        if all(r["kid"] is not None for r in off):
            summary[scheme]["kid"] = round(float(np.mean([r["kid"] for r in off])), 5)
    print("\noff-square sizes, mean:")
    for scheme, s in summary.items():
        print(f"  {scheme:7s} " + ", ".join(f"{k} {v}" for k, v in s.items()))
    out = {
        "refs": refs,
        "train_images": args.train_images,
        "steps": args.steps,
        "vae_steps": args.vae_steps,
        "prompts": prompts,
        "sample_steps": args.sample_steps,
        "guidance": args.guidance,
        "rows": rows,
        "off_square_mean": summary,
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json} (sample sheets under bench/.cache/composition/)")


def _contact_sheet(images: list, path: Path) -> None:
    from PIL import Image

    w, h = images[0].size
    sheet = Image.new("RGB", (w * len(images) + 2 * (len(images) - 1), h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, (i * (w + 2), 0))
    sheet.save(path)


if __name__ == "__main__":
    main()

"""ASD-upscale: FSTD against 50%-overlap tiles (MultiDiffusion-style img2img), naive tiles and a
full-latent img2img, same model and steps, on real photos; the round trip over strength; and a
job killed half way and rerun.

    python -m bench.upscale [--side 512] [--json bench/results/upscale.json]   # 512^2 -> 2048^2 (CPU)
    python -m bench.upscale --side 1024 --device cuda                          # 1024^2 -> 4096^2
    python -m bench.upscale --kill-rerun 100 --workers 2                       # + the kill-and-rerun job

The model is the demo's (the tiny SD-shaped model trained by the `nightly` deployment's settings
on the demo photos, about two minutes; cached under bench/.cache/upscale-store): a random
network would draw noise, and its round trip would mean nothing. Its weak VAE alone keeps little
of an image (round-trip SSIM about 0.72 at the lowest strength): the `none` rows are this model's,
not the method's ceiling; `backproject` rows hold whatever the model.

1. Methods: a demo photo centre-cropped to `--side`^2, enlarged 4x with each of fstd,
   multidiffusion (50%-overlap windows), naive (fixed non-overlapping tiles) and full (one latent),
   `--steps` steps at strength 0.5, each method's own pixels (`--fidelity none`): seconds, seam
   score on FSTD's tile lattice (the lines naive tiles show) over the full-latent output's on the
   same lines, round-trip SSIM and colour error.
2. Round trip over strength: every demo photo enlarged 2x with FSTD at strengths 0.1 .. 0.7, as
   the model draws it and back-projected (the default): mean SSIM (grey) and colour error (mean
   |difference| of the RGB channel means, 0..255) of the output downscaled back against the
   input, and `detail`: mean |output - its own downscale enlarged again|, what the output holds
   above the input's resolution.
3. The x4 paths (`--x4-side`, 64: 64^2 -> 256^2 on the CPU): img2img FSTD with the model against
   the tiny x4 upscaler fitted in code on the demo photos (`asd_models.upscaler_training`, once,
   cached under bench/.cache/x4-upscaler), each as drawn and back-projected, beside bicubic.
4. `--kill-rerun N`: N photos of mixed sizes (crops of the demo photos) upscaled 2x by
   `asd upscale` on `--workers` Dask workers, SIGKILLed after half of them are written, then
   rerun: images resumed, rendered by the rerun, and whether every image is there once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import table, write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STORE = HERE / ".cache" / "upscale-store"
METHODS = ("fstd", "multidiffusion", "naive", "full")
STRENGTHS = (0.1, 0.2, 0.3, 0.5, 0.7)


def trained_model() -> str:
    """The demo's model, trained once into bench/.cache/upscale-store; returns its reference."""
    from artifact_store import ArtifactStore
    from data_manifests.demo import demo_photos_folder
    from flows.cli.demo import demo_settings
    from flows.stages import ingest_flow, train_flow

    store = ArtifactStore(str(STORE))
    if store.list_versions("models", "upscale-bench"):
        return str(store.list_versions("models", "upscale-bench")[-1])
    print("training the demo's model once (about two minutes) ...", file=sys.stderr, flush=True)
    settings = demo_settings(quick=False)
    data = ingest_flow(str(demo_photos_folder()), "photos", settings["ingest"], str(STORE))
    return train_flow(data, "upscale-bench", settings["train"], str(STORE))


def photos() -> list:
    from PIL import Image

    from data_manifests.demo import demo_photos_folder

    folder = demo_photos_folder()
    return [Image.open(p).convert("RGB") for p in sorted(folder.iterdir()) if p.suffix in (".png", ".jpg")]


def centre_square(image, side: int):
    from asd_models.images import resize_cover_crop

    return resize_cover_crop(image, side, side)[0]


def compare_methods(
    pipe, side: int, steps: int, methods: tuple[str, ...] = METHODS, pictures: dict | None = None
) -> list[dict]:
    """Each method on the same photo; `pictures` (if given) gets each method's pixels by name
    and FSTD's unshifted tile lines under "lines"."""
    from asd_models.fidelity import roundtrip
    from asd_models.pipeline import RenderRequest
    from asd_models.seams import seam_scores

    image = centre_square(photos()[0], side)
    req = RenderRequest("a photo", 4 * side, 4 * side, seed=0, steps=steps, guidance_scale=4.0, strength=0.5)
    out, lines = [], None
    for method in ("fstd", *[m for m in methods if m != "fstd"]):
        sampler = pipe.default_sampler(method)
        t0 = time.perf_counter()
        res = pipe.upscale_many([req], [image], sampler, fidelity="none")[0]  # the method's own pixels
        seconds = time.perf_counter() - t0
        lines = lines or res.seam_lines  # FSTD's unshifted lattice: where naive tiles' borders are
        seam = seam_scores(res.pixels, lines["x"], lines["y"])[0]
        if pictures is not None:
            pictures[method], pictures["lines"] = res.pixels, lines
        ssim, color = roundtrip(res.pixels, image)
        out.append(
            {
                "method": method,
                "seconds": seconds,
                "seam_score": seam,
                "roundtrip_ssim": ssim,
                "roundtrip_color_error": color,
                "size": f"{4 * side}x{4 * side}",
                "input": f"{side}x{side}",
            }
        )
        print(f"  {method}: {seconds:.1f} s, seam {seam:.3f}, SSIM {ssim:.3f}", file=sys.stderr, flush=True)
    full = next((r for r in out if r["method"] == "full"), None)
    fstd = next(r for r in out if r["method"] == "fstd")
    for r in out:
        r["seam_vs_full"] = r["seam_score"] / full["seam_score"] if full else None
        r["time_vs_fstd"] = r["seconds"] / fstd["seconds"]
    return out


def method_sheet(pictures: dict, rows: list[dict], path: Path, cell: int = 320) -> None:
    """The comparison as one picture for the docs: per method (a column) the whole output, its
    seam heat-map (bright = an abrupt change; cyan ticks = FSTD's unshifted tile lines, where
    naive tiles have their borders) and a 1:1 crop around a crossing of those lines."""
    from PIL import Image, ImageDraw

    from asd_models.seams import seam_heatmap_rgb

    lines = pictures["lines"]
    methods = [r for r in rows if r["method"] in pictures]
    label_h = 34
    sheet = Image.new("RGB", (cell * len(methods), label_h + 3 * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for col, r in enumerate(methods):
        px = pictures[r["method"]]
        h, w, _ = px.shape
        whole = Image.fromarray(px).resize((cell, round(cell * h / w)), Image.Resampling.LANCZOS)
        heat = Image.fromarray(seam_heatmap_rgb(px, lines["x"], lines["y"], max_side=cell))
        cx = min(lines["x"], key=lambda x: abs(x - w // 2)) if lines["x"] else w // 2
        cy = min(lines["y"], key=lambda y: abs(y - h // 2)) if lines["y"] else h // 2
        x0, y0 = max(0, min(w - cell, cx - cell // 2)), max(0, min(h - cell, cy - cell // 2))
        crop = Image.fromarray(px[y0 : y0 + cell, x0 : x0 + cell])
        x = col * cell
        versus = f", {r['seam_vs_full']:.2f}x full" if r.get("seam_vs_full") else ""
        draw.text((x + 6, 4), r["method"], fill="black")
        draw.text((x + 6, 18), f"seam {r['seam_score']:.2f}{versus}", fill="black")
        for row, im in enumerate((whole, heat, crop)):
            sheet.paste(im, (x, label_h + row * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, quality=88) if path.suffix == ".jpg" else sheet.save(path)


def _scored(results, images, **fields) -> dict:
    """Round trip and added detail of `results` (of `images`), with `fields`."""
    from asd_models.fidelity import roundtrip

    scores = [roundtrip(r.pixels, im) for r, im in zip(results, images, strict=True)]
    return {
        **fields,
        "images": len(images),
        "ssim_mean": float(np.mean([s for s, _ in scores])),
        "ssim_min": float(np.min([s for s, _ in scores])),
        "color_error_mean": float(np.mean([c for _, c in scores])),
        "detail": float(np.mean([finer_detail(r.pixels, im) for r, im in zip(results, images, strict=True)])),
    }


def finer_detail(pixels: np.ndarray, image) -> float:
    """Mean |pixels - pixels shrunk to the input and enlarged again (bicubic)|: the detail an
    output holds above what its input can (0 for a plain bicubic enlargement's own band)."""
    from PIL import Image

    h, w = pixels.shape[:2]
    low = (
        Image.fromarray(pixels)
        .resize(image.size, Image.Resampling.BOX)
        .resize((w, h), Image.Resampling.BICUBIC)
    )
    return float(np.abs(pixels.astype(np.float32) - np.asarray(low, dtype=np.float32)).mean())


def strength_curve(pipe, steps: int) -> list[dict]:
    """Every demo photo enlarged 2x with FSTD at each strength, as the model draws it (`none`)
    and back-projected (`backproject`, the default)."""
    from asd_models.pipeline import RenderRequest

    images = [centre_square(p, 256) if max(p.size) > 512 else p for p in photos()]
    out = []
    for strength in STRENGTHS:
        reqs = [
            RenderRequest(
                "a photo",
                2 * im.width,
                2 * im.height,
                seed=i,
                steps=steps,
                guidance_scale=4.0,
                strength=strength,
            )
            for i, im in enumerate(images)
        ]
        for fidelity in ("none", "backproject"):
            out.append(
                _scored(
                    pipe.upscale_many(reqs, images, fidelity=fidelity),
                    images,
                    strength=strength,
                    fidelity=fidelity,
                )
            )
            print(
                f"  strength {strength}, {fidelity}: SSIM {out[-1]['ssim_mean']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    return out


def tiny_x4_upscaler() -> Path:
    """The tiny x4 upscaler fitted in code on the demo photos (once; cached under bench/.cache)."""
    from asd_models.images import pil_to_tensor_m11
    from asd_models.tiny_model import save_upscaler_components
    from asd_models.upscaler_training import fit_tiny_upscaler

    folder = HERE / ".cache" / "x4-upscaler"
    if (folder / "model_index.json").exists():
        return folder
    print("fitting the tiny x4 upscaler once (a few minutes) ...", file=sys.stderr, flush=True)
    images = [pil_to_tensor_m11(centre_square(p, 256) if max(p.size) > 512 else p) for p in photos()]
    components = fit_tiny_upscaler(images, ["a photo"] * len(images))
    return save_upscaler_components(components, folder)


def x4_paths(model_dir: Path, side: int, steps: int) -> list[dict]:
    """The demo photos (centre squares of `side`) enlarged 4x by img2img FSTD with the model
    (strength 0.3) and by the tiny x4 upscaler (noise level 20), each as drawn and back-projected,
    beside a plain bicubic enlargement."""
    from PIL import Image

    from asd_models.pipeline import AnySizePipeline, RenderRequest

    images = [centre_square(p, side) for p in photos()]
    upscaler = tiny_x4_upscaler()
    pipes = {
        "img2img": AnySizePipeline.from_pretrained(model_dir),
        "x4 upscaler": AnySizePipeline.from_pretrained(model_dir, upscaler=upscaler),
    }
    reqs = [
        RenderRequest(
            "a photo",
            4 * side,
            4 * side,
            seed=i,
            steps=steps,
            guidance_scale=4.0,
            strength=0.3,
            noise_level=20,
        )
        for i in range(len(images))
    ]

    class Plain:  # a result of bicubic enlargement
        def __init__(self, im):
            self.pixels = np.asarray(im.resize((4 * side, 4 * side), Image.Resampling.BICUBIC))

    out = [_scored([Plain(im) for im in images], images, path="bicubic", fidelity="-", seconds=0.0)]
    for path, pipe in pipes.items():
        for fidelity in ("none", "backproject"):
            t0 = time.perf_counter()
            results = pipe.upscale_many(reqs, images, fidelity=fidelity)
            out.append(
                _scored(
                    results,
                    images,
                    path=path,
                    fidelity=fidelity,
                    seconds=(time.perf_counter() - t0) / len(images),
                )
            )
            print(f"  {path}, {fidelity}: SSIM {out[-1]['ssim_mean']:.3f}", file=sys.stderr, flush=True)
    return out


def _kill_when_half_done(proc: subprocess.Popen, n: int) -> int:
    """SIGKILL `proc` and every process under it (the flow, its Dask workers) once half of the
    job's images have their fragment in its pending version; returns how many had."""
    from bench.harness import kill_tree

    def written() -> int:
        return sum(
            1
            for p in STORE.glob("upscales/kill-*/*/images/*.png")
            if not p.name.endswith(".seams.png") and p.stat().st_mtime > start
        )

    start = time.time()
    while proc.poll() is None and written() < n // 2:
        time.sleep(0.2)
    kill_tree(proc)
    return written()


def kill_rerun(model: str, n: int, workers: int, steps: int) -> dict:
    """`asd upscale` of n mixed-size photos on Dask workers, SIGKILLed (the flow and its workers)
    once half of the images are written, then rerun."""
    from artifact_store import ArtifactStore

    rng = np.random.default_rng(0)
    sources = photos()
    with tempfile.TemporaryDirectory(prefix="bench-upscale-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i in range(n):
            im = sources[i % len(sources)]
            w, h = (int(v) for v in rng.integers(64, 200, 2))
            x, y = int(rng.integers(0, max(1, im.width - w))), int(rng.integers(0, max(1, im.height - h)))
            im.crop((x, y, x + w, y + h)).save(folder / f"photo{i:03d}.png")
            (folder / f"photo{i:03d}.txt").write_text(f"a photo, part {i}")
        args = [
            sys.executable,
            "-m",
            "flows.cli",
            "--store",
            str(STORE),
            "upscale",
            str(folder),
            "--model",
            model,
            "--name",
            f"kill-{n}",
            "--steps",
            str(steps),
            "--executor",
            "dask",
            "--workers",
            str(workers),
            "--partition-inputs",
            "4",
            "--seed",
            str(time.time_ns() % 1000),
        ]  # a new job each bench run
        env = {**os.environ, "TQDM_DISABLE": "1", "PREFECT_HOME": str(Path(tmp) / "ph")}
        t0 = time.perf_counter()
        first = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        done_before = _kill_when_half_done(first, n)
        killed_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        second = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
        rerun_s = time.perf_counter() - t0
        if second.returncode:
            raise SystemExit(f"the rerun failed:\n{second.stderr[-3000:]}")
        store = ArtifactStore(str(STORE))
        ref = second.stdout.strip().splitlines()[-2]
        summary = store.record(ref)["summary"]
        import io

        import polars as pl

        m = pl.read_parquet(io.BytesIO(store.read_bytes(ref, "manifest.parquet")))
        return {
            "photos": n,
            "workers": workers,
            "written_when_killed": done_before,
            "killed_after_s": killed_s,
            "rerun_s": rerun_s,
            "resumed": summary["images_resumed"],
            "rendered_by_rerun": summary["images_rendered_by_this_run"],
            "ok": summary["images_ok"],
            "failed": summary["images_failed"],
            "keys_unique": m["key"].n_unique() == len(m),
            "each_once": summary["images_resumed"] + summary["images_rendered_by_this_run"]
            == summary["images_ok"],
            "verify_problems": len(store.verify(ref)),
            "ref": ref,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=512, help="input side (the output is 4x)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated, of " + ", ".join(METHODS) + " (full: one latent, slow on a CPU at 4096^2)",
    )
    ap.add_argument(
        "--curve",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the round trip over strength (--no-curve: skip it)",
    )
    ap.add_argument(
        "--x4-side", type=int, default=64, help="input side of the x4 paths' comparison (0: skip it)"
    )
    ap.add_argument("--kill-rerun", type=int, default=0, help="photos of the kill-and-rerun job (0: skip it)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--pictures",
        default=None,
        help="write the methods' comparison as one picture here (.jpg or .png): output, seam heat-map, 1:1 crop",
    )
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from artifact_store import ArtifactStore
    from asd_models.devices import resolve_device, resolve_dtype
    from asd_models.pipeline import AnySizePipeline
    from tasks.model_cache import local_model_dir

    model = trained_model()
    pipe = AnySizePipeline.from_pretrained(local_model_dir(ArtifactStore(str(STORE)), model))
    dev = resolve_device(args.device)
    pipe.to(dev, resolve_dtype("auto", dev))
    print(f"methods, {args.side}^2 -> {4 * args.side}^2 on {dev} ...", file=sys.stderr, flush=True)
    pictures: dict | None = {} if args.pictures else None
    methods = compare_methods(
        pipe, args.side, args.steps, tuple(m.strip() for m in args.methods.split(",")), pictures
    )
    if args.pictures and pictures:
        method_sheet(pictures, methods, Path(args.pictures))
        print(f"pictures: {args.pictures}", file=sys.stderr, flush=True)
    if args.curve:
        print("round trip over strength ...", file=sys.stderr, flush=True)
    curve = strength_curve(pipe, args.steps) if args.curve else []
    print(f"x4 paths, {args.x4_side}^2 -> {4 * args.x4_side}^2 ...", file=sys.stderr, flush=True)
    x4 = (
        x4_paths(local_model_dir(ArtifactStore(str(STORE)), model), args.x4_side, args.steps)
        if args.x4_side
        else []
    )
    killed = kill_rerun(model, args.kill_rerun, args.workers, args.steps) if args.kill_rerun else None
    print(f"\nASD-upscale with {model} on {dev}, {args.steps} steps, strength 0.5, guidance 4\n")
    table(
        methods,
        {
            "method": "{method}",
            "input -> output": "{input} -> {size}",
            "s": "{seconds:.1f}",
            "vs FSTD": "{time_vs_fstd:.2f}x",
            "seam score": "{seam_score:.3f}",
            "vs full latent": lambda r: f"{r['seam_vs_full']:.2f}x" if r["seam_vs_full"] else "-",
            "round-trip SSIM": "{roundtrip_ssim:.3f}",
            "colour error": "{roundtrip_color_error:.2f}",
        },
    )
    round_trip = {
        "SSIM mean": "{ssim_mean:.3f}",
        "SSIM min": "{ssim_min:.3f}",
        "colour error (0..255)": "{color_error_mean:.2f}",
        "detail": "{detail:.2f}",
    }
    if curve:
        print(
            f"\nround trip of the {curve[0]['images']} demo photos enlarged 2x with FSTD (detail: mean |output - its "
            "own downscale enlarged again|, the detail above what the input holds)\n"
        )
        table(curve, {"strength": "{strength}", "fidelity": "{fidelity}", **round_trip})
    if x4:
        print(f"\nx4 paths: the {x4[0]['images']} demo photos, {args.x4_side}^2 -> {4 * args.x4_side}^2\n")
        table(x4, {"path": "{path}", "fidelity": "{fidelity}", "s / image": "{seconds:.2f}", **round_trip})
    if killed:
        print(f"\nkill and rerun: {json.dumps({k: v for k, v in killed.items() if k != 'ref'})}")
    write_json(
        args.json,
        {
            "model": model,
            "device": str(dev),
            "steps": args.steps,
            "methods": methods,
            "strength_curve": curve,
            "x4_paths": x4,
            "kill_rerun": killed,
        },
    )


if __name__ == "__main__":
    main()

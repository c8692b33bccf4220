"""FSTD generation against the card's own limit, in one process on one GPU.

    python -m bench.gpu --quick --json bench/results/gpu-quick.json   # ~5 min on an H200
    python -m bench.gpu --json bench/results/gpu.json                 # ~9 min
    python -m bench.gpu --size tiny --device cpu --json /tmp/gpu.json # dry run of every arm (CI)

Model: an SD-2.1-base-shaped UNet (865 M), SD's VAE and a CLIP text model, randomly initialised
(speed and memory do not depend on the weights), saved and loaded through
`AnySizePipeline.from_pretrained`, fp16 on the GPU.

Arms (each repetition runs them in the same order; ratios are taken per repetition, medians
reported):
- reference: the same UNet object's best batched throughput of 64x64 samples (batch sweep,
  warm-up, CUDA events) = R_ref, measured at the start and at the end (a drift over 5% fails the
  run), and MB per sample from the sweep;
- FSTD at 1024^2, 2048^2, 4096^2 and 8 x 1024^2 packed (--quick: 1024^2, 2048^2 and 4 x 1024^2),
  guidance on: every stage-2 UNet call (batch, h, w, CUDA-event time) gives E = area-equivalent
  64x64 samples per second during stage 2 / R_ref, U = latent area / run area, and E_run = E / U
  (the call efficiency over the area the UNet really ran: the targets); calls per
  step; stage times (stage 1, canvas, FSTD, decode); the first image at a size against steady
  state; 16384^2 for memory only (2 steps);
- diffusers' `StableDiffusionPipeline` built from the same module objects, full latent at the
  same sizes, run for a few steps and extrapolated to the step count (labelled as such).

The JSON is written after every arm (`complete` false until the end): a run stopped by its time
limit still returns what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from asd_models.devices import resolve_device
from asd_models.pipeline import AnySizePipeline, RenderRequest
from bench.generate_gpu import build_pipeline

CASES = {  # name -> (side, images); quick runs the first three
    "sd21": [
        ("1024^2", 1024, 1),
        ("2048^2", 2048, 1),
        ("4 x 1024^2 packed", 1024, 4),
        ("4096^2", 4096, 1),
        ("8 x 1024^2 packed", 1024, 8),
    ],
    "tiny": [("128^2", 128, 1), ("256^2", 256, 1), ("4 x 128^2 packed", 128, 4), ("512^2", 512, 1)],
}
MEMORY_CASE = {"sd21": 16384, "tiny": 1024}
# call efficiency over the area the UNet really ran (E_run = E / U): E over the latent area alone can never
# pass U, so the targets are on E_run and U is reported beside it
TARGETS = {
    "1024^2": ("E_run", 0.50),
    "2048^2": ("E_run", 0.75),
    "4096^2": ("E_run", 0.85),
    "8 x 1024^2 packed": ("E_run", 0.80),
}
REF_DRIFT = 0.05


class CallTimer:
    """Wraps the UNet's forward: every call's shape and CUDA events (read after the arm, so no
    call waits for the device), tagged with the pipeline stage it ran in."""

    def __init__(self, unet: torch.nn.Module, device: torch.device) -> None:
        self.unet, self.device, self.stage = unet, device, ""
        self.calls: list[tuple[str, int, int, int, Any, Any]] = []
        self._forward = unet.forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = _event(device)
            out = self._forward(*args, **kwargs)
            self.calls.append(
                (self.stage, args[0].shape[0], args[0].shape[-2], args[0].shape[-1], start, _event(device))
            )
            return out

        unet.forward = timed

    def on_stage(self, name: str) -> None:
        sync(self.device)
        self.stage = name
        self.calls.append((f"@{name}", 0, 0, 0, time.perf_counter(), None))

    def restore(self) -> None:
        self.unet.forward = self._forward


def _event(device: torch.device) -> Any:
    """A point in time on the device's stream (a recorded CUDA event; on the CPU, the clock)."""
    if device.type == "cuda":
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def _elapsed(start: Any, end: Any, device: torch.device) -> float:
    return start.elapsed_time(end) / 1000 if device.type == "cuda" else end - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference(pipe: AnySizePipeline, device: torch.device, batches: list[int], side: int) -> dict:
    """The UNet's best batched throughput on side x side latents with guidance-sized text."""
    unet = pipe.c.unet
    text = torch.zeros(1, 77, unet.config.cross_attention_dim, device=device, dtype=pipe.dtype)
    rows = []
    for b in batches:
        x = torch.randn(b, unet.config.in_channels, side, side, device=device, dtype=pipe.dtype)
        t = torch.full((b,), 500, device=device)
        with torch.no_grad():
            for _ in range(2):  # warm-up
                unet(x, t, encoder_hidden_states=text.expand(b, -1, -1))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            sync(device)
            reps = 5 if device.type == "cuda" else 1
            start = _event(device)
            for _ in range(reps):
                unet(x, t, encoder_hidden_states=text.expand(b, -1, -1))
            end = _event(device)
            sync(device)
            seconds = _elapsed(start, end, device) / reps
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
        rows.append(
            {
                "batch": b,
                "samples_per_s": round(b / seconds, 2),
                "mb_per_sample": round(peak / b, 1) if peak is not None else None,
            }
        )
    best = max(rows, key=lambda r: r["samples_per_s"])
    return {"side": side, "sweep": rows, "R_ref": best["samples_per_s"], "best_batch": best["batch"]}


def fstd_arm(
    pipe: AnySizePipeline,
    device: torch.device,
    side: int,
    images: int,
    steps: int,
    ref_side: int,
    guidance: float,
    memory_only: bool = False,
) -> dict:
    """One FSTD case: per-call efficiency of stage 2, stage times, peak memory."""
    reqs = [
        RenderRequest(
            f"a lighthouse at dusk {i}",
            side,
            side,
            seed=i,
            steps=steps,
            guidance_scale=guidance,
            strength=1.0,
        )
        for i in range(images)
    ]
    sampler = pipe.default_sampler(
        salt=0, pieces="bucketed"
    )  # the GPU's shape discipline, in the dry run too
    timer = CallTimer(pipe.c.unet, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    try:
        results = pipe.generate_many(reqs, sampler, on_stage=timer.on_stage)
    finally:
        timer.restore()
    sync(device)
    total = time.perf_counter() - t0
    marks = [(c[0][1:], c[4]) for c in timer.calls if c[0].startswith("@")]
    stages = {name: round(marks[i + 1][1] - at, 3) for i, (name, at) in enumerate(marks[:-1])}
    calls = [c for c in timer.calls if c[0] == "fstd"]
    out = {
        "size": f"{side}^2",
        "images": images,
        "steps": steps,
        "seconds": round(total, 3),
        "stages": stages,
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "sizes_ok": all(r.size == (side, side) for r in results),
    }
    if memory_only:
        return out
    call_seconds = sum(_elapsed(c[4], c[5], device) for c in calls)
    run_area = sum(b * h * w for _, b, h, w, _, _ in calls)
    latent_side = side // pipe.c.vae_scale_factor
    copies = 2 if guidance != 1.0 else 1
    useful = images * latent_side * latent_side * steps * copies
    out.update(
        {
            "fstd_calls": len(calls),
            "calls_per_step": round(len(calls) / steps, 2),
            "shapes": len({(h, w) for _, _, h, w, _, _ in calls}),
            "mean_batch": round(sum(b for _, b, _, _, _, _ in calls) / max(1, len(calls)), 2),
            "fstd_stage_s": stages.get("fstd"),
            "unet_call_s": round(call_seconds, 3),
            "area_samples_per_s": round(useful / (ref_side * ref_side) / stages["fstd"], 2)
            if stages.get("fstd")
            else None,
            "U": round(useful / run_area, 3) if run_area else None,
        }
    )
    return out


def diffusers_arm(
    pipe: AnySizePipeline, device: torch.device, side: int, steps: int, run_steps: int, guidance: float
) -> dict:
    """diffusers' StableDiffusionPipeline from the same module objects, full latent, timed for
    `run_steps` steps after a 1-step warm-up and extrapolated to `steps`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sd = StableDiffusionPipeline(
        vae=pipe.c.vae,
        text_encoder=pipe.c.text_encoder,
        tokenizer=pipe.c.tokenizer,
        unet=pipe.c.unet,
        scheduler=DDIMScheduler.from_config(pipe.c.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    kw = {"height": side, "width": side, "guidance_scale": guidance, "output_type": "latent"}
    try:
        sd("warm-up", num_inference_steps=1, **kw)
        sync(device)
        t0 = time.perf_counter()
        sd("a lighthouse at dusk", num_inference_steps=run_steps, **kw)
        sync(device)
    except torch.OutOfMemoryError as exc:
        return {"size": f"{side}^2", "error": f"out of memory: {exc}"[:200]}
    seconds = time.perf_counter() - t0
    return {
        "size": f"{side}^2",
        "run_steps": run_steps,
        "seconds_per_step": round(seconds / run_steps, 4),
        "seconds_at_steps": round(seconds / run_steps * steps, 3),
        "extrapolated": run_steps < steps,
    }


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import diffusers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(device),
        "dtype": str(dtype),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the first three cases, fewer steps, one repetition")
    ap.add_argument(
        "--size", choices=sorted(CASES), default="sd21", help="sd21: SD-2.1-base-sized; tiny: dry run"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--steps", type=int, default=None, help="steps per stage (default 50; --quick 20; tiny 3)"
    )
    ap.add_argument(
        "--repeats", type=int, default=None, help="repetitions of every arm (default 2; --quick 1)"
    )
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--json", default="bench/results/gpu.json")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tiny = args.size == "tiny"
    steps = args.steps or (3 if tiny else 20 if args.quick else 50)
    repeats = args.repeats or (1 if args.quick or tiny else 2)
    cases = CASES[args.size][:3] if args.quick else CASES[args.size]
    report: dict[str, Any] = {
        "environment": environment(device, dtype),
        "steps": steps,
        "repeats": repeats,
        "complete": False,
    }

    def save() -> None:
        """The report so far, written after every arm: a run stopped by its time limit keeps its arms."""
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pipe = build_pipeline(args.size, Path(tmp) / "model", device, dtype)
        ref_side = pipe.c.unet.config.sample_size
        report["environment"]["load_s"] = round(time.perf_counter() - t0, 1)
        print(
            f"pipeline on {pipe.device} ({pipe.dtype}), UNet "
            f"{sum(p.numel() for p in pipe.c.unet.parameters()) / 1e6:.0f} M, {steps} steps per stage",
            flush=True,
        )
        batches = [1, 2, 4, 8] if tiny else [1, 4, 8, 16, 32, 64]
        ref_start = reference(pipe, device, batches, ref_side)
        report["reference_start"] = ref_start
        save()
        print(
            f"reference: R_ref {ref_start['R_ref']} samples/s at batch {ref_start['best_batch']}", flush=True
        )
        cold: dict[str, float] = {}
        report["first_image_s"] = cold
        for name, side, images in cases:  # first image at each size: new shapes pay their kernel selection
            t0 = time.perf_counter()
            fstd_arm(pipe, device, side, images, 2, ref_side, args.guidance)
            cold[name] = time.perf_counter() - t0
            save()
        reps: list[dict[str, dict]] = []
        report["repetitions"] = reps
        for _ in range(repeats):
            rows: dict[str, dict] = {}
            reps.append(rows)
            for name, side, images in cases:
                rows[name] = fstd_arm(pipe, device, side, images, steps, ref_side, args.guidance)
                save()
            for name, side, _ in cases:
                if name.endswith("^2"):
                    rows[f"diffusers {name}"] = diffusers_arm(
                        pipe, device, side, steps, min(steps, 3), args.guidance
                    )
                    save()
            print(
                json.dumps({k: v.get("seconds", v.get("seconds_at_steps")) for k, v in rows.items()}),
                flush=True,
            )
        ref_end = reference(pipe, device, [ref_start["best_batch"]], ref_side)
        drift = abs(ref_end["R_ref"] - ref_start["R_ref"]) / ref_start["R_ref"]
        memory = fstd_arm(
            pipe, device, MEMORY_CASE[args.size], 1, 2, ref_side, args.guidance, memory_only=True
        )
    r_ref = ref_start["R_ref"]
    summary = {}
    for name, _, _ in cases:
        e = [r[name]["area_samples_per_s"] / r_ref for r in reps if r[name].get("area_samples_per_s")]
        u = reps[-1][name]["U"]
        row = {
            "E": round(statistics.median(e), 3) if e else None,
            "U": u,
            "E_run": round(statistics.median(e) / u, 3) if e and u else None,
            "calls_per_step": reps[-1][name]["calls_per_step"],
            "shapes": reps[-1][name]["shapes"],
            "seconds": statistics.median(r[name]["seconds"] for r in reps),
            "first_over_steady_2_steps": None,
            "peak_gpu_gb": reps[-1][name]["peak_gpu_gb"],
        }
        steady2 = reps[-1][name]["seconds"] / steps * 2
        row["first_over_steady_2_steps"] = round(cold[name] / steady2, 2) if steady2 else None
        sd = [r.get(f"diffusers {name}", {}).get("seconds_at_steps") for r in reps]
        sd = [s for s in sd if s]
        if sd:
            row["over_diffusers"] = round(
                statistics.median(r[name]["seconds"] / s for r, s in zip(reps, sd, strict=False)), 3
            )
        summary[name] = row
    report.update(
        reference_start=ref_start,
        reference_end=ref_end,
        reference_drift=round(drift, 4),
        repetitions=reps,
        memory=memory,
        summary=summary,
        complete=True,
    )
    checks = [("R_ref drift <= 5%", drift <= REF_DRIFT, f"{drift:.1%}")]
    for name, (metric, bar) in TARGETS.items():
        if name in summary and summary[name][metric] is not None:
            checks.append((f"{metric} {name} >= {bar}", summary[name][metric] >= bar, summary[name][metric]))
    if not tiny:
        checks.append(("R_ref >= 300 samples/s", r_ref >= 300, r_ref))
    report["checks"] = [{"check": c, "pass": bool(p), "value": v} for c, p, v in checks]
    print(
        f"\nR_ref {r_ref} samples/s ({ref_side}^2 latents, batch {ref_start['best_batch']}), drift {drift:.1%}"
    )
    print(
        f"{'case':22s} {'E_run':>6s} {'E':>6s} {'U':>6s} {'calls/step':>10s} {'shapes':>6s} {'seconds':>8s} {'first/steady':>12s} "
        f"{'vs diffusers':>12s} {'peak GB':>8s}"
    )
    for name, r in summary.items():
        print(
            f"{name:22s} {r['E_run'] if r['E_run'] is not None else '-':>6} {r['E'] if r['E'] is not None else '-':>6} {r['U'] or '-':>6} {r['calls_per_step']:>10} "
            f"{r['shapes']:>6} {r['seconds']:>8} {r['first_over_steady_2_steps'] or '-':>12} "
            f"{r.get('over_diffusers', '-'):>12} {r['peak_gpu_gb'] or '-':>8}"
        )
    print(
        f"memory only, {memory['size']} (2 steps): {memory['seconds']} s, peak GPU {memory['peak_gpu_gb']} GB"
    )
    print("\n" + "\n".join(f"{'PASS' if p else 'FAIL'}  {c}: {v}" for c, p, v in checks))
    if tiny:
        print(
            "(dry run: a tiny random model on this device; the numbers say the arms run, not how fast a GPU is)"
        )
    save()
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""`asd generate --image-parallel N`: a pack of images rendered by N processes on this machine,
each taking its share of every step's pieces (`asd_models.image_share`): torch.distributed over
TCP on 127.0.0.1, NCCL with one GPU a rank (rank k on the k-th visible device), gloo on CPUs.

The ranks are child processes (`python -m tasks.image_parallel SPEC RANK`, as torchrun would
start them; a Dask worker, a daemon, may start them too), each loading the model the same way
and running the same `generate_many` under its share (the tiled VAE's encode and decode split
by tile too). Rank 0 hands the images back through files (an output over the memory-map threshold comes back memory-mapped, never read
whole). A rank that fails or dies stops the others and fails the pack with one line naming it
(its images become failed rows, rendered again when the job is run again); a rank that hangs is
stopped by the process group's timeout."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from asd_models.render_request import AnySizeResult, RenderRequest

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SharedRender:
    """What every rank needs (pickled to a file): how to load the pipeline on a device
    (`load(device=...)`), how to make the sampler from it, the requests, and the limits."""

    load: Callable[..., Any]
    sampler_for: Callable[[Any], Any]
    requests: list[RenderRequest]
    memmap_pixels: int
    device: str = "cpu"  # "cuda": rank k renders on cuda:k
    threads: int = 1  # torch threads a rank (CPU)
    timeout_s: float = 1800.0  # a collective that waits longer than this fails the rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render_shared(spec: SharedRender, world: int) -> list[AnySizeResult]:
    """Render `spec.requests` with `world` processes; the results, as `generate_many` gives them."""
    if world < 2:
        raise ValueError(f"image-parallel needs 2 or more processes, not {world}")
    out = Path(tempfile.mkdtemp(prefix="asd-image-parallel-"))
    try:
        (out / "spec.pkl").write_bytes(pickle.dumps(spec))
        port = free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        procs = []
        for rank in range(world):
            with open(out / f"rank-{rank}.log", "wb") as log:  # the child keeps its own descriptor
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "tasks.image_parallel",
                            str(out),
                            str(rank),
                            str(world),
                            str(port),
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        _wait(procs, out)
        results = _read_results(out, len(spec.requests), spec.memmap_pixels)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if not any(isinstance(r.pixels, np.memmap) for r in results):
        shutil.rmtree(out, ignore_errors=True)
    return results


def _wait(procs: list[subprocess.Popen], out: Path) -> None:
    """Every rank finished; the first that fails stops the others and fails the pack."""
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                raise RuntimeError(_failure(failed, len(procs), procs[failed], out))
            if all(c == 0 for c in codes):
                return
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _failure(rank: int, world: int, proc: subprocess.Popen, out: Path) -> str:
    error = out / f"rank-{rank}.error"
    why = error.read_text().strip() if error.is_file() else ""
    if not why:
        code = proc.returncode
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return f"image-parallel rank {rank} of {world} failed ({why}); the other ranks were stopped"


def _read_results(out: Path, n: int, memmap_pixels: int) -> list[AnySizeResult]:
    """Rank 0's results; an image over `memmap_pixels` stays memory-mapped (its folder removed
    when the last such image is freed), the rest are read into memory."""
    results: list[AnySizeResult] = pickle.loads((out / "results.pkl").read_bytes())
    if len(results) != n:
        raise RuntimeError(f"image-parallel rank 0 returned {len(results)} images for {n} requests")
    loaded = []
    for i, res in enumerate(results):
        pixels = np.load(out / f"pixels-{i}.npy", mmap_mode="r")
        if pixels.shape[0] * pixels.shape[1] <= memmap_pixels:
            pixels = np.array(pixels)
        else:
            weakref.finalize(pixels, shutil.rmtree, out, True)
        loaded.append(replace(res, pixels=pixels))
    return loaded


def _rank_main(out: Path, rank: int, world: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    from artifact_store.faults import fault_point
    from asd_models.image_share import ImageShare, image_share

    spec: SharedRender = pickle.loads((out / "spec.pkl").read_bytes())
    cuda = spec.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(max(1, spec.threads))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=spec.timeout_s),
    )
    try:
        device = f"cuda:{rank}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(rank)
        pipe = spec.load(device=device)
        fault_point(f"image-parallel-rank-{rank}")  # tests: a rank killed after it joined the group
        with image_share(ImageShare(rank, world, device=device)):
            results = pipe.generate_many(
                spec.requests, spec.sampler_for(pipe), memmap_pixels=spec.memmap_pixels
            )
        if rank == 0:
            for i, res in enumerate(results):
                np.save(out / f"pixels-{i}.npy", res.pixels)
            kept = [replace(res, pixels=np.zeros((0, 0, 3), np.uint8)) for res in results]
            (out / "results.pkl.tmp").write_bytes(pickle.dumps(kept))
            os.replace(out / "results.pkl.tmp", out / "results.pkl")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    folder, rank_arg, world_arg, port_arg = sys.argv[1:5]
    try:
        _rank_main(Path(folder), int(rank_arg), int(world_arg), int(port_arg))
    except BaseException as exc:
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        (Path(folder) / f"rank-{rank_arg}.error").write_text(last[:2000])
        raise SystemExit(1) from None


def pipeline_from_folder(folder: str, device: str = "cpu") -> Any:
    """A loader for `SharedRender.load`: a model folder's pipeline on `device` (tests, benches)."""
    from asd_models.pipeline import AnySizePipeline

    return AnySizePipeline.from_pretrained(folder).to(device)

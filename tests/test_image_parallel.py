"""`--image-parallel N`: one image rendered by N processes (gloo on the CPU here), each running
its share of every step's pieces, one all-reduce a step: the images are the one-process images
(bit for bit when each process batches as one process would: one piece a call), at odd sizes,
packed, and for an output large enough to be memory-mapped; a rank that dies fails its pack in
one line naming it, and the rest of the job goes on."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image

from asd_models.image_share import ImageShare, assign, image_share
from asd_models.pipeline import AnySizePipeline
from asd_models.render_request import RenderRequest
from tasks.image_parallel import SharedRender, pipeline_from_folder, render_shared


def test_pieces_are_shared_by_area_and_every_rank_agrees():
    areas = [64 * 64, 64 * 32, 32 * 32, 64 * 64, 16 * 64, 64 * 48]
    owners = assign(areas, 2)
    assert owners == assign(list(areas), 2)  # a pure function: every rank computes the same
    load = [sum(a for a, o in zip(areas, owners, strict=True) if o == r) for r in range(2)]
    assert max(load) - min(load) <= max(areas)  # largest first to the least loaded
    assert set(assign(areas, 8)) <= set(range(8)) and assign([], 3) == []
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        ImageShare(2, 2)
    with image_share(ImageShare(0, 1)):  # one process: no share at all
        from asd_models.image_share import current_share

        assert current_share() is None


def test_two_processes_render_the_one_process_images(tiny_model_dir):
    """Two images of odd sizes packed together, and one output past the memory-map threshold:
    the same pixels from two gloo processes as from one."""
    reqs = [
        RenderRequest("a red barn", 328, 200, seed=3, steps=3),
        RenderRequest("a cat on a wall", 200, 264, seed=4, steps=3),
    ]
    sampler_for = functools.partial(AnySizePipeline.default_sampler, tile_batch_size=1)
    pipe = AnySizePipeline.from_pretrained(tiny_model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (a thread count changes float reductions)
    try:
        alone = pipe.generate_many(reqs, sampler_for(pipe))
        big = [RenderRequest("a harbour", 392, 136, seed=5, steps=3)]
        alone_big = pipe.generate_many(big, sampler_for(pipe), memmap_pixels=10_000)
    finally:
        torch.set_num_threads(threads)
    spec = SharedRender(
        functools.partial(pipeline_from_folder, str(tiny_model_dir)), sampler_for, reqs, 1 << 30
    )
    shared = render_shared(spec, 2)
    for a, b in zip(alone, shared, strict=True):
        assert b.size == a.size and np.array_equal(a.pixels, b.pixels)
        assert b.unet_evals == a.unet_evals  # every rank's pieces counted, as one process counts them
    shared = render_shared(SharedRender(spec.load, sampler_for, big, 10_000), 2)
    assert isinstance(shared[0].pixels, np.memmap) and np.array_equal(alone_big[0].pixels, shared[0].pixels)


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_pack_in_one_line(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ASD_FAULT_AT", "image-parallel-rank-1")
    spec = SharedRender(
        functools.partial(pipeline_from_folder, str(tiny_model_dir)),
        AnySizePipeline.default_sampler,
        [RenderRequest("a barn", 200, 136, steps=2)],
        1 << 30,
    )
    with pytest.raises(RuntimeError, match=r"image-parallel rank 1 of 2 failed \(killed by signal 9\)"):
        render_shared(spec, 2)


@pytest.mark.slow
def test_asd_generate_image_parallel_gives_the_same_images(stored_model, tmp_path):
    """The CLI: --image-parallel 2 renders the images --image-parallel 1 does (one piece a call)."""
    from artifact_store import ArtifactStore
    from tests.helpers import asd_process

    common = ["--prompt", "a lighthouse", "--size", "296x168", "--steps", "3", "--tile-batch-size", "1"]
    env = {"OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "ph")}  # a thread each, as the ranks
    refs = []
    for n in (1, 2):
        done = asd_process(
            stored_model,
            "generate",
            "--model",
            "tiny",
            "--name",
            f"ip{n}",
            *common,
            "--image-parallel",
            str(n),
            env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        refs.append(done.stdout.strip().splitlines()[-1])
    store = ArtifactStore(stored_model)
    pictures = []
    for ref in refs:
        (image,) = [rel for rel, _ in store.iter_files(ref) if rel.endswith(".png") and ".seams" not in rel]
        pictures.append(np.asarray(Image.open(io.BytesIO(store.read_bytes(ref, image)))))
    assert pictures[0].shape == (168, 296, 3) and np.array_equal(pictures[0], pictures[1])

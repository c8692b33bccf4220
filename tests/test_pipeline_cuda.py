"""The pipeline on a CUDA device (skipped where there is none). Imports only the science, so it
runs on a GPU machine that has torch and diffusers and nothing else of the project's stack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asd_models.pipeline import AnySizePipeline, RenderRequest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REQUESTS = [
    RenderRequest("a red cat", 128, 128, seed=1, steps=3),
    RenderRequest("a blue dog", 128, 128, seed=2, steps=3),
    RenderRequest("a green hill", 200, 96, seed=3, steps=4, strength=0.8),
]


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a.image, dtype=np.float32) - np.asarray(b.image, dtype=np.float32)).mean())


def test_every_tensor_on_the_device_and_same_seed_same_image_as_cpu(tiny_model_dir):
    cpu = AnySizePipeline.from_pretrained(tiny_model_dir)
    gpu = AnySizePipeline.from_pretrained(tiny_model_dir).to("cuda", torch.float32)
    assert gpu.device.type == "cuda" and all(p.device.type == "cuda" for p in gpu.c.vae.parameters())
    a = cpu.generate_many(REQUESTS, cpu.default_sampler(tile_batch_size=8))
    b = gpu.generate_many(REQUESTS, gpu.default_sampler(tile_batch_size=8))
    for x, y in zip(a, b, strict=True):
        assert x.image.size == y.image.size and x.unet_evals == y.unet_evals
        assert _diff(x, y) < 2.0  # noise drawn on the CPU: one seed, one picture on any device


def test_fp16_and_bf16_render_exact_sizes(tiny_model_dir):
    for dtype in (torch.float16, torch.bfloat16):
        pipe = AnySizePipeline.from_pretrained(tiny_model_dir).to("cuda", dtype)
        assert pipe.dtype == dtype
        if dtype == torch.float16 and torch.cuda.is_bf16_supported():  # SD-style VAEs overflow in fp16
            assert pipe.c.vae.dtype == torch.bfloat16
        for res, req in zip(pipe.generate_many(REQUESTS), REQUESTS, strict=True):
            arr = np.asarray(res.image)
            assert res.image.size == (req.width, req.height) and arr.std() > 0
    assert pipe.default_sampler().tile_batch_size >= 1  # from free GPU memory


def test_concurrent_large_decodes_on_one_gpu_pipeline_match_sequential_ones(tiny_model_dir):
    from concurrent.futures import ThreadPoolExecutor

    from asd_models.tiled_vae import tiled_decode

    pipe = AnySizePipeline.from_pretrained(tiny_model_dir).to("cuda", torch.float16)
    latents = [
        torch.randn(1, 4, 40, 64, generator=torch.Generator().manual_seed(s)).cuda() * (1 + s) for s in (0, 1)
    ]
    alone = [tiled_decode(pipe.c.vae, z, tile=8) for z in latents]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda z: tiled_decode(pipe.c.vae, z, tile=8), latents))
    assert all(np.array_equal(a, t) for a, t in zip(alone, together, strict=True))


def test_packed_matches_one_at_a_time_on_the_gpu(tiny_model_dir):
    pipe = AnySizePipeline.from_pretrained(tiny_model_dir).to("cuda", torch.float32)
    sampler = pipe.default_sampler(tile_batch_size=16)
    alone = [pipe.generate_many([r], sampler)[0] for r in REQUESTS]
    packed = pipe.generate_many(REQUESTS, sampler)
    for a, p in zip(alone, packed, strict=True):
        assert _diff(a, p) < 1.0

"""ARAD trainer throughput at Stable Diffusion 2.1 size on a GPU (randomly initialised: speed
and memory do not depend on the weights).

    python -m bench.train_gpu --json bench/results/train_gpu.json           # on a CUDA machine
    python -m bench.train_gpu --size tiny --steps 2 --warmup 1              # dry run on a CPU

UNet: SD-2.1-base's config (865 M parameters: blocks 320/640/1280/1280, linear-projection
attention, 1024-d cross-attention); VAE: SD's (84 M); text encoder: OpenCLIP-ViT-H-shaped CLIP
text model (23 layers, 1024 wide; 290 M with the character-level tokenizer's small vocabulary). The real `AradTrainer`
runs: bf16 autocast, AdamW, EMA, VAE encoding of every batch (or cached latents), batches
cycling over three ASD 512 buckets (512x512, 576x448, 448x576). Reports samples/s and peak
GPU memory (`torch.cuda.max_memory_allocated`) per configuration.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

BUCKETS = [(512, 512), (576, 448), (448, 576)]


def components(size: str) -> SimpleNamespace:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from asd_models.tiny_model import MAX_TOKENS, build_tiny_components, build_tiny_tokenizer

    if size == "tiny":
        return SimpleNamespace(**build_tiny_components())
    tokenizer = build_tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_act="gelu",
            projection_dim=1024,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=512,
        layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
    )
    return SimpleNamespace(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


def batches(batch_size: int, scale: int):
    g = torch.Generator().manual_seed(0)
    i = 0
    while True:
        w, h = BUCKETS[i % len(BUCKETS)]
        w, h = w // scale, h // scale
        keys = [f"{i}-{j}" for j in range(batch_size)]
        yield {
            "bucket": f"{w}x{h}",
            "pixels": torch.rand(batch_size, 3, h, w, generator=g) * 2 - 1,
            "captions": [f"a generated picture {k}" for k in keys],
            "keys": keys,
        }
        i += 1


def run(size: str, batch_size: int, checkpointing: str, cache: bool, steps: int, warmup: int) -> dict:
    from asd_models.arad_training import AradTrainer
    from tasks.train import TrainSettings

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    c = components(size)
    params = sum(p.numel() for p in c.unet.parameters())
    cfg = TrainSettings(
        steps=steps + warmup,
        batch_size=batch_size,
        learning_rate=1e-5,
        ema_decay=0.9999,
        mixed_precision="auto",
        gradient_checkpointing=checkpointing,
        cache_latents=cache,
    ).train_config()
    trainer = AradTrainer(c, cfg)
    # cached latents: the same few batches repeat, so every timed step finds its latents cached
    it = batches(batch_size, 1 if size == "sd21" else 4)
    if cache:
        fixed = [next(it) for _ in range(len(BUCKETS))]
        it = (fixed[i % len(fixed)] for i in range(10**9))
    trainer.train(it, until_step=warmup)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.train(it)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {
        "size": size,
        "unet_params_m": params / 1e6,
        "batch_size": batch_size,
        "gradient_checkpointing": checkpointing,
        "cached_latents": cache,
        "precision": trainer.accelerator.mixed_precision,
        "steps": steps,
        "seconds": seconds,
        "samples_per_s": steps * batch_size / seconds,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "loss_last": trainer.losses[-1],
    }
    del trainer, c
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("sd21", "tiny"), default="sd21")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configs = [(8, "off", False), (8, "on", False), (16, "on", False), (16, "on", True)]
    results = []
    for bs, ckpt, cache in configs:
        try:
            results.append(run(args.size, bs, ckpt, cache, args.steps, args.warmup))
        except torch.cuda.OutOfMemoryError as exc:
            results.append(
                {
                    "size": args.size,
                    "batch_size": bs,
                    "gradient_checkpointing": ckpt,
                    "cached_latents": cache,
                    "error": f"out of memory: {exc}"[:200],
                }
            )
        print(json.dumps(results[-1]), flush=True)
    print("\n| UNet | batch | grad ckpt | cached latents | precision | samples/s | peak GPU GiB | device |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(
                f"| {r['size']} | {r['batch_size']} | {r['gradient_checkpointing']} | {r['cached_latents']} | | OOM | | |"
            )
            continue
        gib = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "-"
        print(
            f"| {r['unet_params_m']:.0f} M | {r['batch_size']} | {r['gradient_checkpointing']} | {r['cached_latents']} | "
            f"{r['precision']} | {r['samples_per_s']:.2f} | {gib} | {r['device']} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

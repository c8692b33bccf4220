"""Where and in what precision the models run: the device and dtype a user names resolved (`auto`:
a GPU when there is one, fp16 there), the VAE's dtype when fp16 would overflow, and how many
tiles fit one UNet call on a GPU."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' (a GPU when there is one), 'cpu', 'cuda' or 'cuda:N'."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': fp16 on a GPU, fp32 on the CPU; else fp32 / fp16 / bf16."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def vae_upcast_dtype(device: torch.device) -> torch.dtype:
    """The VAE's dtype when fp16 would overflow: bf16 on a GPU that has it, else fp32."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def auto_tile_batch_size(device: torch.device, tile: int, dtype: torch.dtype) -> int | None:
    """Tiles per UNet call from free GPU memory (None on the CPU: the sampler's default).
    Budget: half the free memory, about 160 MB of activations per fp16 sample of a 64x64 latent
    for an SD-2.1-sized UNet (twice in fp32), guidance doubling the samples."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    per_tile = 2 * 160e6 * (tile / 64) ** 2 * (2 if dtype == torch.float32 else 1)
    return int(max(1, min(64, 0.5 * free // per_tile)))

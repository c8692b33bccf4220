"""A VAE's posterior as the denoiser's latents and back: `(z - shift_factor) * scaling_factor`.
SD's VAEs have no shift (0); SD3's and FLUX's 16-channel ones do. Every encode and decode of
the pipeline, the tiled VAE and the trainer goes through these two."""

from __future__ import annotations

from typing import Any

import torch


def _shift(vae: Any) -> float:
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def to_latents(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """The VAE's posterior sample or mean `z` as scaled latents."""
    return (z - _shift(vae)) * vae.config.scaling_factor


def from_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents as the VAE's decoder takes them (in the VAE's dtype)."""
    return (latents / vae.config.scaling_factor + _shift(vae)).to(vae.dtype)

"""The noise schedule of the families trained with flow matching (SD3-, FLUX-class): a straight
path `x_t = (1 - s) x0 + s noise` from data (s = 0) to noise (s = 1), the denoiser predicting
the velocity `noise - x0`, sampled with diffusers' `FlowMatchEulerDiscreteScheduler`.

The timestep shift is the model's: a fixed `shift` from its scheduler config (SD3), or with
`use_dynamic_shifting` one computed from the whole image's number of patches (FLUX): FSTD asks
for it once, for the whole latent, never per tile. The Euler step is taken once a step on the
whole latent by the shared loop, as for every scheduler."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from asd_models.families.base import ModelComponents, ModelFamily

TILE_POSITIONS = ("global", "local")  # a piece's positions: its place in the whole image, or its own


def check_tile_positions(value: str) -> None:
    if value not in TILE_POSITIONS:
        raise ValueError(f"tile_positions {value!r}: expected one of {', '.join(TILE_POSITIONS)}")


def dynamic_shift_mu(config: Any, image_seq_len: int) -> float:
    """The resolution-dependent shift of a scheduler with `use_dynamic_shifting` (as FLUX's own
    pipeline computes it: linear in the image's patch count between base and max)."""
    base_len, max_len = config.base_image_seq_len, config.max_image_seq_len
    slope = (config.max_shift - config.base_shift) / (max_len - base_len)
    return float(image_seq_len * slope + config.base_shift - slope * base_len)


class FlowMatching(ModelFamily):
    """A family trained with flow matching: its scheduler, its noising and its training pairs.
    `patch` is the side of the square of latent pixels one token covers; `explicit_sigmas`: the
    family's pipeline sets sigmas 1 .. 1/steps itself (FLUX) rather than the scheduler's own."""

    explicit_sigmas: ClassVar[bool] = False

    def patch(self, config: Mapping[str, Any]) -> int:
        return int(config["patch_size"])

    def latent_multiple(self, config: Mapping[str, Any]) -> int:
        return self.patch(config)

    def sampling_scheduler(self, c: ModelComponents, steps: int, latent_hw: tuple[int, int]) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(c.scheduler.config)
        kw: dict[str, Any] = {}
        if self.explicit_sigmas:
            kw["sigmas"] = list(np.linspace(1.0, 1 / steps, steps))
        if scheduler.config.use_dynamic_shifting:
            h, w = latent_hw
            p = self.patch(c.unet.config)
            seq = (h // p) * (w // p)  # the whole image's, never a tile's
            kw["mu"] = dynamic_shift_mu(scheduler.config, seq)
        scheduler.set_timesteps(None if "sigmas" in kw else steps, **kw)
        return scheduler

    def start_latents(self, scheduler: Any, noise: torch.Tensor) -> torch.Tensor:
        return noise  # s = 1 is pure noise

    def noised(self, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_noise(x0, t, noise)

    def check_training(self, c: ModelComponents) -> None:
        pass  # every flow-matching model trains with the same objective

    def training_example(
        self, c: ModelComponents, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise levels drawn logit-normally (SD3's default weighting), shifted as the model's
        schedule shifts them; the target is the velocity `noise - x0`."""
        config = c.scheduler.config
        u = torch.sigmoid(torch.randn(x0.shape[0], generator=generator, device=generator.device))
        if config.use_dynamic_shifting:
            p = self.patch(c.unet.config)
            seq = (x0.shape[-2] // p) * (x0.shape[-1] // p)
            shift = math.exp(dynamic_shift_mu(config, seq))
        else:
            shift = float(config.shift)
        sigma = (shift * u / (1 + (shift - 1) * u)).to(x0.device)
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        noisy = (1 - s) * x0 + s * noise
        return noisy, sigma * config.num_train_timesteps, noise - x0

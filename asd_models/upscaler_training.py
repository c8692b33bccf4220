"""A tiny x4 upscaler, built and fitted in code (as the tiny base model is): the SD-x4-upscaler
shape (`tiny_model.build_tiny_upscaler_components`: the UNet sees 4 noisy latent channels plus
the 3-channel low-res image, noised to a level given as its class label), its VAE fitted to the
images (`arad_training.fit_vae`), then its UNet trained with the upscaler's objective on random
crops: the crop's latents noised to a random timestep, conditioned on the crop shrunk 4x and
noised to a random level below `max_noise_level`, and on its caption. No weights are
downloaded; a user with the real `stabilityai/stable-diffusion-x4-upscaler` passes its folder
as `--upscaler` instead."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from asd_models.arad_training import fit_vae
from asd_models.tiny_model import build_tiny_upscaler_components

MAX_NOISE_LEVEL = 350  # as the released x4 upscaler's pipeline caps it


def fit_tiny_upscaler(
    images: list[torch.Tensor],
    captions: list[str],
    vae_steps: int = 200,
    unet_steps: int = 300,
    crop: int = 64,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    seed: int = 0,
    on_step: Callable[[str, int, int, float], None] | None = None,
) -> dict:
    """The tiny upscaler's components, fitted to `images` (each 1 x 3 x H x W in [-1, 1], at
    least `crop` pixels a side) with their `captions`. Returns the components dict that
    `tiny_model.save_upscaler_components` saves."""
    c = build_tiny_upscaler_components(seed)
    fit_vae(
        c["vae"],
        images,
        vae_steps,
        batch_size=batch_size,
        crop=crop,
        seed=seed,
        on_step=(lambda s, n, loss: on_step("vae", s, n, loss)) if on_step else None,
    )
    vae, unet, text, tok = c["vae"], c["unet"], c["text_encoder"], c["tokenizer"]
    sched, low_sched = c["scheduler"], c["low_res_scheduler"]
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    crop = min([crop] + [min(img.shape[-2:]) for img in images])
    with torch.no_grad():
        ids = tok(
            captions,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embeddings = text(ids)[0]
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=learning_rate)
    for step in range(unet_steps):
        picks = [rng.randrange(len(images)) for _ in range(batch_size)]
        crops = []
        for i in picks:
            _, _, h, w = images[i].shape
            y, x = rng.randint(0, h - crop), rng.randint(0, w - crop)
            crops.append(images[i][:, :, y : y + crop, x : x + crop])
        high = torch.cat(crops)
        low = F.interpolate(high, scale_factor=0.25, mode="area")
        level = torch.randint(0, MAX_NOISE_LEVEL, (batch_size,), generator=gen)
        low = low_sched.add_noise(low, torch.randn(low.shape, generator=gen), level)
        with torch.no_grad():
            latents = vae.encode(high).latent_dist.mean * vae.config.scaling_factor
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(
            torch.cat([noisy, low], dim=1), t, encoder_hidden_states=embeddings[picks], class_labels=level
        ).sample
        target = (
            sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        )
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step:
            on_step("unet", step, unet_steps, loss.item())
    unet.eval().requires_grad_(False)
    return c

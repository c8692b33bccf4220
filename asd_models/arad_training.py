"""ARAD fine-tuning: denoising loss on aspect-ratio buckets, one bucket per batch.

Plus `fit_vae`, which fits a freshly built (tiny) VAE to the training images: a real
checkpoint's VAE is already trained, a randomly initialised one turns every latent into noise.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

StepLog = Callable[[int, int, float], None]  # step, total, loss


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 20
    caption_dropout: float = 0.1  # empty caption, so classifier-free guidance works
    grad_clip: float = 1.0
    seed: int = 0


def bucket_batches(counts: dict[str, int], batch_size: int, seed: int) -> Iterator[tuple[str, list[int]]]:
    """Endless (bucket, sample indices) batches, every batch from one bucket.

    Per epoch each bucket's samples are shuffled; each batch draws a bucket with probability
    proportional to its remaining samples (NovelAI's scheme). Leftover policy: a bucket's last
    partial batch is kept as a smaller batch, so every sample is seen once per epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    names = sorted(b for b, n in counts.items() if n > 0)
    if not names:
        raise ValueError("no samples in any bucket")
    while True:
        remaining = {}
        for b in names:
            idx = list(range(counts[b]))
            rng.shuffle(idx)
            remaining[b] = idx
        while any(remaining.values()):
            live = [b for b in names if remaining[b]]
            b = rng.choices(live, weights=[len(remaining[x]) for x in live])[0]
            batch, remaining[b] = remaining[b][:batch_size], remaining[b][batch_size:]
            yield b, batch


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    import math

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_unet_arad(
    unet: torch.nn.Module,
    noise_scheduler,
    latents: dict[str, torch.Tensor],
    text_embeds: dict[str, torch.Tensor],
    empty_embed: torch.Tensor,
    config: TrainConfig,
    on_step: StepLog | None = None,
) -> list[float]:
    """Train `unet` in place on cached latents per bucket; returns the loss per step.

    latents[b]: N x C x h x w (scaled) for bucket b; text_embeds[b]: N x L x D.
    """
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.warmup_steps, config.steps))
    prediction_type = noise_scheduler.config.prediction_type
    T = noise_scheduler.config.num_train_timesteps
    batches = bucket_batches({b: len(x) for b, x in latents.items()}, config.batch_size, config.seed)
    losses = []
    for step in range(config.steps):
        b, idx = next(batches)
        x0 = latents[b][idx]
        text = text_embeds[b][idx].clone()
        drop = torch.rand(len(idx), generator=gen) < config.caption_dropout
        text[drop] = empty_embed
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (len(idx),), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(x0, noise, t)
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
        pred = unet(noisy, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, config.steps, losses[-1])
    unet.eval().requires_grad_(False)
    return losses


def fit_vae(
    vae: torch.nn.Module,
    images: list[torch.Tensor],
    steps: int,
    batch_size: int = 8,
    crop: int = 64,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    on_step: StepLog | None = None,
) -> list[float]:
    """Fit an autoencoder to random crops of `images` (each 1 x 3 x H x W in [-1, 1]), then
    set `scaling_factor` so scaled latents have unit variance (as SD's VAE does)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(20, steps // 10 + 1), steps))
    losses = []
    for step in range(steps):
        batch = []
        for _ in range(batch_size):
            img = rng.choice(images)
            _, _, h, w = img.shape
            c = min(crop, h, w)
            y, x = rng.randint(0, h - c), rng.randint(0, w - c)
            patch = img[:, :, y : y + c, x : x + c]
            if rng.random() < 0.5:
                patch = patch.flip(-1)
            batch.append(patch)
        x = torch.cat(batch)
        # Decode the posterior mean (as the pipeline does); the KL term keeps latents bounded.
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, steps, losses[-1])
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(img).latent_dist.mean.flatten() for img in images])
    vae.register_to_config(scaling_factor=float(1.0 / z.std().clamp_min(1e-6)))
    return losses

"""ARAD fine-tuning: the denoising loss on aspect-ratio buckets, one bucket per batch.

`AradTrainer` trains a diffusers `UNet2DConditionModel` (VAE and text encoder frozen) with
accelerate, so one CPU, one GPU or several GPUs run the same code: AdamW, warm-up then cosine,
gradient accumulation and clipping, EMA weights (diffusers' `EMAModel`), bf16 autocast and
gradient checkpointing on GPUs, optional cached latents. Its whole state (weights, optimizer,
LR schedule, EMA, RNG streams, position in the data) saves to a folder of safetensors + JSON
and loads back so that a resumed run continues the uninterrupted run's loss sequence exactly.

Plus `fit_vae`, which fits a freshly built (tiny) VAE to the training images: a real
checkpoint's VAE is already trained, a randomly initialised one turns every latent into noise.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from asd_models.families.base import Conditioning, Place
from asd_models.latent_scale import to_latents
from asd_models.lora import add_trainable_lora

StepLog = Callable[[int, int, float], None]  # step, total, loss


@dataclass(frozen=True)
class TrainConfig:
    """The trainer's frozen config. No defaults here: `TrainSettings` owns them
    (`TrainSettings(...).train_config()` builds this)."""

    steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float  # cosine decays to this fraction of the peak
    caption_dropout: float  # empty caption, so classifier-free guidance works
    grad_clip: float
    grad_accum: int
    ema_decay: float  # 0 turns EMA off; with warm-up (diffusers' EMAModel)
    mixed_precision: str  # auto (bf16 on a GPU that has it, else fp32) | no | bf16 | fp16
    gradient_checkpointing: str  # auto (on a GPU) | on | off
    cache_latents: bool  # encode each sample once (memory grows with the dataset)
    shuffle_buffer: int
    leftover: str  # a bucket's last partial batch: keep (smaller batch) | drop
    num_workers: int  # data-loader processes (part of the data order)
    seed: int
    lora_rank: int  # 0: the whole denoiser; else a LoRA adapter of this rank is trained, the rest frozen

    def __post_init__(self) -> None:
        checks = {
            "mixed_precision": ("auto", "no", "bf16", "fp16"),
            "gradient_checkpointing": ("auto", "on", "off"),
            "leftover": ("keep", "drop"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"train option {name}={getattr(self, name)!r}: use one of {', '.join(allowed)}"
                )
        if self.grad_accum < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay {self.ema_decay} must be in [0, 1)")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank {self.lora_rank} must be >= 0 (0: no adapter)")


def _lr_lambda(warmup: int, total: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class CheckpointMismatch(ValueError):
    """A checkpoint that this run cannot continue (another config or number of processes)."""


RANK_SEED_STRIDE = 1_000_003  # rank r's generator starts at seed + r * this


class AradTrainer:
    """One training run. `batches` yields dicts with `bucket`, `pixels` (B x 3 x H x W in
    [-1, 1]) or `latents`, `captions` and `keys` (one loader batch per micro-step)."""

    def __init__(self, components: Any, config: TrainConfig, accelerator: Any = None) -> None:
        from accelerate import Accelerator
        from diffusers.training_utils import EMAModel

        self.c, self.config = components, config
        cuda = torch.cuda.is_available()
        mp = config.mixed_precision
        if mp == "auto":
            mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = accelerator or Accelerator(
            mixed_precision=mp, cpu=not cuda, gradient_accumulation_steps=config.grad_accum
        )
        acc = self.accelerator
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            acc.mixed_precision, torch.float32
        )
        unet = components.unet
        unet.train().requires_grad_(True)
        if config.lora_rank:  # the base frozen: only the adapter trains (and is averaged, and saved)
            add_trainable_lora(unet, config.lora_rank)
        self.trained = [p for p in unet.parameters() if p.requires_grad]
        if config.gradient_checkpointing == "on" or (config.gradient_checkpointing == "auto" and cuda):
            unet.enable_gradient_checkpointing()
        for frozen in (components.vae, components.text_encoder):
            frozen.requires_grad_(False).eval().to(acc.device)
            if self.weight_dtype != torch.float32:
                frozen.to(dtype=self.weight_dtype)
        # on a GPU: one fused kernel for the whole optimizer step, and EMA over all tensors at once
        opt = torch.optim.AdamW(
            self.trained,
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            fused=acc.device.type == "cuda",
        )
        # Stepped by hand once per optimizer step (accelerate would step it once per process).
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, _lr_lambda(config.warmup_steps, config.steps, config.min_lr_ratio)
        )
        self.unet, self.optimizer = acc.prepare(unet, opt)
        self.ema = (
            EMAModel(
                self.trained,
                decay=config.ema_decay,
                use_ema_warmup=True,
                foreach=acc.device.type == "cuda",
            )
            if config.ema_decay > 0
            else None
        )
        # every draw (noise, timesteps, caption dropout) from this generator: the global RNG is never seeded;
        # each rank of a multi-process run draws its own stream (rank 0's is a one-process run's)
        self.generator = torch.Generator().manual_seed(config.seed + RANK_SEED_STRIDE * acc.process_index)
        self.rank_rng_states: list[torch.Tensor] | None = None  # every rank's, gathered at a checkpoint
        self.step = 0
        self.batches_consumed = 0
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.latent_cache: dict[str, torch.Tensor] = {}
        components.family.check_training(components)
        with torch.no_grad():
            self.empty_cond = self._encode_text([""])

    # -- one micro-batch ------------------------------------------------------------------
    @torch.no_grad()
    def _encode_text(self, captions: list[str]) -> Conditioning:
        """The captions' conditioning, as the model's family makes it (on the training device)."""
        cond = self.c.family.encode_prompts(self.c, captions)
        return {k: v.to(self.accelerator.device) for k, v in cond.items()}

    @torch.no_grad()
    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.accelerator.device)
        keys = batch["keys"]
        if self.config.cache_latents and all(k in self.latent_cache for k in keys):
            return torch.stack([self.latent_cache[k] for k in keys]).to(self.accelerator.device)
        pixels = batch["pixels"].to(self.accelerator.device, dtype=self.weight_dtype)
        # the posterior mean: deterministic, so cached and uncached training see the same latents
        z = to_latents(self.c.vae, self.c.vae.encode(pixels).latent_dist.mean.float())
        if self.config.cache_latents:
            for k, zi in zip(keys, z.cpu(), strict=True):
                self.latent_cache[k] = zi
        return z

    def places(self, batch: dict[str, Any], x0: torch.Tensor) -> list[Place]:
        """Where each sample stands, in latent pixels: its crop in the image ingest resized to
        cover the bucket (`batch["crops"]`: SDXL's crop ids, a transformer's positions), as FSTD
        places a piece in the whole latent; a sample without a recorded crop is a whole image."""
        crops = batch.get("crops") or [None] * x0.shape[0]
        f = self.c.vae_scale_factor
        _, _, h, w = x0.shape
        out: list[Place] = []
        for crop in crops:
            if crop is None:
                out.append((0, 0, h, w, h, w))
                continue
            left, top, cover_w, cover_h = crop
            ry, rx = top // f, left // f
            out.append((ry, rx, h, w, max(cover_h // f, ry + h), max(cover_w // f, rx + w)))
        return out

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        device = self.accelerator.device
        x0 = self._latents(batch)
        n = x0.shape[0]
        cond = {k: v.clone() for k, v in self._encode_text(batch["captions"]).items()}
        drop = (torch.rand(n, generator=self.generator) < self.config.caption_dropout).to(device)
        for k, v in cond.items():  # a dropped caption is the empty prompt's conditioning, every part
            v[drop] = self.empty_cond[k][0]
        cond = {k: v.to(self.weight_dtype) if v.is_floating_point() else v for k, v in cond.items()}
        noise = torch.randn(x0.shape, generator=self.generator).to(device)
        noisy, t, target = self.c.family.training_example(self.c, x0, noise, self.generator)
        with self.accelerator.autocast():
            pred = self.c.family.predict(self.c, self.unet, noisy, t, cond, self.places(batch, x0))
        return F.mse_loss(pred.float(), target.float())

    # -- the loop -------------------------------------------------------------------------
    def train(
        self,
        batches: Iterator[dict[str, Any]],
        until_step: int | None = None,
        on_step: StepLog | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
        checkpoint_every: int = 0,
    ) -> list[float]:
        """Optimizer steps up to `until_step` (default: config.steps); returns all losses."""
        acc, cfg = self.accelerator, self.config
        until = min(until_step or cfg.steps, cfg.steps)
        while self.step < until:
            micro_losses = []
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                self.batches_consumed += 1
                with acc.accumulate(self.unet):
                    loss = self._loss(batch)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.grad_clip > 0:
                        acc.clip_grad_norm_(self.trained, cfg.grad_clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                micro_losses.append(loss.detach().float().item())
            self.lrs.append(float(self.lr_scheduler.get_last_lr()[0]))
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.step(self.trained)
            self.step += 1
            loss_value = sum(micro_losses) / len(micro_losses)
            if acc.num_processes > 1:
                loss_value = acc.reduce(torch.tensor(loss_value, device=acc.device), "mean").item()
            self.losses.append(loss_value)
            if on_step:
                on_step(self.step - 1, cfg.steps, loss_value)
            if (
                on_checkpoint
                and checkpoint_every
                and self.step % checkpoint_every == 0
                and self.step < cfg.steps
            ):
                self.rank_rng_states = self.gather_rng_states()  # every rank takes part; rank 0 writes
                on_checkpoint(self.step)
        return self.losses

    def final_unet(self) -> torch.nn.Module:
        """The trained UNet (EMA weights when EMA is on), in eval mode, float32."""
        unet = self.accelerator.unwrap_model(self.unet)
        if self.ema is not None:
            self.ema.copy_to(self.trained)
        if getattr(unet, "is_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()
        return unet.float().eval().requires_grad_(False)

    # -- checkpoints ----------------------------------------------------------------------
    def gather_rng_states(self) -> list[torch.Tensor]:
        """Every rank's generator state, in rank order (a collective: all ranks call it)."""
        state = self.generator.get_state()
        if self.accelerator.num_processes == 1:
            return [state]
        from accelerate.utils import gather_object

        return [torch.as_tensor(s, dtype=torch.uint8) for s in gather_object([state.tolist()])]

    def save_checkpoint(self, folder: str | Path) -> Path:
        """Everything needed to continue exactly: safetensors for tensors, JSON for the rest."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        unet = self.accelerator.unwrap_model(self.unet)
        _save_tensors(folder / "unet.safetensors", unet.state_dict())
        opt_state = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        per_param: dict[str, dict[str, Any]] = {}
        for idx, st in opt_state["state"].items():
            per_param[str(idx)] = {}
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{idx}.{k}"] = v
                else:
                    per_param[str(idx)][k] = v
        _save_tensors(folder / "optimizer.safetensors", tensors)
        # the trainer's every draw comes from its own generator; the global RNGs are neither saved nor
        # restored (library code never changes them; a UNet with dropout would draw from them)
        states = self.rank_rng_states or [self.generator.get_state()]
        _save_tensors(folder / "rng.safetensors", {f"generator.{r}": st for r, st in enumerate(states)})
        ema_meta = None
        if self.ema is not None:
            ema_state = self.ema.state_dict()
            _save_tensors(
                folder / "ema.safetensors",
                {f"shadow.{i}": t for i, t in enumerate(ema_state.pop("shadow_params"))},
            )
            ema_meta = {k: v for k, v in ema_state.items() if isinstance(v, int | float | bool | type(None))}
        sched_state = {k: v for k, v in self.lr_scheduler.state_dict().items() if k != "lr_lambdas"}
        state = {
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "losses": self.losses,
            "lrs": self.lrs,
            "world_size": len(states),  # processes that trained it: each rank's data and draws depend on it
            "config": asdict(self.config),
            "optimizer": {"param_groups": opt_state["param_groups"], "state": per_param},
            "lr_scheduler": sched_state,
            "ema": ema_meta,
            "latent_cache": "not saved (rebuilt on demand)",
        }
        (folder / "trainer_state.json").write_text(json.dumps(state))
        return folder

    def load_checkpoint(self, folder: str | Path) -> None:
        folder = Path(folder)
        state = json.loads((folder / "trainer_state.json").read_text())
        state["config"].setdefault("lora_rank", 0)  # a checkpoint from before adapters: none
        if state["config"] != asdict(self.config):
            diff = {
                k: (v, state["config"].get(k))
                for k, v in asdict(self.config).items()
                if state["config"].get(k) != v
            }
            raise CheckpointMismatch(f"checkpoint {folder} was made with another training config: {diff}")
        world = self.accelerator.num_processes
        if state.get("world_size", 1) != world:  # each rank's share of the data and its draws depend on it
            raise CheckpointMismatch(
                f"checkpoint {folder} was written by a run of {state.get('world_size', 1)} process(es); "
                f"this run has {world}: resume with the same number of processes, or train again "
                "without --resume"
            )
        unet = self.accelerator.unwrap_model(self.unet)
        unet.load_state_dict(_load_tensors(folder / "unet.safetensors"))
        tensors = _load_tensors(folder / "optimizer.safetensors")
        opt_state: dict[str, Any] = {"param_groups": state["optimizer"]["param_groups"], "state": {}}
        for idx, extra in state["optimizer"]["state"].items():
            opt_state["state"][int(idx)] = dict(extra)
        for name, t in tensors.items():
            idx, k = name.split(".", 1)
            opt_state["state"].setdefault(int(idx), {})[k] = (
                t.to(self.accelerator.device) if k != "step" else t
            )
        self.optimizer.load_state_dict(opt_state)
        self.lr_scheduler.load_state_dict({**state["lr_scheduler"], "lr_lambdas": [None]})
        if self.ema is not None:
            shadow = _load_tensors(folder / "ema.safetensors")
            self.ema.load_state_dict(
                {**state["ema"], "shadow_params": [shadow[f"shadow.{i}"] for i in range(len(shadow))]}
            )
        rng = _load_tensors(folder / "rng.safetensors")
        state_of_this_process = rng.get(f"generator.{self.accelerator.process_index}", rng.get("generator"))
        if state_of_this_process is None:
            raise CheckpointMismatch(
                f"checkpoint {folder} holds no random state for process {self.accelerator.process_index}"
            )
        self.generator.set_state(state_of_this_process)
        self.step, self.batches_consumed = state["step"], state["batches_consumed"]
        self.losses, self.lrs = list(state["losses"]), list(state["lrs"])


def fit_vae(
    vae: Any,  # a diffusers AutoencoderKL (its encode/decode are not typed)
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
    rng = random.Random(seed)  # crops and flips; the VAE fit itself draws no random numbers
    crop = min(
        [crop] + [min(img.shape[-2:]) for img in images]
    )  # one crop size: images of any bucket batch together
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(20, steps // 10 + 1), steps))
    losses = []
    for step in range(steps):
        batch = []
        for _ in range(batch_size):
            img = rng.choice(images)
            _, _, h, w = img.shape
            y, x = rng.randint(0, h - crop), rng.randint(0, w - crop)
            patch = img[:, :, y : y + crop, x : x + crop]
            if rng.random() < 0.5:
                patch = patch.flip(-1)
            batch.append(patch)
        pixels = torch.cat(batch)
        # Decode the posterior mean (as the pipeline does); the KL term keeps latents bounded.
        post = vae.encode(pixels).latent_dist
        rec = vae.decode(post.mean).sample
        loss = F.l1_loss(rec, pixels) + F.mse_loss(rec, pixels) + kl_weight * post.kl().mean()
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
    if getattr(vae.config, "shift_factor", None) is not None:  # a VAE with a shift centres its latents too
        vae.register_to_config(shift_factor=float(z.mean()))
        z = z - z.mean()
    vae.register_to_config(scaling_factor=float(1.0 / z.std().clamp_min(1e-6)))
    return losses

"""What every model family shares: its loaded components (`ModelComponents`), where a piece
stands in the whole latent (`Place`), and the plug-in a family is (`ModelFamily`): how its
folder is recognised and loaded, how prompts become conditioning, how one batched call of its
denoiser runs on pieces that know their place, and how it is saved.

A family never asks which family it is: the pipeline, the trainer and the stages call these
methods and nothing else, so adding a family is its own module and a row in `FAMILIES`."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

WEIGHTLESS = ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")  # components with no weights

# A piece's place, in latent pixels: its top and left in the whole latent, its height and
# width, and the whole latent's height and width. Stage 1 and training run whole latents:
# (0, 0, H, W, H, W).
Place = tuple[int, int, int, int, int, int]
# Conditioning of one or more samples, by name ("text": hidden states, "pooled": pooled text
# embeddings, ...): every tensor has the samples on its first dimension.
Conditioning = dict[str, torch.Tensor]


def as_conditioning(cond: Conditioning | torch.Tensor) -> Conditioning:
    """`cond` as a dict: a bare tensor is SD's text hidden states."""
    return {"text": cond} if isinstance(cond, torch.Tensor) else cond


def token_ids(
    tokenizer: Any, prompts: list[str], device: torch.device, length: int | None = None
) -> torch.Tensor:
    """The prompts' token ids, padded and truncated to `length` (default: the tokenizer's own
    maximum), on the encoder's device: how every family's pipeline tokenizes."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


class ModelNotFoundError(FileNotFoundError):
    """A model folder or model id that cannot be loaded offline, with what was expected."""


def whole(latents: torch.Tensor) -> list[Place]:
    """Every sample of `latents` (N x C x H x W) placed as a whole latent."""
    n, _, h, w = latents.shape
    return [(0, 0, h, w, h, w)] * n


@dataclass
class ModelComponents:
    """A loaded model: its denoiser (`unet`, a UNet or a transformer), VAE, text encoders and
    tokenizers (a second pair for the families that have one), scheduler, where it came from,
    and its family (which knows how to drive them)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str
    family: ModelFamily
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    low_res_scheduler: Any = None
    extra: dict[str, Any] = field(default_factory=dict)  # the pipeline config's other fields
    others: dict[str, Any] = field(default_factory=dict)  # a family's further components, by folder

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_multiple(self) -> int:
        """Latent sizes must be multiples of this for the denoiser's down/up-sampling."""
        return self.family.latent_multiple(self.unet.config)

    @property
    def native_latent(self) -> int:
        """The latent side the denoiser was trained at (its tile in FSTD)."""
        return self.family.native_latent(self.unet.config)

    def text_encoders(self) -> list[Any]:
        further = [
            m for k, m in sorted(self.others.items()) if k.startswith("text_encoder") and m is not None
        ]
        return [m for m in (self.text_encoder, self.text_encoder_2, *further) if m is not None]

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders()]


class ModelFamily:
    """A family of latent diffusion models. Subclasses set the class attributes and implement
    `load`, `encode_prompts`, `predict` and `save`."""

    name: ClassVar[str]
    description: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s it takes
    example: ClassVar[str]  # a real model of the family, named in errors
    classes: ClassVar[dict[str, tuple[str, str]]]  # component -> (module, class) it loads with
    optional: ClassVar[tuple[str, ...]] = ()  # components a folder may leave out (null in model_index)
    denoiser: ClassVar[str] = "unet"  # the subfolder of the denoiser (a UNet or a transformer)
    # single-file checkpoints (A1111/ComfyUI): the model types diffusers' key inference names
    # that this family takes, and each component's key prefixes in such a file ("": the keys
    # no other component claims, as in a bare transformer file)
    single_file_types: ClassVar[tuple[str, ...]] = ()
    single_file_parts: ClassVar[dict[str, tuple[str, ...]]] = {}

    # -- folders ---------------------------------------------------------------------------
    @property
    def folders(self) -> dict[str, str | None]:
        """Each component's subfolder and the config file it must hold (None: a tokenizer's files)."""
        return {
            sub: None
            if sub.startswith("tokenizer")
            else "scheduler_config.json"
            if sub == "scheduler"
            else "config.json"
            for sub in self.classes
        }

    def check_folder(self, folder: Path) -> None:
        """ModelNotFoundError naming every component the folder lacks."""
        if not folder.is_dir():
            raise ModelNotFoundError(f"model folder {folder} does not exist")
        missing = [
            f"{sub}/{cfg}" if cfg else f"{sub}/"
            for sub, cfg in self.folders.items()
            if sub not in self.optional
            and not ((folder / sub / cfg).is_file() if cfg else (folder / sub).is_dir())
        ]
        if missing:
            raise ModelNotFoundError(
                f"model folder {folder} lacks {', '.join(missing)}: expected the diffusers "
                f"{self.description} layout (model_index.json, {', '.join(f'{s}/' for s in self.folders)}), "
                f"e.g. a local download of {self.example}"
            )

    def load(self, base: str, kw: dict[str, Any], source: str) -> ModelComponents:
        """Every component of `classes` from its subfolder (weights from safetensors only); an
        optional one the folder leaves out is None."""
        parts: dict[str, Any] = {}
        others: dict[str, Any] = {}
        for sub, (module, name) in self.classes.items():
            if sub in self.optional and Path(base).is_dir() and not (Path(base) / sub).is_dir():
                others[sub] = None
                continue
            cls = getattr(importlib.import_module(module), name)
            weights = {"use_safetensors": True} if sub not in WEIGHTLESS else {}
            loaded = cls.from_pretrained(base, subfolder=sub, **kw, **weights)
            name_in_components = "unet" if sub == self.denoiser else sub
            if name_in_components in ModelComponents.__dataclass_fields__:
                parts[name_in_components] = loaded
            else:
                others[sub] = loaded
        c = ModelComponents(**parts, source=source, family=self, others=others)
        self.check_loaded(c)
        return c

    def check_loaded(self, c: ModelComponents) -> None:
        """What the folder's configs must say beyond their classes (ValueError naming it)."""

    def save(self, c: ModelComponents, folder: Path) -> Path:
        raise NotImplementedError

    # -- the noise schedule (DDPM-trained families: DDIM sampling, as SD's) --------------------
    def sampling_scheduler(self, c: ModelComponents, steps: int, latent_hw: tuple[int, int]) -> Any:
        """A fresh scheduler (it holds per-run state) with `steps` timesteps set, for a whole
        latent of `latent_hw` (a family whose schedule depends on the image's size reads it)."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(c.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    def start_latents(self, scheduler: Any, noise: torch.Tensor) -> torch.Tensor:
        """Stage 1's starting latent from unit noise."""
        return noise * scheduler.init_noise_sigma

    def noised(self, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`x0` noised to timestep `t` (where img2img starts)."""
        return scheduler.add_noise(x0, noise, t)

    def check_training(self, c: ModelComponents) -> None:
        """ValueError when the trainer cannot train this model's objective."""
        kind = c.scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")

    def training_example(
        self, c: ModelComponents, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, the denoiser's target) for one training batch: DDPM's
        uniform timesteps, epsilon or v targets as the scheduler's `prediction_type` says."""
        sched = c.scheduler
        t = torch.randint(
            0, sched.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=generator.device
        ).to(x0.device)
        noisy = sched.add_noise(x0, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
        return noisy, t, target

    # -- sampling and training -------------------------------------------------------------
    def out_channels(self, c: ModelComponents, unet: Any) -> int:
        """Channels of the latent `predict` returns for this denoiser module."""
        return int(unet.config.out_channels)

    def native_latent(self, config: Mapping[str, Any]) -> int:
        """The latent side the denoiser (of this `config.json`) was trained at: its `sample_size`."""
        return int(config["sample_size"])

    def latent_multiple(self, config: Mapping[str, Any]) -> int:
        """Latent sides the denoiser (of this `config.json`) takes are multiples of this."""
        return 2 ** (len(config["block_out_channels"]) - 1)

    def encode_prompts(self, c: ModelComponents, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def negative(self, c: ModelComponents, negative_prompt: str) -> Conditioning:
        """The unconditional branch's conditioning for `negative_prompt`."""
        return self.encode_prompts(c, [negative_prompt])

    def guided(
        self, c: ModelComponents, cond: Conditioning, uncond: Conditioning | None, scale: float
    ) -> tuple[Conditioning, Conditioning | None, float]:
        """How a request's guidance scale is applied: classifier-free guidance with `uncond`
        (as SD). A guidance-distilled family puts the scale into `cond` instead."""
        return cond, uncond, scale

    def predict(
        self,
        c: ModelComponents,
        unet: Any,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning,
        places: list[Place],
        **kwargs: Any,
    ) -> torch.Tensor:
        """The denoiser's output for a batch of pieces, each at its place in its whole latent."""
        raise NotImplementedError


class UNetCall:
    """The Stable-Diffusion-shaped call of a bare UNet: text as cross-attention, nothing placed
    (what the SD family makes, and what tests and benches hand the sampling loop directly)."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet

    @property
    def out_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, places: list[Place], **kwargs: Any
    ) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=cond["text"], **kwargs).sample


class Denoiser(UNetCall):
    """The model call FSTD's loop makes: a family's `predict` bound to its components and one
    denoiser module (the model's own, or an upscaler's)."""

    def __init__(self, c: ModelComponents, unet: Any = None) -> None:
        super().__init__(unet if unet is not None else c.unet)
        self.c = c

    @property
    def out_channels(self) -> int:
        """Channels of the latent it predicts (a packing family's module outputs tokens)."""
        return self.c.family.out_channels(self.c, self.unet)

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, places: list[Place], **kwargs: Any
    ) -> torch.Tensor:
        return self.c.family.predict(self.c, self.unet, x, t, cond, places, **kwargs)


def as_denoiser(model: Any) -> UNetCall:
    """A `Denoiser` as it is; a bare UNet as its SD-shaped call."""
    return model if isinstance(model, UNetCall) else UNetCall(model)


def cat_conditioning(parts: list[Conditioning], device: torch.device, dtype: torch.dtype) -> Conditioning:
    """Several samples' conditioning as one batch (floating tensors in `dtype`)."""
    out = {}
    for k in parts[0]:
        out[k] = torch.cat(
            [p[k].to(device=device, dtype=dtype if p[k].is_floating_point() else p[k].dtype) for p in parts]
        )
    return out


def take(cond: Conditioning, index: int) -> Conditioning:
    """One sample of a batch of conditioning (kept as a batch of one)."""
    return {k: v[index : index + 1] for k, v in cond.items()}

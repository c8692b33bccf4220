"""What every model family shares: its loaded components (`ModelComponents`), where a piece
stands in the whole latent (`Place`), and the plug-in a family is (`ModelFamily`): how its
folder is recognised and loaded, how prompts become conditioning, how one batched call of its
denoiser runs on pieces that know their place, and how it is saved.

A family never asks which family it is: the pipeline, the trainer and the stages call these
methods and nothing else, so adding a family is its own module and a row in `FAMILIES`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

WEIGHTLESS = ("tokenizer", "tokenizer_2", "scheduler")  # components with no weights to load

# A piece's place, in latent pixels: its top and left in the whole latent, its height and
# width, and the whole latent's height and width. Stage 1 and training run whole latents:
# (0, 0, H, W, H, W).
Place = tuple[int, int, int, int, int, int]
# Conditioning of one or more samples, by name ("text": hidden states, "pooled": pooled text
# embeddings, ...): every tensor has the samples on its first dimension.
Conditioning = dict[str, torch.Tensor]


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

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_multiple(self) -> int:
        """Latent sizes must be multiples of this for the denoiser's down/up-sampling."""
        return self.family.latent_multiple(self)

    @property
    def native_latent(self) -> int:
        """The latent side the denoiser was trained at (its tile in FSTD)."""
        return int(self.unet.config.sample_size)

    def text_encoders(self) -> list[Any]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

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
            if not ((folder / sub / cfg).is_file() if cfg else (folder / sub).is_dir())
        ]
        if missing:
            raise ModelNotFoundError(
                f"model folder {folder} lacks {', '.join(missing)}: expected the diffusers "
                f"{self.description} layout (model_index.json, {', '.join(f'{s}/' for s in self.folders)}), "
                f"e.g. a local download of {self.example}"
            )

    def load(self, base: str, kw: dict[str, Any], source: str) -> ModelComponents:
        """Every component of `classes` from its subfolder (weights from safetensors only)."""
        parts = {}
        for sub, (module, name) in self.classes.items():
            cls = getattr(importlib.import_module(module), name)
            weights = {"use_safetensors": True} if sub not in WEIGHTLESS else {}
            parts[sub] = cls.from_pretrained(base, subfolder=sub, **kw, **weights)
        c = ModelComponents(**parts, source=source, family=self)
        self.check_loaded(c)
        return c

    def check_loaded(self, c: ModelComponents) -> None:
        """What the folder's configs must say beyond their classes (ValueError naming it)."""

    def save(self, c: ModelComponents, folder: Path) -> Path:
        raise NotImplementedError

    # -- sampling and training -------------------------------------------------------------
    def latent_multiple(self, c: ModelComponents) -> int:
        return 2 ** (len(c.unet.config.block_out_channels) - 1)

    def encode_prompts(self, c: ModelComponents, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def negative(self, c: ModelComponents, negative_prompt: str) -> Conditioning:
        """The unconditional branch's conditioning for `negative_prompt`."""
        return self.encode_prompts(c, [negative_prompt])

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

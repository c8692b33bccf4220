"""SD3-class MMDiT transformers trained with flow matching: two CLIP text encoders (penultimate
hidden states side by side, padded to the joint attention width, then T5's tokens; their pooled
embeddings side by side), an optional T5 encoder (absent: zeros, as SD3's own pipeline), a
16-channel VAE with a shift factor, and learned 2D position embeddings.

Where a piece stands: SD3 adds to each 2x2 patch the position embedding of its place. Its own
pipeline gives an image of the whole latent's size the centred window of the embedding grid;
here every FSTD piece gets that same window's part at the piece's place (`PlacedPatchEmbed`),
so a tile is told where it is in the whole image, not that it is a small image of its own
("local": every piece the centred window of its own size, the ablation). A whole latent larger
than the grid (past the model's `pos_embed_max_size`, where SD3's pipeline refuses) maps each
piece's place in proportion onto the grid."""

from __future__ import annotations

import contextvars
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from asd_models.families.base import Conditioning, ModelComponents, Place, token_ids
from asd_models.families.flow_matching import FlowMatching, check_tile_positions

T5_TOKENS = 256  # SD3's pipeline's max_sequence_length: the T5 part of the text tokens

# the places of the pieces of the batch the current thread's transformer call runs (None: whole)
_PLACES: contextvars.ContextVar[tuple[list[Place], str] | None] = contextvars.ContextVar(
    "asd_sd3_places", default=None
)


def _window_start(at: int, piece: int, whole: int, grid: int) -> int:
    """Where a piece's window starts on an embedding grid of `grid` (all in patches)."""
    if whole <= grid:
        return (grid - whole) // 2 + at
    return round(at * (grid - piece) / (whole - piece)) if whole > piece else 0


def placed_pos_embed(module: Any, places: list[Place], mode: str, device: torch.device) -> torch.Tensor:
    """N x (h*w) x D position embeddings of N pieces, each at its place (see the module doc)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    p = module.patch_size
    out = []
    for ry, rx, rh, rw, H, W in places:
        if mode == "local":
            ry, rx, H, W = 0, 0, rh, rw
        h, w, gh, gw = rh // p, rw // p, H // p, W // p
        if module.pos_embed_max_size:
            m = module.pos_embed_max_size
            grid = module.pos_embed.reshape(m, m, -1)
            top, left = _window_start(ry // p, h, gh, m), _window_start(rx // p, w, gw, m)
            out.append(grid[top : top + h, left : left + w].reshape(h * w, -1))
        else:
            grid = get_2d_sincos_pos_embed(
                embed_dim=module.pos_embed.shape[-1],
                grid_size=(gh, gw),
                base_size=module.base_size,
                interpolation_scale=module.interpolation_scale,
                device=device,
                output_type="pt",
            ).reshape(gh, gw, -1)
            out.append(grid[ry // p : ry // p + h, rx // p : rx // p + w].reshape(h * w, -1))
    return torch.stack(out).to(device=device, dtype=torch.float32)


def _placed_forward(module: Any, latent: torch.Tensor) -> torch.Tensor:
    placed = _PLACES.get()
    _, _, h, w = latent.shape
    if placed is None or all(pl[2:4] == pl[4:6] for pl in placed[0]):
        return module.asd_whole_forward(latent)  # whole latents: the model's own forward, bit for bit
    x = module.proj(latent)
    if module.flatten:
        x = x.flatten(2).transpose(1, 2)
    if module.layer_norm:
        x = module.norm(x)
    return (x + placed_pos_embed(module, placed[0], placed[1], latent.device)).to(x.dtype)


def place_aware(transformer: Any) -> Any:
    """Make the transformer's patch embedding read the pieces' places (idempotent). Its
    parameters, state dict and whole-latent output are unchanged."""
    embed = transformer.pos_embed
    if getattr(embed, "asd_whole_forward", None) is None:
        # bound methods, not closures: a deep copy of the model rebinds them to the copy
        embed.asd_whole_forward = types.MethodType(type(embed).forward, embed)
        embed.forward = types.MethodType(_placed_forward, embed)
    return transformer


@dataclass(frozen=True)
class StableDiffusion3(FlowMatching):
    name: ClassVar[str] = "sd3"
    description: ClassVar[str] = "Stable Diffusion 3 (MMDiT, flow matching)"
    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
    )
    example: ClassVar[str] = "stabilityai/stable-diffusion-3.5-medium"
    single_file_types: ClassVar[tuple[str, ...]] = ("sd3", "sd35_medium", "sd35_large")
    single_file_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "transformer": ("model.diffusion_model.",),
        "vae": ("first_stage_model.", "vae."),
        "text_encoder": ("text_encoders.clip_l.",),
        "text_encoder_2": ("text_encoders.clip_g.",),
        "text_encoder_3": ("text_encoders.t5xxl.",),
    }
    denoiser: ClassVar[str] = "transformer"
    classes: ClassVar[dict[str, tuple[str, str]]] = {
        "transformer": ("diffusers", "SD3Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_3": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "tokenizer_3": ("transformers", "T5TokenizerFast"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    }
    optional: ClassVar[tuple[str, ...]] = ("text_encoder_3", "tokenizer_3")
    tile_positions: Literal["global", "local"] = "global"

    def __post_init__(self) -> None:
        check_tile_positions(self.tile_positions)

    def check_loaded(self, c: ModelComponents) -> None:
        place_aware(c.unet)

    def save(self, c: ModelComponents, folder: Path) -> Path:
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline(
            transformer=c.unet,
            scheduler=c.scheduler,
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            text_encoder_2=c.text_encoder_2,
            tokenizer_2=c.tokenizer_2,
            text_encoder_3=c.others.get("text_encoder_3"),
            tokenizer_3=c.others.get("tokenizer_3"),
        ).save_pretrained(str(folder), safe_serialization=True)
        return folder

    @torch.no_grad()
    def encode_prompts(self, c: ModelComponents, prompts: list[str]) -> Conditioning:
        hidden, pooled = [], []
        for tok, enc in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
            out = enc(token_ids(tok, prompts, enc.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        joint = int(c.unet.config.joint_attention_dim)
        t5, t5_tok = c.others.get("text_encoder_3"), c.others.get("tokenizer_3")
        if t5 is None or t5_tok is None:
            t5_states = torch.zeros(len(prompts), T5_TOKENS, joint, device=clip.device, dtype=clip.dtype)
        else:
            t5_states = t5(token_ids(t5_tok, prompts, t5.device, T5_TOKENS))[0].to(clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, joint - clip.shape[-1]))
        return {"text": torch.cat([clip, t5_states], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

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
        place_aware(unet)
        token = _PLACES.set((places, self.tile_positions))
        try:
            return unet(
                hidden_states=x,
                timestep=t.expand(x.shape[0]) if t.dim() == 0 else t,
                encoder_hidden_states=cond["text"],
                pooled_projections=cond["pooled"],
                return_dict=False,
            )[0]
        finally:
            _PLACES.reset(token)


def build_tiny_sd3(seed: int = 0, latent_size: int = 16) -> ModelComponents:
    """A tiny SD3-shaped model: two CLIP encoders with projections (no T5), a 2-layer MMDiT with
    learned positions on a grid 4x the native latent, a 16-channel VAE with a shift factor, the
    flow-matching scheduler; randomly initialised from `seed` without touching the global RNG."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from asd_models.tiny_model import build_tiny_components, build_tiny_tokenizer

    base = build_tiny_components(seed, latent_size)  # the SD tiny model's shapes
    encoder_config = base["text_encoder"].config
    vae_config = {k: v for k, v in base["vae"].config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        transformer = SD3Transformer2DModel(
            sample_size=latent_size,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=2 * encoder_config.hidden_size,
            caption_projection_dim=32,
            pooled_projection_dim=2 * encoder_config.projection_dim,
            pos_embed_max_size=4 * latent_size // 2,
        )
        return ModelComponents(
            unet=place_aware(transformer),
            vae=AutoencoderKL(
                **{**vae_config, "latent_channels": 16, "shift_factor": 0.0, "scaling_factor": 1.0}
            ),
            text_encoder=CLIPTextModelWithProjection(encoder_config),
            text_encoder_2=CLIPTextModelWithProjection(encoder_config),
            tokenizer=build_tiny_tokenizer(),
            tokenizer_2=build_tiny_tokenizer(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            source="tiny-sd3",
            family=StableDiffusion3(),
            others={"text_encoder_3": None, "tokenizer_3": None},
        )

"""FLUX-class transformers: flow matching with a resolution-dependent timestep shift, latents
packed 2x2 into tokens (a 16-channel VAE with a shift factor under them), rotary position ids
(0, row, column) per token, a CLIP text encoder's pooled embedding and T5's hidden states, and,
for guidance-distilled models, the guidance scale as an input (no unconditional branch).

Where a piece stands: its tokens get the rotary ids of their rows and columns in the whole
packed latent ("global"), as FLUX's own pipeline gives that region of the whole image; "local"
(the ablation) gives every piece ids from (0, 0), a picture of its own. FLUX's transformer takes
one set of ids a call, so a batch of pieces runs as one call per place (a piece's conditional
and unconditional halves share one)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from asd_models.families.base import Conditioning, ModelComponents, Place, token_ids
from asd_models.families.flow_matching import FlowMatching, check_tile_positions

T5_TOKENS = 512  # FLUX's pipeline's max_sequence_length


def pack(latents: torch.Tensor) -> torch.Tensor:
    """N x C x h x w -> N x (h/2 * w/2) x 4C, as FLUX's pipeline packs."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack`."""
    n, _, d = tokens.shape
    x = tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)


def image_ids(place: Place, mode: str, device: torch.device) -> torch.Tensor:
    """(h/2 * w/2) x 3 rotary ids (0, row, column) of a piece's tokens."""
    ry, rx, rh, rw, _, _ = place
    top, left = (ry // 2, rx // 2) if mode == "global" else (0, 0)
    rows = torch.arange(top, top + rh // 2, device=device, dtype=torch.float32)
    cols = torch.arange(left, left + rw // 2, device=device, dtype=torch.float32)
    ids = torch.zeros(rh // 2, rw // 2, 3, device=device)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


@dataclass(frozen=True)
class Flux(FlowMatching):
    name: ClassVar[str] = "flux"
    description: ClassVar[str] = "FLUX (rectified-flow transformer)"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("FluxPipeline", "FluxImg2ImgPipeline")
    example: ClassVar[str] = "black-forest-labs/FLUX.1-schnell"
    single_file_types: ClassVar[tuple[str, ...]] = ("flux-dev", "flux-schnell")
    single_file_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "transformer": ("model.diffusion_model.", ""),
        "vae": ("first_stage_model.", "vae."),
        "text_encoder": ("text_encoders.clip_l.",),
        "text_encoder_2": ("text_encoders.t5xxl.",),
    }
    denoiser: ClassVar[str] = "transformer"
    classes: ClassVar[dict[str, tuple[str, str]]] = {
        "transformer": ("diffusers", "FluxTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "T5TokenizerFast"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    }
    explicit_sigmas: ClassVar[bool] = True  # FLUX's pipeline: sigmas 1 .. 1/steps, then shifted
    tile_positions: Literal["global", "local"] = "global"

    def __post_init__(self) -> None:
        check_tile_positions(self.tile_positions)

    def patch(self, config: Mapping[str, Any]) -> int:
        return 2  # the 2x2 packing: the transformer's own patch_size is 1 token

    def out_channels(self, c: ModelComponents, unet: Any) -> int:
        return int(c.vae.config.latent_channels)  # the module's are the packed tokens' (4x)

    def native_latent(self, config: Mapping[str, Any]) -> int:
        """FLUX's transformer config names no size: 1024 px (128 latent) unless it says one."""
        return int(config.get("sample_size") or 128)

    def save(self, c: ModelComponents, folder: Path) -> Path:
        from diffusers import FluxPipeline

        FluxPipeline(
            scheduler=c.scheduler,
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            text_encoder_2=c.text_encoder_2,
            tokenizer_2=c.tokenizer_2,
            transformer=c.unet,
        ).save_pretrained(str(folder), safe_serialization=True)
        return folder

    @torch.no_grad()
    def encode_prompts(self, c: ModelComponents, prompts: list[str]) -> Conditioning:
        enc, t5 = c.text_encoder, c.text_encoder_2
        pooled = enc(token_ids(c.tokenizer, prompts, enc.device), output_hidden_states=False).pooler_output
        states = t5(token_ids(c.tokenizer_2, prompts, t5.device, T5_TOKENS), output_hidden_states=False)[0]
        return {"text": states, "pooled": pooled}

    def guided(
        self, c: ModelComponents, cond: Conditioning, uncond: Conditioning | None, scale: float
    ) -> tuple[Conditioning, Conditioning | None, float]:
        """A guidance-distilled model (`guidance_embeds`) takes the scale as an input; FLUX's
        pipeline runs no unconditional branch by default, and neither does this."""
        if c.unet.config.guidance_embeds:
            cond = {**cond, "guidance": torch.full((cond["pooled"].shape[0],), float(scale))}
        return cond, None, 1.0

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
        n, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX packs 2x2 latent pixels a token: a {h}x{w} latent piece is not even")
        tokens = pack(x)
        t = t.expand(n) if t.dim() == 0 else t
        guidance = cond.get("guidance")
        if guidance is None and unet.config.guidance_embeds:
            guidance = torch.ones(n, device=x.device)  # training: no guidance asked of the model
        txt_ids = torch.zeros(cond["text"].shape[1], 3, device=x.device)
        out = torch.empty_like(tokens)
        groups: dict[tuple, list[int]] = {}
        for i, place in enumerate(places):
            groups.setdefault(tuple(place) if self.tile_positions == "global" else place[2:4], []).append(i)
        for members in groups.values():
            idx = torch.tensor(members, device=x.device)
            out[idx] = unet(
                hidden_states=tokens[idx],
                timestep=(t[idx] / 1000).to(tokens.dtype),
                guidance=None if guidance is None else guidance[idx].to(x.device, torch.float32),
                pooled_projections=cond["pooled"][idx],
                encoder_hidden_states=cond["text"][idx],
                txt_ids=txt_ids,
                img_ids=image_ids(places[members[0]], self.tile_positions, x.device),
                return_dict=False,
            )[0].to(out.dtype)
        return unpack(out, h, w)


def build_tiny_t5_tokenizer() -> Any:
    """A T5 tokenizer (Unigram over characters, `</s>` appended) built in code: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(ch, -1.0) for ch in "\u2581abcdefghijklmnopqrstuvwxyz0123456789,.-'"]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


def build_tiny_flux(seed: int = 0, latent_size: int = 16) -> ModelComponents:
    """A tiny FLUX-shaped model: a CLIP encoder (pooled), a 2-layer T5 encoder, a transformer of
    one double and one single block with guidance embedding, a 16-channel VAE with a shift factor,
    the dynamically shifted flow-matching scheduler; random from `seed`, global RNG untouched."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from asd_models.tiny_model import build_tiny_components, build_tiny_tokenizer

    base = build_tiny_components(seed, latent_size)
    encoder_config = base["text_encoder"].config
    vae_config = {k: v for k, v in base["vae"].config.items() if not k.startswith("_")}
    t5_tokenizer = build_tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=encoder_config.hidden_size,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        transformer.register_to_config(sample_size=latent_size)  # the native latent: FSTD's tile
        return ModelComponents(
            unet=transformer,
            vae=AutoencoderKL(
                **{**vae_config, "latent_channels": 16, "shift_factor": 0.0, "scaling_factor": 1.0}
            ),
            text_encoder=CLIPTextModel(encoder_config),
            text_encoder_2=t5,
            tokenizer=build_tiny_tokenizer(),
            tokenizer_2=t5_tokenizer,
            scheduler=FlowMatchEulerDiscreteScheduler(
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            ),
            source="tiny-flux",
            family=Flux(),
        )

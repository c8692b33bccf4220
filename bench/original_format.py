"""A Stable Diffusion 1.x diffusers folder written back as the single original-format
checkpoint A1111 and ComfyUI users keep (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*` in one safetensors file): what the single-file import is
tested and measured on (`bench.model_import --single-file`), since diffusers converts only the
other way. The key names are those of the CompVis/Stability LDM code, derived here from the
UNet's and VAE's configs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
RESNET |= {"time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _renamed(sd: dict[str, torch.Tensor], prefix_map: dict[str, str], inner: dict[str, str]) -> dict:
    """Every key whose diffusers prefix is in `prefix_map`, renamed to its LDM prefix (and its
    next part through `inner` when it is there)."""
    out = {}
    for key, value in sd.items():
        for src, dst in sorted(prefix_map.items(), key=lambda kv: -len(kv[0])):
            if key.startswith(src + "."):
                rest = key[len(src) + 1 :]
                for a, b in inner.items():
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a) :]
                        break
                out[f"{dst}.{rest}"] = value
                break
        else:
            raise KeyError(f"no original-format name for {key}")
    return out


def unet_names(config: dict) -> dict[str, str]:
    levels = len(config["block_out_channels"])
    per = config["layers_per_block"]
    names = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i in range(levels):
        for j in range(per):
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{(per + 1) * i + j + 1}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{(per + 1) * i + j + 1}.1"
        if i < levels - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(per + 1) * (i + 1)}.0.op"
        attends = "CrossAttn" in config["up_block_types"][i]
        for j in range(per + 1):
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{(per + 1) * i + j}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{(per + 1) * i + j}.1"
        if i < levels - 1:
            names[f"up_blocks.{i}.upsamplers.0"] = (
                f"output_blocks.{(per + 1) * i + per}.{2 if attends else 1}"
            )
    return names


def vae_names(config: dict) -> dict[str, str]:
    levels = len(config["block_out_channels"])
    per = config["layers_per_block"]
    names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        names |= {
            f"{part}.conv_in": f"{part}.conv_in",
            f"{part}.conv_out": f"{part}.conv_out",
            f"{part}.conv_norm_out": f"{part}.norm_out",
            f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
            f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1",
            f"{part}.mid_block.resnets.1": f"{part}.mid.block_2",
        }
    for i in range(levels):
        for j in range(per):
            names[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        if i < levels - 1:
            names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        for j in range(per + 1):
            names[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{levels - 1 - i}.block.{j}"
        if i < levels - 1:
            names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - i}.upsample.conv"
    return names


def write_sd_single_file(folder: Path, out: Path) -> Path:
    """The SD 1.x pipeline in `folder` as one original-format safetensors checkpoint."""
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    unet = _renamed(
        load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), unet_names(unet_cfg), RESNET
    )
    vae_sd = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    vae = _renamed(vae_sd, vae_names(vae_cfg), {"conv_shortcut": "nin_shortcut"} | VAE_ATTENTION)
    for key, value in vae.items():  # the LDM VAE's attention projections are 1x1 convolutions
        if ".attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            vae[key] = value[:, :, None, None]
    text = load_file(folder / "text_encoder" / "model.safetensors")
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    checkpoint |= {f"first_stage_model.{k}": v for k, v in vae.items()}
    text = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text.items()}
    checkpoint |= {f"cond_stage_model.transformer.{k}": v for k, v in text.items()}
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(out))
    return out

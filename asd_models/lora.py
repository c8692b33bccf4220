"""LoRA adapters on a denoiser (peft, through diffusers' adapter support): trained by ARAD
(`TrainConfig.lora_rank`), stored as the adapter alone, applied at generation and upscaling to
every call of the denoiser, so every FSTD tile.

An adapter folder holds `adapter.safetensors` (peft's state dict of the LoRA weights, keys
without the adapter name) and `adapter_config.json` (rank, alpha, target modules, the family it
was trained on). The attention projections of UNets and transformers share their names, so one
target list serves every family."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
ADAPTER_DIR = "lora"  # the folder of an adapter in a model version
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


class LoraError(ValueError):
    """A LoRA adapter that cannot be trained or applied as asked (the user's input, not a bug)."""


class AdapterMismatch(LoraError):
    """An adapter that does not fit the model it is applied to."""


@dataclass(frozen=True)
class Adapter:
    """An adapter folder on disk, its weight in the mix and its name in the model."""

    folder: Path
    weight: float
    name: str


def _lora_config(rank: int, alpha: int, targets: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)


def add_trainable_lora(unet: Any, rank: int) -> list[torch.nn.Parameter]:
    """Freeze the denoiser and add a LoRA adapter of `rank` on its attention projections; its
    parameters (what the optimizer steps) are returned."""
    unet.requires_grad_(False)
    unet.add_adapter(_lora_config(rank, rank, TARGET_MODULES))
    return [p for p in unet.parameters() if p.requires_grad]


def save_adapter(unet: Any, folder: Path, rank: int, family: str) -> Path:
    """The trained adapter alone (not the frozen base) into `folder`."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(
        json.dumps({"rank": rank, "alpha": rank, "target_modules": TARGET_MODULES, "family": family})
    )
    return folder


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """An adapter's config, checked (it is read back from the store)."""
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterMismatch(f"{folder}: no readable {CONFIG_FILE} ({exc})") from exc
    if not isinstance(cfg, dict):
        raise AdapterMismatch(f"{folder / CONFIG_FILE} is not an adapter's config")
    rank, alpha, targets = cfg.get("rank"), cfg.get("alpha", cfg.get("rank")), cfg.get("target_modules")
    if not (
        isinstance(rank, int) and 0 < rank <= 4096 and isinstance(alpha, int) and isinstance(targets, list)
    ):
        raise AdapterMismatch(
            f"{folder / CONFIG_FILE}: rank {rank!r} / target_modules {targets!r} are not an adapter's"
        )
    if not all(isinstance(t, str) and t.replace(".", "").replace("_", "").isalnum() for t in targets):
        raise AdapterMismatch(f"{folder / CONFIG_FILE}: target_modules {targets!r} are not module names")
    return cfg


def apply_adapters(unet: Any, adapters: list[Adapter], family: str) -> None:
    """Load each adapter into a denoiser that has none and mix them at their weights. An adapter
    trained on another family, or whose weights do not fit this model's shapes, is an
    `AdapterMismatch` naming it (nothing is half-applied: the model is left as it was loaded)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not adapters:
        return
    try:
        for a in adapters:
            cfg = read_adapter_config(a.folder)
            if cfg.get("family") != family:
                raise AdapterMismatch(
                    f"adapter {a.name} was trained on a {cfg.get('family')!r} model; this model is {family!r}"
                )
            unet.add_adapter(
                _lora_config(cfg["rank"], cfg.get("alpha", cfg["rank"]), cfg["target_modules"]),
                adapter_name=a.name,
            )
            try:
                result = set_peft_model_state_dict(
                    unet, load_file(str(a.folder / WEIGHTS_FILE)), adapter_name=a.name
                )
            except RuntimeError as exc:  # shapes of another model
                raise AdapterMismatch(
                    f"adapter {a.name} does not fit this model: {str(exc).splitlines()[0]}"
                ) from exc
            unexpected = list(getattr(result, "unexpected_keys", []))
            if unexpected:
                raise AdapterMismatch(
                    f"adapter {a.name} has weights for modules this model lacks: {unexpected[:3]}"
                )
        unet.set_adapters([a.name for a in adapters], [a.weight for a in adapters])
    except Exception:
        if getattr(unet, "peft_config", None):  # the model was loaded without adapters: restore it
            unet.unload_lora()
        raise

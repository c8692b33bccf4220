"""Training tasks: build the tiny base model, ARAD fine-tuning on bucketed shards."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from prefect import get_run_logger, task

from asd_models.arad_training import TrainConfig, fit_vae, train_unet_arad
from asd_models.images import pil_to_tensor_m11
from asd_models.loading import SDComponents, load_components
from asd_models.tiny_model import build_tiny_components, save_components
from tasks.models import load_model_components
from tasks.progress import Progress
from tasks.runtime import current_flow_run_id
from tasks.store import ArtifactRef, ArtifactStore, params_hash


def read_bucket_samples(store: ArtifactStore, dataset_ref: ArtifactRef | str) -> dict[str, list[tuple[Image.Image, str]]]:
    """All samples of a dataset version, per bucket, read with webdataset's tar iterators
    over fsspec streams (local or S3)."""
    ref = store.resolve(dataset_ref)
    index = json.loads(store.read_bytes(ref, "bucket_index.json"))
    out: dict[str, list[tuple[Image.Image, str]]] = {}
    for bucket, info in index["buckets"].items():
        for shard in info["shards"]:
            with store.open(ref, shard["shard"]) as stream:
                samples = wds.tariterators.group_by_keys(
                    wds.tariterators.tar_file_expander([{"url": shard["shard"], "stream": stream}])
                )
                for s in samples:
                    img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
                    out.setdefault(bucket, []).append((img, s["txt"].decode("utf-8")))
    if not out:
        raise ValueError(f"dataset {ref} has no successful samples to train on")
    return out


@torch.no_grad()
def encode_texts(c: SDComponents, texts: list[str]) -> torch.Tensor:
    ids = c.tokenizer(texts, padding="max_length", max_length=c.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
    return c.text_encoder(ids)[0]


def _save_loss_plot(losses: list[float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(losses, lw=0.6, alpha=0.5, label="loss")
    k = max(1, len(losses) // 30)
    smooth = [sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1]) for i in range(len(losses))]
    ax.plot(smooth, lw=1.5, label=f"mean of {k + 1}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@task(name="build-tiny-base-model")
def build_tiny_base(store_url: str, dataset_ref: str, name: str, vae_steps: int, seed: int = 0, rerun: bool = False) -> str:
    """A tiny SD-shaped base model, built in code, saved and loaded back through
    `from_pretrained`, with its VAE fitted to the dataset's images (a random VAE decodes
    every latent to noise). Committed as `models/<name>` with the dataset as parent."""
    logger = get_run_logger()
    store = ArtifactStore(store_url)
    dataset = store.resolve(dataset_ref)
    input_hash = params_hash({"dataset": str(dataset), "vae_steps": vae_steps, "seed": seed, "kind": "tiny-base"})
    if not rerun and (done := store.find_by_input_hash("models", name, input_hash)):
        logger.info("tiny base model %s already built from the same inputs: reusing it", done)
        return str(done)
    samples = read_bucket_samples(store, dataset)
    images = [pil_to_tensor_m11(img) for items in samples.values() for img, _ in items]
    with tempfile.TemporaryDirectory() as tmp:
        save_components(build_tiny_components(seed=seed), Path(tmp) / "init")
        c = load_components(Path(tmp) / "init")  # the same path real checkpoints take
        with Progress("fit tiny VAE", total=vae_steps, unit="step") as progress:
            def on_step(step: int, total: int, loss: float) -> None:
                progress.update(step + 1)
                progress.note(f"loss {loss:.3f}")

            losses = fit_vae(c.vae, images, vae_steps, seed=seed, on_step=on_step)
        out = Path(tmp) / "model"
        save_components({"unet": c.unet, "vae": c.vae, "text_encoder": c.text_encoder,
                         "tokenizer": c.tokenizer, "scheduler": c.scheduler}, out)
        _save_loss_plot(losses, "tiny VAE reconstruction loss", out / "vae_loss.png")
        (out / "training_log.json").write_text(json.dumps({"vae_loss": losses}))
        writer = store.new_version("models", name)
        writer.put_dir(out)
    ref = writer.commit(
        parents=[dataset], params={"vae_steps": vae_steps, "seed": seed, "builder": "asd_models.tiny_model"},
        flow_run_id=current_flow_run_id(), input_hash=input_hash,
        summary={"vae_loss_first": losses[0], "vae_loss_last": losses[-1], "images": len(images),
                 "untrained_unet": True},
    )
    logger.info("committed %s (VAE loss %.3f -> %.3f)", ref, losses[0], losses[-1])
    return str(ref)


@task(name="arad-finetune")
def arad_finetune(store_url: str, dataset_ref: str, base_model: str, model_name: str, config: dict[str, Any],
                  rerun: bool = False) -> str:
    """ARAD: fine-tune the UNet on one-bucket batches (VAE and text encoder frozen); commit a
    diffusers-layout model version with the dataset (and a stored base model) as parents."""
    logger = get_run_logger()
    store = ArtifactStore(store_url)
    dataset = store.resolve(dataset_ref)
    base = str(store.resolve(base_model)) if base_model.startswith("models/") else base_model
    cfg = TrainConfig(**config)
    input_hash = params_hash({"dataset": str(dataset), "base": base, "config": cfg.__dict__, "kind": "arad"})
    if not rerun and (done := store.find_by_input_hash("models", model_name, input_hash)):
        logger.info("model %s already trained from the same inputs: reusing it", done)
        return str(done)
    c = load_model_components(store, base)
    samples = read_bucket_samples(store, dataset)
    sf = c.vae.config.scaling_factor
    latents, texts = {}, {}
    with torch.no_grad():
        for b, items in samples.items():
            x = torch.cat([pil_to_tensor_m11(img) for img, _ in items])
            latents[b] = torch.cat([c.vae.encode(x[i : i + 8]).latent_dist.mean for i in range(0, len(x), 8)]) * sf
            texts[b] = encode_texts(c, [cap for _, cap in items])
        empty = encode_texts(c, [""])[0]
    logger.info("ARAD fine-tuning %s on %s for %d steps", base, {b: len(v) for b, v in samples.items()}, cfg.steps)
    with Progress("ARAD fine-tuning", total=cfg.steps, unit="step") as progress:
        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(step + 1)
            progress.note(f"loss {loss:.3f}")

        losses = train_unet_arad(c.unet, c.scheduler, latents, texts, empty, cfg, on_step)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_components({"unet": c.unet, "vae": c.vae, "text_encoder": c.text_encoder,
                         "tokenizer": c.tokenizer, "scheduler": c.scheduler}, out)
        _save_loss_plot(losses, "ARAD denoising loss", out / "loss.png")
        (out / "training_log.json").write_text(json.dumps({"loss": losses, "buckets": {b: len(v) for b, v in samples.items()}}))
        (out / "buckets.json").write_text(json.dumps(sorted(samples)))
        writer = store.new_version("models", model_name)
        writer.put_dir(out)
    parents: list[str] = [str(dataset)] + ([base] if base.startswith("models/") else [])
    k = max(1, len(losses) // 10)
    ref = writer.commit(
        parents=parents, params={"base_model": base, **cfg.__dict__}, flow_run_id=current_flow_run_id(),
        input_hash=input_hash,
        summary={"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "steps": cfg.steps,
                 "buckets": sorted(samples)},
    )
    logger.info("committed %s (loss %.3f -> %.3f)", ref, sum(losses[:k]) / k, sum(losses[-k:]) / k)
    return str(ref)

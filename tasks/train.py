"""Training tasks: build the tiny base model, ARAD fine-tuning on bucketed shards."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image
from prefect import task

from asd_models.arad_loader import LoaderConfig, ShardRef, make_loader, tar_samples
from asd_models.arad_training import AradTrainer, TrainConfig, fit_vae
from asd_models.images import pil_to_tensor_m11
from asd_models.loading import load_components
from asd_models.tiny_model import build_tiny_components, save_components
from tasks.models import load_model_components
from tasks.progress import Progress
from tasks.runtime import current_flow_run_id, in_prefect_run, run_logger
from tasks.store import ArtifactRef, ArtifactStore, params_hash


class StoreOpener:
    """Picklable opener of a dataset version's shards (data-loader workers re-create the store)."""

    def __init__(self, store_url: str, ref: str) -> None:
        self.store_url, self.ref = store_url, ref
        self._store: ArtifactStore | None = None

    def __call__(self, relpath: str):
        if self._store is None:
            self._store = ArtifactStore(self.store_url)
        return self._store.open(self.ref, relpath)

    def __getstate__(self) -> dict[str, Any]:
        return {"store_url": self.store_url, "ref": self.ref, "_store": None}


def dataset_buckets(store: ArtifactStore, dataset: ArtifactRef) -> dict[str, list[ShardRef]]:
    index = json.loads(store.read_bytes(dataset, "bucket_index.json"))
    buckets = {b: [ShardRef(s["shard"], s["count"]) for s in info["shards"]] for b, info in index["buckets"].items()}
    if not any(s.count for shards in buckets.values() for s in shards):
        raise ValueError(f"dataset {dataset} has no successful samples to train on")
    return buckets


def read_bucket_samples(store: ArtifactStore, dataset_ref: ArtifactRef | str) -> dict[str, list[tuple[Image.Image, str]]]:
    """All samples of a (small) dataset version in memory, per bucket: for fitting the tiny
    VAE and for evaluation's real patches. Training streams instead (`make_loader`)."""
    ref = store.resolve(dataset_ref)
    opener = StoreOpener(store.url, str(ref))
    out: dict[str, list[tuple[Image.Image, str]]] = {}
    for bucket, shards in dataset_buckets(store, ref).items():
        for shard in shards:
            for s in tar_samples(shard.url, opener):
                img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
                out.setdefault(bucket, []).append((img, s["txt"].decode("utf-8")))
    return out


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
    logger = run_logger()
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


def training_id(dataset: ArtifactRef, base: str, cfg: TrainConfig) -> str:
    """What a checkpoint must match to be resumed: same data, base model and config."""
    return params_hash({"dataset": str(dataset), "base": base, "config": cfg.__dict__, "kind": "arad"})


def _publish_losses(losses: list[float], lrs: list[float], total: int, ref_hint: str) -> None:
    if not in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    k = max(1, total // 20)
    rows = [{"step": i + len(losses[i : i + k]), "loss": round(sum(losses[i : i + k]) / len(losses[i : i + k]), 5),
             "lr": f"{lrs[min(i + k, len(lrs)) - 1]:.3g}"} for i in range(0, len(losses), k)]
    try:
        create_table_artifact(key="arad-loss", table=rows, description=f"ARAD loss (mean per {k} steps), {ref_hint}")
    except Exception:  # noqa: BLE001 - the UI table is optional
        pass


@task(name="arad-finetune")
def arad_finetune(store_url: str, dataset_ref: str, base_model: str, model_name: str, config: dict[str, Any],
                  rerun: bool = False, resume: bool = False, checkpoint_every: int = 0) -> str:
    """Prefect task around `arad_to_store`."""
    return arad_to_store(store_url, dataset_ref, base_model, model_name, config, rerun, resume, checkpoint_every)


def arad_to_store(store_url: str, dataset_ref: str, base_model: str, model_name: str, config: dict[str, Any],
                  rerun: bool = False, resume: bool = False, checkpoint_every: int = 0,
                  stop_after: int | None = None) -> str:
    """ARAD: fine-tune the UNet on one-bucket batches streamed from the dataset's shards (VAE and
    text encoder frozen). Every `checkpoint_every` steps a `checkpoints/<model_name>` version
    holds the whole trainer state; `resume` continues from the newest one made for the same
    dataset, base model and config. The result is a diffusers-layout `models/<model_name>`
    version with the dataset (and a stored base model) as parents. `stop_after` ends the run
    early without committing a model (tests, and "train in slices" jobs)."""
    logger = run_logger()
    store = ArtifactStore(store_url)
    dataset = store.resolve(dataset_ref)
    base = str(store.resolve(base_model)) if base_model.startswith("models/") else base_model
    cfg = TrainConfig(**config)
    train_id = training_id(dataset, base, cfg)
    if not rerun and (done := store.find_by_input_hash("models", model_name, train_id)):
        logger.info("model %s already trained from the same inputs: reusing it", done)
        return str(done)
    c = load_model_components(store, base)
    buckets = dataset_buckets(store, dataset)
    trainer = AradTrainer(c, cfg)
    acc = trainer.accelerator
    resumed_from = None
    if resume:
        resumed_from = store.find_by_input_hash("checkpoints", model_name, train_id)
        if resumed_from is None:
            logger.warning("--resume: no checkpoint of %s for this dataset, base model and config; starting at step 0",
                           model_name)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                trainer.load_checkpoint(store.download(resumed_from, tmp))
            logger.info("resumed from %s at step %d", resumed_from, trainer.step)
    loader_cfg = LoaderConfig(batch_size=cfg.batch_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                              leftover=cfg.leftover, rank=acc.process_index, world_size=acc.num_processes)
    loader = make_loader(buckets, StoreOpener(store.url, str(dataset)), loader_cfg, cfg.num_workers,
                         start_batch=trainer.batches_consumed)
    counts = {b: sum(s.count for s in v) for b, v in buckets.items()}
    logger.info("ARAD fine-tuning %s on %s for %d steps (batch %d x %d accumulation, %s, leftover=%s)", base, counts,
                cfg.steps, cfg.batch_size, cfg.grad_accum, acc.mixed_precision, cfg.leftover)

    def checkpoint(step: int) -> None:
        if not acc.is_main_process:
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = trainer.save_checkpoint(Path(tmp) / "ckpt")
            writer = store.new_version("checkpoints", model_name)
            writer.put_dir(folder)
            ref = writer.commit(parents=[dataset] + ([base] if base.startswith("models/") else []),
                                params={"base_model": base, **cfg.__dict__}, flow_run_id=current_flow_run_id(),
                                input_hash=train_id, summary={"step": step, "loss_last": trainer.losses[-1]})
        logger.info("checkpoint %s at step %d", ref, step)
        _publish_losses(trainer.losses, trainer.lrs, cfg.steps, f"step {step}")

    with Progress("ARAD fine-tuning", total=cfg.steps, unit="step") as progress:
        progress.update(trainer.step)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(step + 1)
            progress.note(f"loss {loss:.3f}")
            if (step + 1) % max(1, total // 10) == 0:
                _publish_losses(trainer.losses, trainer.lrs, total, f"step {step + 1}")

        trainer.train(iter(loader), until_step=stop_after, on_step=on_step, on_checkpoint=checkpoint,
                      checkpoint_every=checkpoint_every)
    losses = trainer.losses
    acc.wait_for_everyone()
    if not acc.is_main_process:  # under `accelerate launch` only rank 0 commits
        return ""
    if trainer.step < cfg.steps:
        logger.info("stopped at step %d of %d (stop_after); no model committed", trainer.step, cfg.steps)
        return ""
    unet = trainer.final_unet()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_components({"unet": unet, "vae": c.vae.float(), "text_encoder": c.text_encoder.float(),
                         "tokenizer": c.tokenizer, "scheduler": c.scheduler}, out)
        _save_loss_plot(losses, "ARAD denoising loss", out / "loss.png")
        (out / "training_log.json").write_text(json.dumps({
            "loss": losses, "lr": trainer.lrs, "buckets": counts, "resumed_from": str(resumed_from) if resumed_from else None,
            "leftover_policy": cfg.leftover, "ema": cfg.ema_decay > 0, "mixed_precision": acc.mixed_precision,
        }))
        (out / "buckets.json").write_text(json.dumps(sorted(buckets)))
        writer = store.new_version("models", model_name)
        writer.put_dir(out)
    parents: list[str] = [str(dataset)] + ([base] if base.startswith("models/") else [])
    if resumed_from:
        parents.append(str(resumed_from))
    k = max(1, len(losses) // 10)
    ref = writer.commit(
        parents=parents, params={"base_model": base, **cfg.__dict__, "checkpoint_every": checkpoint_every},
        flow_run_id=current_flow_run_id(), input_hash=train_id,
        summary={"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "steps": cfg.steps,
                 "buckets": sorted(buckets), "weights": "ema" if cfg.ema_decay > 0 else "raw"},
    )
    _publish_losses(losses, trainer.lrs, cfg.steps, str(ref))
    logger.info("committed %s (loss %.3f -> %.3f)", ref, sum(losses[:k]) / k, sum(losses[-k:]) / k)
    return str(ref)

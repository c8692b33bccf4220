"""Training tasks: build the tiny base model, and ARAD fine-tuning on bucketed shards."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from artifact_store import ArtifactRef, ArtifactStore, PendingVersion, new_version_id, params_hash
from asd_models.arad_loader import LoaderConfig, make_loader
from asd_models.arad_training import AradTrainer, TrainConfig, fit_vae
from asd_models.images import pil_to_tensor_m11
from asd_models.loading import SDComponents, load_components
from asd_models.tiny_model import build_tiny_components, save_components
from data_engine.dataset_reader import StoreOpener, dataset_buckets, read_bucket_samples
from data_manifests.settings import TrainSettings
from tasks.model_cache import load_model_components
from tasks.progress import Progress, publish_table
from tasks.runtime import commit_in_run, run_logger

LOSS_ARTIFACT = "arad-loss"


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
    found = store.reuse_or_new("models", name, input_hash, rerun)
    if isinstance(found, ArtifactRef):
        logger.info("tiny base model %s already built from the same inputs: reusing it", found)
        return str(found)
    samples = read_bucket_samples(store, dataset)
    images = [pil_to_tensor_m11(img) for items in samples.values() for img, _ in items]
    writer = store.writer(found)
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
        writer.put_dir(out)
    ref = commit_in_run(
        writer, parents=[dataset], params={"vae_steps": vae_steps, "seed": seed, "builder": "asd_models.tiny_model"},
        summary={"vae_loss_first": losses[0] if losses else None, "vae_loss_last": losses[-1] if losses else None,
                 "images": len(images), "untrained_unet": True},
    )
    logger.info("committed %s (VAE loss %s)", ref, f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "not fitted")
    return str(ref)


def training_id(dataset: ArtifactRef, base: str, cfg: TrainConfig) -> str:
    """What a checkpoint must match to be resumed: same data, base model and config."""
    return params_hash({"dataset": str(dataset), "base": base, "config": cfg.__dict__, "kind": "arad"})


def loss_table(losses: list[float], lrs: list[float], total: int) -> list[dict[str, Any]]:
    """The loss curve as at most ~20 rows (mean per block of steps)."""
    k = max(1, total // 20)
    return [{"step": i + len(losses[i : i + k]), "loss": round(sum(losses[i : i + k]) / len(losses[i : i + k]), 5),
             "lr": f"{lrs[min(i + k, len(lrs)) - 1]:.3g}"} for i in range(0, len(losses), k)]


@dataclass
class TrainOutcome:
    """What one training call did: the committed model ("" when it stopped early), the
    checkpoint it resumed from, and the optimizer step it reached."""

    model: str
    resumed_from: str | None
    step: int


@dataclass
class _Training:
    store: ArtifactStore
    dataset: ArtifactRef
    base: str
    model_name: str
    cfg: TrainConfig
    train_id: str
    components: SDComponents
    trainer: AradTrainer

    @property
    def parents(self) -> list[str]:
        return [str(self.dataset)] + ([self.base] if self.base.startswith("models/") else [])


def _resume(t: _Training, logger: Any) -> ArtifactRef | None:
    """Load the newest checkpoint of the same training into the trainer, if there is one."""
    ckpt = t.store.find_by_input_hash("checkpoints", t.model_name, t.train_id)
    if ckpt is None:
        logger.warning("--resume: no checkpoint of %s for this dataset, base model and config; starting at step 0",
                       t.model_name)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        t.trainer.load_checkpoint(t.store.download(ckpt, tmp))
    logger.info("resumed from %s at step %d", ckpt, t.trainer.step)
    return ckpt


def _save_checkpoint(t: _Training, step: int, logger: Any) -> None:
    if not t.trainer.accelerator.is_main_process:
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = t.trainer.save_checkpoint(Path(tmp) / "ckpt")
        writer = t.store.writer(PendingVersion(ArtifactRef("checkpoints", t.model_name, new_version_id()), t.train_id))
        writer.put_dir(folder)
        ref = commit_in_run(writer, parents=t.parents, params={"base_model": t.base, **t.cfg.__dict__},
                            summary={"step": step, "loss_last": t.trainer.losses[-1]})
    logger.info("checkpoint %s at step %d", ref, step)


def _run_steps(t: _Training, buckets: dict, checkpoint_every: int, stop_after: int | None, logger: Any) -> None:
    cfg, trainer, acc = t.cfg, t.trainer, t.trainer.accelerator
    loader_cfg = LoaderConfig(batch_size=cfg.batch_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                              leftover=cfg.leftover, rank=acc.process_index, world_size=acc.num_processes)
    loader = make_loader(buckets, StoreOpener(t.store.url, str(t.dataset)), loader_cfg, cfg.num_workers,
                         start_batch=trainer.batches_consumed)
    # The loss lives in one UI artifact key: this progress artifact (loss in its description),
    # then the final loss table under the same key.
    with Progress("ARAD fine-tuning", total=cfg.steps, unit="step", key=LOSS_ARTIFACT) as progress:
        progress.update(trainer.step)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(step + 1)
            progress.note(f"loss {loss:.3f}")

        trainer.train(iter(loader), until_step=stop_after, on_step=on_step,
                      on_checkpoint=lambda step: _save_checkpoint(t, step, logger), checkpoint_every=checkpoint_every)


def _commit_model(t: _Training, pending: PendingVersion, counts: dict[str, int], resumed_from: ArtifactRef | None,
                  checkpoint_every: int) -> ArtifactRef:
    """The trained model in diffusers layout, with its loss curve and training log."""
    trainer, cfg, losses = t.trainer, t.cfg, t.trainer.losses
    writer = t.store.writer(pending)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_components({"unet": trainer.final_unet(), "vae": t.components.vae.float(),
                         "text_encoder": t.components.text_encoder.float(), "tokenizer": t.components.tokenizer,
                         "scheduler": t.components.scheduler}, out)
        _save_loss_plot(losses, "ARAD denoising loss", out / "loss.png")
        (out / "training_log.json").write_text(json.dumps({
            "loss": losses, "lr": trainer.lrs, "buckets": counts,
            "resumed_from": str(resumed_from) if resumed_from else None, "leftover_policy": cfg.leftover,
            "ema": cfg.ema_decay > 0, "mixed_precision": trainer.accelerator.mixed_precision,
        }))
        (out / "buckets.json").write_text(json.dumps(sorted(counts)))
        writer.put_dir(out)
    k = max(1, len(losses) // 10)
    return commit_in_run(
        writer, parents=t.parents + ([str(resumed_from)] if resumed_from else []),
        params={"base_model": t.base, **cfg.__dict__, "checkpoint_every": checkpoint_every},
        summary={"loss_first10pct_mean": sum(losses[:k]) / k, "loss_last10pct_mean": sum(losses[-k:]) / k,
                 "steps": cfg.steps, "buckets": sorted(counts), "weights": "ema" if cfg.ema_decay > 0 else "raw"},
    )


def train_to_store(store_url: str, dataset_ref: str, base_model: str, model_name: str, settings: TrainSettings,
                   rerun: bool = False, resume: bool = False, stop_after: int | None = None) -> TrainOutcome:
    """ARAD: fine-tune the UNet on one-bucket batches streamed from the dataset's shards (VAE and
    text encoder frozen). Every `settings.checkpoint_every` steps a `checkpoints/<model_name>`
    version holds the whole trainer state; `resume` continues from the newest one made for the
    same dataset, base model and config. The result is a diffusers-layout `models/<model_name>`
    version with the dataset (and a stored base model) as parents. `stop_after` ends the run
    early without committing a model (tests, and "train in slices" jobs)."""
    logger = run_logger()
    store = ArtifactStore(store_url)
    dataset = store.resolve(dataset_ref)
    base = str(store.resolve(base_model)) if base_model.startswith("models/") else base_model
    cfg = settings.train_config()
    train_id = training_id(dataset, base, cfg)
    found = store.reuse_or_new("models", model_name, train_id, rerun)
    if isinstance(found, ArtifactRef):
        logger.info("model %s already trained from the same inputs: reusing it", found)
        return TrainOutcome(str(found), None, cfg.steps)
    components = load_model_components(store, base)
    buckets = dataset_buckets(store, dataset)
    t = _Training(store, dataset, base, model_name, cfg, train_id, components, AradTrainer(components, cfg))
    resumed_from = _resume(t, logger) if resume else None
    counts = {b: sum(s.count for s in v) for b, v in buckets.items()}
    logger.info("ARAD fine-tuning %s on %s for %d steps (batch %d x %d accumulation, %s, leftover=%s)", base, counts,
                cfg.steps, cfg.batch_size, cfg.grad_accum, t.trainer.accelerator.mixed_precision, cfg.leftover)
    _run_steps(t, buckets, settings.checkpoint_every, stop_after, logger)
    t.trainer.accelerator.wait_for_everyone()
    resumed = str(resumed_from) if resumed_from else None
    if not t.trainer.accelerator.is_main_process:  # under `accelerate launch` only rank 0 commits
        return TrainOutcome("", resumed, t.trainer.step)
    if t.trainer.step < cfg.steps:
        logger.info("stopped at step %d of %d (stop_after); no model committed", t.trainer.step, cfg.steps)
        return TrainOutcome("", resumed, t.trainer.step)
    ref = _commit_model(t, found, counts, resumed_from, settings.checkpoint_every)
    publish_table(LOSS_ARTIFACT, loss_table(t.trainer.losses, t.trainer.lrs, cfg.steps), f"ARAD loss of {ref}")
    logger.info("committed %s", ref)
    return TrainOutcome(str(ref), resumed, t.trainer.step)


@task(name="arad-finetune")
def arad_finetune(store_url: str, dataset_ref: str, base_model: str, model_name: str, settings: TrainSettings,
                  rerun: bool = False, resume: bool = False) -> str:
    """Prefect task around `train_to_store`: the committed model reference."""
    return train_to_store(store_url, dataset_ref, base_model, model_name, settings, rerun, resume).model

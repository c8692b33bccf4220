"""The train stages, in one place: the settings (and their adapter to the trainer's frozen
config), and two stages: the tiny base model (built in code, its VAE fitted to the data) and
ARAD fine-tuning on one-bucket batches streamed from a dataset's shards, with resumable
checkpoints in the store."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from artifact_store import ArtifactRef, ArtifactStore, PendingVersion, new_version_id, params_hash
from asd_models.arad_loader import LoaderConfig, make_loader
from asd_models.arad_training import AradTrainer, CheckpointMismatch, TrainConfig, fit_vae
from asd_models.families import FAMILY_NAMES, save_tiny
from asd_models.images import pil_to_tensor_m11
from asd_models.loading import ModelComponents, load_components
from asd_models.lora import ADAPTER_DIR, LoraError, save_adapter
from data_engine.dataset_reader import StoreOpener, dataset_buckets, read_bucket_samples
from data_manifests.settings import SEED_MAX, StageSettings, execution, output
from tasks.model_cache import load_model_components
from tasks.progress import Progress, publish_table
from tasks.runtime import commit_in_run
from tasks.stage import Built, Inputs, Stage, StageRun, run_stage

LOSS_ARTIFACT = "arad-loss"


class TrainSettings(StageSettings):
    """ARAD fine-tuning (`asd_models.arad_training.TrainConfig`), plus where to start from."""

    base_model: str = output(
        "tiny",
        description="'tiny' (built in code, VAE fitted to the data), a store ref models/NAME@VERSION, "
        "a local diffusers folder, or a hub id already in the local HF cache",
    )
    vae_steps: int = output(400, ge=0, description="VAE fitting steps for the tiny base model")
    tiny_family: Literal[FAMILY_NAMES] = output(  # type: ignore[valid-type]  # Literal of the plug-in table's names
        "sd", description="the model family of the tiny base model built in code (base_model 'tiny')"
    )
    steps: int = output(1000, ge=1, description="optimizer steps")
    batch_size: int = output(8, ge=1, description="samples per micro-batch (per process)")
    grad_accum: int = output(1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = output(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = output(1e-2, ge=0, description="AdamW weight decay")
    warmup_steps: int = output(20, ge=0, description="linear warm-up, then cosine")
    min_lr_ratio: float = output(0.1, ge=0, le=1, description="cosine ends at this fraction of the peak")
    caption_dropout: float = output(0.1, ge=0, le=1, description="share of empty captions (for CFG)")
    grad_clip: float = output(1.0, ge=0, description="gradient-norm clip (0: off)")
    ema_decay: float = output(0.9999, ge=0, lt=1, description="EMA of the weights, with warm-up (0: off)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = output("auto", description="auto: bf16 on a GPU")
    gradient_checkpointing: Literal["auto", "on", "off"] = output("auto", description="auto: on a GPU")
    cache_latents: bool = output(False, description="encode each image once (memory grows with the data)")
    shuffle_buffer: int = output(256, ge=1, description="encoded samples held per bucket for shuffling")
    leftover: Literal["keep", "drop"] = output("keep", description="a bucket's last partial batch per epoch")
    num_workers: int = output(0, ge=0, description="data-loader processes (changes the data order)")
    checkpoint_every: int = execution(
        500, ge=0, description="a resumable checkpoint in the store every N steps (0: none)"
    )
    seed: int = output(0, ge=0, le=SEED_MAX, description="seed of weights, noise, timesteps and data order")
    lora_rank: int = output(
        0,
        ge=0,
        le=1024,
        description="train a LoRA adapter of this rank on the denoiser's attention projections, the base "
        "frozen; the model version holds the adapter alone, its base model a parent (0: fine-tune the "
        "whole denoiser)",
    )

    def train_config(self) -> TrainConfig:
        """The trainer's frozen config (the one place it is built): every TrainConfig field from here."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})


def _save_loss_plot(losses: list[float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(losses, lw=0.6, alpha=0.5, label="loss")
    k = max(1, len(losses) // 30)
    smooth = [
        sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1]) for i in range(len(losses))
    ]
    ax.plot(smooth, lw=1.5, label=f"mean of {k + 1}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class TinyBase(Stage):
    """A tiny base model of `family` (`asd_models.families.TINY`), built in code, saved by its
    diffusers pipeline and loaded back through `from_pretrained`, with its VAE fitted to the
    dataset's images (a random VAE decodes every latent to noise). Its UNet is untrained: ARAD
    fine-tuning starts from it."""

    flow: ClassVar[str] = "asd-train"
    output_param: ClassVar[str] = "model"  # named <model>-tiny-base by the train flow
    kind: ClassVar[str] = "models"
    dataset_ref: str
    vae_steps: int
    seed: int = 0
    family: str = "sd"

    def resolve(self, store: ArtifactStore) -> Inputs:
        dataset = str(store.resolve(self.dataset_ref))
        return Inputs(
            reads=[dataset],
            parents=[dataset],
            refs={"dataset": dataset},
            identity={
                "dataset": dataset,
                "vae_steps": self.vae_steps,
                "seed": self.seed,
                "kind": "tiny-base",
                **({"family": self.family} if self.family != "sd" else {}),
            },
        )

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        samples = read_bucket_samples(run.store, run.store.resolve(inputs.refs["dataset"]))
        images = [pil_to_tensor_m11(img) for items in samples.values() for img, _ in items]
        with tempfile.TemporaryDirectory() as tmp:
            save_tiny(self.family, Path(tmp) / "init", seed=self.seed)
            c = load_components(Path(tmp) / "init")  # the same path real checkpoints take
            with Progress("fit tiny VAE", total=self.vae_steps, unit="step") as progress:

                def on_step(step: int, total: int, loss: float) -> None:
                    progress.update(step + 1)
                    progress.note(f"loss {loss:.3f}")

                losses = fit_vae(c.vae, images, self.vae_steps, seed=self.seed, on_step=on_step)
            out = c.family.save(c, Path(tmp) / "model")
            _save_loss_plot(losses, "tiny VAE reconstruction loss", out / "vae_loss.png")
            (out / "training_log.json").write_text(json.dumps({"vae_loss": losses}))
            run.writer.put_dir(out)
        run.logger.info(
            "tiny VAE loss %s", f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "not fitted"
        )
        return Built(
            params={
                "vae_steps": self.vae_steps,
                "seed": self.seed,
                "family": self.family,
                "builder": "asd_models.families.TINY",
            },
            summary={
                "vae_loss_first": losses[0] if losses else None,
                "vae_loss_last": losses[-1] if losses else None,
                "images": len(images),
                "untrained_unet": True,
            },
        )


def build_tiny_base(
    store_url: str | None, dataset_ref: str, name: str, vae_steps: int, seed: int = 0, rerun: bool = False
) -> str:
    """The tiny base model `models/<name>` for a dataset (reused when built from the same inputs)."""
    return run_stage(TinyBase(dataset_ref, vae_steps, seed), name, store_url, rerun).ref


def rank_zero_first() -> contextlib.AbstractContextManager[None]:
    """Under a multi-process launch (torchrun, accelerate launch): rank 0 runs the block first,
    the other ranks once it is done (what rank 0 committed, they then reuse). One process: no-op."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).main_process_first()


def world_size() -> int:
    """Processes of this training run (torchrun / accelerate launch set WORLD_SIZE; else 1)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def training_identity(dataset: str, base: str, cfg: TrainConfig, processes: int = 1) -> dict[str, Any]:
    """What a model (and a checkpoint to resume) is made from: same data, base model and config,
    and the number of processes (each draws its own share and noise: N processes train another
    model than one; a one-process identity is as it always was)."""
    config = {k: v for k, v in cfg.__dict__.items() if k != "lora_rank" or v}  # no adapter: as it always was
    ident = {"dataset": dataset, "base": base, "config": config, "kind": "arad"}
    return {**ident, "world_size": processes} if processes > 1 else ident


def loss_table(losses: list[float], lrs: list[float], total: int) -> list[dict[str, Any]]:
    """The loss curve as at most ~20 rows (mean per block of steps)."""
    k = max(1, total // 20)
    return [
        {
            "step": i + len(losses[i : i + k]),
            "loss": round(sum(losses[i : i + k]) / len(losses[i : i + k]), 5),
            "lr": f"{lrs[min(i + k, len(lrs)) - 1]:.3g}",
        }
        for i in range(0, len(losses), k)
    ]


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
    components: ModelComponents
    trainer: AradTrainer

    @property
    def parents(self) -> list[str]:
        return [str(self.dataset)] + ([self.base] if self.base.startswith("models/") else [])


def _resume(t: _Training, logger: Any) -> ArtifactRef | None:
    """Load the newest checkpoint of the same training into the trainer, if there is one."""
    ckpt = t.store.find_by_input_hash("checkpoints", t.model_name, t.train_id)
    if ckpt is None:
        _refuse_other_world_size(t)
        logger.warning(
            "--resume: no checkpoint of %s for this dataset, base model and config; starting at step 0",
            t.model_name,
        )
        return None
    with tempfile.TemporaryDirectory() as tmp:
        t.trainer.load_checkpoint(t.store.download(ckpt, tmp))
    logger.info("resumed from %s at step %d", ckpt, t.trainer.step)
    return ckpt


def _same_training(t: _Training) -> str:
    """The training's identity whatever its number of processes (what checkpoints record)."""
    return params_hash(training_identity(str(t.dataset), t.base, t.cfg))


def _refuse_other_world_size(t: _Training) -> None:
    """A checkpoint of the same training by another number of processes cannot be continued
    exactly (each rank's share of the data and its noise depend on it): say so, in one line."""
    world = t.trainer.accelerator.num_processes
    for ref in reversed(t.store.list_versions("checkpoints", t.model_name)):
        params = t.store.record(ref).get("params") or {}
        if params.get("training") == _same_training(t) and params.get("world_size", 1) != world:
            raise CheckpointMismatch(
                f"--resume: {ref} was written by a run of {params.get('world_size', 1)} "
                f"process(es); this run has {world}: resume with the same number of processes, "
                "or train without --resume"
            )


def _save_checkpoint(t: _Training, step: int, logger: Any) -> None:
    if not t.trainer.accelerator.is_main_process:
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = t.trainer.save_checkpoint(Path(tmp) / "ckpt")
        writer = t.store.writer(
            PendingVersion(ArtifactRef("checkpoints", t.model_name, new_version_id()), t.train_id)
        )
        writer.put_dir(folder)
        ref = commit_in_run(
            writer,
            parents=t.parents,
            params={
                "base_model": t.base,
                **t.cfg.__dict__,
                "world_size": t.trainer.accelerator.num_processes,
                "training": _same_training(t),
            },
            summary={"step": step, "loss_last": t.trainer.losses[-1]},
        )
    logger.info("checkpoint %s at step %d", ref, step)


def _run_steps(
    t: _Training, buckets: dict, checkpoint_every: int, stop_after: int | None, logger: Any
) -> None:
    cfg, trainer, acc = t.cfg, t.trainer, t.trainer.accelerator
    loader_cfg = LoaderConfig(
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        leftover=cfg.leftover,
        rank=acc.process_index,
        world_size=acc.num_processes,
    )
    loader = make_loader(
        buckets,
        StoreOpener(t.store.url, str(t.dataset)),
        loader_cfg,
        cfg.num_workers,
        start_batch=trainer.batches_consumed,
    )
    # The loss lives in one UI artifact key: this progress artifact (loss in its description),
    # then the final loss table under the same key.
    with Progress("ARAD fine-tuning", total=cfg.steps, unit="step", key=LOSS_ARTIFACT) as progress:
        progress.update(trainer.step)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(step + 1)
            progress.note(f"loss {loss:.3f}")

        trainer.train(
            iter(loader),
            until_step=stop_after,
            on_step=on_step,
            on_checkpoint=lambda step: _save_checkpoint(t, step, logger),
            checkpoint_every=checkpoint_every,
        )


def _write_model(t: _Training, writer: Any, counts: dict[str, int], resumed_from: ArtifactRef | None) -> None:
    """The trained model in diffusers layout, with its loss curve and training log."""
    trainer, cfg, losses = t.trainer, t.cfg, t.trainer.losses
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        c = t.components
        if cfg.lora_rank:  # the adapter alone: the base model is its parent
            save_adapter(trainer.final_unet(), out / ADAPTER_DIR, cfg.lora_rank, c.family.name)
        else:
            encoder_2 = c.text_encoder_2.float() if c.text_encoder_2 is not None else None
            final = replace(
                c,
                unet=trainer.final_unet(),
                vae=c.vae.float(),
                text_encoder=c.text_encoder.float(),
                text_encoder_2=encoder_2,
            )
            c.family.save(final, out)  # in the layout of the base model's family
        _save_loss_plot(losses, "ARAD denoising loss", out / "loss.png")
        (out / "training_log.json").write_text(
            json.dumps(
                {
                    "loss": losses,
                    "lr": trainer.lrs,
                    "buckets": counts,
                    "resumed_from": str(resumed_from) if resumed_from else None,
                    "leftover_policy": cfg.leftover,
                    "ema": cfg.ema_decay > 0,
                    "mixed_precision": trainer.accelerator.mixed_precision,
                }
            )
        )
        (out / "buckets.json").write_text(json.dumps(sorted(counts)))
        writer.put_dir(out)


@dataclass(frozen=True)
class Arad(Stage):
    """ARAD: fine-tune the UNet of `base_model` on one-bucket batches streamed from the
    dataset's shards (VAE and text encoder frozen). Every `settings.checkpoint_every` steps a
    `checkpoints/<name>` version holds the whole trainer state; `resume` continues from the
    newest one made for the same dataset, base model and config. The result is a
    diffusers-layout `models/<name>` version with the dataset (and a stored base model) as
    parents. `stop_after` ends the run early without committing a model (tests, and "train in
    slices" jobs); under `accelerate launch` only rank 0 commits."""

    flow: ClassVar[str] = "asd-train"
    output_param: ClassVar[str] = "model"
    kind: ClassVar[str] = "models"
    dataset_ref: str
    base_model: str
    settings: TrainSettings = TrainSettings()
    resume: bool = False
    stop_after: int | None = None

    def resolve(self, store: ArtifactStore) -> Inputs:
        dataset = str(store.resolve(self.dataset_ref))
        base = (
            str(store.resolve(self.base_model)) if self.base_model.startswith("models/") else self.base_model
        )
        refs = {"dataset": dataset, "base": base}
        if self.settings.lora_rank and not base.startswith("models/"):
            raise LoraError(
                f"--lora-rank trains an adapter whose base must be a stored model (its parent); {base!r} is "
                "not one: `asd model import` it first, then train on models/NAME"
            )
        return Inputs(
            reads=[dataset] + ([base] if base.startswith("models/") else []),
            parents=[dataset] + ([base] if base.startswith("models/") else []),
            refs=refs,
            identity=training_identity(dataset, base, self.settings.train_config(), world_size()),
        )

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        store, logger, cfg = run.store, run.logger, self.settings.train_config()
        dataset, base, name = store.resolve(inputs.refs["dataset"]), inputs.refs["base"], run.pending.ref.name
        components = load_model_components(store, base)
        buckets = dataset_buckets(store, dataset)
        t = _Training(
            store,
            dataset,
            base,
            name,
            cfg,
            run.pending.input_hash or "",
            components,
            AradTrainer(components, cfg),
        )
        resumed_from = _resume(t, logger) if self.resume else None
        counts = {b: sum(s.count for s in v) for b, v in buckets.items()}
        logger.info(
            "ARAD fine-tuning %s on %s for %d steps (batch %d x %d accumulation, %s, leftover=%s)",
            base,
            counts,
            cfg.steps,
            cfg.batch_size,
            cfg.grad_accum,
            t.trainer.accelerator.mixed_precision,
            cfg.leftover,
        )
        _run_steps(t, buckets, self.settings.checkpoint_every, self.stop_after, logger)
        t.trainer.accelerator.wait_for_everyone()
        outcome = {"resumed_from": str(resumed_from) if resumed_from else None, "step": t.trainer.step}
        if not t.trainer.accelerator.is_main_process:  # under `accelerate launch` only rank 0 commits
            return Built({}, {}, extra=outcome, commit=False)
        if t.trainer.step < cfg.steps:
            logger.info(
                "stopped at step %d of %d (stop_after); no model committed", t.trainer.step, cfg.steps
            )
            return Built({}, {}, extra=outcome, commit=False)
        _write_model(t, run.writer, counts, resumed_from)
        losses, k = t.trainer.losses, max(1, len(t.trainer.losses) // 10)
        return Built(
            params={
                "base_model": base,
                **cfg.__dict__,
                **(
                    {"lora": {"rank": cfg.lora_rank, "family": t.components.family.name}}
                    if cfg.lora_rank
                    else {}
                ),
                "checkpoint_every": self.settings.checkpoint_every,
                "world_size": world_size(),
            },
            summary={
                "loss_first10pct_mean": sum(losses[:k]) / k,
                "loss_last10pct_mean": sum(losses[-k:]) / k,
                "steps": cfg.steps,
                "buckets": sorted(counts),
                "weights": "ema" if cfg.ema_decay > 0 else "raw",
            },
            parents=[str(resumed_from)] if resumed_from else [],
            extra={**outcome, "loss_table": loss_table(losses, t.trainer.lrs, cfg.steps)},
        )

    def publish(self, store: ArtifactStore, ref: str, built: Built | None) -> None:
        if built is not None:
            publish_table(LOSS_ARTIFACT, built.extra["loss_table"], f"ARAD loss of {ref}")


def train_to_store(
    store_url: str | None,
    dataset_ref: str,
    base_model: str,
    model_name: str,
    settings: TrainSettings,
    rerun: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
) -> TrainOutcome:
    """Run the ARAD stage (see `Arad`): what it committed, resumed from, and reached."""
    result = run_stage(
        Arad(dataset_ref, base_model, settings, resume, stop_after), model_name, store_url, rerun
    )
    if result.built is None:  # reused as it was
        return TrainOutcome(result.ref, None, settings.steps)
    return TrainOutcome(result.ref, result.built.extra["resumed_from"], result.built.extra["step"])

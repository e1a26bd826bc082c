"""``fit``, ``validate`` and ``test`` from a TrainConfig: the one path behind ``kiban fit``.

fit: validate the config (before any work) -> find the checkpoint to resume from -> build the
LightningModule, DataModule, callbacks and Trainer -> ``trainer.fit``. Inside a Slurm job the
world comes from Lightning's ``SLURMEnvironment`` (with its own requeue turned off; kiban's
``PreemptionRequeue`` does it at a step boundary). DeepSpeed on a CPU goes to the raw-DeepSpeed
loop in ``deepspeed_cpu.py`` instead, with the same presets, checkpoints and step log.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from kiban.atomic import write_atomic
from kiban.hpc.env import ClusterEnv, detect_cluster, lightning_environment
from kiban.train.checkpoint import complete_checkpoints, verify_checkpoint
from kiban.train.config import ConfigError, TrainConfig
from kiban.train.export import export_checkpoint, export_encoder, export_model
from kiban.train.validation import resolve_accelerator, validate_config

__all__ = ["FitResult", "fit", "resume_checkpoint", "test", "validate"]

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """Where a fit ended: the run directory, the last global step and the newest complete checkpoint."""
    run_dir: Path
    global_step: int
    checkpoint: Path | None  # the newest complete checkpoint after the run


def fit(config: TrainConfig, *, callbacks: Sequence[Any] = ()) -> FitResult:
    """Train as the config says; returns where it ended. ``callbacks``: extra Lightning callbacks,
    run before kiban's own (not available on the raw-DeepSpeed CPU path).
    """
    validate_config(config)
    cluster = detect_cluster()
    accelerator = resolve_accelerator(config)
    _check_world(config, cluster, accelerator=accelerator)
    with _process_group():
        return _fit(config, cluster=cluster, accelerator=accelerator, callbacks=callbacks)


def _fit(config: TrainConfig, *, cluster: ClusterEnv, accelerator: str, callbacks: Sequence[Any]) -> FitResult:
    run_dir = Path(config.run.dir)
    resume = resume_checkpoint(config)
    if cluster.global_rank == 0 and os.environ.get("LOCAL_RANK", "0") == "0":
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", config.to_yaml())
    from kiban.train.strategies import uses_raw_deepspeed

    if uses_raw_deepspeed(config, accelerator=accelerator):
        from kiban.train.deepspeed_cpu import fit_deepspeed_cpu

        if callbacks:
            raise ValueError(
                "Lightning callbacks need the Lightning path; DeepSpeed on the CPU runs a raw loop"
            )
        step = fit_deepspeed_cpu(config, cluster=cluster, resume=resume)
        if cluster.global_rank == 0 and step >= config.trainer.max_steps:
            _export_sharded(run_dir, config)
    else:
        trainer, module, datamodule = _build(
            config, cluster=cluster, accelerator=accelerator, resume=resume, extra=callbacks
        )
        trainer.fit(
            module,
            datamodule=datamodule,
            ckpt_path=str(resume / "state.ckpt") if resume else None,
            weights_only=True,
        )
        step = trainer.global_step
        if trainer.is_global_zero:
            if config.trainer.strategy not in ("auto", "ddp"):
                if step >= config.trainer.max_steps:
                    _export_sharded(run_dir, config)
            elif config.stage == "pretrain":
                export_encoder(module, run_dir / "encoder", step=step)
            else:
                export_model(module.model, run_dir / "model")
    complete = complete_checkpoints(run_dir / "checkpoints")
    return FitResult(run_dir, step, complete[-1][1] if complete else None)


def _export_sharded(run_dir: Path, config: TrainConfig) -> None:
    """A sharded run (DeepSpeed, FSDP) ends with the same ``model/`` (``encoder/`` for pretraining)
    as a DDP one, consolidated by rank 0 from the final checkpoint every rank has just written.
    Only a finished run exports: a preempted one is requeued within its grace time, and merging
    every shard of a large model takes minutes (``kiban export`` does it later on request).
    """
    complete = complete_checkpoints(run_dir / "checkpoints")
    if not complete:
        log.warning("no complete checkpoint in %s: nothing to export", run_dir / "checkpoints")
        return
    target = run_dir / ("encoder" if config.stage == "pretrain" else "model")
    export_checkpoint(complete[-1][1], target)


def validate(config: TrainConfig, *, checkpoint: str | Path | None = None) -> list[dict[str, float]]:
    """Evaluate a checkpoint (default: the newest in run.dir) on data.val; the metrics per dataloader."""
    return _evaluate(config, "validate", checkpoint)


def test(config: TrainConfig, *, checkpoint: str | Path | None = None) -> list[dict[str, float]]:
    """Evaluate a checkpoint (default: the newest in run.dir) on data.test; the metrics per dataloader."""
    return _evaluate(config, "test", checkpoint)


def resume_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint a fit resumes from (``run.resume``); not yet verified (rank 0 does that)."""
    if config.run.resume == "never":
        return None
    if config.run.resume != "auto":
        return Path(config.run.resume)
    complete = complete_checkpoints(Path(config.run.dir) / "checkpoints")
    return complete[-1][1] if complete else None


# ----------------------------------------------------------------------------------------------


def _evaluate(config: TrainConfig, stage: str, checkpoint: str | Path | None) -> list[dict[str, float]]:
    validate_config(config)
    split = "val" if stage == "validate" else "test"
    if config.stage == "pretrain":
        if split != "val" or not config.pretrain.val:
            raise ConfigError("pretrain.val", f"kiban {stage} of a pretraining run evaluates pretrain.val; set it")
    elif getattr(config.data, split) is None:
        raise ConfigError(f"data.{split}", f"kiban {stage} needs data.{split} (a JSONL of records, or tiny)")
    accelerator = resolve_accelerator(config)
    from kiban.train.strategies import uses_raw_deepspeed

    if uses_raw_deepspeed(config, accelerator=accelerator):
        raise ConfigError(
            "trainer.strategy",
            f"kiban {stage} of a raw-DeepSpeed CPU run is not supported; "
            "evaluate with strategy auto from a GPU-trained or DDP checkpoint",
        )
    path = Path(checkpoint) if checkpoint else resume_checkpoint(config)
    if path is None:
        raise FileNotFoundError(
            f"no checkpoint in {Path(config.run.dir) / 'checkpoints'} (pass --checkpoint)"
        )
    verify_checkpoint(path)
    cluster = detect_cluster()
    trainer, module, datamodule = _build(
        config, cluster=cluster, accelerator=accelerator, resume=None, extra=()
    )
    module.init_weights = False  # the checkpoint brings them
    run = trainer.validate if stage == "validate" else trainer.test
    with _process_group():
        return run(module, datamodule=datamodule, ckpt_path=str(path / "state.ckpt"), verbose=False, weights_only=True)


@contextmanager
def _process_group() -> Iterator[None]:
    """Ends the process group that training or evaluation started, before this process exits.

    Left to interpreter shutdown, gloo's worker threads outlive Python and the process aborts
    ("terminate called without an active exception"), so srun marks a finished job FAILED. On a
    normal end every rank first waits at a barrier for rank 0's export, so no rank's step ends
    before the model is written; after an error there is no barrier (a peer may never reach it).
    """
    import torch.distributed as dist

    ended = False
    try:
        yield
        ended = True
    finally:
        if dist.is_available() and dist.is_initialized():
            if ended:
                dist.barrier()
            dist.destroy_process_group()


def _build(
    config: TrainConfig, *, cluster: ClusterEnv, accelerator: str, resume: Path | None, extra: Sequence[Any]
) -> tuple[Any, Any, Any]:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger

    from kiban.data.datamodule import KibanDataModule
    from kiban.hpc.requeue import PreemptionRequeue
    from kiban.train.callbacks import NonFiniteGuard, StepLog, ThroughputMonitor
    from kiban.train.checkpointing import AtomicCheckpoint, ResumeState
    from kiban.train.module import KibanLightningModule
    from kiban.train.strategies import build_strategy

    t, c = config.trainer, config.callbacks
    pl.seed_everything(config.seed, workers=True, verbose=False)
    run_dir = Path(config.run.dir)
    checkpoint = AtomicCheckpoint(
        root=run_dir / "checkpoints",
        config_yaml=config.to_yaml(),
        every_n_steps=c.checkpoint.every_n_steps,
        keep_last=c.checkpoint.keep_last,
        monitor=c.checkpoint.monitor,
        mode=c.checkpoint.mode,
    )
    callbacks = [
        *extra,
        StepLog(run_dir / "metrics.jsonl"),
        ThroughputMonitor(every_n_steps=t.log_every_n_steps, peak_tflops=c.throughput.peak_tflops),
        NonFiniteGuard(action=c.nan_guard.action, max_skips=c.nan_guard.max_skips),
        checkpoint,  # after the step log and throughput (they read the step), before preemption
        PreemptionRequeue(save=checkpoint.save, saved_step=lambda: checkpoint.last_saved_step),
    ]
    if c.lr_monitor:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if resume is not None:
        callbacks.append(ResumeState(resume))
    devices, num_nodes = t.devices, t.num_nodes
    if cluster.kind in ("slurm", "torchelastic"):  # the launcher decided: one process per device
        devices, num_nodes = cluster.tasks_per_node, cluster.num_nodes
    elif devices == "auto":
        # resolved here, not by Lightning, so that several GPUs get kiban's DDP settings
        devices = max(1, torch.cuda.device_count()) if accelerator == "gpu" else 1
    world = devices * num_nodes
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=build_strategy(config, accelerator=accelerator, world_size=world),
        precision=t.precision,
        plugins=[lightning_environment(cluster)],
        max_steps=t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if t.val_check_interval else 1,
        limit_val_batches=t.limit_val_batches if _has_val(config) else 0,
        num_sanity_val_steps=0,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        enable_checkpointing=False,  # kiban's AtomicCheckpoint replaces ModelCheckpoint
        use_distributed_sampler=False,  # ResumableBatches shards by rank itself
        logger=CSVLogger(run_dir, name="logs"),
        default_root_dir=run_dir,
        callbacks=callbacks,
    )
    if config.stage == "pretrain":
        module, datamodule = _pretrain_parts(config, run_dir=run_dir, rank=cluster.global_rank)
    else:
        module = KibanLightningModule(config=config)
        datamodule = KibanDataModule.from_config(config, splits=("train", "val", "test"))
    module.init_weights = resume is None
    return trainer, module, datamodule


def _has_val(config: TrainConfig) -> bool:
    if config.stage == "pretrain":
        return bool(config.pretrain.val)
    return config.data.val is not None


def _pretrain_parts(config: TrainConfig, *, run_dir: Path, rank: int) -> tuple[Any, Any]:
    """The pretraining module and the one data module over the ``pretrain`` section's files.

    Each split is a ``PretrainSource`` (read when the loader first asks, with the featurizer the
    module builds in ``configure_model``); the module's ``processor`` crops, featurizes and masks
    each record under the record's seed (``SeededRecords``) and collates through the masker.
    """
    from kiban.data.datamodule import KibanDataModule
    from kiban.train.pretrain_data import PretrainSource
    from kiban.train.pretrain_module import PretrainLightningModule

    p, d = config.pretrain, config.data
    module = PretrainLightningModule(config=config)
    sources = {
        split: PretrainSource(p, split=split, module=module, rejects_dir=run_dir, rank=rank)
        for split in ("train", "val")
        if getattr(p, split)
    }
    datamodule = KibanDataModule(
        splits=sources,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        shuffle=d.shuffle,
        bucket_pool=d.bucket_pool,
        seed=config.seed,
    )
    return module, datamodule


def _check_world(config: TrainConfig, cluster: ClusterEnv, *, accelerator: str) -> None:
    """Inside Slurm the job's shape wins; a YAML that pins a different one is an error, not a hang."""
    from kiban.train.strategies import uses_raw_deepspeed

    t = config.trainer
    if (
        uses_raw_deepspeed(config, accelerator=accelerator)
        and isinstance(t.devices, int)
        and t.devices != cluster.tasks_per_node
    ):
        raise ConfigError(
            "trainer.devices",
            f"is {t.devices}, but DeepSpeed on the CPU runs the ranks its launcher "
            f"started ({cluster.tasks_per_node} here): use torchrun --nproc-per-node "
            f"{t.devices} kiban fit ..., or srun",
        )
    if cluster.kind != "slurm":
        return
    if isinstance(t.devices, int) and t.devices != cluster.tasks_per_node:
        raise ConfigError(
            "trainer.devices",
            f"is {t.devices} but the Slurm job runs {cluster.tasks_per_node} "
            "task(s) per node; set devices: auto",
        )
    if t.num_nodes not in (1, cluster.num_nodes):
        raise ConfigError(
            "trainer.num_nodes", f"is {t.num_nodes} but the Slurm job has {cluster.num_nodes} node(s)"
        )



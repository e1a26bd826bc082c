"""DeepSpeed ZeRO-2/3 on the CPU: a raw ``deepspeed.initialize`` loop, because Lightning's
``DeepSpeedStrategy`` refuses any accelerator but CUDA.

It reads the same YAML and the same ``hpc/presets/deepspeed_stage_*.json`` as the GPU path (with
the run's batch, accumulation, clipping and precision filled in by ``hpc.presets.deepspeed_config``),
runs gloo across the ranks that torchrun or ``srun`` started (rank and world size through
Lightning's cluster environments), and keeps kiban's contracts: the same objectives, NaN guard,
step log, atomic checkpoints (``state/`` is DeepSpeed's own checkpoint, plus ``data.json``, the
position of the next batch), preemption handling and automatic resume. What it leaves out is
Lightning's extras (loggers, validation loop); it exists to train and to prove the presets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from kiban.data.datamodule import KibanDataModule
from kiban.hpc.env import ClusterEnv
from kiban.hpc.presets import deepspeed_config
from kiban.hpc.requeue import clear_preemption, in_slurm_job, preemption_requested, requeue_job
from kiban.train.callbacks import NonFiniteError, describe_non_finite
from kiban.train.checkpoint import (
    CheckpointError,
    load_rng_state,
    prune_checkpoints,
    rng_file,
    save_checkpoint,
    verify_checkpoint,
)
from kiban.train.config import TrainConfig
from kiban.train.objectives import FrozenPrefix, fused_losses
from kiban.train.optim import build_optimizer, build_scheduler
from kiban.train.weights import load_stage_weights
from kiban.version import __version__

__all__ = ["fit_deepspeed_cpu"]

log = logging.getLogger(__name__)


def _skip_shared_memory_op() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op on the CPU accelerator.

    DeepSpeed's torch backend JIT-builds ``deepspeed_shm_comm`` (a C++ build of minutes on a small
    machine, repeated whenever another environment rebuilt the shared torch-extensions cache) only
    to speed up ``inference_all_reduce`` between ranks of one host; training here talks over gloo,
    within a node and across nodes, and never calls it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # build_shm_op() returns None


def fit_deepspeed_cpu(config: TrainConfig, *, cluster: ClusterEnv, resume: Path | None) -> int:
    """Train with raw DeepSpeed on the CPU; returns the final global step."""
    import deepspeed
    import pytorch_lightning as pl

    from kiban.fusion.model import KibanModel, apply_freeze_policy

    t = config.trainer
    if cluster.kind == "local" and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())  # one process alone: any free port
    for key, value in (
        ("RANK", cluster.global_rank),
        ("WORLD_SIZE", cluster.world_size),
        ("LOCAL_RANK", cluster.local_rank),
        ("MASTER_ADDR", cluster.main_address),
        ("MASTER_PORT", cluster.main_port),
    ):
        os.environ.setdefault(key, str(value))  # what deepspeed.init_distributed reads
    _skip_shared_memory_op()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    pl.seed_everything(config.seed, verbose=False)
    ds_config = deepspeed_config(
        t.strategy,
        micro_batch_size=config.data.batch_size,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        precision=t.precision,
    )
    # Built whole, then partitioned by deepspeed.initialize: under zero.Init each submodule's
    # parameters are sharded as soon as its __init__ returns, and fair-esm's ESM-2 then
    # initialises a child's weight from the parent (an empty shard by then). See strategies.py.
    model = KibanModel.from_config(config.model)
    if config.run.init_from and resume is None:  # a resumed run's checkpoint brings its own weights
        load_stage_weights(model, Path(config.run.init_from))
    apply_freeze_policy(model, config.stage)
    optimizer = build_optimizer(model.named_parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.schedule, max_steps=t.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )

    data = KibanDataModule.from_config(config, splits=("train",))
    data.attach(model.processor, rank=rank, world_size=world)
    root = Path(config.run.dir) / "checkpoints"
    if resume is not None:
        _restore(engine, data, resume, rank=rank)
    step_log = Path(config.run.dir) / "metrics.jsonl"
    checkpoint = _Saver(engine, data, root, config, rank=rank, world=world)
    checkpoint.last_step = engine.global_steps
    skipped, losses = 0, []
    engine.train()
    prefix = FrozenPrefix()  # used only while the LLM is frozen and its parameters are whole (not ZeRO-3)
    while engine.global_steps < t.max_steps:
        for batch in data.loader("train"):
            out = fused_losses(
                engine.module,
                batch.inputs,
                contrastive_weight=config.loss.contrastive_weight,
                temperature=config.loss.temperature,
                prefix=prefix,
            )
            loss = float(out.loss.detach())
            bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0])
            dist.all_reduce(bad)  # every rank skips or stops together
            if bad.item():
                message = describe_non_finite(
                    step=engine.global_steps + 1, loss=loss, grads=[], ids=batch.ids, rank=rank
                )
                if (
                    config.callbacks.nan_guard.action == "skip"
                    and skipped < config.callbacks.nan_guard.max_skips
                ):
                    skipped += 1
                    log.warning("%s; skipping this batch", message)
                    continue
                raise NonFiniteError(f"{message}; stopping before the update")
            lr = engine.get_lr()[0]
            boundary = engine.is_gradient_accumulation_boundary()  # before step() moves the counter
            engine.backward(out.loss)
            engine.step()
            losses.append(loss)
            if not boundary:
                continue
            data.batch_consumed(batch)
            loss, losses = sum(losses) / len(losses), []
            step = engine.global_steps
            if rank == 0:
                norm = engine.get_global_grad_norm()
                _append(
                    step_log,
                    {
                        "step": step,
                        "epoch": batch.epoch,
                        "loss": loss,
                        "grad_norm": None if norm is None else float(norm),
                        "lr": lr,
                        "ids": batch.ids,
                        "samples": len(batch.ids),
                        "tokens": out.tokens,
                        "time": time.time(),
                    },
                )
                if step % t.log_every_n_steps == 0:
                    log.info("step %d: loss %.4f", step, loss)
            if step % config.callbacks.checkpoint.every_n_steps == 0:
                checkpoint.save(reason="periodic")
            flag = torch.tensor([1.0 if preemption_requested() else 0.0])
            dist.all_reduce(flag)
            if flag.item():
                if checkpoint.last_step != step:
                    checkpoint.save(reason="preemption")
                clear_preemption()
                if rank == 0 and in_slurm_job():
                    requeue_job()
                return step
            if step >= t.max_steps:
                break
    if checkpoint.last_step != engine.global_steps:
        checkpoint.save(reason="end of training")
    return engine.global_steps


class _Saver:
    """Atomic checkpoints of a DeepSpeed engine, in the same layout as the Lightning path."""

    def __init__(
        self, engine, data: KibanDataModule, root: Path, config: TrainConfig, *, rank: int, world: int
    ):
        self.engine, self.data, self.root, self.config, self.rank, self.world = (
            engine,
            data,
            root,
            config,
            rank,
            world,
        )
        self.last_step = -1

    def save(self, *, reason: str) -> None:
        step = self.engine.global_steps
        meta = {
            "step": step,
            "world_size": self.world,
            "strategy": f"raw DeepSpeed {self.config.trainer.strategy}",
            "reason": reason,
            "kiban_version": __version__,
            "time": time.time(),
        }

        def committed(final: Path) -> None:
            prune_checkpoints(self.root, keep_last=self.config.callbacks.checkpoint.keep_last)
            log.info("saved checkpoint %s (%s)", final, reason)

        save_checkpoint(
            self.root,
            step,
            rank=self.rank,
            barrier=lambda name: dist.barrier(),
            files=lambda: {
                "config.yaml": self.config.to_yaml(),
                "data.json": json.dumps(self.data.state_dict()) + "\n",
                "meta.json": json.dumps(meta, indent=1) + "\n",
            },
            # every rank writes its ZeRO shards
            write_state=lambda tmp: self.engine.save_checkpoint(str(tmp), tag="state"),
            committed=committed,
        )
        self.last_step = step


def _restore(engine, data: KibanDataModule, path: Path, *, rank: int) -> None:
    problem = [None]
    if rank == 0:
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            problem = [str(error)]
        if problem[0] is None and not (path / "state").is_dir():
            problem = [
                f"checkpoint {path} holds no DeepSpeed state/ directory: it was written by a Lightning run; "
                "resume it with that run's trainer.strategy"
            ]
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise CheckpointError(problem[0])
    engine.load_checkpoint(str(path), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True)
    data.load_state_dict(json.loads((path / "data.json").read_text()))
    rng = path / rng_file(rank)
    if rng.is_file():
        load_rng_state(rng)
    log.info("resumed from %s at step %d", path, engine.global_steps)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _append(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")

"""Lightning side of the atomic checkpoints (format in ``checkpoint.py``).

``AtomicCheckpoint`` saves every ``every_n_steps`` optimizer steps, at the end of training and on
request (preemption), keeps the newest ``keep_last`` plus the best by ``monitor``, and records the
data position of every completed step in the DataModule first, so a checkpoint resumes after the
last batch it trained on. ``ResumeState`` verifies the checkpoint a run resumes from (rank 0
hashes, every rank hears the verdict) and restores each rank's RNG states before the first step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from kiban.train.checkpoint import (
    CheckpointError,
    load_rng_state,
    prune_checkpoints,
    read_pointer,
    rng_file,
    save_checkpoint,
    verify_checkpoint,
    write_pointer,
)
from kiban.version import __version__

__all__ = ["AtomicCheckpoint", "ResumeState", "STATE_FILE"]

log = logging.getLogger(__name__)

STATE_FILE = "state.ckpt"


class AtomicCheckpoint(Callback):
    """Lightning callback that saves atomic checkpoints under ``root`` and keeps the newest and the best."""
    def __init__(
        self,
        *,
        root: str | Path,
        config_yaml: str,
        every_n_steps: int,
        keep_last: int,
        monitor: str | None = None,
        mode: str = "min",
    ) -> None:
        self.root, self.config_yaml = Path(root), config_yaml
        self.every_n_steps, self.keep_last, self.monitor, self.mode = every_n_steps, keep_last, monitor, mode
        self.best: dict[str, Any] | None = None
        self.last_saved_step = -1
        self._last_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the starting (possibly resumed) step as already saved."""
        # a resumed run starts at its checkpoint's step: nothing new to save until it moves on
        self._last_step = self.last_saved_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After each optimizer step record the data position and save every ``every_n_steps`` steps."""
        if trainer.global_step == self._last_step:  # mid-accumulation: no optimizer step yet
            return
        self._last_step = trainer.global_step
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "batch_consumed"):
            trainer.datamodule.batch_consumed(batch)
        if trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, reason="periodic")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the final step unless it was just saved."""
        if trainer.global_step != self.last_saved_step and trainer.global_step > 0:
            self.save(trainer, reason="end of training")

    def save(self, trainer: pl.Trainer, *, reason: str) -> Path | None:
        """Save the current step on every rank (a collective); returns the directory on rank 0."""
        step = trainer.global_step
        strategy = trainer.strategy
        meta = {
            "step": step,
            "epoch": trainer.current_epoch,
            "world_size": trainer.world_size,
            "strategy": type(strategy).__name__,
            "reason": reason,
            "kiban_version": __version__,
            "time": time.time(),
        }
        self._update_best(trainer, step)

        def committed(final: Path) -> None:
            if self.best is not None and self.best["checkpoint"] == final.name:
                write_pointer(self.root / "best", json.dumps(self.best))
            best = json.loads(read_pointer(self.root / "best") or "null")
            prune_checkpoints(
                self.root, keep_last=self.keep_last, protect={best["checkpoint"]} if best else set()
            )
            log.info("saved checkpoint %s (%s)", final, reason)

        final = save_checkpoint(
            self.root,
            step,
            rank=trainer.global_rank,
            barrier=strategy.barrier,
            files=lambda: {"config.yaml": self.config_yaml, "meta.json": json.dumps(meta, indent=1) + "\n"},
            write_state=lambda tmp: trainer.save_checkpoint(tmp / STATE_FILE),
            committed=committed,
        )
        self.last_saved_step = step
        return final

    def _update_best(self, trainer: pl.Trainer, step: int) -> None:
        if self.monitor is None or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if not math.isfinite(value):
            return
        better = self.best is None or (
            value < self.best["value"] if self.mode == "min" else value > self.best["value"]
        )
        if better:
            self.best = {"checkpoint": f"ckpt-{step:06d}", "monitor": self.monitor, "value": value}

    def state_dict(self) -> dict[str, Any]:
        """The best checkpoint so far, saved in the Lightning checkpoint."""
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the best checkpoint so far from a Lightning checkpoint."""
        self.best = state.get("best")


class ResumeState(Callback):
    """Verify ``checkpoint`` once (rank 0) at setup; restore this rank's RNG at train start."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Verify the checkpoint on rank 0 and raise ``CheckpointError`` on every rank if it is bad."""
        problem = None
        if trainer.is_global_zero:
            try:
                verify_checkpoint(self.checkpoint)
                if not (self.checkpoint / STATE_FILE).exists():
                    raise CheckpointError(
                        f"checkpoint {self.checkpoint} has no {STATE_FILE}: it was written by the "
                        "raw-DeepSpeed CPU loop; resume it with the same trainer.strategy on a CPU"
                    )
            except CheckpointError as error:
                problem = str(error)
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise CheckpointError(problem)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore this rank's RNG states from the checkpoint (warn if it has none for this rank)."""
        path = self.checkpoint / rng_file(trainer.global_rank)
        if path.is_file():
            load_rng_state(path)
        else:
            log.warning(
                "%s has no RNG state for rank %d (was it saved with another world size?); "
                "the run continues, but not bit-for-bit",
                self.checkpoint,
                trainer.global_rank,
            )
        log.info("resumed from %s at step %d", self.checkpoint, trainer.global_step)

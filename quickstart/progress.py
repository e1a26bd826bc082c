"""The align stage's progress bar: optimizer steps with loss, samples/s and time left."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytorch_lightning as pl

__all__ = ["TrainingProgress"]


class TrainingProgress(pl.Callback):
    """tqdm on a terminal (steps, loss, samples/s, time left); elsewhere a line every tenth of the run."""

    def __init__(self, total: int, *, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled
        self.bar: Any = None
        self.started = 0.0
        self.first_step = 0
        self.samples = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Start the progress line."""
        self.started, self.first_step, self.samples = time.time(), trainer.global_step, 0
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=trainer.global_step, desc="align", unit="step")

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Advance the progress line by one optimizer step."""
        step = trainer.global_step
        self.samples += len(batch.ids)
        elapsed = max(1e-6, time.time() - self.started)
        rate = self.samples / elapsed
        loss = pl_module.stats.mean_loss
        left = elapsed / max(1, step - self.first_step) * (self.total - step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.3f}", samples_per_s=f"{rate:.2f}")
        elif self.enabled and (step == self.total or step % max(1, self.total // 10) == 0):
            print(
                f"  align step {step}/{self.total}  loss {loss:.3f}  {rate:.2f} samples/s  ~{left:.0f} s left",
                file=sys.stderr,
                flush=True,
            )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Close the progress line."""
        if self.bar is not None:
            self.bar.close()

"""Training callbacks: NaN/Inf guard, throughput + MFU, and a per-step JSONL log.

All three read what the module left in ``pl_module.stats`` for the current optimizer step. Every
collective here (a flag or a pair of counters reduced across ranks) happens at the same step on
every rank, so no rank waits for one the others skip.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from kiban.train.flops import FORMULA, model_flops, peak_flops

__all__ = ["NonFiniteError", "NonFiniteGuard", "StepLog", "ThroughputMonitor", "describe_non_finite"]

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/Inf and the guard stopped the run before the update."""


def describe_non_finite(
    *, step: int, loss: float, grads: list[tuple[str, torch.Tensor]], ids: list[str], rank: int
) -> str:
    """One line naming the step, the batch and which value is not finite."""
    problems = []
    if not math.isfinite(loss):
        problems.append(f"loss is {loss}")
    for name, grad in grads:
        if not torch.isfinite(grad).all():
            kind = "nan" if torch.isnan(grad).any() else "inf"
            problems.append(f"gradient of {name} has {kind}")
            break  # the first one is enough to point at the source
    what = "; ".join(problems) or "another rank saw a non-finite loss or gradient"
    shown = ", ".join(ids[:8]) + (" ..." if len(ids) > 8 else "")
    return f"non-finite value at step {step} (rank {rank}, records {shown}): {what}"


class NonFiniteGuard(Callback):
    """Before each optimizer step: is the loss or any gradient NaN/Inf on any rank?

    ``stop``: drop the gradients and raise ``NonFiniteError`` — the weights never see the bad
    update and the last checkpoint stays the newest. ``skip``: drop the gradients (optimizers skip
    parameters whose ``.grad`` is None, so Adam's moments are untouched too) and go on, at most
    ``max_skips`` times. Also records the gradient norm (before clipping) in ``stats.grad_norm``.
    """

    def __init__(self, *, action: str = "stop", max_skips: int = 10) -> None:
        self.action, self.max_skips, self.skipped = action, max_skips, 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Record the gradient norm; drop the gradients and stop or skip if any rank saw a NaN/Inf."""
        stats = pl_module.stats
        grads = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float64)
        for _, grad in grads:
            squares += grad.detach().double().pow(2).sum().cpu()
        if pl_module.config.trainer.strategy == "fsdp":  # each rank holds a shard of every gradient
            squares = trainer.strategy.reduce(squares.to(pl_module.device), reduce_op="sum").cpu()
        stats.grad_norm = float(squares.sqrt()) if grads else None
        local_bad = not math.isfinite(stats.mean_loss) or not math.isfinite(float(squares))
        flag = torch.tensor(float(local_bad), device=pl_module.device)
        if float(trainer.strategy.reduce(flag, reduce_op="sum")) == 0:
            return
        message = describe_non_finite(
            step=trainer.global_step + 1,
            loss=stats.mean_loss,
            grads=grads,
            ids=stats.ids,
            rank=trainer.global_rank,
        )
        for param in pl_module.parameters():
            param.grad = None
        if self.action == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            log.warning(
                "%s; skipping this update (%d of at most %d skips)", message, self.skipped, self.max_skips
            )
            return
        reason = "" if self.action == "stop" else f" after {self.skipped} skipped updates (max_skips)"
        raise NonFiniteError(
            f"{message}; stopping before the update{reason}. The newest checkpoint predates it."
        )

    def state_dict(self) -> dict[str, int]:
        """The number of updates skipped so far, saved in the checkpoint."""
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the skip count from a checkpoint."""
        self.skipped = state.get("skipped", 0)


class ThroughputMonitor(Callback):
    """samples/s, tokens/s (all ranks together) and MFU, logged every ``every_n_steps`` steps."""

    def __init__(self, *, every_n_steps: int, peak_tflops: float | None = None) -> None:
        self.every_n_steps, self.peak_tflops = every_n_steps, peak_tflops
        self._window: list[float] = [0.0, 0.0, 0.0]  # samples, tokens, flops since the last report
        self._started = 0.0
        self._last_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count the model's FLOPs, find the device's peak FLOP/s and start the clock."""
        # the fused model counts its LLM; a module training something else says what it trains
        own = getattr(pl_module, "model_flops", None)
        self.flops = own() if own is not None else model_flops(pl_module.model.llm)
        self.peak, source = peak_flops(pl_module.device, trainer.precision, override_tflops=self.peak_tflops)
        f = self.flops
        if trainer.is_global_zero:
            log.info(
                "throughput: %s with N=%.4g, L=%d, d=%d; peak: %s",
                FORMULA,
                f.params,
                f.layers,
                f.width,
                source,
            )
        self._started, self._last_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Add each optimizer step's samples, tokens and FLOPs; log the rates every ``every_n_steps``."""
        if trainer.global_step == self._last_step:  # mid-accumulation
            return
        self._last_step = trainer.global_step
        s = pl_module.stats
        attention_units = s.tokens * (s.padded_tokens / max(1, s.samples))
        self._window[0] += s.samples
        self._window[1] += s.tokens
        self._window[2] += self.flops.step_flops(tokens=s.tokens, attention_units=int(attention_units))
        if trainer.global_step % self.every_n_steps:
            return
        totals = (
            trainer.strategy.reduce(
                torch.tensor(self._window, dtype=torch.float64, device=pl_module.device), reduce_op="sum"
            )
            .cpu()
            .tolist()
        )
        seconds = time.perf_counter() - self._started
        metrics = {"perf/samples_per_s": totals[0] / seconds, "perf/tokens_per_s": totals[1] / seconds}
        if self.peak:
            metrics["perf/mfu"] = totals[2] / (seconds * trainer.world_size * self.peak)
        pl_module.log_dict(metrics, on_step=True, rank_zero_only=True)
        if trainer.is_global_zero:
            mfu = f", MFU {metrics['perf/mfu']:.1%}" if "perf/mfu" in metrics else ""
            log.info(
                "step %d: %.2f samples/s, %.0f tokens/s%s",
                trainer.global_step,
                metrics["perf/samples_per_s"],
                metrics["perf/tokens_per_s"],
                mfu,
            )
        self._window = [0.0, 0.0, 0.0]
        self._started = time.perf_counter()


class StepLog(Callback):
    """Appends one JSON line per optimizer step to ``path`` (rank 0): step, epoch, loss, grad norm,
    lr, the ids of rank 0's records, samples and tokens, plus an objective's metrics (mean over the
    step's micro-batches). A resumed run appends to the same file: steps trained again after a
    kill appear twice (with the same numbers, which the resume tests check); the last one counts.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._last_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start from the current (possibly resumed) step, so the first logged step is a new one."""
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After each optimizer step append its JSON line (rank 0 only)."""
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        s = pl_module.stats
        grad_norm = s.grad_norm
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if grad_norm is None and engine is not None:  # ZeRO keeps gradients outside .grad
            norm = engine.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
        entry = {
            "step": trainer.global_step,
            "epoch": batch.epoch,
            "loss": s.mean_loss,
            "grad_norm": grad_norm,
            "lr": s.lr,
            "ids": s.ids,
            "samples": s.samples,
            "tokens": s.tokens,
            "time": time.time(),
            **{name: value / max(1, s.micro_batches) for name, value in s.metrics.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")


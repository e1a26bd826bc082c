"""Preemption: on SIGUSR1, checkpoint at the next step boundary, then ``scontrol requeue`` the job.

Slurm sends SIGUSR1 ahead of a time limit (``#SBATCH --signal=USR1@90``) or on request
(``scancel --signal=USR1 JOBID``, which reaches the ``srun`` tasks). Lightning's own handler
(``SLURMEnvironment(auto_requeue=True)``) saves from inside the signal handler, at whatever point
each rank happens to be, and writes a plain ``hpc_ckpt_N.ckpt``; ranks interrupted at different
points then meet different collectives. So kiban turns that handler off and does this instead:

1. the handler only sets a flag (safe at any moment, even before training starts);
2. at the end of every optimizer step the ranks sum their flags (one tiny all-reduce), so all of
   them stop at the same step even when the signal reaches them at different times;
3. they write an atomic checkpoint together; then rank 0 runs ``scontrol requeue $SLURM_JOB_ID``
   and the run stops. The requeued job runs the same ``kiban fit`` command, which resumes from
   the newest complete checkpoint.

Outside Slurm the same signal checkpoints and stops (rerun the command to resume).
"""

from __future__ import annotations

import logging
import signal
import subprocess
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from kiban.hpc.env import in_slurm_job, slurm_job_id

__all__ = ["PreemptionRequeue", "install_preemption_handler", "preemption_requested", "requeue_job"]

log = logging.getLogger(__name__)

_requested: list[int] = []  # signal numbers received; a list so the handler only appends


def _handler(signum: int, frame: Any) -> None:
    _requested.append(signum)


def install_preemption_handler(signum: int = signal.SIGUSR1) -> Any:
    """Catch ``signum`` from now on (its default action would kill the process); returns the
    previous handler. Call it early: a signal before this line ends the process.
    """
    return signal.signal(signum, _handler)


def preemption_requested() -> bool:
    """Whether a preemption signal (SIGUSR1/SIGTERM from Slurm) has arrived."""
    return bool(_requested)


def clear_preemption() -> None:
    _requested.clear()


def requeue_job() -> bool:
    """``scontrol requeue`` this Slurm job; True when Slurm accepted it."""
    job = slurm_job_id()
    if job is None:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
        return False
    log.warning("requeued Slurm job %s; it resumes from the newest checkpoint when it restarts", job)
    return True


class PreemptionRequeue(Callback):
    """``save(trainer, reason=...)``: the checkpoint function (``AtomicCheckpoint.save``);
    ``saved_step()``: the step last saved, so a checkpoint written this very step is not repeated.
    """

    def __init__(
        self, *, save: Callable[..., Any], saved_step: Callable[[], int], signum: int = signal.SIGUSR1
    ) -> None:
        self.save, self.saved_step, self.signum = save, saved_step, signum
        self._previous: Any = None
        self._last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Install the signal handlers."""
        if signal.getsignal(self.signum) is not _handler:
            self._previous = install_preemption_handler(self.signum)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Restore the previous signal handlers."""
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Forget a preemption requested before training started."""
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """On preemption: save a checkpoint, requeue the job and stop the trainer."""
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        flag = torch.tensor(float(preemption_requested()), device=pl_module.device)
        if float(trainer.strategy.reduce(flag, reduce_op="sum")) == 0:
            return
        if trainer.is_global_zero:
            log.warning("preemption signal received: checkpointing at step %d", trainer.global_step)
        if self.saved_step() != trainer.global_step:
            self.save(trainer, reason="preemption")
        clear_preemption()
        trainer.should_stop = True
        if trainer.is_global_zero and in_slurm_job():
            requeue_job()
        elif trainer.is_global_zero:
            log.warning("not in a Slurm job: stopped after the checkpoint; run the same command to resume")

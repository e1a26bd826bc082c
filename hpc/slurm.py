"""Render and submit the Slurm batch script that runs ``kiban fit`` on a training YAML.

The script is deliberately thin (STYLE habit 12): resources, the preemption signal, requeue, a log
per job id, and one ``srun`` of one entry point with the config. Everything else — ranks, world
size, the main address, resuming — is worked out by ``kiban fit`` itself from the Slurm variables
(through Lightning's ``SLURMEnvironment``) and from the run directory.

Tasks: one per GPU on GPU nodes (``--gpus-per-node G`` gives ``--ntasks-per-node G``); on CPU
nodes (``--gpus-per-node 0``) ``--ntasks-per-node`` says how many ranks (gloo) each node runs.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiban.atomic import write_atomic

__all__ = ["SlurmError", "SlurmJob", "render_sbatch", "submit"]


class SlurmError(ValueError):
    """A Slurm request that cannot work (names the flag), or sbatch refusing the job."""


@dataclass
class SlurmJob:
    """What ``kiban slurm submit`` asks Slurm for: nodes, tasks, GPUs, time, the config to run."""
    config: str  # the training YAML
    nodes: int
    gpus_per_node: int
    ntasks_per_node: int | None = None  # CPU nodes only; GPU nodes run one task per GPU
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # Slurm's format: "2-00:00:00", "90" (minutes), ...
    mem: str | None = None
    job_name: str = "kiban"
    log_dir: str = "slurm-logs"
    workdir: str = field(default_factory=lambda: str(Path.cwd()))
    overrides: list[str] = field(default_factory=list)  # KEY.PATH=VALUE, passed to kiban fit
    signal_seconds: int = 90  # how long before the time limit Slurm sends SIGUSR1

    @property
    def tasks_per_node(self) -> int:
        """Tasks (ranks) per node: one per GPU, or ``ntasks_per_node`` on CPU nodes."""
        return self.gpus_per_node if self.gpus_per_node > 0 else (self.ntasks_per_node or 1)

    def check(self) -> None:
        """Raise ``SlurmError`` naming the first flag that cannot work."""
        if self.nodes < 1:
            raise SlurmError(f"--nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise SlurmError(f"--gpus-per-node must be 0 (CPU nodes) or more, got {self.gpus_per_node}")
        if self.ntasks_per_node is not None:
            if self.ntasks_per_node < 1:
                raise SlurmError(f"--ntasks-per-node must be at least 1, got {self.ntasks_per_node}")
            if self.gpus_per_node > 0 and self.ntasks_per_node != self.gpus_per_node:
                raise SlurmError(
                    f"--ntasks-per-node {self.ntasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                    "kiban runs "
                    "one task per GPU; leave --ntasks-per-node out on GPU nodes"
                )
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SlurmError(f"--cpus-per-task must be at least 1, got {self.cpus_per_task}")
        if self.signal_seconds < 1:
            raise SlurmError(f"--signal-seconds must be at least 1, got {self.signal_seconds}")


def render_sbatch(job: SlurmJob, *, kiban: str | None = None) -> str:
    """The batch script for ``job`` (about 30 lines). ``kiban``: the command srun starts (default:
    the ``kiban`` next to this Python, so the job uses the same environment).
    """
    job.check()
    kiban = kiban or _kiban_executable()
    log_dir = Path(job.log_dir).expanduser().resolve()
    optional = {
        "gpus-per-node": job.gpus_per_node or None,
        "cpus-per-task": job.cpus_per_task,
        "partition": job.partition,
        "account": job.account,
        "time": job.time,
        "mem": job.mem,
    }
    lines = [
        "#!/bin/bash",
        f"# Rendered by `kiban slurm submit` on {time.strftime('%Y-%m-%d %H:%M:%S')}: one task per GPU (or",
        "# --ntasks-per-node on CPU nodes); srun starts them all; kiban fit reads its rank from Slurm.",
        f"#SBATCH --job-name={job.job_name}",
        f"#SBATCH --nodes={job.nodes}",
        f"#SBATCH --ntasks-per-node={job.tasks_per_node}",
        *(f"#SBATCH --{flag}={value}" for flag, value in optional.items() if value is not None),
        f"#SBATCH --signal=USR1@{job.signal_seconds}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={log_dir}/%j.out",
        f"#SBATCH --chdir={job.workdir}",
        "",
        "# SIGUSR1 (preemption notice, or scancel --signal=USR1) reaches the srun tasks: kiban fit",
        "# checkpoints at the next step and runs `scontrol requeue`; the requeued job runs this script",
        "# again and resumes from the newest complete checkpoint; every restart appends to one log.",
        "set -euo pipefail",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}  # threads/rank, as torchrun",
        'echo "kiban: job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST"',
        " ".join(
            [
                "srun --kill-on-bad-exit=1",
                shlex.quote(kiban),
                "fit --config",
                shlex.quote(str(Path(job.config).expanduser().resolve())),
                *map(shlex.quote, job.overrides),
            ]
        ),
        "",
    ]
    return "\n".join(lines)


def submit(job: SlurmJob, script: str) -> str:
    """Write the script beside the logs and ``sbatch`` it; returns the job id."""
    log_dir = Path(job.log_dir).expanduser().resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{job.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    write_atomic(path, script)
    try:
        result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise SlurmError(
            "sbatch is not on PATH: is this a Slurm login node? (--dry-run prints the script)"
        ) from None
    if result.returncode != 0:
        raise SlurmError(f"sbatch refused {path}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def _kiban_executable() -> str:
    beside = Path(sys.executable).with_name("kiban")
    return str(beside) if beside.is_file() else "kiban"

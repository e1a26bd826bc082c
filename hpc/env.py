"""Where this process sits in a distributed run: Slurm, torchrun, or alone.

Rank, world size and the main address come from Lightning's own cluster environments
(``SLURMEnvironment``, ``TorchElasticEnvironment``), so the raw-DeepSpeed path and the Lightning
path read the same variables the same way.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

from lightning_fabric.plugins.environments import (
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

__all__ = ["ClusterEnv", "detect_cluster", "in_slurm_job", "lightning_environment", "slurm_job_id"]


@dataclass(frozen=True)
class ClusterEnv:
    """Where this process runs: Slurm job, ranks, nodes and tasks per node."""
    kind: str  # "slurm" | "torchelastic" | "local"
    world_size: int
    global_rank: int
    local_rank: int
    node_rank: int
    num_nodes: int
    tasks_per_node: int
    main_address: str
    main_port: int


def in_slurm_job() -> bool:
    """True inside ``srun`` tasks of a batch job (Lightning's rule: not an interactive 'bash' job)."""
    with warnings.catch_warnings():
        # Lightning warns whenever srun exists but is not in use: on every login node, for nothing
        warnings.simplefilter("ignore")
        return SLURMEnvironment.detect()


def lightning_environment(cluster: "ClusterEnv") -> Any:
    """The Lightning cluster-environment plugin for ``cluster`` (given explicitly, so the Trainer
    does not probe again). Slurm's comes with Lightning's own requeue off: see hpc/requeue.py.
    """
    if cluster.kind == "slurm":
        return SLURMEnvironment(auto_requeue=False)
    if cluster.kind == "torchelastic":
        return TorchElasticEnvironment()
    return LightningEnvironment()


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes (``<array job>_<task>`` for array jobs)."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def detect_cluster() -> ClusterEnv:
    """The cluster environment of this process (Slurm variables, else one local process)."""
    if in_slurm_job():
        env = SLURMEnvironment(auto_requeue=False)
        per_node = _first_count(
            os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "1")
        )
        return ClusterEnv(
            "slurm",
            env.world_size(),
            env.global_rank(),
            env.local_rank(),
            env.node_rank(),
            int(os.environ.get("SLURM_NNODES", "1")),
            per_node,
            env.main_address,
            env.main_port,
        )
    if TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size()))
        return ClusterEnv(
            "torchelastic",
            env.world_size(),
            env.global_rank(),
            env.local_rank(),
            env.node_rank(),
            max(1, env.world_size() // per_node),
            per_node,
            env.main_address,
            env.main_port,
        )
    return ClusterEnv("local", 1, 0, 0, 0, 1, 1, "127.0.0.1", int(os.environ.get("MASTER_PORT", 29500)))


def _first_count(value: str) -> int:
    """Slurm's per-node task counts look like ``2`` or ``2(x3),1``: the first node's count."""
    match = re.match(r"\d+", value)
    return int(match.group()) if match else 1

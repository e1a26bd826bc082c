"""Cluster launch: Slurm script rendering and submission, preemption and requeue, DeepSpeed/FSDP
presets (``hpc/presets/*.json``), and cluster environment detection.

    from kiban.hpc import SlurmJob, render_sbatch, submit

    job = SlurmJob(config="configs/align.yaml", nodes=2, gpus_per_node=4, time="1-00:00:00")
    print(render_sbatch(job))       # or: kiban slurm submit configs/align.yaml --nodes 2 --gpus-per-node 4

Names are imported on first use (the requeue callback needs Lightning; rendering does not).
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "SlurmJob": "kiban.hpc.slurm",
    "SlurmError": "kiban.hpc.slurm",
    "render_sbatch": "kiban.hpc.slurm",
    "submit": "kiban.hpc.slurm",
    "PreemptionRequeue": "kiban.hpc.requeue",
    "install_preemption_handler": "kiban.hpc.requeue",
    "requeue_job": "kiban.hpc.requeue",
    "ClusterEnv": "kiban.hpc.env",
    "detect_cluster": "kiban.hpc.env",
    "deepspeed_config": "kiban.hpc.presets",
    "list_presets": "kiban.hpc.presets",
    "load_preset": "kiban.hpc.presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kiban.hpc' has no attribute {name!r}")

"""``kiban slurm submit CONFIG --nodes N --gpus-per-node G [...]``: render, check and submit a job.

The training config is read and checked against the requested nodes before anything is written or
submitted, so a typo fails on the login node in a second, not after a day in the queue.
"""

from __future__ import annotations

import argparse
import sys

from kiban.cli import arguments, command

__all__ = ["slurm_command"]


def _slurm_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="slurm_command", required=True, metavar="ACTION")
    submit = sub.add_parser(
        "submit",
        help="render the sbatch script for a training YAML and submit it",
        description="Render the sbatch script for a training YAML and submit it; print the job id.",
    )
    submit.add_argument("config", help="training YAML (the one kiban fit reads)")
    submit.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value (repeatable); the job passes it on to kiban fit",
    )
    submit.add_argument("--nodes", type=int, required=True, help="number of nodes")
    submit.add_argument(
        "--gpus-per-node", type=int, required=True, help="GPUs per node (one task each); 0: CPU nodes"
    )
    submit.add_argument(
        "--ntasks-per-node", type=int, help="tasks (ranks) per CPU node; GPU nodes run one per GPU"
    )
    submit.add_argument("--cpus-per-task", type=int, help="CPU cores per task")
    submit.add_argument("--partition", help="Slurm partition")
    submit.add_argument("--account", help="Slurm account to charge")
    submit.add_argument("--time", help="time limit, Slurm format (e.g. 2-00:00:00)")
    submit.add_argument("--mem", help="memory per node, Slurm format (e.g. 64G)")
    submit.add_argument("--job-name", default="kiban", help="job name (default: kiban)")
    submit.add_argument("--log-dir", help="where %%j.out logs and the script go (default: <run.dir>/slurm)")
    submit.add_argument(
        "--signal-seconds",
        type=int,
        default=90,
        help="send SIGUSR1 this long before the time limit (default: 90)",
    )
    submit.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")


@command(
    "slurm", help="submit training jobs to Slurm (kiban slurm submit CONFIG --nodes N --gpus-per-node G)"
)
@arguments(_slurm_arguments)
def slurm_command(args: argparse.Namespace) -> int:
    """``kiban slurm``: render, print or submit a Slurm job for a training config."""
    from pathlib import Path

    from kiban.hpc.slurm import SlurmJob, render_sbatch, submit
    from kiban.train.config import load_config
    from kiban.train.validation import validate_config

    job = SlurmJob(
        config=args.config,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        ntasks_per_node=args.ntasks_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        account=args.account,
        time=args.time,
        mem=args.mem,
        job_name=args.job_name,
        overrides=list(args.overrides),
        signal_seconds=args.signal_seconds,
    )
    job.check()  # the request first: it costs nothing to check
    config = load_config(args.config, job.overrides)
    validate_config(config, target="gpu" if job.gpus_per_node else "cpu")
    _check_shape(config, job)
    job.log_dir = args.log_dir or str(Path(config.run.dir) / "slurm")
    script = render_sbatch(job)
    if args.dry_run:
        print(script, end="")
        return 0
    job_id = submit(job, script)
    print(job_id)  # alone on stdout, for scripts: JOB=$(kiban slurm submit ...)
    print(
        f"kiban slurm: submitted job {job_id}; log: {Path(job.log_dir).resolve()}/{job_id}.out",
        file=sys.stderr,
    )
    return 0


def _check_shape(config, job) -> None:
    """The YAML may leave devices/num_nodes to Slurm; pinning other values would fail in the job."""
    from kiban.train.config import ConfigError

    devices = config.trainer.devices
    if isinstance(devices, int) and devices != job.tasks_per_node:
        raise ConfigError(
            "trainer.devices",
            f"is {devices} but the job runs {job.tasks_per_node} task(s) per node; "
            "set devices: auto (kiban fit takes it from Slurm)",
        )
    if config.trainer.num_nodes not in (1, job.nodes):
        raise ConfigError(
            "trainer.num_nodes", f"is {config.trainer.num_nodes} but the job asks for --nodes {job.nodes}"
        )

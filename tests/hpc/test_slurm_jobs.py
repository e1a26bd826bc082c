"""Jobs on a real Slurm: `kiban slurm submit` renders the script, sbatch queues it, srun runs 2 ranks
(DDP over gloo on the CPU) that train a tiny fused model; SIGUSR1 checkpoints and requeues a job.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
KIBAN = str(Path(sys.executable).with_name("kiban"))


def _submit(cluster, run_dir, *overrides):
    command = [
        KIBAN,
        "slurm",
        "submit",
        str(SMOKE),
        "--nodes",
        "1",
        "--gpus-per-node",
        "0",
        "--ntasks-per-node",
        "2",
        "--time",
        "10",
        "--log-dir",
        str(run_dir / "slurm"),
        "--set",
        f"run.dir={run_dir}",
        "--set",
        "trainer.strategy=ddp",
        "--set",
        "data.val=null",
        "--set",
        "trainer.val_check_interval=null",
        "--set",
        "trainer.log_every_n_steps=1",
        *(arg for o in overrides for arg in ("--set", o)),
    ]
    result = subprocess.run(command, env=cluster.env, capture_output=True, text=True, cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    assert job.isdigit(), result.stdout
    cluster.jobs.append(job)
    return job


def _metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _log(run_dir, job):
    return (run_dir / "slurm" / f"{job}.out").read_text()


def test_a_submitted_job_trains_on_two_ranks_through_srun_and_checkpoints(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = _submit(slurm_cluster, run_dir, "trainer.max_steps=4", "callbacks.checkpoint.every_n_steps=2")
    info = slurm_cluster.wait_for_job(job)
    assert info["JobState"] == "COMPLETED", _log(run_dir, job)
    assert info["NumTasks"] == "2"
    checkpoint = run_dir / "checkpoints" / "ckpt-000004"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "ckpt-000004"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["strategy"] == "DDPStrategy"
    assert {p.name for p in checkpoint.glob("rng-rank*.pt")} == {"rng-rank00000.pt", "rng-rank00001.pt"}
    assert [m["step"] for m in _metrics(run_dir)] == [1, 2, 3, 4]


def test_sigusr1_checkpoints_requeues_and_the_job_finishes_from_where_it_stopped(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = _submit(
        slurm_cluster,
        run_dir,
        "trainer.max_steps=60",
        "callbacks.checkpoint.every_n_steps=1000",
        "callbacks.checkpoint.keep_last=5",
    )
    deadline = time.monotonic() + 120
    while not any(m["step"] >= 2 for m in _metrics(run_dir)):  # training, with most of the run ahead
        assert time.monotonic() < deadline, "the job never reached step 2"
        assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), _log(run_dir, job)
        time.sleep(0.2)
    # without --batch/--full, scancel signals the job's steps: the srun'd kiban processes
    slurm_cluster.run("scancel", "--signal=USR1", job)
    info = slurm_cluster.wait_for_job(job, timeout=240)
    log = _log(run_dir, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log
    preempted = [
        p
        for p in (run_dir / "checkpoints").glob("ckpt-*")
        if json.loads((p / "meta.json").read_text())["reason"] == "preemption"
    ]
    assert "requeued Slurm job" in log and "restart 1" in log
    steps = [m["step"] for m in _metrics(run_dir)]
    assert steps == list(range(1, 61)), "every step exactly once: the restart resumed after the checkpoint"
    resumed_at = int(log.split("resumed from ")[1].split("ckpt-")[1][:6])
    assert 2 <= resumed_at < 60
    assert [p.name for p in preempted] == [f"ckpt-{resumed_at:06d}"]

"""A two-node Slurm job on one machine (each node a slurmd in its own network namespace, see
conftest.py): `kiban slurm submit --nodes 2` trains the smoke model on one rank per node (DDP over
gloo; raw DeepSpeed ZeRO-2 on the CPU), SIGUSR1 makes it checkpoint and requeue, the restart
resumes, and every step's loss equals that of the same job left alone; the exported model serves.

Each test submits the uninterrupted job and the preempted one together (the nodes have room for
both), so the pair costs about one job's start-up more than a single run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
KIBAN = str(Path(sys.executable).with_name("kiban"))
STEPS = 30
PROTEIN = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"


def _submit(cluster, run_dir: Path, strategy: str) -> str:
    run_dir.mkdir()
    command = [
        KIBAN, "slurm", "submit", str(SMOKE),
        "--nodes", "2", "--gpus-per-node", "0", "--ntasks-per-node", "1", "--cpus-per-task", "1",
        "--time", "10", "--log-dir", str(run_dir / "slurm"),
        "--set", f"run.dir={run_dir}",
        "--set", f"trainer.strategy={strategy}",
        "--set", f"trainer.max_steps={STEPS}",
        "--set", "trainer.log_every_n_steps=1",
        "--set", "trainer.val_check_interval=null",
        "--set", "data.val=null",
        "--set", "callbacks.checkpoint.every_n_steps=1000",
        "--set", "callbacks.checkpoint.keep_last=5",
    ]  # fmt: skip
    result = subprocess.run(command, env=cluster.env, capture_output=True, text=True, cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    assert job.isdigit(), result.stdout
    cluster.jobs.append(job)
    return job


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _log(run_dir: Path, job: str) -> str:
    path = run_dir / "slurm" / f"{job}.out"
    return path.read_text() if path.is_file() else "(no job log)"


def _preempted_and_uninterrupted(cluster, tmp_path: Path, strategy: str) -> tuple[Path, Path, str]:
    alone, preempted = tmp_path / "alone", tmp_path / "preempted"
    reference = _submit(cluster, alone, strategy)
    job = _submit(cluster, preempted, strategy)
    deadline = time.monotonic() + 240
    while not any(m["step"] >= 2 for m in _metrics(preempted)):  # training, with most of the run ahead
        assert time.monotonic() < deadline, "the job never reached step 2:\n" + _log(preempted, job)
        assert cluster.job(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), _log(preempted, job)
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", job)  # reaches the srun'd kiban processes on both nodes
    for run_dir, job_id in ((alone, reference), (preempted, job)):
        info = cluster.wait_for_job(job_id, timeout=420)
        assert info["JobState"] == "COMPLETED", _log(run_dir, job_id)
        assert info["NumNodes"] == "2" and info["NodeList"] == "kbn[1-2]", info
    return alone, preempted, job


def _check_the_run(cluster, alone: Path, preempted: Path, job: str) -> None:
    log = _log(preempted, job)
    info = cluster.job(job)
    assert info["Restarts"] == "1", log
    assert "requeued Slurm job" in log and "restart 1" in log
    # one rank per node: both slurmd launched a task of each run of the job
    for node in ("kbn1", "kbn2"):
        assert f"StepId={job}." in (cluster.root / f"slurmd-{node}.log").read_text(), node
    preemption = [
        p
        for p in (preempted / "checkpoints").glob("ckpt-*")
        if json.loads((p / "meta.json").read_text())["reason"] == "preemption"
    ]
    assert len(preemption) == 1 and json.loads((preemption[0] / "meta.json").read_text())["world_size"] == 2
    assert {p.name for p in preemption[0].glob("rng-rank*.pt")} == {"rng-rank00000.pt", "rng-rank00001.pt"}
    resumed_at = int(preemption[0].name.removeprefix("ckpt-"))
    assert 2 <= resumed_at < STEPS and f"resumed from {preemption[0]}" in log
    # every step once, on the same records, with the loss of the run that was never stopped
    steps, reference = _metrics(preempted), _metrics(alone)
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    assert [m["ids"] for m in steps] == [m["ids"] for m in reference]
    assert [m["loss"] for m in steps] == [m["loss"] for m in reference]
    # and it ends with the same servable model
    ours, theirs = load_file(preempted / "model" / "model.safetensors"), load_file(alone / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_ddp_on_two_nodes_preempts_requeues_resumes_step_for_step_and_serves(slurm_multinode, tmp_path):
    from kiban.fusion import KibanModel
    from kiban.serve.launch import ServerProcess

    alone, preempted, job = _preempted_and_uninterrupted(slurm_multinode, tmp_path, "ddp")
    _check_the_run(slurm_multinode, alone, preempted, job)
    meta = json.loads((preempted / "checkpoints" / f"ckpt-{STEPS:06d}" / "meta.json").read_text())
    assert meta["strategy"] == "DDPStrategy" and meta["world_size"] == 2
    with torch.no_grad():
        expected = KibanModel.from_pretrained(alone / "model").eval().embed([("protein", PROTEIN)])
    with ServerProcess(preempted / "model", None, tmp_path / "serve.log", "--device", "auto") as server:
        server.wait_ready(key=None, timeout=300)  # a loaded 2-core box takes minutes
        with server.client(None) as api:
            response = api.post(
                "/v1/embeddings", json={"input": [{"type": "protein", "protein": {"sequence": PROTEIN}}]}
            )
    assert response.status_code == 200, response.text
    served = torch.tensor(response.json()["data"][0]["embedding"])
    assert torch.allclose(served, expected[0], atol=1e-5)


def test_raw_deepspeed_on_two_nodes_preempts_requeues_resumes_step_for_step(slurm_multinode, tmp_path):
    alone, preempted, job = _preempted_and_uninterrupted(slurm_multinode, tmp_path, "deepspeed_stage_2")
    _check_the_run(slurm_multinode, alone, preempted, job)
    state = {p.name for p in (preempted / "checkpoints" / f"ckpt-{STEPS:06d}" / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= state

"""A two-node Slurm job on one machine (each node a slurmd in its own network namespace, see
conftest.py): `kiban slurm submit --nodes 2` trains the smoke model on one rank per node (DDP over
gloo; raw DeepSpeed ZeRO-2 on the CPU), SIGUSR1 makes it checkpoint and requeue, the restart
resumes, and every step's loss equals that of the same job left alone; the exported model serves.

To keep CI cheap, the module submits all four jobs at once (for each strategy: one left alone, one
preempted; every node has room for them all), so the module costs about one preempted job's time:
two start-ups of two ranks, the requeue wait and the export.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
# Steps are cheap next to the start-ups (about 0.25 s each on a loaded 2-core box); enough of them
# that SIGUSR1, sent once step 1 is logged, reaches both ranks with most of the run still ahead
STEPS = 40
PROTEIN = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
STRATEGIES = {"ddp": "DDPStrategy", "deepspeed_stage_2": "raw DeepSpeed deepspeed_stage_2"}  # meta.json strategy


def _submit(cluster, run_dir: Path, strategy: str) -> str:
    """``kiban slurm submit`` (its ``main``, in this process: four fresh interpreters would cost more
    than the jobs' steps) against the test cluster; the job id it prints.
    """
    from kiban.cli import main

    run_dir.mkdir(parents=True)
    command = [
        "slurm", "submit", str(SMOKE),
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
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:  # sbatch (and the job: --export=ALL) see the cluster's env
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            patch.delenv(name, raising=False)
        patch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
        patch.chdir(run_dir.parent)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(command)
    assert code == 0, err.getvalue()
    job = out.getvalue().strip()
    assert job.isdigit(), out.getvalue()
    cluster.jobs.append(job)
    return job


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _log(run_dir: Path, job: str) -> str:
    path = run_dir / "slurm" / f"{job}.out"
    return path.read_text() if path.is_file() else "(no job log)"


@pytest.fixture(scope="module")
def runs(slurm_multinode, tmp_path_factory):
    """{strategy: (alone run dir, preempted run dir, preempted job id)}, every job completed."""
    cluster, root = slurm_multinode, tmp_path_factory.mktemp("multinode")
    jobs = {
        (strategy, kind): (root / strategy / kind, _submit(cluster, root / strategy / kind, strategy))
        for strategy in STRATEGIES
        for kind in ("alone", "preempted")
    }
    waiting, deadline = set(STRATEGIES), time.monotonic() + 600
    while waiting:  # preempt each strategy's job once it trains, with most of the run ahead
        for strategy in sorted(waiting):
            run_dir, job = jobs[strategy, "preempted"]
            if _metrics(run_dir):
                cluster.run("scancel", "--signal=USR1", job)  # reaches the srun'd kiban processes on both nodes
                waiting.discard(strategy)
                continue
            assert time.monotonic() < deadline, "the job never reached step 1:\n" + _log(run_dir, job)
            assert cluster.job(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), _log(run_dir, job)
        time.sleep(0.2)
    for (strategy, kind), (run_dir, job) in jobs.items():
        info = cluster.wait_for_job(job, timeout=420)
        assert info["JobState"] == "COMPLETED", f"{strategy} {kind}:\n" + _log(run_dir, job)
        assert info["NumNodes"] == "2" and info["NodeList"] == "kbn[1-2]", info
    return {s: (jobs[s, "alone"][0], *jobs[s, "preempted"]) for s in STRATEGIES}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_two_nodes_preempt_requeue_and_resume_step_for_step(runs, slurm_multinode, strategy):
    cluster = slurm_multinode
    alone, preempted, job = runs[strategy]
    log = _log(preempted, job)
    assert cluster.job(job)["Restarts"] == "1", log
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
    assert 1 <= resumed_at < STEPS and f"resumed from {preemption[0]}" in log
    # every step once, on the same records, with the loss of the run that was never stopped
    steps, reference = _metrics(preempted), _metrics(alone)
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    assert [m["ids"] for m in steps] == [m["ids"] for m in reference]
    assert [m["loss"] for m in steps] == [m["loss"] for m in reference]
    final = preempted / "checkpoints" / f"ckpt-{STEPS:06d}"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["strategy"] == STRATEGIES[strategy] and meta["world_size"] == 2
    if strategy == "deepspeed_stage_2":  # each rank's ZeRO-2 optimiser shard was saved and reloaded
        state = {p.name for p in (final / "state").iterdir()}
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= state
    # and it ends with the same model as the run left alone
    ours, theirs = load_file(preempted / "model" / "model.safetensors"), load_file(alone / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_the_model_a_preempted_two_node_job_exported_serves(runs, strategy):
    """The folder loads in the engine ``kiban serve`` runs (same loader, ``--device auto``) and answers
    as the uninterrupted run's model; the HTTP server over an exported model is tested in
    tests/train/test_train_export.py.
    """
    from kiban.device import resolve_device
    from kiban.fusion import KibanModel
    from kiban.serve import InferenceEngine

    alone, preempted, _ = runs[strategy]
    placement = resolve_device("auto")
    with torch.no_grad():
        expected = KibanModel.from_pretrained(alone / "model").eval().embed([("protein", PROTEIN)])

    async def served():
        engine = InferenceEngine(model_dir=preempted / "model", placement=placement)
        await engine.start()
        try:
            await engine.wait_ready()
            return await engine.embed([("protein", PROTEIN)])
        finally:
            await engine.stop()

    vectors = asyncio.run(served()).float().cpu()
    if placement.dtype == torch.float32:
        assert torch.allclose(vectors, expected, atol=1e-5)
    else:  # a GPU's bfloat16
        assert torch.nn.functional.cosine_similarity(vectors, expected).min() > 0.99

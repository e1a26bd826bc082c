"""`kiban slurm submit`: the rendered script, and requests that fail before anything is submitted."""

import sys
from pathlib import Path

import pytest

from kiban.cli import main
from kiban.hpc.slurm import SlurmError, SlurmJob, render_sbatch

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def _submit(capsys, *args):
    code = main(["slurm", "submit", str(SMOKE), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_prints_a_short_script_that_sruns_kiban_fit_with_preemption_and_requeue(capsys, tmp_path):
    code, script, _ = _submit(
        capsys,
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--partition",
        "gpu",
        "--account",
        "bio",
        "--time",
        "1-00:00:00",
        "--dry-run",
        "--set",
        f"run.dir={tmp_path}",
        "--set",
        "trainer.max_steps=50",
    )
    assert code == 0
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash" and len(lines) <= 30
    for expected in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=bio",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --signal=USR1@90",
        "#SBATCH --requeue",
        f"#SBATCH --output={tmp_path}/slurm/%j.out",
    ):
        assert expected in lines, expected
    (srun,) = [line for line in lines if line.startswith("srun")]  # one entry point, one config
    kiban = Path(sys.executable).with_name("kiban")
    assert (
        srun == f"srun --kill-on-bad-exit=1 {kiban} fit --config {SMOKE} "
        f"run.dir={tmp_path} trainer.max_steps=50"
    )
    assert not (tmp_path / "slurm").exists(), "a dry run writes nothing"


def test_cpu_nodes_take_their_task_count_from_ntasks_per_node():
    script = render_sbatch(
        SlurmJob(config=str(SMOKE), nodes=1, gpus_per_node=0, ntasks_per_node=2), kiban="kiban"
    )
    assert "#SBATCH --ntasks-per-node=2" in script and "--gpus-per-node" not in script


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--nodes", "0", "--gpus-per-node", "4"], "--nodes must be at least 1, got 0"),
        (["--nodes", "1", "--gpus-per-node", "-1"], "--gpus-per-node must be 0 (CPU nodes) or more"),
        (["--nodes", "1", "--gpus-per-node", "4", "--ntasks-per-node", "2"], "kiban runs one task per GPU"),
        (
            ["--nodes", "1", "--gpus-per-node", "0", "--set", "model.encoders.protien={preset: tiny}"],
            "model.encoders.protien: unknown encoder 'protien'",
        ),
        (
            ["--nodes", "1", "--gpus-per-node", "0", "--set", "trainer.strategy=fsdp"],
            "trainer.strategy: fsdp needs CUDA",
        ),
        (
            ["--nodes", "1", "--gpus-per-node", "4", "--set", "trainer.devices=8"],
            "trainer.devices: is 8 but the job runs 4",
        ),
        (
            ["--nodes", "2", "--gpus-per-node", "4", "--set", "trainer.num_nodes=4"],
            "trainer.num_nodes: is 4 but",
        ),
    ],
)
def test_a_bad_request_fails_before_anything_is_written_or_submitted(capsys, tmp_path, args, says):
    code, out, err = _submit(capsys, *args, "--set", f"run.dir={tmp_path}")
    assert code == 2 and out == ""
    assert err.startswith("kiban slurm: error: ") and says in err
    assert not (tmp_path / "slurm").exists()


def test_gpu_nodes_are_checked_as_gpu_nodes_even_from_a_cpu_login_node(capsys, tmp_path):
    code, script, err = _submit(
        capsys,
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--dry-run",
        "--set",
        f"run.dir={tmp_path}",
        "--set",
        "trainer.strategy=fsdp",
        "--set",
        "trainer.precision=bf16-mixed",
    )
    assert code == 0, err
    assert "trainer.strategy=fsdp" in script


def test_the_job_object_names_the_flag():
    with pytest.raises(SlurmError, match="--nodes"):
        SlurmJob(config="x.yaml", nodes=0, gpus_per_node=0).check()

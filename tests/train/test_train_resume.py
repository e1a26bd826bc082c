"""Exact resume: a run preempted at step k and resumed matches an uninterrupted run at every step."""

import json
import os
import signal

import pytest
import pytorch_lightning as pl

from kiban.train.runner import fit


class SignalAtStep(pl.Callback):
    """Sends this process SIGUSR1 at the end of step ``step``, as Slurm does before a preemption."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def _steps(run_dir):
    """Step -> the last logged entry for it (a resumed run appends)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        out[entry["step"]] = entry
    return out


@pytest.mark.parametrize("accumulate", [1, 2])
def test_preempted_and_resumed_run_matches_an_uninterrupted_one_step_by_step(
    train_config, random_run, tmp_path, accumulate
):
    overrides = [
        *random_run,
        "model.encoders={protein: {preset: tiny}, dna: {preset: tiny, rc_augment: 0.5}}",
        "trainer.max_steps=9",
        "callbacks.checkpoint.every_n_steps=100",
        f"trainer.accumulate_grad_batches={accumulate}",
    ]
    straight = train_config(*overrides, run_dir=tmp_path / "straight")
    fit(straight)

    broken = train_config(*overrides, run_dir=tmp_path / "broken")
    first = fit(broken, callbacks=[SignalAtStep(4)])
    assert first.global_step == 4 and first.checkpoint.name == "ckpt-000004"
    second = fit(broken)
    assert second.global_step == 9

    a, b = _steps(tmp_path / "straight"), _steps(tmp_path / "broken")
    assert sorted(a) == sorted(b) == list(range(1, 10))
    for step in range(1, 10):
        assert b[step]["ids"] == a[step]["ids"], f"step {step}: batch ids differ"
        assert b[step]["epoch"] == a[step]["epoch"]
        assert b[step]["loss"] == a[step]["loss"], f"step {step}: loss {b[step]['loss']} != {a[step]['loss']}"
        assert b[step]["grad_norm"] == a[step]["grad_norm"], f"step {step}: grad norm differs"
        assert b[step]["lr"] == a[step]["lr"]
    # 10 records in batches of 3 make 4 batches an epoch: the run crossed epoch boundaries
    assert {a[s]["epoch"] for s in a} == ({0, 1, 2} if accumulate == 1 else {0, 1, 2, 3, 4})
    if accumulate == 2:  # a step logs the records of both its micro-batches
        assert all(len(a[s]["ids"]) >= 4 for s in a)

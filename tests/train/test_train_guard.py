"""The NaN/Inf guard: a NaN injected into a batch stops the run (or skips the update) with a clear message."""

import json
import logging

import pytest
import pytorch_lightning as pl
import torch

from kiban.train.callbacks import NonFiniteError
from kiban.train.runner import fit


class PoisonBatch(pl.Callback):
    """Writes NaN into the molecule atom features of the batch of step ``step`` (1-based)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            batch.inputs.features["molecule"]["atom_features"][0, 0, 0] = float("nan")
            self.ids = batch.ids


OVERRIDES = [
    "trainer.max_steps=5",
    "callbacks.checkpoint.every_n_steps=2",
    "data.val=null",
    "trainer.val_check_interval=null",
]


def test_a_nan_in_a_batch_stops_the_run_before_the_update_naming_step_records_and_value(
    train_config, tmp_path
):
    poison = PoisonBatch(3)
    with pytest.raises(NonFiniteError) as caught:
        fit(train_config(*OVERRIDES), callbacks=[poison])
    message = str(caught.value)
    assert message.startswith("non-finite value at step 3 (rank 0, records ")
    assert ", ".join(poison.ids) in message
    assert "loss is nan" in message and "gradient of model.projectors." in message
    assert "stopping before the update" in message
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*"))
    assert checkpoints == ["ckpt-000002"], "nothing after the bad step was saved"


def test_skip_drops_the_poisoned_update_and_the_run_goes_on(train_config, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="kiban")
    result = fit(train_config(*OVERRIDES, "callbacks.nan_guard.action=skip"), callbacks=[PoisonBatch(3)])
    assert result.global_step == 5
    assert (
        "non-finite value at step 3" in caplog.text
        and "skipping this update (1 of at most 10 skips)" in caplog.text
    )
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert steps[3]["loss"] == steps[3]["loss"]  # finite after the skipped step
    state = torch.load(result.checkpoint / "state.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

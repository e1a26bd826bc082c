"""Shared helpers for the training tests: the shipped smoke config (configs/smoke.yaml) with overrides."""

from pathlib import Path

import pytest

from kiban.train.config import load_config

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"

# Randomness everywhere a resume could lose it: LoRA and attention dropout (torch RNG in the
# model) and DNA reverse-complement augmentation (RNG inside the featurizer).
RANDOM_RUN = [
    "stage=instruct",
    "model.backbone.lora={r: 4, alpha: 8, dropout: 0.1, target_modules: [q_proj, v_proj]}",
    "model.backbone.hf_config.attention_dropout=0.1",
    "model.encoders.dna={preset: tiny, rc_augment: 0.5}",
    "data.tiny_records=10",
    "data.batch_size=3",
    "data.val=null",
    "data.test=null",
    "trainer.deterministic=true",
    "trainer.log_every_n_steps=100",
    "trainer.val_check_interval=null",
    "callbacks.checkpoint.monitor=train/loss",
    "callbacks.lr_monitor=false",
]


@pytest.fixture
def random_run():
    return list(RANDOM_RUN)


@pytest.fixture
def train_config(tmp_path):
    """``train_config(*overrides)``: the smoke YAML, run dir under tmp_path, plus overrides."""

    def make(*overrides, run_dir=None):
        return load_config(SMOKE, [f"run.dir={run_dir or tmp_path / 'run'}", *overrides])

    return make


def _fit_two_ranks(run_dir, strategy, max_steps, *overrides, timeout=600):
    """``kiban fit`` of the smoke config on 2 CPU ranks over gloo (torchrun); returns its stderr."""
    import subprocess
    import sys

    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc-per-node",
        "2",
        str(Path(sys.executable).with_name("kiban")),
        "fit",
        "--config",
        str(SMOKE),
        f"run.dir={run_dir}",
        f"trainer.strategy={strategy}",
        f"trainer.max_steps={max_steps}",
        "callbacks.checkpoint.every_n_steps=2",
        "callbacks.checkpoint.keep_last=5",
        "data.val=null",
        *overrides,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stderr


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory):
    """One align run under raw DeepSpeed ZeRO-2, 4 steps on 2 ranks (shared: each costs a minute)."""
    run_dir = tmp_path_factory.mktemp("zero2")
    _fit_two_ranks(run_dir, "deepspeed_stage_2", 4)
    return run_dir


@pytest.fixture(scope="session")
def fit_two_ranks():
    """``fit_two_ranks(run_dir, strategy, max_steps, *overrides)``: see ``_fit_two_ranks``."""
    return _fit_two_ranks

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

"""Training configs: every shipped YAML parses and validates; bad ones fail before any work,
naming the field.
"""

from pathlib import Path

import pytest
import yaml

from kiban.train.config import ConfigError, config_from_dict, load_config
from kiban.train.validation import validate_config


def load_config_from_text(text):
    return config_from_dict(yaml.safe_load(text))


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAINING_CONFIGS = sorted(
    p for p in CONFIGS.glob("*.yaml") if {"model", "trainer"} <= set(yaml.safe_load(p.read_text()))
)


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_training_config_parses_and_validates(path, tmp_path):
    # data files are the user's; the rest must be right as shipped
    config = load_config(path, [f"run.dir={tmp_path}", "data.train=tiny", "data.val=tiny"])
    gpu = config.trainer.strategy.startswith(("deepspeed", "fsdp")) or config.trainer.precision.startswith(
        "bf16"
    )
    validate_config(config, target="gpu" if gpu else None)
    assert load_config(path, [f"run.dir={tmp_path}"]).to_yaml()  # and it round-trips to YAML


def test_the_smoke_config_builds_its_model_and_runs_on_this_cpu(train_config):
    from kiban.train.module import KibanLightningModule

    config = train_config()
    validate_config(config)
    module = KibanLightningModule(config=config)
    module.configure_model()
    assert sorted(module.model.encoders) == ["molecule", "protein"]


@pytest.mark.parametrize(
    ("overrides", "field", "says"),
    [
        (["model.encoders.protien={preset: tiny}"], "model.encoders.protien", "unknown encoder 'protien'"),
        (["model.encoders.protein.preset=huge"], "model.encoders.protein.preset", "no preset 'huge'"),
        (
            ["model.encoders.dna={preset: tiny, rc_agument: 0.5}"],
            "model.encoders.dna.rc_agument",
            "unknown field",
        ),
        (["model.default_projector.kind=perceiver"], "model.default_projector.kind", "unknown projector"),
        (["model.backbone={}"], "model.backbone", "exactly one of path, gguf, hf_config"),
        (["stage=instruct"], "model.backbone.lora", "trains LoRA adapters"),
        (["trainer.stratgy=ddp"], "trainer.stratgy", "unknown field"),
        (["trainer.strategy=horovod"], "trainer.strategy", "unknown strategy"),
        (["trainer.strategy=fsdp"], "trainer.strategy", "fsdp needs CUDA GPUs"),
        (["trainer.strategy=deepspeed_stage_3_offload"], "trainer.strategy", "nothing to offload"),
        (["trainer.precision=16-mixed"], "trainer.precision", "16-mixed needs a GPU"),
        (["trainer.accelerator=gpu"], "trainer.accelerator", "CUDA sees none"),
        (["trainer.max_steps=0"], "trainer.max_steps", "at least 1"),
        (["trainer.max_steps=ten"], "trainer.max_steps", "expected int, got 'ten'"),
        (["model.projectors.molecule={num_tokens: sixteen}"], "model.projectors.molecule.num_tokens", "expected int"),
        (["model.projectors.cell={kind: linear}"], "model.projectors.cell", "has no encoder"),
        (["model.backbone.lora={r: 4, alhpa: 8}"], "model.backbone.lora.alhpa", "unknown field"),
        (["data.batch_size=0"], "data.batch_size", "at least 1"),
        (["data.train=/nowhere/train.jsonl"], "data.train", "is not a file"),
        (["callbacks.nan_guard.action=ignore"], "callbacks.nan_guard.action", "stop or skip"),
        (
            ["trainer.strategy=deepspeed_stage_2", "callbacks.nan_guard.action=skip"],
            "callbacks.nan_guard.action",
            "not available with DeepSpeed",
        ),
        (["run.resume=/nowhere/ckpt-000001"], "run.resume", "not a checkpoint directory"),
    ],
)
def test_a_bad_config_fails_before_any_work_naming_the_field(train_config, overrides, field, says):
    with pytest.raises(ConfigError) as caught:
        validate_config(train_config(*overrides))
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ") and says in str(caught.value)


def test_the_fit_command_fails_in_a_second_with_one_line_naming_the_field(tmp_path):
    import subprocess
    import sys

    kiban = Path(sys.executable).with_name("kiban")
    result = subprocess.run(
        [
            str(kiban),
            "fit",
            "--config",
            str(CONFIGS / "smoke.yaml"),
            f"run.dir={tmp_path}",
            "model.encoders.protien={preset: tiny}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "kiban fit: error: model.encoders.protien: unknown encoder 'protien'; registered encoders: "
        "cell, dna, image, molecule, properties, protein, text"
    )
    assert not (tmp_path / "checkpoints").exists()


def test_overrides_are_yaml_values_on_dotted_paths(train_config):
    config = train_config("trainer.max_steps=7", "optim.lr=1e-3", "data.val=null", "optim.betas=[0.8, 0.9]")
    assert config.trainer.max_steps == 7 and config.optim.lr == 1e-3 and config.data.val is None
    assert config.optim.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="trainer.max_steps: is a value, not a section"):
        train_config("trainer.max_steps.nested=1")


def test_a_misspelt_or_mistyped_model_field_in_the_yaml_is_refused_at_load_time(tmp_path):
    values = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    values["model"]["projectors"] = {"protein": {"kind": "resampler", "num_tokens": "sixteen"}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=r"^model\.projectors\.protein\.num_tokens: expected int, got 'sixteen'$"):
        load_config(path)
    values["model"]["projectors"] = {}
    values["model"]["encoders"]["protein"] = {"preset": "tiny", "num_layrs": 2}
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=r"^model\.encoders\.protein\.num_layrs: unknown field"):
        load_config(path)


def test_the_model_section_is_typed_and_round_trips(train_config):
    from kiban.fusion import BackboneConfig, KibanConfig, ProjectorConfig
    from kiban.fusion.config import EncoderSpec

    config = train_config("model.projectors={protein: {kind: resampler, num_tokens: 2}}")
    assert isinstance(config.model, KibanConfig) and isinstance(config.model.backbone, BackboneConfig)
    assert isinstance(config.model.encoders["protein"], EncoderSpec)
    assert config.model.projectors["protein"] == ProjectorConfig(
        **{**vars(config.model.default_projector), "kind": "resampler", "num_tokens": 2}
    )
    again = load_config_from_text(config.to_yaml())
    assert again == config

"""KibanConfig is typed end to end: read strictly from config.json, old saved models still load."""

import json

import pytest

from kiban.config import ConfigError, from_plain
from kiban.fusion import BackboneConfig, KibanModel, ProjectorConfig
from kiban.fusion.config import EncoderSpec, KibanConfig
from kiban.tiny import tiny_backbone_config, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_model(["protein", "molecule"]).save_pretrained(folder)
    return folder


def _rewrite(folder, tmp_path, change):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    values = json.loads((copy / "config.json").read_text())
    change(values)
    (copy / "config.json").write_text(json.dumps(values))
    return copy


def test_a_mistyped_or_misspelt_field_in_config_json_is_refused_naming_it(saved, tmp_path):
    def mistyped(values):
        values["projectors"]["molecule"]["num_tokens"] = "sixteen"

    with pytest.raises(ConfigError, match=r"config\.json: projectors\.molecule\.num_tokens: expected int, got 'sixteen'"):
        KibanModel.from_pretrained(_rewrite(saved, tmp_path / "a", mistyped))

    def misspelt(values):
        values["encoders"]["protein"]["config"]["num_layrs"] = 2

    with pytest.raises(ConfigError, match=r"config\.json: encoders\.protein\.config\.num_layrs: unknown field"):
        KibanModel.from_pretrained(_rewrite(saved, tmp_path / "b", misspelt))


def test_a_model_saved_in_the_older_layout_still_loads(saved, tmp_path):
    reference = KibanModel.from_pretrained(saved)

    def older(values):
        # what save_pretrained wrote before the configs were typed: every projector in full,
        # relative_paths always present, the backbone with every key
        for spec in values["encoders"].values():
            spec.setdefault("relative_paths", [])
        values["projectors"] = {m: {**values["default_projector"], **p} for m, p in values["projectors"].items()}
        values["backbone"] = {
            "path": None, "gguf": None, "tokenizer_path": None, "dtype": "float32",
            "gradient_checkpointing": False, "lora": None, **values["backbone"],
        }
        values["kiban_version"] = "0.1.0"

    model = KibanModel.from_pretrained(_rewrite(saved, tmp_path, older))
    for name in ("encoders", "projectors", "default_projector", "max_length"):
        assert getattr(model.config, name) == getattr(reference.config, name)
    assert model.config.backbone.hf_config == reference.config.backbone.hf_config
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_python_dicts_go_through_the_same_checks_and_round_trip():
    config = KibanConfig(
        encoders={"protein": {"preset": "tiny", "num_layers": 1}},
        backbone=tiny_backbone_config(),
        projectors={"protein": {"num_tokens": 2}},
        default_projector={"kind": "resampler", "depth": 1},
    )
    assert config.encoders["protein"] == EncoderSpec(preset="tiny", overrides={"num_layers": 1})
    assert isinstance(config.backbone, BackboneConfig)
    assert config.projectors["protein"] == ProjectorConfig(kind="resampler", num_tokens=2, depth=1)
    assert KibanConfig.from_plain(json.loads(json.dumps(config.to_plain()))) == config
    with pytest.raises(ConfigError, match=r"^encoders\.protein\.num_layers: expected int, got '1'$"):
        KibanConfig(encoders={"protein": {"preset": "tiny", "num_layers": "1"}}, backbone=tiny_backbone_config())


def test_the_converter_names_nested_paths_and_reads_lists_as_tuples():
    from kiban.fusion.backbone import LoraSettings

    assert from_plain(LoraSettings, {"target_modules": ["q_proj"]}).target_modules == ("q_proj",)
    with pytest.raises(ConfigError, match=r"^backbone\.lora\.target_modules\[1\]: expected a string, got 3$"):
        from_plain(BackboneConfig, {"lora": {"target_modules": ["q_proj", 3]}}, "backbone")
    with pytest.raises(ConfigError, match=r"^lora\.r: expected int, got 2\.5$"):
        from_plain(LoraSettings, {"r": 2.5}, "lora")

"""``kiban merge`` on tiny LoRA models: merged weights equal the ones worked out by hand, the
result is a plain saved model, and incompatible sources are refused with one line.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from kiban.adapt.merge import MergeError, MergeRecipe, MergeSource, merge_models
from kiban.cli import main
from kiban.fusion import KibanModel
from kiban.fusion.model import KibanConfig
from kiban.tiny import tiny_backbone_config

SCALING = 8 / 4  # tiny LoRA: alpha 8, r 4


def _lora_model(adapter_seed: int, *, base_seed: int = 0, r: int = 4, layers: int = 2) -> KibanModel:
    backbone = tiny_backbone_config(lora=True, layers=layers)
    backbone["lora"] = {**backbone["lora"], "r": r}
    config = KibanConfig(
        encoders={"molecule": {"preset": "tiny"}},
        backbone=backbone,
        default_projector={"kind": "mlp2", "num_tokens": 4, "depth": 1, "num_heads": 4},
    )
    torch.manual_seed(base_seed)
    model = KibanModel.from_config(config).eval()
    generator = torch.Generator().manual_seed(100 + adapter_seed)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_" in name:  # B starts at zero: give both matrices values, as training would
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def _q_proj(model: KibanModel, layer: int = 0):
    return model.llm.base_model.model.model.layers[layer].self_attn.q_proj


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    models = [_lora_model(1), _lora_model(2)]
    for k, model in enumerate(models):
        model.save_pretrained(root / f"m{k}")
    return root, models


@pytest.mark.parametrize("method, weights, expected", [
    ("linear", (1.0, 1.0), lambda w0, d1, d2: w0 + (d1 + d2) / 2),
    ("linear", (3.0, 1.0), lambda w0, d1, d2: w0 + (3 * d1 + d2) / 4),
    ("task_arithmetic", (1.0, 0.5), lambda w0, d1, d2: w0 + 0.7 * (d1 + 0.5 * d2)),
])
def test_merging_two_lora_adapters_gives_the_weights_worked_by_hand(adapters, method, weights, expected):
    root, models = adapters
    q = [_q_proj(m) for m in models]
    w0 = q[0].base_layer.weight.detach().clone()
    d1, d2 = (SCALING * p.lora_B["default"].weight @ p.lora_A["default"].weight for p in q)
    recipe = MergeRecipe(
        method=method, models=[MergeSource(str(root / "m0"), weights[0]), MergeSource(str(root / "m1"), weights[1])],
        scale=0.7,
    )
    merged = merge_models(recipe)
    assert not merged.has_lora and merged.config.backbone.lora is None
    weight = merged.llm.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(weight, expected(w0, d1.detach(), d2.detach()), atol=1e-6)
    # what no adapter touched is the base's, projectors included
    k_proj = merged.llm.model.layers[0].self_attn.k_proj.weight
    assert torch.equal(k_proj, models[0].llm.base_model.model.model.layers[0].self_attn.k_proj.weight)
    for name, tensor in merged.projectors.state_dict().items():
        assert torch.equal(tensor, models[0].projectors.state_dict()[name])


def test_a_merged_model_round_trips_through_save_and_load(adapters, tmp_path):
    root, _ = adapters
    recipe = MergeRecipe(method="ties", models=[MergeSource(str(root / "m0")), MergeSource(str(root / "m1"))])
    merged = merge_models(recipe)
    merged.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "lora").exists()
    again = KibanModel.from_pretrained(tmp_path / "merged").eval()
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    items = [("molecule", "CCO"), ("molecule", "c1ccccc1O"), ("text", "a protein kinase")]
    assert torch.allclose(merged.embed(items), again.embed(items), atol=1e-6)


def _write_recipe(path, **values):
    path.write_text(yaml.safe_dump(values))
    return path


def test_cli_refuses_a_different_base_in_one_line(adapters, tmp_path, capsys):
    root, _ = adapters
    _lora_model(3, base_seed=1).save_pretrained(tmp_path / "other")
    recipe = _write_recipe(
        tmp_path / "recipe.yaml", method="ties", models=[{"path": str(root / "m0")}, {"path": str(tmp_path / "other")}]
    )
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not fine-tuned from the same base" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_adapters_of_different_shapes_are_refused(adapters, tmp_path):
    root, _ = adapters
    _lora_model(4, r=8).save_pretrained(tmp_path / "r8")
    recipe = MergeRecipe(method="linear", models=[MergeSource(str(root / "m0")), MergeSource(str(tmp_path / "r8"))])
    with pytest.raises(MergeError, match=r"r=8 on q_proj,v_proj.*r=4 on q_proj,v_proj.*different shapes"):
        merge_models(recipe)


def test_different_architectures_are_refused(adapters, tmp_path):
    root, _ = adapters
    _lora_model(5, layers=3).save_pretrained(tmp_path / "deeper")
    recipe = MergeRecipe(method="linear", models=[MergeSource(str(root / "m0")), MergeSource(str(tmp_path / "deeper"))])
    with pytest.raises(MergeError, match="are different models"):
        merge_models(recipe)


def test_recipe_errors_name_the_file(tmp_path, capsys):
    recipe = _write_recipe(tmp_path / "bad.yaml", method="average", models=[{"path": "x"}])
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "not one of" in err
    recipe = _write_recipe(tmp_path / "typo.yaml", method="ties", modles=[{"path": "x"}])
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "typo.yaml" in capsys.readouterr().err


def test_merge_cli_writes_a_plain_model_with_metrics(adapters, tmp_path):
    root, _ = adapters
    recipe = _write_recipe(
        tmp_path / "recipe.yaml", method="dare_ties", density=0.7, models=[{"path": str(root / "m0")}, {"path": str(root / "m1")}]
    )
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert (out / "config.json").is_file() and not (out / "lora").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "dare_ties"
    sources = metrics["before"]["models"]
    assert len(sources) == 2
    for figures in (*sources.values(), metrics["after"]):
        assert figures["general_text"]["perplexity"] > 1 and figures["general_text"]["tokens"] > 100
    assert json.loads((out / "merge.json").read_text())["recipe"]["density"] == 0.7

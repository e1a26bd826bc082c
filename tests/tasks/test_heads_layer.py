"""``HeadConfig.layer``: stored in head.json, absent in old files (None), checked, and used by
``PooledHead.predict`` to read the model's states at the head's layer.
"""

from __future__ import annotations

import json

import pytest
import torch

from kiban.fusion import KibanConfig, KibanModel
from kiban.tasks.heads import HeadConfig, create_head, load_head
from kiban.tiny import tiny_backbone_config

SMILES = ["CCO", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O"]


def _config(**values) -> HeadConfig:
    return HeadConfig(
        task="bbbp", modality="molecule", kind="classification", labels=["no", "yes"], input_dim=32, **values
    )


def test_layer_is_saved_and_an_old_head_json_without_it_loads_as_none(tmp_path):
    head = create_head(_config(layer=3))
    head.save(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "head.json").read_text())["layer"] == 3
    assert load_head(tmp_path / "new").config.layer == 3

    head.save(tmp_path / "old")
    stored = json.loads((tmp_path / "old" / "head.json").read_text())
    del stored["layer"]  # a head.json written before the field existed
    (tmp_path / "old" / "head.json").write_text(json.dumps(stored))
    assert load_head(tmp_path / "old").config.layer is None


@pytest.mark.parametrize("layer", [0, -2, True, 1.5, "3"])
def test_a_layer_that_is_no_layer_is_refused(layer):
    with pytest.raises(ValueError, match=r"layer must be None or an integer >= 1"):
        _config(layer=layer)


def test_predict_reads_the_model_at_the_heads_layer():
    torch.manual_seed(0)
    model = KibanModel.from_config(
        KibanConfig(encoders={"molecule": {"preset": "tiny"}}, backbone=tiny_backbone_config(layers=4))
    ).eval()
    items = [("molecule", s) for s in SMILES]
    for layer in (1, 3, None):
        head = create_head(_config(layer=layer)).eval()
        torch.nn.init.normal_(head.net[0].weight, std=1.0)
        got = torch.tensor([list(row["probabilities"].values()) for row in head.predict(model, SMILES)])
        for other in (1, 3, None):
            expected = torch.tensor(
                [list(row["probabilities"].values()) for row in head.outputs(model.embed(items, layer=other))]
            )
            if other == layer:
                torch.testing.assert_close(got, expected)
            else:  # the layers give other answers, so agreeing with one layer means that layer was read
                assert not torch.allclose(got, expected, atol=1e-4)


def test_predict_names_the_layers_the_model_has():
    torch.manual_seed(0)
    model = KibanModel.from_config(
        KibanConfig(encoders={"molecule": {"preset": "tiny"}}, backbone=tiny_backbone_config(layers=2))
    ).eval()
    with pytest.raises(ValueError, match=r"1\.\.2, got 5"):
        create_head(_config(layer=5)).predict(model, SMILES[:1])

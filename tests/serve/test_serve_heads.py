"""Task heads (``kiban.tasks.heads``): save/load through safetensors, predictions, and the checks the
server relies on when it loads ``MODEL_DIR/heads/``.
"""

from __future__ import annotations

import json

import pytest
import torch

from kiban.tasks import HeadConfig, PooledHead, create_head, list_head_architectures, load_head, load_heads
from kiban.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(["protein", "molecule"], seed=0).eval()


def _config(**overrides) -> HeadConfig:
    values = {
        "task": "toxicity",
        "modality": "molecule",
        "kind": "classification",
        "labels": ["no", "yes"],
        "input_dim": 32,
    }
    return HeadConfig(**{**values, **overrides})


@pytest.mark.parametrize("hidden_dim", [0, 16])
def test_save_and_load_give_the_same_outputs_through_safetensors_only(tmp_path, model, hidden_dim):
    head = PooledHead(_config(hidden_dim=hidden_dim)).eval()
    head.save(tmp_path / "toxicity")
    assert sorted(p.name for p in (tmp_path / "toxicity").iterdir()) == ["head.json", "head.safetensors"]
    assert json.loads((tmp_path / "toxicity" / "head.json").read_text())["architecture"] == "pooled"
    loaded = PooledHead.load(tmp_path / "toxicity")
    pooled = model.embed([("molecule", "CCO"), ("molecule", "c1ccccc1")])
    torch.testing.assert_close(loaded(pooled), head(pooled))
    assert loaded.predict(model, ["CCO", "c1ccccc1"]) == head.predict(model, ["CCO", "c1ccccc1"])


def test_predictions_are_probabilities_or_values(model):
    rows = PooledHead(_config()).predict(model, ["CCO", "CCN"])
    for row in rows:
        assert set(row) == {"label", "probabilities"}
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    regression = PooledHead(_config(task="stability", modality="protein", kind="regression", labels=["tm"]))
    (row,) = regression.predict(model, ["MKTAYIAKQR"])
    assert set(row) == {"values"} and isinstance(row["values"]["tm"], float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"task": "../etc"}, "task name"),
        ({"kind": "ranking"}, "kind"),
        ({"labels": ["only"]}, "at least 2"),
        ({"labels": ["a", "a"]}, "distinct"),
        ({"input_dim": 0}, "input_dim"),
    ],
)
def test_bad_head_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_unknown_fields_and_architectures_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown field"):
        HeadConfig.from_dict({**_config().to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match="unknown architecture 'transformer'"):
        create_head(_config(architecture="transformer"))
    assert "pooled" in list_head_architectures()
    with pytest.raises(FileNotFoundError, match="not a saved head"):
        load_head(tmp_path)


def test_load_heads_checks_folder_names_and_widths(tmp_path):
    assert load_heads(tmp_path) == {}  # no heads folder: no heads
    PooledHead(_config()).save(tmp_path / "heads" / "toxicity")
    assert list(load_heads(tmp_path, width=32)) == ["toxicity"]
    with pytest.raises(ValueError, match="32-wide states; the model's are 64-wide"):
        load_heads(tmp_path, width=64)
    PooledHead(_config(task="solubility")).save(tmp_path / "heads" / "other-name")
    with pytest.raises(ValueError, match="folder must be named after the task"):
        load_heads(tmp_path)

"""``kiban finetune --mode lora``: adapters on the backbone train with the head through a
grad-enabled pooled-state path, are saved in the run's model/lora/, and reload to identical outputs.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from kiban.cli import main
from kiban.tasks.heads import HeadConfig, create_head, load_heads
from kiban.tasks.predict import model_for_head


def _tiny_lora_model():
    from kiban.fusion import KibanModel
    from kiban.fusion.model import KibanConfig
    from kiban.tiny import tiny_backbone_config

    torch.manual_seed(0)
    config = KibanConfig(
        encoders={"molecule": {"preset": "tiny"}},
        backbone=tiny_backbone_config(lora=True),
        default_projector={"kind": "mlp2", "num_tokens": 4, "depth": 1, "num_heads": 4},
    )
    return KibanModel.from_config(config).eval()


SMILES = [f"{'C' * n}O" for n in range(1, 13)] + [f"c1ccccc1{'C' * n}" for n in range(12)]


def test_pooled_states_match_embed_and_carry_gradients():
    from kiban.tasks.lora import pooled_states

    model = _tiny_lora_model()
    with torch.no_grad():
        reference = model.embed([("molecule", s) for s in SMILES[:4]])
    states = pooled_states(model, "molecule", SMILES[:4])
    assert states.requires_grad and torch.allclose(states, reference, atol=1e-6)


def test_fit_lora_trains_adapters_only():
    from kiban.tasks.lora import LoraFitSettings, fit_lora

    model = _tiny_lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head = create_head(
        HeadConfig(task="t", modality="molecule", kind="regression", labels=["n"], input_dim=32)
    )
    targets = torch.tensor([[float(len(s))] for s in SMILES])
    history = fit_lora(
        model,
        head,
        "molecule",
        SMILES,
        targets,
        range(18),
        range(18, 24),
        settings=LoraFitSettings(epochs=3, batch_size=8, progress=False),
    )
    assert len(history["train"]) == 3 and len(history["valid"]) == 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapters now do something
    assert not any(p.requires_grad for p in model.parameters())


def test_finetune_lora_end_to_end_reloads_identically(tmp_path):
    """Always runs: a small SMILES regression CSV, --mode lora on the tiny model; the run folder's
    model/lora/ holds peft's adapter files and the reloaded model + head reproduce predictions.csv.
    """
    smiles = [f"{'C' * n}O" for n in range(1, 31)] + [f"c1ccccc1{'C' * n}" for n in range(30)]
    data = tmp_path / "toy.csv"
    ids = [f"m{k}" for k in range(len(smiles))]
    pd.DataFrame({"id": ids, "smiles": smiles, "size": [float(len(s)) for s in smiles]}).to_csv(
        data, index=False
    )
    out = tmp_path / "run"
    code = main(
        [
            "finetune",
            "toy",
            "--data",
            str(data),
            "--labels",
            "size",
            "--mode",
            "lora",
            "--out",
            str(out),
            "--epochs",
            "3",
        ]
    )
    assert code == 0
    assert (out / "model" / "lora" / "adapter_model.safetensors").is_file()
    assert (out / "model" / "lora" / "adapter_config.json").is_file()
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["backbone"]["lora"]["r"] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert any(r["model"].startswith("head (lora") for r in metrics["results"])
    head = load_heads(out)["toy"]
    assert head.config.extra["mode"] == "lora" and head.config.hidden_dim == 0
    model = model_for_head(out / "heads" / "toy", head)
    assert model.has_lora
    predictions = pd.read_csv(out / "predictions.csv")
    items = [dict(zip(ids, smiles))[i] for i in predictions["id"]]
    assert len(items) >= 5
    rows = head.outputs(model.embed([("molecule", s) for s in items]))
    again = np.array([r["values"]["size"] for r in rows])
    assert np.allclose(again, predictions["predicted:size"].to_numpy(), atol=1e-5)

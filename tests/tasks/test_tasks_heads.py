"""Head losses and training: every registered architecture trains, NaN targets are masked, the
folded head answers in label units, and a drug classifier on real BBBP beats the majority class.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from kiban.cli import main
from kiban.tasks.baselines import morgan_fingerprints, trivial
from kiban.tasks.heads import HeadConfig, create_head, list_head_architectures, load_head
from kiban.tasks.training import FitSettings, fit_head

# the heads over pooled states; per-residue, contact and pair heads have their own tests
# (tests/tasks/test_tasks_saved_heads.py)
POOLED = [a for a in list_head_architectures() if a in ("pooled", "multilabel")]


def test_the_pooled_architectures_are_registered():
    assert POOLED == ["multilabel", "pooled"]


@pytest.mark.parametrize("architecture", POOLED)
@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_every_head_trains(architecture, kind, tmp_path):
    labels = ["a", "b", "c"]
    if architecture == "multilabel" and kind != "classification":
        with pytest.raises(ValueError, match="multilabel"):
            create_head(
                HeadConfig(
                    task="t",
                    modality="molecule",
                    kind=kind,
                    labels=labels,
                    input_dim=8,
                    architecture=architecture,
                )
            )
        return
    head = create_head(
        HeadConfig(
            task="t",
            modality="molecule",
            kind=kind,
            labels=labels,
            input_dim=8,
            hidden_dim=4,
            architecture=architecture,
        )
    )
    x = torch.randn(16, 8)
    y = torch.randint(0, 3, (16,)) if kind == "classification" else torch.randn(16, 3)
    if architecture == "multilabel":  # several 0/1 tasks, NaN = not measured
        y = torch.randint(0, 2, (16, 3)).float()
        y[::4, 1] = float("nan")
    loss = head.loss(head(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in head.parameters())
    head.save(tmp_path / "t")
    assert torch.equal(load_head(tmp_path / "t")(x), head.eval()(x))


def test_regression_loss_masks_missing_labels():
    head = create_head(
        HeadConfig(task="t", modality="molecule", kind="regression", labels=["a", "b"], input_dim=2)
    )
    outputs = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    targets = torch.tensor([[2.0, float("nan")], [float("nan"), 6.0]])
    assert head.loss(outputs, targets).item() == pytest.approx((1 + 4) / 2)
    assert head.loss(outputs, torch.full((2, 2), float("nan"))).item() == 0.0


def test_folded_head_answers_in_label_units():
    torch.manual_seed(0)
    x = torch.randn(400, 6) * 50 + 20  # badly scaled features
    y = torch.stack([x[:, 0] * 3 + 1000, -x[:, 1] * 0.01], 1)
    y[::3, 1] = float("nan")  # multi-task, a third of target b unmeasured
    head = create_head(
        HeadConfig(task="t", modality="molecule", kind="regression", labels=["a", "b"], input_dim=6)
    )
    fit_head(
        head,
        x[:300],
        y[:300],
        valid=(x[300:350], y[300:350]),
        settings=FitSettings(epochs=150, progress=False),
    )
    with torch.no_grad():
        predicted = head(x[350:])
    truth = y[350:]
    known = ~torch.isnan(truth[:, 1])
    assert torch.allclose(predicted[:, 0], truth[:, 0], atol=5.0)  # range ~ +-150 around 1000
    assert torch.allclose(predicted[known, 1], truth[known, 1], atol=0.05)


def test_baseline_helpers():
    fingerprints = morgan_fingerprints(["CCO", "c1ccccc1"])
    assert fingerprints.shape == (2, 2048) and fingerprints.sum(1).min() > 0
    with pytest.raises(ValueError, match="cannot parse"):
        morgan_fingerprints(["C1CC"])
    assert trivial("classification", np.array([0, 1, 1]), 2, n_classes=3).argmax(1).tolist() == [1, 1]
    assert trivial("regression", np.array([[1.0], [3.0], [np.nan]]), 2).tolist() == [[2.0], [2.0]]


def test_drug_classifier_on_bbbp_beats_majority(shared_data, tmp_path):
    data = tmp_path / "bbbp.csv"
    table = pd.read_csv(shared_data / "molecules" / "bbbp.csv").sample(500, random_state=0)
    table.to_csv(data, index=False)
    out = tmp_path / "bbbp"
    assert (
        main(
            [
                "finetune",
                "bbbp",
                "--data",
                str(data),
                "--labels",
                "p_np",
                "--out",
                str(out),
                "--epochs",
                "100",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "classification" and metrics["labels"] == ["0", "1"]
    test = {r["model"]: r["metrics"] for r in metrics["results"] if r["split"] == "test"}
    head, majority = test["head (probe, tiny)"], test["trivial (majority class)"]
    assert majority["roc_auc"] == 0.5
    assert head["roc_auc"] > 0.62 and head["pr_auc"] > majority["pr_auc"]  # 0.68 at seed 0
    assert test["logistic regression on Morgan fingerprints"]["roc_auc"] > 0.7
    assert (out / "plots" / "roc.png").is_file() and (out / "plots" / "confusion.png").is_file()
    assert not math.isnan(head["macro_f1"])

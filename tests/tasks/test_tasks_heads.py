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


def test_linear_probe_is_fitted_as_scikit_learn_fits_logistic_regression():
    """The probe is a convex problem solved to convergence: with one L2 strength and no validation
    rows, its probabilities equal scikit-learn's LogisticRegression(C=1) on standardised features.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=generator) * torch.linspace(0.1, 40.0, 12)  # one huge dimension
    y = (x[:, :3] / torch.tensor([0.1, 3.6, 7.2]) @ torch.tensor([1.0, -1.0, 0.5]) + torch.randn(300, generator=generator)).gt(0).long()
    y[::7] = 2  # a third class
    head = create_head(
        HeadConfig(task="t", modality="molecule", kind="classification", labels=["a", "b", "c"], input_dim=12)
    )
    fit_head(head, x[:200], y[:200], settings=FitSettings(progress=False))
    scaler = StandardScaler().fit(x[:200].numpy())
    # ours: mean loss + 1/(2n) ||W||^2; scikit-learn: summed loss + 1/(2C) ||W||^2, the same at C=1
    reference = LogisticRegression(C=1.0, max_iter=10_000, tol=1e-10).fit(scaler.transform(x[:200].numpy()), y[:200].numpy())
    expected = reference.predict_proba(scaler.transform(x[200:].numpy()))
    with torch.no_grad():
        got = head(x[200:]).softmax(-1).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_linear_probe_picks_its_l2_strength_on_the_validation_rows():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(120, 40, generator=generator)
    y = (x[:, 0] + 0.5 * torch.randn(120, generator=generator)).gt(0).long()  # 39 noise features, 60 training rows
    head = create_head(HeadConfig(task="t", modality="molecule", kind="classification", labels=["n", "y"], input_dim=40))
    history = fit_head(head, x[:60], y[:60], valid=(x[60:], y[60:]), settings=FitSettings(progress=False))
    assert history["l2"] == list(FitSettings().l2_grid) and len(history["valid"]) == len(history["l2"])
    # the kept head is the one with the lowest validation loss, and it is not the weakest penalty
    chosen = int(np.argmin(history["valid"]))
    assert chosen > 0
    with torch.no_grad():
        kept = float(head.loss(head(x[60:]), y[60:]))
    assert kept == pytest.approx(history["valid"][chosen], rel=1e-3)

"""Multi-task binary classification with missing labels masked (Tox21 / SIDER style): the loss
ignores blanks, metrics are per task, and ``kiban finetune`` runs end to end on a Tox21 subset.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from kiban.cli import main
from kiban.tasks.heads import HeadConfig, MultiLabelHead, create_head, load_head, load_heads
from kiban.tasks.objectives import multilabel_loss, multilabel_metrics

NAN = float("nan")


def test_multilabel_loss_masks_missing_entries():
    outputs = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, NAN], [NAN, 0.0]])
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(3.0))) / 2
    assert multilabel_loss(outputs, targets).item() == pytest.approx(expected, rel=1e-6)
    # changing an output whose label is missing changes nothing, and its gradient is zero
    moved = outputs.clone().requires_grad_(True)
    loss = multilabel_loss(moved, targets)
    loss.backward()
    assert moved.grad[0, 1] == 0 and moved.grad[1, 0] == 0 and moved.grad[0, 0] != 0
    assert multilabel_loss(outputs, torch.full((2, 2), NAN)).item() == 0.0


def test_multilabel_metrics_per_task_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(60, 3)).astype(float)
    y[rng.random((60, 3)) < 0.3] = np.nan
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 0.0)  # task c: one class only -> undefined AUC
    scores = rng.normal(size=(60, 3)) + np.nan_to_num(y)
    m = multilabel_metrics(scores, y, ["a", "b", "c"])
    for k, name in enumerate("ab"):
        known = ~np.isnan(y[:, k])
        assert m["per_task"][name]["n"] == known.sum()
        assert m["per_task"][name]["roc_auc"] == pytest.approx(roc_auc_score(y[known, k], scores[known, k]))
        assert m["per_task"][name]["pr_auc"] == pytest.approx(
            average_precision_score(y[known, k], scores[known, k])
        )
    assert m["per_task"]["c"]["roc_auc"] is None and m["tasks_scored"] == 2
    assert m["mean_roc_auc"] == pytest.approx(np.mean([m["per_task"][t]["roc_auc"] for t in "ab"]))


def test_multilabel_head_trains_on_synthetic_masked_tasks(tmp_path):
    """Two tasks read different features; half of each task's labels are missing. The head learns
    both (AUC well above 0.5) and saves, reloads and predicts identically.
    """
    from kiban.tasks.training import FitSettings, fit_head

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=generator)
    y = torch.stack([(x[:, 0] > 0).float(), (x[:, 1] + x[:, 2] > 0).float()], 1)
    y[torch.rand(400, 2, generator=generator) < 0.5] = NAN
    config = HeadConfig(
        task="toy",
        modality="molecule",
        kind="classification",
        labels=["t1", "t2"],
        input_dim=8,
        architecture="multilabel",
    )
    head = create_head(config)
    assert isinstance(head, MultiLabelHead)
    fit_head(head, x[:300], y[:300], settings=FitSettings(epochs=100, progress=False))
    with torch.no_grad():
        m = head.metrics(head(x[300:]).numpy(), y[300:].numpy())
    assert m["per_task"]["t1"]["roc_auc"] > 0.9 and m["per_task"]["t2"]["roc_auc"] > 0.9
    head.save(tmp_path / "toy")
    again = load_head(tmp_path / "toy")
    assert isinstance(again, MultiLabelHead)
    rows, rows_again = head.outputs(x[:5]), again.outputs(x[:5])
    assert rows == rows_again and "label" not in rows[0]
    assert set(rows[0]["probabilities"]) == {"t1", "t2"}
    assert all(0 <= p <= 1 for p in rows[0]["probabilities"].values())


def test_finetune_synthetic_multilabel_csv(tmp_path):
    """Always runs: a SMILES CSV with two 0/1 columns and blanks -> a multilabel head and per-task metrics."""
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    smiles = ["C" * n for n in range(1, 21)] + ["c1ccccc1" + "C" * n for n in range(20)]
    smiles += ["OC" + "C" * n for n in range(20)] + ["NC(=O)" + "C" * n for n in range(20)]
    rng = np.random.default_rng(0)
    aromatic = np.array(["c1" in s for s in smiles], float)
    polar = np.array([s[0] in "ON" for s in smiles], float)
    frame = pd.DataFrame({"smiles": smiles, "aromatic": aromatic, "polar": polar})
    frame.loc[rng.random(len(frame)) < 0.3, "aromatic"] = np.nan
    frame.loc[rng.random(len(frame)) < 0.3, "polar"] = np.nan
    frame["aromatic"] = frame["aromatic"].map(lambda v: "" if np.isnan(v) else str(int(v)))
    frame["polar"] = frame["polar"].map(lambda v: "" if np.isnan(v) else str(int(v)))
    data = tmp_path / "toy.csv"
    frame.to_csv(data, index=False)
    out = tmp_path / "run"
    code = main(
        [
            "finetune",
            "toy",
            "--data",
            str(data),
            "--labels",
            "aromatic,polar",
            "--out",
            str(out),
            "--epochs",
            "30",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "multilabel" and metrics["labels"] == ["aromatic", "polar"]
    test_rows = [r for r in metrics["results"] if r["split"] == "test"]
    assert {r["model"] for r in test_rows} >= {
        "trivial (training positive rate)",
        "logistic regression on Morgan fingerprints",
    }
    for r in test_rows:
        assert set(r["metrics"]["per_task"]) == {"aromatic", "polar"}
    assert (out / "plots" / "roc.png").is_file()
    head = load_heads(out)["toy"]
    assert head.config.architecture == "multilabel" and head.config.kind == "multilabel"
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["id", "true:aromatic", "true:polar", "p:aromatic", "p:polar"]
    # kiban predict with the saved head: one probability per task, the same as the run's predictions
    written = tmp_path / "predicted.csv"
    assert main(["predict", str(out / "heads" / "toy"), "--data", str(data), "--out", str(written)]) == 0
    again = pd.read_csv(written).set_index("id")
    assert list(again.columns) == ["p:aromatic", "p:polar"]
    for _, row in predictions.iterrows():
        assert again.loc[row["id"], "p:aromatic"] == pytest.approx(row["p:aromatic"], abs=1e-5)


def test_multilabel_single_class_task_is_rejected(tmp_path, capsys):
    data = tmp_path / "one.csv"
    pd.DataFrame({"smiles": ["CCO", "CCN", "c1ccccc1", "CCC"], "a": [0, 1, 0, 1], "b": [0, 0, "", 0]}).to_csv(
        data, index=False
    )
    out = tmp_path / "run"
    assert main(["finetune", "x", "--data", str(data), "--labels", "a,b", "--out", str(out)]) == 2
    assert "'b' has a single class" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["one.csv"]


def test_finetune_tox21_subset_beats_trivial(shared_data, tmp_path):
    """1,000 Tox21 molecules, all 12 assays (blanks masked): the fingerprint baseline and the tiny
    random model's head are reported per task; the head must beat the trivial predictor's 0.5 mean AUC.
    """
    frame = pd.read_csv(shared_data / "molecules" / "tox21.csv").sample(1000, random_state=0)
    data = tmp_path / "tox21.csv"
    frame.to_csv(data, index=False)
    tasks = [c for c in frame.columns if c != "smiles"]
    assert len(tasks) == 12 and frame[tasks].isna().to_numpy().any()
    out = tmp_path / "run"
    code = main(
        [
            "finetune",
            "tox21",
            "--data",
            str(data),
            "--labels",
            ",".join(tasks),
            "--out",
            str(out),
            "--epochs",
            "60",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    test = {r["model"]: r["metrics"] for r in metrics["results"] if r["split"] == "test"}
    head = next(v for k, v in test.items() if k.startswith("head"))
    trivial = test["trivial (training positive rate)"]
    fingerprints = test["logistic regression on Morgan fingerprints"]
    assert set(head["per_task"]) == set(tasks)
    assert 0.0 < head["measured_fraction"] < 1.0
    assert trivial["mean_roc_auc"] == pytest.approx(0.5)
    assert head["mean_roc_auc"] > 0.6
    assert fingerprints["mean_roc_auc"] > 0.6


def test_multilabel_rows_fit_the_server_schema():
    """The server's response models accept a multilabel head's rows and its kind as they are."""
    from kiban.serve.schemas import HeadInfo, Prediction

    head = create_head(
        HeadConfig(
            task="tox",
            modality="molecule",
            kind="classification",
            labels=["a", "b"],
            input_dim=4,
            architecture="multilabel",
        )
    )
    row = head.outputs(torch.randn(1, 4))[0]
    prediction = Prediction(index=0, **row)
    assert prediction.label is None and set(prediction.probabilities) == {"a", "b"}
    HeadInfo(
        task="tox",
        modality="molecule",
        kind=head.config.kind,
        labels=head.config.labels,
        version="1",
        endpoint="/v1/predict/tox",
    )

"""Drug–target interaction / affinity from a (protein, molecule) pair.

Features of a pair are the frozen model's pooled states of the protein and of the molecule,
concatenated: [N, 2H] (each distinct protein and drug embedded once). A regression ``PooledHead``
(``modality="protein+molecule"``) maps them to the affinity (Davis pKd, KIBA score). Baseline, as
a chemist would run it: a random forest on the drug's Morgan fingerprint joined to a one-hot of
the target. Metrics: RMSE (MSE = RMSE², DeepDTA reports MSE), Spearman, concordance index.

The server cannot serve a pair head yet (it embeds one input of one modality per row), so
``evaluate_pairs`` returns metrics and the fitted head without saving it under ``heads/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from kiban.tasks.heads import HeadConfig, PooledHead, create_head
from kiban.tasks.splits import Split
from kiban.tasks.training import FitSettings, fit_head

__all__ = ["evaluate_pairs", "pair_features", "target_fingerprint_baseline"]


def pair_features(
    model: Any, proteins: Sequence[str], smiles: Sequence[str], *, progress: bool = False
) -> torch.Tensor:
    """[N, 2H]: pooled protein state ‖ pooled molecule state of each pair."""
    from kiban.tasks.finetune import embed_items

    unique_proteins, protein_index = np.unique(np.asarray(proteins, dtype=object), return_inverse=True)
    unique_smiles, smiles_index = np.unique(np.asarray(smiles, dtype=object), return_inverse=True)
    p = embed_items(model, "protein", list(unique_proteins), batch_size=8, progress=progress)
    m = embed_items(model, "molecule", list(unique_smiles), progress=progress)
    return torch.cat([p[torch.as_tensor(protein_index)], m[torch.as_tensor(smiles_index)]], 1)


def target_fingerprint_baseline(
    target_ids: Sequence[str], smiles: Sequence[str], y: np.ndarray, split: Split, *, seed: int = 0
) -> np.ndarray:
    """Random forest on [Morgan fingerprint of the drug ‖ one-hot target]; predictions for ``split.test``."""
    from kiban.tasks.baselines import morgan_fingerprints
    from sklearn.ensemble import RandomForestRegressor

    unique_smiles, smiles_index = np.unique(np.asarray(smiles, dtype=object), return_inverse=True)
    fingerprints = morgan_fingerprints(list(unique_smiles))[smiles_index]
    targets, target_index = np.unique(np.asarray(target_ids, dtype=object), return_inverse=True)
    x = np.hstack([fingerprints, np.eye(len(targets), dtype=np.uint8)[target_index]])
    forest = RandomForestRegressor(n_estimators=200, random_state=seed, n_jobs=1)
    return forest.fit(x[split.train], y[split.train]).predict(x[split.test])


def evaluate_pairs(
    model: Any,
    *,
    target_ids: Sequence[str],
    proteins: Sequence[str],
    smiles: Sequence[str],
    y: np.ndarray,
    split: Split,
    label: str = "pKd",
    hidden_dim: int = 64,
    seed: int = 0,
    epochs: int = 200,
) -> tuple[PooledHead, list[dict[str, Any]]]:
    """Fit the pair head on ``split.train`` (early stopping on ``split.valid``); score head, baseline
    and the training mean on ``split.test``. Returns (head, results as in metrics.json)."""
    from kiban.tasks.baselines import trivial

    features = pair_features(model, proteins, smiles)
    targets = torch.as_tensor(np.asarray(y, dtype=np.float32)).unsqueeze(1)
    torch.manual_seed(seed)
    head = create_head(
        HeadConfig(
            task="dti",
            modality="protein+molecule",
            kind="regression",
            labels=[label],
            input_dim=features.shape[1],
            hidden_dim=hidden_dim,
            extra={"seed": seed},
        )
    )
    fit_head(
        head,
        features[split.train],
        targets[split.train],
        valid=(features[split.valid], targets[split.valid]) if len(split.valid) else None,
        settings=FitSettings(epochs=epochs, seed=seed, progress=False),
    )
    truth = targets[split.test].numpy()
    with torch.no_grad():
        predicted = head(features[split.test]).numpy()
    baseline = target_fingerprint_baseline(target_ids, smiles, np.asarray(y, dtype=float), split, seed=seed)[
        :, None
    ]
    mean = trivial("regression", targets[split.train].numpy(), len(split.test))
    side = {"split": "test", **split.describe()}
    return head, [
        {"model": "pair head over pooled states", **side, "metrics": head.metrics(predicted, truth)},
        {
            "model": "random forest on Morgan FP + target one-hot",
            **side,
            "metrics": head.metrics(baseline, truth),
        },
        {"model": "trivial (training mean)", **side, "metrics": head.metrics(mean, truth)},
    ]

"""Drug–target affinity on a real Davis subset with DeepDTA's folds: the pair head and the
fingerprint baseline beat the training mean.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kiban.tasks.dti import evaluate_pairs
from kiban.tasks.splits import Split


@pytest.fixture(scope="module")
def davis(shared_data):
    folder = shared_data / "dti"
    pairs = pd.read_csv(folder / "davis_pairs.csv")
    drugs = pd.read_csv(folder / "davis_drugs.csv").set_index("drug_id")["smiles"]
    targets = pd.read_csv(folder / "davis_targets.csv").set_index("target_id")["sequence"]
    rng = np.random.default_rng(0)
    chosen_drugs = rng.choice(pairs.drug_id.unique(), 16, replace=False)
    short = targets[targets.str.len() < 500].index
    chosen_targets = rng.choice(pairs.target_id[pairs.target_id.isin(short)].unique(), 30, replace=False)
    subset = pairs[pairs.drug_id.isin(chosen_drugs) & pairs.target_id.isin(chosen_targets)].reset_index(
        drop=True
    )
    return subset, drugs, targets


def test_pair_head_on_davis(davis):
    from kiban.tiny import tiny_model

    pairs, drugs, targets = davis
    assert len(pairs) == 16 * 30
    fold = pairs.deepdta_split.to_numpy()
    split = Split(
        "deepdta-fold",
        0,
        np.flatnonzero(~np.isin(fold, ["test", "train0"])),
        np.flatnonzero(fold == "train0"),
        np.flatnonzero(fold == "test"),
    )
    head, results = evaluate_pairs(
        tiny_model(["protein", "molecule"]).eval(),
        target_ids=pairs.target_id.tolist(),
        proteins=targets[pairs.target_id].tolist(),
        smiles=drugs[pairs.drug_id].tolist(),
        y=pairs.pKd.to_numpy(),
        split=split,
        epochs=60,
    )
    scores = {r["model"]: r["metrics"]["pKd"] for r in results}
    mean = scores["trivial (training mean)"]
    assert mean["concordance_index"] == 0.5
    assert scores["pair head over pooled states"]["concordance_index"] > 0.6
    assert scores["random forest on Morgan FP + target one-hot"]["concordance_index"] > 0.6
    assert head.config.input_dim == 64 and all(r["method"] == "deepdta-fold" for r in results)

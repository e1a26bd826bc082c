"""The field's molecule scores on hand-made sets whose answers are known, and the n-gram baseline."""

from __future__ import annotations

import pytest

from kiban.design.metrics import (
    NgramSmiles,
    fcd,
    internal_diversity,
    kl_score,
    molecule_scores,
    sample_training,
)

DRUGS = [
    "CC(=O)Oc1ccccc1C(=O)O", "CN1CCC[C@H]1c1cccnc1", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "O=C(O)CCc1ccccc1",
    "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "CC(=O)Nc1ccc(O)cc1", "COc1ccc2[nH]cc(CCN(C)C)c2c1", "OC(=O)c1ccccc1O",
]


def test_validity_uniqueness_and_novelty_count_as_moses_defines_them():
    scores = molecule_scores(
        ["CCO", "OCC", "c1ccccc1", None, "C1CC", DRUGS[0]], training={"CCO"}, reference=DRUGS, with_fcd=False
    )
    assert scores["n"] == 6 and scores["validity"] == pytest.approx(4 / 6)  # None and an open ring fail
    assert scores["uniqueness"] == pytest.approx(3 / 4)  # CCO and OCC are one molecule
    assert scores["novelty"] == pytest.approx(2 / 3)


def test_internal_diversity_is_zero_for_one_molecule_and_grows_with_difference():
    assert internal_diversity(["CCO", "OCC"]) == pytest.approx(0.0)
    assert 0.5 < internal_diversity(DRUGS) < 1.0


def test_kl_score_and_fcd_prefer_the_same_distribution():
    same = kl_score(DRUGS, DRUGS)
    alkanes = ["C" * k for k in range(2, 10)]
    assert same == pytest.approx(1.0, abs=1e-6) and kl_score(alkanes, DRUGS) < 0.5
    assert fcd(DRUGS, DRUGS) == pytest.approx(0.0, abs=1e-3) and fcd(alkanes, DRUGS) > 1.0


def test_the_baselines_sample_reproducibly_from_what_they_were_fitted_on():
    model = NgramSmiles(order=4).fit(DRUGS)
    one, two = model.sample(20, seed=3), model.sample(20, seed=3)
    assert one == two and model.sample(20, seed=4) != one
    assert set("".join(one)) <= set("".join(DRUGS))
    assert set(sample_training(DRUGS, 12, seed=0)) <= set(DRUGS)
    with pytest.raises(ValueError, match="fit the n-gram model"):
        NgramSmiles().sample(1)

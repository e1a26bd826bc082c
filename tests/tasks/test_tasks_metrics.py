"""Metric functions against scikit-learn / SciPy and against hand-computed values."""

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn import metrics as skm

from kiban.tasks.metrics import (
    concordance_index,
    confusion_matrix,
    per_class_f1,
    pr_auc,
    precision_at_l,
    rmse,
    roc_auc,
    spearman,
)

rng = np.random.default_rng(0)


@pytest.mark.parametrize("ties", [False, True])
def test_roc_and_pr_auc_match_sklearn(ties):
    y = rng.integers(0, 2, 200)
    s = y * 0.7 + rng.normal(size=200)
    if ties:
        s = np.round(s, 1)
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert pr_auc(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)


def test_auc_by_hand():
    # positives score 0.9, 0.4; negatives 0.5, 0.1: 3 of 4 pairs ordered -> 0.75
    assert roc_auc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == 0.75
    # ranking: + - + -: AP = 1/2 * 1 + 1/2 * 2/3
    assert pr_auc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.5 + 1 / 3)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.3])


def test_regression_metrics():
    y, p = rng.normal(size=100), rng.normal(size=100)
    assert rmse(y, p) == pytest.approx(np.sqrt(skm.mean_squared_error(y, p)))
    p[:10] = p[10]  # ties
    assert spearman(y, p) == pytest.approx(spearmanr(y, p).statistic)
    assert rmse([1, 2], [1, 4]) == pytest.approx(np.sqrt(2))


def test_concordance_index_by_hand():
    # pairs with y_i > y_j: (2,1),(3,1),(3,2); predictions 0.1, 0.3, 0.2 -> (2,1) ok, (3,1) ok, (3,2) wrong
    assert concordance_index([1, 2, 3], [0.1, 0.3, 0.2]) == pytest.approx(2 / 3)
    assert concordance_index([1, 2, 3], [0.5, 0.5, 0.9]) == pytest.approx(2.5 / 3)  # a tie counts 1/2
    y = rng.normal(size=50)
    assert concordance_index(y, y) == 1.0
    # equals ROC-AUC for binary labels (a CI over 0/1 is the Mann–Whitney statistic)
    yb, s = rng.integers(0, 2, 80), rng.normal(size=80)
    assert concordance_index(yb, s) == pytest.approx(skm.roc_auc_score(yb, s))


def test_classification_metrics_match_sklearn():
    y, p = rng.integers(0, 5, 300), rng.integers(0, 4, 300)  # class 4 never predicted
    np.testing.assert_array_equal(
        confusion_matrix(y, p, n_classes=5), skm.confusion_matrix(y, p, labels=range(5))
    )
    np.testing.assert_allclose(
        per_class_f1(y, p, n_classes=5), skm.f1_score(y, p, labels=range(5), average=None, zero_division=0)
    )


def test_precision_at_l_known_example():
    length = 30
    contacts = np.zeros((length, length), bool)
    scores = np.zeros((length, length))
    # long range (|i-j| >= 24): pairs (0,24), (0,25), (1,29), (2,27), (3,28), (5,29); L = 30 -> top 30 for P@L
    for (i, j), s, c in [
        ((0, 24), 0.9, 1),
        ((0, 25), 0.8, 0),
        ((1, 29), 0.7, 1),
        ((2, 27), 0.6, 1),
        ((3, 28), 0.5, 0),
        ((5, 29), 0.4, 1),
    ]:
        scores[i, j] = scores[j, i] = s
        contacts[i, j] = contacts[j, i] = c
    # a strong short-range pair must not count as long range
    scores[10, 16] = scores[16, 10] = 1.0
    contacts[10, 16] = contacts[16, 10] = True
    # L/5 = 6 -> top 6 long pairs by score: the six above (the other long pairs score 0 and rank later)
    assert precision_at_l(scores, contacts, fraction=0.2, separation="long") == pytest.approx(4 / 6)
    # L/10 = 3: 0.9 (hit), 0.8 (miss), 0.7 (hit)
    assert precision_at_l(scores, contacts, fraction=0.1, separation="long") == pytest.approx(2 / 3)
    # short range 6 <= |i-j| < 12: the (10,16) pair is the top one
    assert precision_at_l(scores, contacts, fraction=1 / 30, separation="short") == 1.0
    # P@L long: only 6+5+4+3+2+1 = 21 pairs are 24 or more apart in a 30-residue chain; all are taken
    assert precision_at_l(scores, contacts, fraction=1.0, separation="long") == pytest.approx(4 / 21)

"""Masked-marginal variant scoring: mutant parsing, the wild type scoring 0, additivity, a
brute-force check of one score, and Spearman against the real β-lactamase DMS (mechanics only:
with a tiny random encoder the correlation itself means nothing).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from kiban.tasks.metrics import spearman
from kiban.tasks.variants import masked_marginal_scores, parse_mutations


@pytest.fixture(scope="module")
def encoder():
    from kiban.encoders import create_encoder

    torch.manual_seed(0)
    return create_encoder("protein", preset="tiny").eval()


@pytest.fixture(scope="module")
def dms(shared_data):
    table = pd.read_csv(shared_data / "protein" / "sequences" / "beta_lactamase_P62593_dms.csv")
    # the synonymous rows (P20P) carry the wild-type sequence itself
    synonymous = table[table.mutation.str[0] == table.mutation.str[-1]]
    return table, synonymous.sequence.iloc[0]


def test_parse_mutations():
    assert parse_mutations("A2V:K3R", "MAKL") == [(1, "A", "V"), (2, "K", "R")]
    assert parse_mutations("A12V", "MAKL", offset=11) == [(1, "A", "V")]
    with pytest.raises(ValueError, match="has A at 2, not G"):
        parse_mutations("G2V", "MAKL")
    with pytest.raises(ValueError, match="outside"):
        parse_mutations("A9V", "MAKL")
    with pytest.raises(ValueError, match="not written like"):
        parse_mutations("2V", "MAKL")


def test_dms_mutations_parse_against_the_wild_type(dms):
    table, wild_type = dms
    assert len(wild_type) == 286
    sample = table.sample(200, random_state=0)
    for mutation, sequence in zip(sample.mutation, sample.sequence):
        [(index, wt, mt)] = parse_mutations(mutation, wild_type)
        assert (
            sequence[index] == mt
            and sequence[:index] == wild_type[:index]
            and sequence[index + 1 :] == wild_type[index + 1 :]
        )


def test_masked_marginal_mechanics(encoder, dms):
    table, wild_type = dms
    sample = table.sample(40, random_state=1)
    synonymous = f"{wild_type[19]}20{wild_type[19]}"
    singles = sample.mutation.tolist()
    scores = masked_marginal_scores(encoder, wild_type, [synonymous, *singles])
    assert scores[0] == 0.0
    assert np.isfinite(scores).all() and scores[1:].std() > 0
    # additivity: a double mutant is the sum of its singles
    a, b = "M1A", f"{wild_type[9]}10W"
    double = masked_marginal_scores(encoder, wild_type, [a, b, f"{a}:{b}"])
    assert double[2] == pytest.approx(double[0] + double[1], abs=1e-5)
    # brute force for one mutation: mask the position, read log-probabilities
    index, wt, mt = parse_mutations(singles[0], wild_type)[0]
    tokens = encoder.featurizer(wild_type)["tokens"].unsqueeze(0)
    tokens[0, index + 1] = encoder.model.mask_idx
    with torch.no_grad():
        logits = encoder.model(tokens)["logits"][0, index + 1]
    ids = encoder.featurizer.token_ids
    expected = float(logits.log_softmax(-1)[ids[mt]] - logits.log_softmax(-1)[ids[wt]])
    assert scores[1] == pytest.approx(expected, abs=1e-5)
    rho = spearman(sample.fitness, scores[1:])
    assert -1.0 <= rho <= 1.0 and not math.isnan(rho)

"""Protein design: fixed positions never change, the same seed gives the same designs, the PLL is
the sum of masked log-probabilities, and bad positions are refused with one line naming them.
"""

from __future__ import annotations

import pytest
import torch

from kiban.design import design_proteins, parse_positions, pseudo_log_likelihood
from kiban.design.proteins import STANDARD, identity, random_mutants, write_fasta
from kiban.encoders import create_encoder

TEMPLATE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ"


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return create_encoder("protein", preset="tiny").eval()


def test_fixed_positions_never_change_and_free_ones_do(encoder):
    fixed = parse_positions("1-20,45", len(TEMPLATE))
    designs = design_proteins(encoder, TEMPLATE, n=4, fixed=fixed, steps=40, temperature=2.0, seed=0)
    assert len(designs) == 4
    for design in designs:
        assert len(design.sequence) == len(TEMPLATE) and set(design.sequence) <= set(STANDARD)
        assert all(design.sequence[i] == TEMPLATE[i] for i in fixed)
        assert design.mutations and all(int(m[1:-1]) - 1 not in fixed for m in design.mutations)
    assert len({d.sequence for d in designs}) > 1


def test_the_same_seed_gives_the_same_designs(encoder):
    one = design_proteins(encoder, TEMPLATE[:30], n=2, steps=8, seed=11)
    two = design_proteins(encoder, TEMPLATE[:30], n=2, steps=8, seed=11)
    other = design_proteins(encoder, TEMPLATE[:30], n=2, steps=8, seed=12)
    assert [d.sequence for d in one] == [d.sequence for d in two]
    assert [d.pll for d in one] == pytest.approx([d.pll for d in two])
    assert [d.sequence for d in one] != [d.sequence for d in other]


def test_pseudo_log_likelihood_is_the_sum_of_masked_log_probabilities(encoder):
    sequence = TEMPLATE[:12]
    tokens = encoder.featurizer(sequence)["tokens"]
    ids = torch.tensor([encoder.featurizer.token_ids[a] for a in STANDARD])
    expected = 0.0
    with torch.no_grad():
        for i, residue in enumerate(sequence):
            masked = tokens.clone()[None]
            masked[0, i + 1] = encoder.model.mask_idx
            logits = encoder.model(masked)["logits"][0, i + 1, ids]
            expected += float(torch.log_softmax(logits, -1)[STANDARD.index(residue)])
    assert pseudo_log_likelihood(encoder, [sequence], batch_size=5)[0] == pytest.approx(expected, abs=1e-4)


def test_random_mutants_have_the_asked_number_of_changes_off_the_fixed_positions():
    fixed = list(range(10))
    mutants = random_mutants(TEMPLATE, [0, 3, 7], fixed=fixed, seed=0)
    assert [sum(a != b for a, b in zip(m, TEMPLATE)) for m in mutants] == [0, 3, 7]
    assert all(m[:10] == TEMPLATE[:10] for m in mutants)
    assert identity(mutants[1], TEMPLATE) == pytest.approx(1 - 3 / len(TEMPLATE))


def test_fasta_headers_carry_the_scores(encoder):
    designs = design_proteins(encoder, TEMPLATE[:30], n=2, steps=5, seed=0)
    text = write_fasta(designs, TEMPLATE[:30])
    headers = [line for line in text.splitlines() if line.startswith(">")]
    assert headers[0].startswith(">design_1 pll=") and "pll_per_residue=" in headers[0] and "identity=" in headers[0]
    assert "".join(line for line in text.splitlines()[1:] if not line.startswith(">")).startswith(designs[0].sequence)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1-20,x", r"--fixed 'x' is not a position or range"),
        ("70", r"--fixed '70' is outside the 66-residue template \(positions 1-66\)"),
        ("9-3", r"runs backwards"),
    ],
)
def test_bad_fixed_positions_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_positions(text, len(TEMPLATE))


def test_nothing_left_to_design_and_bad_templates_are_refused(encoder):
    with pytest.raises(ValueError, match="nothing is left to design"):
        design_proteins(encoder, TEMPLATE[:5], n=1, fixed=[0, 1, 2, 3, 4])
    from kiban.encoders.base import InvalidInput

    with pytest.raises(InvalidInput, match="template"):
        design_proteins(encoder, "MKT#AY", n=1)

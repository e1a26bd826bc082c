"""Per-residue 3-state secondary structure head: metrics by hand, mechanics on synthetic tokens,
and a run on real DSSP labels beating the majority state (skipped without the shared data).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiban.tasks.secondary import SS3, ResidueHead, evaluate_secondary_structure, q3_metrics, read_ss3


def test_q3_metrics_by_hand():
    true = np.array([0, 0, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 2, 2, 0])
    m = q3_metrics(true, predicted)
    assert m["residues"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    # C: tp 1, fp 1, fn 1 -> 0.5; E: tp 1, fp 1, fn 0 -> 2/3; H: tp 2, fp 0, fn 1 -> 0.8
    assert m["per_class_f1"] == pytest.approx({"C": 0.5, "E": 2 / 3, "H": 0.8})
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


def test_residue_head_learns_windowed_states():
    """A state that depends on the neighbours (a residue is H when its left neighbour's feature 0 is
    positive): the windowed head learns it, per residue, far above the majority state.
    """
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(20):
        tokens = torch.randn(40, 6, generator=generator)
        states = torch.zeros(40, dtype=torch.long)
        states[1:] = torch.where(tokens[:-1, 0] > 0, 2, 0)
        examples.append((tokens, states))
    torch.manual_seed(0)
    head = ResidueHead(6, hidden=16)
    history = head.fit(examples[:16], epochs=10)
    assert history[-1] < history[0]
    with torch.no_grad():
        predicted = torch.cat([head(t).argmax(-1) for t, _ in examples[16:]]).numpy()
    true = torch.cat([s for _, s in examples[16:]]).numpy()
    majority = np.bincount(true).max() / len(true)
    assert q3_metrics(true, predicted)["accuracy"] > majority + 0.2


def test_secondary_structure_on_real_dssp_beats_majority(shared_data):
    from kiban.encoders import create_encoder

    rows = read_ss3(
        shared_data / "protein" / "sequences" / "secondary_structure_pdb_2000.csv", n=100, max_length=250
    )
    assert len(rows) == 100 and all(set(t) <= set(SS3) for _, t in rows)
    torch.manual_seed(0)
    encoder = create_encoder("protein", preset="tiny").eval()
    report = evaluate_secondary_structure(encoder, rows, epochs=6)
    assert report["split"]["method"] == "length-stratified" and report["split"]["sizes"]["valid"] == 0
    results = {r["model"].split(" ")[0]: r["metrics"] for r in report["results"]}
    head, trivial = results["residue"], results["trivial"]
    assert head["residues"] == trivial["residues"] > 1000
    assert head["accuracy"] > trivial["accuracy"] + 0.05

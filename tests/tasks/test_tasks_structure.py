"""Contact labels from a real PDB against hand-checked pairs, ESM-2's attention features, and the
attention contact head + separation prior over a tiny protein encoder on real structures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kiban.tasks.structure import (
    AttentionContactHead,
    apc,
    attention_features,
    contact_labels,
    contact_metrics,
    prior_scores,
    separation_prior,
    symmetrize,
)

LYSOZYME = "biotite_1aki_A.pdb"  # hen egg-white lysozyme, 129 residues, numbered 1..129


@pytest.fixture(scope="module")
def structures(shared_data):
    return shared_data / "protein" / "structures"


def _atoms_by_hand(path):
    """Cβ (Cα for Gly) of each residue, read from the fixed PDB columns without Biopython."""
    points = {}
    for line in path.read_text().splitlines():
        if not line.startswith("ATOM"):
            continue
        name, residue, number = line[12:16].strip(), line[17:20], int(line[22:26])
        if name == ("CA" if residue == "GLY" else "CB"):
            points[number] = np.array([float(line[30:38]), float(line[38:46]), float(line[46:54])])
    return points


def test_contact_labels_match_hand_checked_pairs(structures):
    labels = contact_labels(structures / LYSOZYME)
    manifest = pd.read_csv(structures / "manifest.csv").set_index("file")
    assert labels.sequence == manifest.loc[LYSOZYME, "sequence"]
    assert labels.numbers == list(range(1, 130)) and labels.valid.all()
    # the four disulfides of lysozyme: bonded cysteines' Cβ atoms are ~3.7 Å apart
    for a, b in [(6, 127), (30, 115), (64, 80), (76, 94)]:
        assert labels.sequence[a - 1] == labels.sequence[b - 1] == "C"
        assert labels.contacts[a - 1, b - 1] and labels.distances[a - 1, b - 1] < 4.5
    # glycine 4 is placed at its Cα (it has no Cβ)
    points = _atoms_by_hand(structures / LYSOZYME)
    assert labels.sequence[3] == "G"
    assert labels.distances[3, 9] == pytest.approx(np.linalg.norm(points[4] - points[10]), abs=1e-3)
    # every pair of residues 1..40 against the distances computed from the raw ATOM columns
    by_hand = {
        (i, j) for i in range(1, 41) for j in range(i + 1, 41) if np.linalg.norm(points[i] - points[j]) < 8.0
    }
    computed = {(i + 1, j + 1) for i, j in zip(*np.nonzero(np.triu(labels.contacts[:40, :40], 1)))}
    assert computed == by_hand
    assert labels.contacts.T.tolist() == labels.contacts.tolist()


def test_apc_and_symmetrize_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert symmetrize(x).tolist() == [[2.0, 5.0], [5.0, 8.0]]
    # APC: x_ij - row_i * col_j / total: row sums 3, 7; column sums 4, 6; total 10
    expected = [[1 - 3 * 4 / 10, 2 - 3 * 6 / 10], [3 - 7 * 4 / 10, 4 - 7 * 6 / 10]]
    assert torch.allclose(apc(x), torch.tensor(expected))


def test_attention_contact_head_and_prior_on_real_structures(structures):
    from kiban.encoders import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("protein", preset="tiny").eval()
    files = sorted(structures.glob("biotite_*.pdb"))[:6]
    examples = []
    for path in files:
        labels = contact_labels(path)
        if len(labels.sequence) > 200 or "X" in labels.sequence:
            continue
        tokens = encoder.featurizer.collate([encoder.featurizer(labels.sequence)])["tokens"]
        with torch.no_grad():
            attentions = encoder(tokens, return_attentions=True).attentions[0]
        examples.append((attention_features(attentions), labels.contacts, labels.valid))
    assert len(examples) >= 3
    train, test = examples[:-1], examples[-1]
    features, contacts, valid = test
    layers_heads = features.shape[-1]
    assert layers_heads == encoder.config.num_layers * encoder.config.attention_heads
    head = AttentionContactHead(layers_heads)
    history = head.fit(train, epochs=100)
    assert history[-1] < history[0]
    with torch.no_grad():
        scores = head(features).sigmoid().numpy()
    metrics = contact_metrics(scores, contacts, valid)
    assert set(metrics) == {f"{r}_P@{k}" for r in ("short", "medium", "long") for k in ("L", "L/2", "L/5")}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # the separation prior: contacts are likelier between near residues; it beats the short-range base rate
    prior = separation_prior([(c, v) for _, c, v in train])
    assert prior[6] > prior[40]
    baseline = contact_metrics(prior_scores(prior, len(contacts)), contacts, valid)
    i, j = np.triu_indices(len(contacts), 6)
    short_rate = contacts[i[j - i < 12], j[j - i < 12]].mean()
    assert baseline["short_P@L/5"] > short_rate


def test_evaluate_contacts_splits_by_structure(structures):
    from kiban.encoders import create_encoder
    from kiban.tasks.contact_fitting import evaluate_contacts

    torch.manual_seed(0)
    encoder = create_encoder("protein", preset="tiny").eval()
    files = sorted(structures.glob("foldseek_d1*.pdb"))[:8] or sorted(structures.glob("*.pdb"))[:8]
    report = evaluate_contacts(encoder, files, max_length=200, epochs=30, pairwise_epochs=5)
    sizes = report["split"]["sizes"]
    assert report["split"]["method"] == "length-stratified" and sizes["valid"] == 0
    assert sizes["train"] + sizes["test"] + report["skipped"] == len(files)
    assert len(report["test_structures"]) == sizes["test"] >= 1
    models = {r["model"] for r in report["results"]}
    assert models == {
        "attention logistic regression",
        "pairwise MLP on encoder tokens",
        "sequence-separation prior",
    }
    for result in report["results"]:
        assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())

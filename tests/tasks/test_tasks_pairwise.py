"""The supervised pairwise contact head: mechanics on synthetic structures (always runs) and an
evaluation against the sequence-separation prior on a few real PDB chains (skipped without data).
"""

from __future__ import annotations

import numpy as np
import torch

from kiban.tasks.structure import (
    PairwiseContactHead,
    contact_labels,
    contact_metrics,
    prior_scores,
    separation_prior,
)


def _synthetic_protein(rng, length=80):
    """A random 3D chain (3.8 Å steps, compacted); tokens carry the coordinates plus noise, so contacts
    are learnable from token pairs while the separation prior alone cannot place them.
    """
    steps = rng.normal(size=(length, 3))
    steps = 3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True)
    xyz = np.cumsum(steps, 0)
    xyz = (xyz - xyz.mean(0)) * 0.6  # compact it so long-range contacts exist
    distances = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
    contacts = distances < 8.0
    tokens = np.concatenate([xyz / 10.0, rng.normal(size=(length, 5))], 1)
    return torch.tensor(tokens, dtype=torch.float32), contacts, np.ones_like(contacts)


def test_pairwise_head_learns_synthetic_contacts():
    rng = np.random.default_rng(0)
    proteins = [_synthetic_protein(rng) for _ in range(12)]
    train, test = proteins[:10], proteins[10:]
    torch.manual_seed(0)
    head = PairwiseContactHead(8, project=16, hidden=32)
    history = head.fit(train, epochs=40)
    assert history[-1] < 0.8 * history[0]
    tokens, contacts, valid = test[0]
    with torch.no_grad():
        logits = head(tokens)
    assert logits.shape == (80, 80) and torch.allclose(logits, logits.T, atol=1e-5)  # symmetric
    prior = separation_prior([(c, v) for _, c, v in train])
    head_scores, prior_s = [], []
    for tokens, contacts, valid in test:
        with torch.no_grad():
            head_scores.append(contact_metrics(head(tokens).sigmoid().numpy(), contacts, valid))
        prior_s.append(contact_metrics(prior_scores(prior, len(contacts)), contacts, valid))

    def mean(rows, k):
        return float(np.nanmean([r[k] for r in rows]))

    assert mean(head_scores, "long_P@L/5") > mean(prior_s, "long_P@L/5") + 0.2


def test_pairwise_head_ignores_pairs_closer_than_six():
    """Labels of |i - j| < 6 pairs never reach the loss: flipping them changes nothing in training."""
    rng = np.random.default_rng(1)
    tokens, contacts, valid = _synthetic_protein(rng, 40)
    flipped = contacts.copy()
    i, j = np.triu_indices(40, k=1)
    near = (j - i) < 6
    flipped[i[near], j[near]] = ~flipped[i[near], j[near]]
    runs = []
    for labels in (contacts, flipped):
        torch.manual_seed(0)
        head = PairwiseContactHead(8, project=8, hidden=8)
        runs.append(head.fit([(tokens, labels, valid)], epochs=3))
    assert runs[0] == runs[1]


def test_pairwise_head_vs_separation_prior_on_real_pdbs(shared_data):
    """A few real chains, tokens from the tiny (random) protein encoder: the head trains and is
    scored by precision@L per range beside the separation prior fitted on the same training chains.
    """
    from kiban.encoders import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("protein", preset="tiny").eval()
    examples = []
    for path in sorted((shared_data / "protein" / "structures").glob("biotite_*.pdb"))[:6]:
        labels = contact_labels(path)
        if len(labels.sequence) > 200 or "X" in labels.sequence:
            continue
        batch = encoder.featurizer.collate([encoder.featurizer(labels.sequence)])
        with torch.no_grad():
            tokens = encoder(batch["tokens"]).embeddings[0]
        assert len(tokens) == len(labels.sequence)
        examples.append((tokens, labels.contacts, labels.valid))
    assert len(examples) >= 3
    train, test = examples[:-1], examples[-1]
    head = PairwiseContactHead(examples[0][0].shape[-1])
    history = head.fit(train, epochs=15)
    assert history[-1] < history[0]
    tokens, contacts, valid = test
    with torch.no_grad():
        metrics = contact_metrics(head(tokens).sigmoid().numpy(), contacts, valid)
    prior = separation_prior([(c, v) for _, c, v in train])
    baseline = contact_metrics(prior_scores(prior, len(contacts)), contacts, valid)
    assert set(metrics) == set(baseline)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # the head has a separation embedding: it should at least reach the prior's short-range precision
    assert metrics["short_P@L/5"] >= baseline["short_P@L/5"] - 0.15


def _write_synthetic_pdb(path, rng, length=40):
    """A single-chain PDB of alanines (CA and CB) along a compact random walk."""
    steps = rng.normal(size=(length, 3))
    xyz = np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True), 0) * 0.6
    lines, serial = [], 1
    for k, (x, y, z) in enumerate(xyz, start=1):
        for name, shift in (("CA", 0.0), ("CB", 1.0)):
            lines.append(
                f"ATOM  {serial:5d}  {name:<3s} ALA A{k:4d}    {x + shift:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C"
            )
            serial += 1
    path.write_text("\n".join(lines + ["END"]) + "\n")


def test_finetune_contacts_command_on_synthetic_pdbs(tmp_path, capsys):
    """Always runs: ``kiban finetune contacts --data DIR`` on six synthetic PDB files writes
    metrics.json (three models, by range) and the contact-map PNG; a bad folder leaves nothing.
    """
    import json

    from kiban.cli import main

    rng = np.random.default_rng(0)
    folder = tmp_path / "pdbs"
    folder.mkdir()
    for k in range(6):
        _write_synthetic_pdb(folder / f"s{k}.pdb", rng, 30 + 5 * k)
    out = tmp_path / "run"
    assert main(["finetune", "contacts", "--data", str(folder), "--out", str(out), "--epochs", "5"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"]["method"] == "length-stratified" and metrics["n"] == 6
    assert {r["model"] for r in metrics["results"]} == {
        "attention logistic regression",
        "pairwise MLP on encoder tokens",
        "sequence-separation prior",
    }
    assert (out / "plots" / "contact_map.png").is_file()
    assert "long P@L" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["finetune", "contacts", "--data", str(empty), "--out", str(tmp_path / "bad")]) == 2
    assert "no .pdb / .cif structure files" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

"""Structure tasks: residue–residue contacts from a protein.

Labels: ``contact_labels(pdb)`` reads one chain with Biopython (PDB or mmCIF) and marks pairs
whose Cβ atoms (Cα for glycine) lie closer than 8 Å — the CASP / ESM-2 definition. Residues
without that atom are left out of scoring through the ``valid`` mask.

Predictor: ``AttentionContactHead`` is ESM-2's contact head (Rao et al. 2021, "Transformer protein
language models are unsupervised structure learners"): every layer's and head's attention map,
symmetrised and APC-corrected, feeds a logistic regression over the ``layers * heads`` features of
each pair. Baseline: ``separation_prior``, the contact rate of each sequence separation |i - j|
in the training structures. Metrics: ``kiban.tasks.metrics.precision_at_l``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kiban.tasks.metrics import precision_at_l
from torch import Tensor, nn

__all__ = [
    "AttentionContactHead",
    "ChainContacts",
    "apc",
    "contact_labels",
    "contact_metrics",
    "evaluate_contacts",
    "separation_prior",
    "symmetrize",
]

CONTACT_DISTANCE = 8.0  # Å, Cβ–Cβ (Cα for glycine)


@dataclass
class ChainContacts:
    """sequence: one letter per residue read; contacts, valid: [L, L] booleans; numbers: residue ids."""

    sequence: str
    contacts: np.ndarray
    valid: np.ndarray
    numbers: list[int]
    distances: np.ndarray


def contact_labels(
    path: str | Path, *, chain: str | None = None, threshold: float = CONTACT_DISTANCE
) -> ChainContacts:
    """Contacts of one chain (the first, unless ``chain`` names one) of model 1 of a PDB / mmCIF file."""
    from Bio.PDB import MMCIFParser, PDBParser
    from Bio.PDB.Polypeptide import is_aa, protein_letters_3to1

    path = Path(path)
    parser = MMCIFParser(QUIET=True) if path.suffix.lower() in (".cif", ".mmcif") else PDBParser(QUIET=True)
    model = next(iter(parser.get_structure(path.stem, str(path))))
    chains = {c.id: c for c in model}
    if not chains:
        raise ValueError(f"{path}: no chain in model 1")
    if chain is not None and chain not in chains:
        raise ValueError(f"{path}: no chain {chain!r}; chains: {', '.join(chains)}")
    residues = [r for r in chains[chain or next(iter(chains))] if r.id[0] == " " and is_aa(r, standard=True)]
    if not residues:
        raise ValueError(f"{path}: the chain has no standard amino-acid residue")
    coordinates = np.full((len(residues), 3), np.nan)
    for k, residue in enumerate(residues):
        atom = "CA" if residue.get_resname() == "GLY" else "CB"
        if atom in residue:
            coordinates[k] = residue[atom].coord
    distances = np.linalg.norm(coordinates[:, None] - coordinates[None], axis=-1)
    valid = ~np.isnan(distances)
    contacts = np.where(valid, distances < threshold, False)
    sequence = "".join(protein_letters_3to1.get(r.get_resname(), "X") for r in residues)
    return ChainContacts(sequence, contacts, valid, [r.id[1] for r in residues], distances)


# ----------------------------------------------------------------------------------------------
# ESM-2's attention features


def symmetrize(x: Tensor) -> Tensor:
    """x + x^T over the last two dimensions."""
    return x + x.transpose(-1, -2)


def apc(x: Tensor) -> Tensor:
    """Average product correction (Dunn et al. 2008), as in ESM: x - (row sum x column sum) / total."""
    a1 = x.sum(-1, keepdims=True)
    a2 = x.sum(-2, keepdims=True)
    return x - a1 * a2 / x.sum((-1, -2), keepdims=True).clamp(min=1e-12)


def attention_features(attentions: Tensor) -> Tensor:
    """[layers, heads, L, L] attention of one protein -> [L, L, layers * heads] pair features."""
    layers, heads, length, _ = attentions.shape
    x = apc(symmetrize(attentions.float().reshape(layers * heads, length, length)))
    return x.permute(1, 2, 0)


class AttentionContactHead(nn.Module):
    """Logistic regression on APC-corrected symmetrised attention: [L, L, F] -> contact logits [L, L]."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.regression = nn.Linear(in_features, 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.regression(features).squeeze(-1)

    def fit(
        self,
        examples: Sequence[tuple[Tensor, np.ndarray, np.ndarray]],
        *,
        min_separation: int = 6,
        epochs: int = 200,
        l1: float = 1e-3,
        lr: float = 0.05,
    ) -> list[float]:
        """Train on (features [L, L, F], contacts [L, L], valid [L, L]) per protein; pairs with
        |i - j| >= ``min_separation`` only. An L1 penalty as in ESM-2 (which fitted 20 proteins)."""
        xs, ys = [], []
        for features, contacts, valid in examples:
            i, j = np.triu_indices(len(contacts), k=min_separation)
            keep = valid[i, j]
            xs.append(features[i[keep], j[keep]])
            ys.append(torch.as_tensor(contacts[i[keep], j[keep]], dtype=torch.float32))
        x, y = torch.cat(xs), torch.cat(ys)
        optimiser = torch.optim.Adam(self.parameters(), lr=lr)
        history = []
        for _ in range(epochs):
            loss = (
                nn.functional.binary_cross_entropy_with_logits(self(x), y)
                + l1 * self.regression.weight.abs().sum()
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            history.append(float(loss.detach()))
        return history


def separation_prior(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], *, max_separation: int = 1024
) -> np.ndarray:
    """Contact rate by separation |i - j| over training (contacts, valid) maps: [max_separation] scores."""
    hits, seen = np.zeros(max_separation), np.zeros(max_separation)
    for contacts, valid in examples:
        i, j = np.triu_indices(len(contacts), k=1)
        d = np.minimum(j - i, max_separation - 1)
        np.add.at(hits, d, (contacts[i, j] & valid[i, j]).astype(float))
        np.add.at(seen, d, valid[i, j].astype(float))
    return np.divide(hits, seen, out=np.zeros_like(hits), where=seen > 0)


def prior_scores(prior: np.ndarray, length: int) -> np.ndarray:
    """[L, L] scores of the separation prior for a protein of ``length`` residues."""
    index = np.arange(length)
    return prior[np.minimum(np.abs(index[:, None] - index[None]), len(prior) - 1)]


def contact_metrics(scores: np.ndarray, contacts: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """P@L, P@L/2, P@L/5 for short, medium and long range: keys like ``long_P@L/5``."""
    out = {}
    for separation in ("short", "medium", "long"):
        for name, fraction in (("L", 1.0), ("L/2", 0.5), ("L/5", 0.2)):
            out[f"{separation}_P@{name}"] = precision_at_l(
                scores, contacts, fraction=fraction, separation=separation, valid=valid
            )
    return out


def evaluate_contacts(
    encoder: Any,
    files: Sequence[str | Path],
    *,
    seed: int = 0,
    max_length: int = 400,
    epochs: int = 200,
) -> dict[str, Any]:
    """Contact head vs. separation prior over a set of structures, split by structure.

    Chains longer than ``max_length`` or with non-standard residues are skipped (and counted). The
    structures are split length-stratified (``splits.length_stratified_split``, no validation side);
    the head and the prior are fitted on train and their precisions averaged over test proteins.
    Returns a metrics.json-style dict: split, seed, and per model the mean of ``contact_metrics``.
    """
    from kiban.tasks.splits import length_stratified_split

    examples, names, skipped = [], [], 0
    for path in files:
        labels = contact_labels(path)
        if len(labels.sequence) > max_length or "X" in labels.sequence:
            skipped += 1
            continue
        tokens = encoder.featurizer.collate([encoder.featurizer(labels.sequence)])["tokens"]
        with torch.no_grad():
            attentions = encoder(tokens, return_attentions=True).attentions[0]
        examples.append((attention_features(attentions), labels.contacts, labels.valid))
        names.append(Path(path).name)
    if len(examples) < 4:
        raise ValueError(f"need at least 4 usable structures, got {len(examples)} ({skipped} skipped)")
    split = length_stratified_split([len(c) for _, c, _ in examples], valid=0.0, test=0.3, seed=seed)
    train = [examples[i] for i in split.train]
    torch.manual_seed(seed)
    head = AttentionContactHead(examples[0][0].shape[-1])
    head.fit(train, epochs=epochs)
    prior = separation_prior([(c, v) for _, c, v in train])
    per_model: dict[str, list[dict[str, float]]] = {
        "attention logistic regression": [],
        "sequence-separation prior": [],
    }
    for i in split.test:
        features, contacts, valid = examples[i]
        with torch.no_grad():
            scores = head(features).sigmoid().numpy()
        per_model["attention logistic regression"].append(contact_metrics(scores, contacts, valid))
        per_model["sequence-separation prior"].append(
            contact_metrics(prior_scores(prior, len(contacts)), contacts, valid)
        )
    results = [
        {
            "model": model,
            "split": "test",
            "metrics": {k: float(np.nanmean([m[k] for m in rows])) for k in rows[0]},
        }
        for model, rows in per_model.items()
    ]
    return {
        "split": split.describe(),
        "seed": seed,
        "skipped": skipped,
        "test_structures": [names[i] for i in split.test],
        "results": results,
    }

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
    "PairwiseContactHead",
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


class PairwiseContactHead(nn.Module):
    """Supervised pairwise head over per-residue encoder tokens: [L, D] -> contact logits [L, L].

    Each residue is projected to ``project`` features a_i; a pair (i, j) reads the symmetric
    features [a_i * a_j, |a_i - a_j|, a_i + a_j] (outer-product diagonal and concatenation) plus a
    learned embedding of its binned sequence separation, through a one-hidden-layer MLP. Trained with
    binary cross-entropy on PDB-derived labels over pairs with |i - j| >= ``min_separation``.
    """

    SEPARATION_BINS = (6, 9, 12, 16, 24, 32, 48, 64, 96, 128)

    def __init__(self, in_features: int, *, project: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, project))
        self.separation = nn.Embedding(len(self.SEPARATION_BINS) + 1, 3 * project)
        self.mlp = nn.Sequential(nn.Linear(3 * project, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def _pairs(self, tokens: Tensor, i: Tensor, j: Tensor) -> Tensor:
        a = self.project(tokens.float())
        left, right = a[i], a[j]
        bins = torch.bucketize(
            (j - i).abs(), torch.tensor(self.SEPARATION_BINS, device=tokens.device), right=True
        )
        features = torch.cat([left * right, (left - right).abs(), left + right], -1) + self.separation(bins)
        return self.mlp(features).squeeze(-1)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [L, D] of one protein -> symmetric logits [L, L]."""
        length = len(tokens)
        i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
        return self._pairs(tokens, i.reshape(-1), j.reshape(-1)).reshape(length, length)

    def fit(
        self,
        examples: Sequence[tuple[Tensor, np.ndarray, np.ndarray]],
        *,
        min_separation: int = 6,
        epochs: int = 100,
        lr: float = 3e-3,
        weight_decay: float = 1e-2,
        seed: int = 0,
    ) -> list[float]:
        """Train on (tokens [L, D], contacts [L, L], valid [L, L]) per protein, one protein a step;
        pairs with |i - j| >= ``min_separation`` and valid labels only. Returns the mean loss per epoch."""
        pairs = []
        for tokens, contacts, valid in examples:
            i, j = np.triu_indices(len(contacts), k=min_separation)
            keep = valid[i, j]
            pairs.append(
                (
                    tokens.detach().float(),
                    torch.as_tensor(i[keep]),
                    torch.as_tensor(j[keep]),
                    torch.as_tensor(contacts[i[keep], j[keep]], dtype=torch.float32),
                )
            )
        generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
        history = []
        self.train()
        for _ in range(epochs):
            total = 0.0
            for k in torch.randperm(len(pairs), generator=generator).tolist():
                tokens, i, j, y = pairs[k]
                loss = nn.functional.binary_cross_entropy_with_logits(self._pairs(tokens, i, j), y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach())
            history.append(total / max(len(pairs), 1))
        self.eval()
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
    pairwise_epochs: int = 30,
    plot: str | Path | None = None,
) -> dict[str, Any]:
    """Contact heads (attention logistic regression; supervised pairwise MLP on the encoder's
    per-residue tokens, ``pairwise_epochs`` passes) vs. separation prior, split by structure.
    ``plot``: a PNG path for the first test structure's contact map (pairwise head vs. true).

    Chains longer than ``max_length`` or with non-standard residues are skipped (and counted). The
    structures are split length-stratified (``splits.length_stratified_split``, no validation side);
    the head and the prior are fitted on train and their precisions averaged over test proteins.
    Returns a metrics.json-style dict: split, seed, and per model the mean of ``contact_metrics``.
    """
    from kiban.tasks.splits import length_stratified_split

    examples, residue_tokens, names, skipped = [], [], [], 0
    for path in files:
        labels = contact_labels(path)
        if len(labels.sequence) > max_length or "X" in labels.sequence:
            skipped += 1
            continue
        tokens = encoder.featurizer.collate([encoder.featurizer(labels.sequence)])["tokens"]
        with torch.no_grad():
            out = encoder(tokens, return_attentions=True)
        examples.append((attention_features(out.attentions[0]), labels.contacts, labels.valid))
        residue_tokens.append(out.embeddings[0])
        names.append(Path(path).name)
    if len(examples) < 4:
        raise ValueError(f"need at least 4 usable structures, got {len(examples)} ({skipped} skipped)")
    split = length_stratified_split([len(c) for _, c, _ in examples], valid=0.0, test=0.3, seed=seed)
    train = [examples[i] for i in split.train]
    torch.manual_seed(seed)
    head = AttentionContactHead(examples[0][0].shape[-1])
    head.fit(train, epochs=epochs)
    prior = separation_prior([(c, v) for _, c, v in train])
    pairwise = PairwiseContactHead(residue_tokens[0].shape[-1])
    pairwise.fit(
        [(residue_tokens[i], examples[i][1], examples[i][2]) for i in split.train],
        epochs=pairwise_epochs,
        seed=seed,
    )
    per_model: dict[str, list[dict[str, float]]] = {
        "attention logistic regression": [],
        "pairwise MLP on encoder tokens": [],
        "sequence-separation prior": [],
    }
    for i in split.test:
        features, contacts, valid = examples[i]
        with torch.no_grad():
            scores = head(features).sigmoid().numpy()
        per_model["attention logistic regression"].append(contact_metrics(scores, contacts, valid))
        with torch.no_grad():
            pair_scores = pairwise(residue_tokens[i]).sigmoid().numpy()
        per_model["pairwise MLP on encoder tokens"].append(contact_metrics(pair_scores, contacts, valid))
        if plot is not None and i == split.test[0]:
            from kiban.tasks.plots import contact_map_plot

            Path(plot).parent.mkdir(parents=True, exist_ok=True)
            contact_map_plot(
                Path(plot), pair_scores, contacts, title=f"{names[i]}: pairwise head (upper) / true (lower)"
            )
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

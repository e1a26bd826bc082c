"""Per-residue secondary structure (3-state DSSP: H helix, E strand, C coil) over encoder tokens.

The head reads the protein encoder's per-residue tokens [L, D] and predicts one of the 3 states
per residue: a 1-D convolution over a window of residues (kernel 7), GELU, then a linear layer;
cross-entropy over residues. Evaluation is per-residue accuracy (Q3), macro F1 and per-class F1 on
held-out proteins of a length-stratified split, beside two baselines: the majority class of the
training residues, and each amino acid's most frequent state in training (a propensity table).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kiban.tasks import metrics as M
from torch import Tensor, nn

__all__ = ["ResidueHead", "evaluate_secondary_structure", "q3_metrics", "read_ss3"]

SS3 = ("C", "E", "H")


def read_ss3(
    path: str | Path, *, n: int | None = None, max_length: int = 400, seed: int = 0
) -> list[tuple[str, str]]:
    """(sequence, ss3) pairs of a CSV with ``sequence`` and ``ss3`` columns; rows whose lengths differ,
    longer than ``max_length`` or with states outside C/E/H are dropped; ``n`` samples that many."""
    import pandas as pd

    frame = pd.read_csv(path)
    rows = [
        (s, t)
        for s, t in zip(frame["sequence"].astype(str), frame["ss3"].astype(str))
        if len(s) == len(t) and len(s) <= max_length and set(t) <= set(SS3)
    ]
    if n is not None and n < len(rows):
        pick = np.random.default_rng(seed).choice(len(rows), n, replace=False)
        rows = [rows[i] for i in sorted(pick)]
    return rows


class ResidueHead(nn.Module):
    """Per-residue tokens [L, D] -> logits [L, 3] (windowed: Conv1d kernel ``window`` then a linear layer)."""

    def __init__(
        self, in_features: int, *, hidden: int = 64, window: int = 7, n_classes: int = len(SS3)
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.conv = nn.Conv1d(in_features, hidden, window, padding=window // 2)
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.norm(tokens.float()).T.unsqueeze(0)  # [1, D, L]
        return self.out(nn.functional.gelu(self.conv(x))[0].T)

    def fit(
        self, examples: Sequence[tuple[Tensor, Tensor]], *, epochs: int = 10, lr: float = 3e-3, seed: int = 0
    ) -> list[float]:
        """Train on (tokens [L, D], states [L] class indices), one protein a step; mean loss per epoch."""
        generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=1e-2)
        history = []
        self.train()
        for _ in range(epochs):
            total = 0.0
            for k in torch.randperm(len(examples), generator=generator).tolist():
                tokens, states = examples[k]
                loss = nn.functional.cross_entropy(self(tokens), states)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach())
            history.append(total / max(len(examples), 1))
        self.eval()
        return history


def q3_metrics(true: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """Per-residue accuracy (Q3), macro F1 over the states present, per-state F1."""
    f1 = M.per_class_f1(true, predicted, n_classes=len(SS3))
    present = np.unique(true)
    return {
        "residues": len(true),
        "accuracy": M.accuracy(true, predicted),
        "macro_f1": float(f1[present].mean()),
        "per_class_f1": {SS3[k]: float(f1[k]) for k in range(len(SS3))},
    }


def evaluate_secondary_structure(
    encoder: Any, rows: Sequence[tuple[str, str]], *, seed: int = 0, epochs: int = 10
) -> dict[str, Any]:
    """Residue head vs. majority-class and amino-acid-propensity baselines, split by protein
    (length-stratified, no validation side); metrics over all test residues pooled."""
    from kiban.tasks.splits import length_stratified_split

    index = {s: k for k, s in enumerate(SS3)}
    examples = []
    for sequence, states in rows:
        batch = encoder.featurizer.collate([encoder.featurizer(sequence)])
        with torch.no_grad():
            tokens = encoder(batch["tokens"]).embeddings[0]
        if len(tokens) != len(sequence):
            raise ValueError(f"encoder gave {len(tokens)} tokens for a {len(sequence)}-residue sequence")
        examples.append((tokens, torch.tensor([index[s] for s in states])))
    split = length_stratified_split([len(s) for s, _ in rows], valid=0.0, test=0.3, seed=seed)
    torch.manual_seed(seed)
    head = ResidueHead(examples[0][0].shape[-1])
    history = head.fit([examples[i] for i in split.train], epochs=epochs, seed=seed)
    train_states = np.concatenate([examples[i][1].numpy() for i in split.train])
    majority = int(np.bincount(train_states, minlength=len(SS3)).argmax())
    by_residue: dict[str, Counter] = {}
    for i in split.train:
        for residue, state in zip(rows[i][0], rows[i][1]):
            by_residue.setdefault(residue, Counter())[state] += 1
    propensity = {r: index[c.most_common(1)[0][0]] for r, c in by_residue.items()}
    true, head_pred, propensity_pred = [], [], []
    for i in split.test:
        tokens, states = examples[i]
        with torch.no_grad():
            head_pred.append(head(tokens).argmax(-1).numpy())
        true.append(states.numpy())
        propensity_pred.append(np.array([propensity.get(r, majority) for r in rows[i][0]]))
    y = np.concatenate(true)
    results = [
        {
            "model": "residue head (conv window 7) on encoder tokens",
            "split": "test",
            "metrics": q3_metrics(y, np.concatenate(head_pred)),
        },
        {
            "model": "amino-acid propensity (most frequent state per residue type)",
            "split": "test",
            "metrics": q3_metrics(y, np.concatenate(propensity_pred)),
        },
        {
            "model": "trivial (majority state)",
            "split": "test",
            "metrics": q3_metrics(y, np.full(len(y), majority)),
        },
    ]
    return {
        "split": split.describe(),
        "seed": seed,
        "proteins": len(rows),
        "states": list(SS3),
        "train_loss": history,
        "results": results,
    }

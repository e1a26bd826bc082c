"""Per-residue secondary structure (3-state DSSP: H helix, E strand, C coil) over encoder tokens.

The head reads the protein encoder's per-residue tokens [L, D] and predicts one of the 3 states
per residue: a 1-D convolution over a window of residues (kernel 7), GELU, then a linear layer;
cross-entropy over residues. Evaluation is per-residue accuracy (Q3), macro F1 and per-class F1 on
held-out proteins of a length-stratified split, beside two baselines: the majority class of the
training residues, and each amino acid's most frequent state in training (a propensity table).

``ResidueClassifierHead`` (architecture "residue", kind "residue_classification") is the saved form
of a trained ``ResidueHead``: head.json + head.safetensors like every head, loaded by ``load_head``;
its ``predict`` gives each residue's state and the probability of every state. ``kiban finetune``
trains one from a CSV of ``sequence`` + per-residue state strings (``read_residue_table``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kiban.tasks import metrics as M
from kiban.tasks.heads import HeadConfig, register_head
from kiban.tasks.structure import ProteinTokenHead, protein_tokens

__all__ = [
    "ResidueClassifierHead",
    "ResidueHead",
    "evaluate_secondary_structure",
    "propensity_baseline",
    "q3_metrics",
    "read_residue_table",
    "read_ss3",
]

SS3 = ("C", "E", "H")


def read_ss3(
    path: str | Path, *, n: int | None = None, max_length: int = 400, seed: int = 0
) -> list[tuple[str, str]]:
    """(sequence, ss3) pairs of a CSV with ``sequence`` and ``ss3`` columns; rows whose lengths differ,
    longer than ``max_length`` or with states outside C/E/H are dropped; ``n`` samples that many.
    """
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
        """Per-residue logits [B, N, C] from encoder tokens [B, N, D]."""
        x = self.norm(tokens.float()).T.unsqueeze(0)  # [1, D, L]
        return self.out(nn.functional.gelu(self.conv(x))[0].T)

    def fit(
        self,
        examples: Sequence[tuple[Tensor, Tensor]],
        *,
        epochs: int = 10,
        lr: float = 3e-3,
        seed: int = 0,
        progress: bool = False,
    ) -> list[float]:
        """Train on (tokens [L, D], states [L] class indices), one protein a step; mean loss per epoch."""
        from kiban.tasks.training import train_loop

        history = train_loop(
            [self],
            torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=1e-2),
            batches=lambda g: ((examples[k], 1) for k in torch.randperm(len(examples), generator=g).tolist()),
            loss=lambda example: nn.functional.cross_entropy(self(example[0]), example[1]),
            epochs=epochs,
            seed=seed,
            progress=progress,
            desc="training residue head",
        )
        return history["train"]


def q3_metrics(true: np.ndarray, predicted: np.ndarray, *, states: Sequence[str] = SS3) -> dict[str, Any]:
    """Per-residue accuracy (Q3 for the 3 states), macro F1 over the states present, per-state F1."""
    f1 = M.per_class_f1(true, predicted, n_classes=len(states))
    present = np.unique(true)
    return {
        "residues": len(true),
        "accuracy": M.accuracy(true, predicted),
        "macro_f1": float(f1[present].mean()),
        "per_class_f1": {states[k]: float(f1[k]) for k in range(len(states))},
    }


def propensity_baseline(
    sequences: Sequence[str], states: Sequence[np.ndarray], *, n_classes: int
) -> tuple[int, dict[str, int]]:
    """(majority state, residue letter -> its most frequent state) over training proteins; states
    are class-index arrays. Predict with ``[table.get(r, majority) for r in sequence]``.
    """
    counts = np.zeros(n_classes, dtype=np.int64)
    by_residue: dict[str, Counter] = {}
    for sequence, row in zip(sequences, states):
        counts += np.bincount(row, minlength=n_classes)
        for residue, state in zip(sequence, row.tolist()):
            by_residue.setdefault(residue, Counter())[state] += 1
    # ties go to the lower class index, as argmax does
    table = {r: min(c, key=lambda k: (-c[k], k)) for r, c in by_residue.items()}
    return int(counts.argmax()), table


def read_residue_table(
    path: str | Path, *, label_column: str, max_length: int, rejects: Any
) -> tuple[list[str], list[str], list[str]]:
    """(ids, sequences, state strings) of a CSV/TSV with a ``sequence`` column and a column of
    one state letter per residue (``label_column``: ``ss3``, ``ss8``, ...). Rows whose lengths
    differ, longer than ``max_length`` or with letters outside the amino-acid alphabet go to
    ``rejects`` with the reason; ids come from an ``id`` / ``name`` column, else ``line N``.
    """
    import csv

    from kiban.encoders.base import InvalidInput
    from kiban.tasks.structure import protein_sequence

    path = Path(path)
    ids, sequences, labels = [], [], []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
        columns = [c.strip() for c in reader.fieldnames or []]
        for needed in ("sequence", label_column):
            if needed not in columns:
                raise ValueError(
                    f"{path}: a per-residue table needs a {needed!r} column; columns: {', '.join(columns)}"
                )
        id_column = next((c for c in ("id", "name", "entry") if c in columns), None)
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            ident = row[id_column] if id_column and row.get(id_column) else f"line {line}"
            where = f"{path}:line {line}"
            try:
                sequence = protein_sequence(row["sequence"])
            except InvalidInput as error:
                rejects.reject(id=ident, location=where, reason="invalid residues", detail=str(error))
                continue
            states = row[label_column]
            if len(states) != len(sequence):
                rejects.reject(
                    id=ident,
                    location=where,
                    reason="label length differs",
                    detail=f"{len(sequence)} residues but {len(states)} {label_column} states",
                )
                continue
            if len(sequence) > max_length:
                rejects.reject(
                    id=ident,
                    location=where,
                    reason="too long",
                    detail=f"{len(sequence)} residues, over --max-length {max_length}",
                )
                continue
            rejects.accept()
            ids.append(ident)
            sequences.append(sequence)
            labels.append(states)
    return ids, sequences, labels


@register_head("residue")
class ResidueClassifierHead(ProteinTokenHead):
    """A saved ``ResidueHead``: protein tokens [L, D] -> one of ``config.labels`` per residue.

    Config: kind "residue_classification", labels the states (e.g. C, E, H), ``hidden_dim`` the
    convolution's width (64), ``extra["window"]`` its kernel (7).
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__(config)
        if config.kind != "residue_classification":
            raise ValueError(
                f"head {config.task!r}: a residue head has kind 'residue_classification', got {config.kind!r}"
            )
        if config.hidden_dim < 1:
            raise ValueError(f"head {config.task!r}: a residue head needs hidden_dim >= 1 (its convolution)")
        self.net = ResidueHead(
            config.input_dim,
            hidden=config.hidden_dim,
            window=int(config.extra.get("window", 7)),
            n_classes=len(config.labels),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [L, len(labels)]."""
        return self.net(tokens)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy of logits [L, K] against state indices [L] (what ``ResidueHead.fit`` minimises)."""
        return nn.functional.cross_entropy(outputs, targets.long())

    def metrics(self, outputs: Any, targets: Any) -> dict[str, Any]:
        """``q3_metrics`` of logits [N, K] against state indices [N] (residues pooled)."""
        predicted = np.asarray(outputs).argmax(-1)
        return q3_metrics(np.asarray(targets), predicted, states=self.config.labels)

    def outputs(self, tokens: Tensor, sequence: str) -> dict[str, Any]:
        """``{"residues": [{"position", "residue", "label", "probabilities"}, ...]}``, positions 1-based."""
        labels = self.config.labels
        with torch.no_grad():
            probabilities = self.net(tokens).softmax(-1).tolist()
        return {
            "residues": [
                {
                    "position": n + 1,
                    "residue": letter,
                    "label": labels[max(range(len(row)), key=row.__getitem__)],
                    "probabilities": dict(zip(labels, row)),
                }
                for n, (letter, row) in enumerate(zip(sequence, probabilities))
            ]
        }


def evaluate_secondary_structure(
    encoder: Any, rows: Sequence[tuple[str, str]], *, seed: int = 0, epochs: int = 10
) -> dict[str, Any]:
    """Residue head vs. majority-class and amino-acid-propensity baselines, split by protein
    (length-stratified, no validation side); metrics over all test residues pooled.
    """
    from kiban.tasks.splits import length_stratified_split

    index = {s: k for k, s in enumerate(SS3)}
    examples = [
        (protein_tokens(encoder, sequence), torch.tensor([index[s] for s in states]))
        for sequence, states in rows
    ]
    split = length_stratified_split([len(s) for s, _ in rows], valid=0.0, test=0.3, seed=seed)
    torch.manual_seed(seed)
    head = ResidueHead(examples[0][0].shape[-1])
    history = head.fit([examples[i] for i in split.train], epochs=epochs, seed=seed)
    majority, propensity = propensity_baseline(
        [rows[i][0] for i in split.train], [examples[i][1].numpy() for i in split.train], n_classes=len(SS3)
    )
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

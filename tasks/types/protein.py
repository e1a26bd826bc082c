"""``--type protein``: sequence-level classification or regression of proteins (FASTA or a sequence
table; ``kiban.tasks.types.sequences``).

Split: whole k-mer Jaccard similarity clusters (3-mers, >= 0.15; ``splits.similarity_split``), so
no test protein has a near-copy in training, or ``--groups COL`` (e.g. the mutated position of a
deep mutational scan, whose variants all fall in one cluster). Baseline: logistic regression
(classification) or ridge regression (regression) on amino-acid + dipeptide composition (420
features), as a sequence-only specialist would start; and the trivial predictor.
"""

from __future__ import annotations

from itertools import product
from typing import Any

import numpy as np

from kiban.tasks.pipeline import FinetuneOptions, LabelledData, register_task_type
from kiban.tasks.pooled import pooled_type, side_outputs
from kiban.tasks.types.sequences import load_sequences, sequence_text

__all__ = ["composition_features", "linear_baseline"]

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
_DIPEPTIDES = {a + b: k for k, (a, b) in enumerate(product(AMINO_ACIDS, repeat=2))}


def composition_features(sequences: list[str]) -> np.ndarray:
    """[N, 420]: amino-acid composition (20 fractions) then dipeptide composition (400 fractions)."""
    out = np.zeros((len(sequences), 420))
    index = {a: k for k, a in enumerate(AMINO_ACIDS)}
    for row, sequence in enumerate(sequences):
        sequence = sequence.upper()
        singles = [index[a] for a in sequence if a in index]
        pairs = [_DIPEPTIDES[sequence[i : i + 2]] for i in range(len(sequence) - 1) if sequence[i : i + 2] in _DIPEPTIDES]
        if singles:
            out[row, :20] = np.bincount(singles, minlength=20) / len(singles)
        if pairs:
            out[row, 20:] = np.bincount(pairs, minlength=400) / len(pairs)
    return out


def linear_baseline(
    kind: str, x_train: Any, y_train: np.ndarray, x_test: Any, *, n_classes: int, seed: int
) -> np.ndarray:
    """Logistic regression (logits, [N, C]) or per-target ridge regression ([N, K]) on standardised
    features; multilabel: one logistic regression per task (logits of P(positive)).
    """
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "regression":
        columns = []
        for k in range(y_train.shape[1]):
            known = ~np.isnan(y_train[:, k])
            model = make_pipeline(StandardScaler(with_mean=False), Ridge(alpha=1.0))
            columns.append(model.fit(x_train[known], y_train[known, k]).predict(x_test))
        return np.stack(columns, 1)
    model = make_pipeline(StandardScaler(with_mean=False), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
    if kind == "multilabel":
        columns = []
        for k in range(y_train.shape[1]):
            known = ~np.isnan(y_train[:, k])
            model.fit(x_train[known], y_train[known, k].astype(int))
            p = np.clip(model.predict_proba(x_test)[:, 1], 1e-9, 1 - 1e-9)
            columns.append(np.log(p / (1 - p)))
        return np.stack(columns, 1)
    model.fit(x_train, y_train)
    logits = np.full((x_test.shape[0], n_classes), -1e9)
    # log-probabilities as logits; classes absent from training stay at -inf-like
    logits[:, model.classes_] = np.log(np.clip(model.predict_proba(x_test), 1e-12, None))
    return logits


def _load(options: FinetuneOptions, model: Any, rejects: Any) -> LabelledData:
    return load_sequences(options, rejects, modality="protein", max_length=options.max_length_for("protein"))


def _split(data: LabelledData, options: FinetuneOptions) -> Any:
    from kiban.tasks.splits import group_split, similarity_split

    if data.groups is not None:
        return group_split(data.groups, seed=options.seed)
    return similarity_split([sequence_text(s) for s in data.items], k=3, threshold=0.15, seed=options.seed)


def _baselines(data: LabelledData, split: Any, seed: int) -> dict[str, dict[str, np.ndarray]]:
    x = composition_features([sequence_text(s) for s in data.items])
    both = np.concatenate([split.valid, split.test])
    predicted = linear_baseline(
        data.kind, x[split.train], data.targets[split.train], x[both], n_classes=len(data.labels), seed=seed
    )
    model = "ridge regression" if data.kind == "regression" else "logistic regression"
    return {f"{model} on amino-acid + dipeptide composition": side_outputs(predicted, split)}


register_task_type(
    pooled_type(
        "protein",
        modality="protein",
        load=_load,
        split=_split,
        baselines=_baselines,
        description="protein FASTA (labels as KEY=VALUE in headers) or a sequence table with label column(s)",
        default_max_length=1000,
    )
)

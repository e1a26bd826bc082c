"""``--type dna``: sequence-level classification or regression of DNA (FASTA or a sequence table;
``kiban.tasks.types.sequences``), e.g. promoter / non-promoter.

Split: whole k-mer Jaccard similarity clusters (6-mers, >= 0.2), or ``--groups COL``. Baseline:
logistic regression (ridge for regression) on k-mer counts, k = 3..6 (sklearn's character
n-grams; 5,440 possible k-mers), and the trivial predictor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kiban.tasks.pipeline import FinetuneOptions, LabelledData, register_task_type
from kiban.tasks.pooled import pooled_type, side_outputs
from kiban.tasks.types.protein import linear_baseline
from kiban.tasks.types.sequences import load_sequences, sequence_text

__all__ = ["kmer_counts"]


def kmer_counts(train: list[str], others: list[str], *, k: tuple[int, int] = (3, 6)) -> tuple[Any, Any]:
    """Sparse k-mer count matrices (vocabulary from ``train``) of ``train`` and ``others``."""
    from sklearn.feature_extraction.text import CountVectorizer

    vectoriser = CountVectorizer(analyzer="char", ngram_range=k, lowercase=False)
    return vectoriser.fit_transform([s.upper() for s in train]), vectoriser.transform([s.upper() for s in others])


def _load(options: FinetuneOptions, model: Any, rejects: Any) -> LabelledData:
    return load_sequences(options, rejects, modality="dna", max_length=options.max_length_for("dna"))


def _split(data: LabelledData, options: FinetuneOptions) -> Any:
    from kiban.tasks.splits import group_split, similarity_split

    if data.groups is not None:
        return group_split(data.groups, seed=options.seed)
    return similarity_split([sequence_text(s) for s in data.items], k=6, threshold=0.2, seed=options.seed)


def _baselines(data: LabelledData, split: Any, seed: int) -> dict[str, dict[str, np.ndarray]]:
    texts = [sequence_text(s) for s in data.items]
    both = np.concatenate([split.valid, split.test])
    x_train, x_other = kmer_counts([texts[i] for i in split.train], [texts[i] for i in both])
    predicted = linear_baseline(
        data.kind, x_train, data.targets[split.train], x_other, n_classes=len(data.labels), seed=seed
    )
    model = "ridge regression" if data.kind == "regression" else "logistic regression"
    return {f"{model} on k-mer counts (k = 3..6)": side_outputs(predicted, split)}


register_task_type(
    pooled_type(
        "dna",
        modality="dna",
        load=_load,
        split=_split,
        baselines=_baselines,
        description="DNA FASTA (labels as KEY=VALUE in headers) or a sequence table with label column(s)",
        default_max_length=None,
    )
)

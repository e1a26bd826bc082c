"""Fitting and scoring the contact heads on a set of structures, split by structure: the supervised
pairwise head (saved by ``kiban finetune --type contacts``) beside ESM-2's attention logistic
regression and the sequence-separation prior (``kiban.tasks.structure`` holds the heads).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiban.tasks.structure import (
    AttentionContactHead,
    PairwiseContactHead,
    attention_features,
    contact_labels,
    contact_metrics,
    prior_scores,
    separation_prior,
)

__all__ = ["evaluate_contacts", "fit_contact_heads"]


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
    """The report of ``fit_contact_heads`` (without the fitted pairwise head)."""
    report, _ = fit_contact_heads(
        encoder,
        files,
        seed=seed,
        max_length=max_length,
        epochs=epochs,
        pairwise_epochs=pairwise_epochs,
        plot=plot,
    )
    return report


def fit_contact_heads(
    encoder: Any,
    files: Sequence[str | Path],
    *,
    seed: int = 0,
    max_length: int = 400,
    epochs: int = 200,
    pairwise_epochs: int = 30,
    plot: str | Path | None = None,
    progress: bool = False,
    rejects: Any = None,
) -> tuple[dict[str, Any], PairwiseContactHead]:
    """Contact heads (attention logistic regression; supervised pairwise MLP on the encoder's
    per-residue tokens, ``pairwise_epochs`` passes) vs. separation prior, split by structure.
    ``plot``: a PNG path for the first test structure's contact map (pairwise head vs. true).

    Chains longer than ``max_length`` or with non-standard residues are skipped (and counted). The
    structures are split length-stratified (``splits.length_stratified_split``, no validation side);
    the head and the prior are fitted on train and their precisions averaged over test proteins.
    Returns (a metrics.json-style dict: split, seed, and per model the mean of ``contact_metrics``,
    each entry naming its side, split method and seed; the fitted pairwise head, in eval mode).
    ``rejects``: a ``kiban.data.Rejects`` told of every skipped chain and why.
    """
    from kiban.tasks.splits import length_stratified_split

    examples, residue_tokens, names, skipped = [], [], [], 0
    paths = list(files)
    if progress:
        from tqdm.auto import tqdm

        paths = tqdm(paths, desc=f"reading and encoding {len(paths)} structures", unit="file", leave=False)
    for path in paths:
        labels = contact_labels(path)
        problem = None
        if len(labels.sequence) > max_length:
            problem = ("too long", f"{len(labels.sequence)} residues, over max_length {max_length}")
        elif "X" in labels.sequence:
            problem = ("non-standard residues", "the chain has residues other than the 20 standard ones")
        if problem is not None:
            skipped += 1
            if rejects is not None:
                rejects.reject(id=Path(path).name, location=str(path), reason=problem[0], detail=problem[1])
            continue
        if rejects is not None:
            rejects.accept()
        tokens = encoder.featurizer.collate([encoder.featurizer(labels.sequence)])["tokens"]
        with torch.no_grad():
            out = encoder(tokens.to(next(encoder.parameters()).device), return_attentions=True)
        examples.append((attention_features(out.attentions[0].cpu()), labels.contacts, labels.valid))
        residue_tokens.append(out.embeddings[0].float().cpu())
        names.append(Path(path).name)
    if len(examples) < 4:
        raise ValueError(
            f"need at least 4 usable structures (at most {max_length} residues, standard amino acids), "
            f"got {len(examples)} ({skipped} skipped)"
        )
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
        progress=progress,
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
            "split_method": split.method,
            "seed": split.seed,
            "metrics": {k: float(np.nanmean([m[k] for m in rows])) for k in rows[0]},
        }
        for model, rows in per_model.items()
    ]
    report = {
        "split": split.describe(),
        "seed": seed,
        "skipped": skipped,
        "test_structures": [names[i] for i in split.test],
        "results": results,
    }
    return report, pairwise

"""Zero-shot variant-effect scoring with the protein encoder's ESM language-model head.

Masked marginals (Meier et al. 2021, ESM-1v): for each mutated position i, mask i in the wild type
and read the model's log-probabilities there; a variant scores

    sum over its mutations (i: wt -> mt) of  log p(mt at i | x without i) - log p(wt at i | x without i)

so the wild type itself (or a synonymous "P20P") scores 0, and a multi-mutant is the sum of its
singles. Higher = more like what the model expects = predicted fitter. With measured effects,
``spearman`` against them is the standard report (ProteinGym). Mutations are written ``A23V``
(1-based on the wild type unless ``offset`` says where residue 1 sits); several joined by ":".
The LM head is in the encoder's ``never_trained`` set: it is used here in eval only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["masked_marginal_scores", "parse_mutations"]

_MUTATION = re.compile(r"^([A-Z])(\d+)([A-Z])$")


def parse_mutations(text: str, wild_type: str, *, offset: int = 1) -> list[tuple[int, str, str]]:
    """``"A23V:G40S"`` -> [(index 0-based, wt, mt), ...], checked against ``wild_type``."""
    out = []
    for part in text.split(":"):
        match = _MUTATION.match(part.strip())
        if not match:
            raise ValueError(f"mutation {part!r} is not written like A23V (wild type, position, mutant)")
        wt, position, mt = match.group(1), int(match.group(2)), match.group(3)
        index = position - offset
        if not 0 <= index < len(wild_type):
            raise ValueError(
                f"mutation {part!r}: position {position} is outside the {len(wild_type)}-residue wild type"
            )
        if wild_type[index] != wt:
            raise ValueError(
                f"mutation {part!r}: the wild type has {wild_type[index]} at {position}, not {wt}"
            )
        out.append((index, wt, mt))
    return out


@torch.no_grad()
def masked_marginal_scores(
    encoder, wild_type: str, mutations: Sequence[str], *, offset: int = 1, batch_size: int = 8
) -> np.ndarray:
    """Scores [len(mutations)] of each variant of ``wild_type`` (see the module docstring).

    encoder: a ``ProteinEncoder`` (its ``.model`` is fair-esm's ESM-2 with the LM head).
    """
    parsed = [parse_mutations(m, wild_type, offset=offset) for m in mutations]
    featurizer = encoder.featurizer
    alphabet_size = encoder.model.alphabet_size
    for _, _, mt in (p for variant in parsed for p in variant):
        if mt not in featurizer.token_ids:
            raise ValueError(f"mutant residue {mt!r} is not in the model's alphabet")
    tokens = featurizer(wild_type)["tokens"]
    positions = sorted({index for variant in parsed for index, _, _ in variant})
    mask_idx = encoder.model.mask_idx
    log_probs: dict[int, torch.Tensor] = {}
    was_training = encoder.training
    encoder.eval()
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        batch = tokens.repeat(len(chunk), 1)
        for row, index in enumerate(chunk):
            batch[row, index + 1] = mask_idx  # +1: the BOS token
        logits = encoder.model(batch.to(next(encoder.parameters()).device))["logits"].float()
        for row, index in enumerate(chunk):
            log_probs[index] = logits[row, index + 1, :alphabet_size].log_softmax(-1).cpu()
    encoder.train(was_training)
    ids = featurizer.token_ids
    return np.array(
        [
            sum(float(log_probs[i][ids[mt]] - log_probs[i][ids[wt]]) for i, wt, mt in variant)
            for variant in parsed
        ]
    )

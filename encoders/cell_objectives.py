"""Self-supervised objectives of the cell encoder (the contract is ``encoders/pretraining.py``).

* ``masked_expression`` (default; scGPT's gene expression prediction, Cui et al. 2024): a fraction
  of each cell's expressed gene tokens has its value hidden (value id ``n_bins + 1``, which scGPT's
  trunk reads as its ``mask_value`` and kiban's as "no value"); an MLP (scGPT's ``ExprDecoder``)
  predicts the hidden bins from the token states, MSE over the hidden genes only. The gene
  identities stay visible, as in scGPT. For binned tokenization. An encoder that is a profile
  token alone (``profile_token="only"``) has no gene tokens: there a fraction of the expressed
  genes is taken out of the profile and their log-normalised values are predicted from the cell's
  token, as scGPT's cell-embedding objective (GEPC, its ``MVCDecoder``): the inner product of a
  query made from the cell token with a learned vector per gene.
* ``rank_mlm`` (Geneformer's masked LM, Theodoris et al. 2023): 15% of each cell's gene tokens are
  selected; of those 80% become ``<mask>``, 10% a random gene, 10% stay; a BERT LM head predicts the
  selected genes' ids, cross-entropy over them. For rank tokenization with a ``mask_id``.

With a profile token the masked genes are also taken out of the profile, so the answer does not
leak through it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiban.encoders.base import pad_stack
from kiban.encoders.cell import CellEncoder
from kiban.encoders.pretraining import ObjectiveOutput, PretrainObjective, register_objective

__all__ = ["MaskedExpression", "MaskedExpressionMasker", "ProfileMasker", "RankMLM", "RankMasker"]


def _n_masked(n: int, ratio: float) -> int:
    """How many of n tokens to mask: round(ratio * n), at least 1 (a cell always contributes)."""
    return max(1, min(n, int(round(ratio * n))))


def _hide_from_profile(features: dict[str, Tensor], hidden_token_ids: Tensor, token_ids: np.ndarray) -> None:
    """Zero the profile weights of the hidden genes (in place): the profile must not give them away."""
    if "profile_index" not in features:
        return
    ids = token_ids[features["profile_index"].numpy()]
    hide = torch.as_tensor(np.isin(ids, hidden_token_ids.numpy()))
    features["profile_values"] = features["profile_values"].masked_fill(hide, 0.0)


def _collate_with(featurizer: Any, items: Sequence[dict[str, Tensor]], extra: dict[str, Any]) -> dict[str, Tensor]:
    batch = featurizer.collate(items)
    for key, pad in extra.items():
        batch[key], _ = pad_stack([item[key] for item in items], pad_value=pad)
    return batch


class MaskedExpressionMasker:
    """Hides ``mask_ratio`` of a cell's expressed gene values: value id -> ``n_bins + 1``.

    Adds ``target_values`` (the true bins, float) and ``masked`` (bool) per token.
    """

    def __init__(self, featurizer: Any, *, mask_ratio: float) -> None:
        """Mask for ``featurizer``'s binned cells."""
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.featurizer = featurizer
        self.mask_ratio = mask_ratio
        self.n_bins = featurizer.n_bins

    def __call__(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Corrupted features of one cell, with its targets."""
        out = dict(features)
        values = features["value_ids"]
        # expressed gene tokens: bins 1..n_bins-1 (0 is an unexpressed gene, n_bins the CLS)
        candidates = torch.nonzero((values > 0) & (values < self.n_bins)).flatten()
        masked = torch.zeros(len(values), dtype=torch.bool)
        if len(candidates):
            pick = torch.randperm(len(candidates))[: _n_masked(len(candidates), self.mask_ratio)]
            masked[candidates[pick]] = True
        out["target_values"] = values.to(torch.float32)
        out["masked"] = masked
        out["value_ids"] = torch.where(masked, torch.full_like(values, self.n_bins + 1), values)
        _hide_from_profile(out, features["gene_ids"][masked], self.featurizer.token_ids)
        return out

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The featurizer's batch plus target_values and masked [B, N]."""
        return _collate_with(self.featurizer, items, {"target_values": 0.0, "masked": False})


class ProfileMasker:
    """Takes ``mask_ratio`` of a cell's expressed genes out of its profile (weight 0).

    Adds ``profile_masked`` (bool) and ``profile_targets`` (the hidden log-normalised values) per
    profile entry.
    """

    def __init__(self, featurizer: Any, *, mask_ratio: float) -> None:
        """Mask for ``featurizer``'s cells with a profile."""
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.featurizer = featurizer
        self.mask_ratio = mask_ratio

    def __call__(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Corrupted features of one cell, with its targets."""
        out = dict(features)
        values = features["profile_values"]
        masked = torch.zeros(len(values), dtype=torch.bool)
        if len(values) > 1:  # keep at least one gene in the profile
            n = min(_n_masked(len(values), self.mask_ratio), len(values) - 1)
            masked[torch.randperm(len(values))[:n]] = True
        out["profile_masked"] = masked
        out["profile_targets"] = values
        out["profile_values"] = values.masked_fill(masked, 0.0)
        return out

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The featurizer's batch plus profile_masked and profile_targets [B, G]."""
        return _collate_with(self.featurizer, items, {"profile_masked": False, "profile_targets": 0.0})


_TARGET_KEYS = ("target_values", "masked", "labels", "profile_masked", "profile_targets")


def _gene_states(encoder: CellEncoder, batch: dict[str, Tensor]) -> Tensor:
    """The trunk's token states [B, N, D], aligned with gene_ids (a profile token is skipped)."""
    inputs = {k: v for k, v in batch.items() if k not in _TARGET_KEYS}
    tokens = encoder(**inputs).embeddings
    return tokens[:, 1:] if encoder.profile is not None else tokens


def _needs_trunk(encoder: CellEncoder, name: str) -> None:
    if encoder.trunk is None:
        raise ValueError(f"cell objective {name!r} predicts gene tokens; this encoder has none (profile_token='only')")


@register_objective("cell", "masked_expression")
class MaskedExpression(PretrainObjective):
    """scGPT's GEP: MSE of the predicted bins of hidden expressed genes (``mask_ratio``, default 0.4).

    For a profile-token-only encoder: MSE of the hidden genes' log-normalised values predicted
    from the cell token (scGPT's GEPC).
    """

    def __init__(self, encoder: CellEncoder, *, mask_ratio: float = 0.4) -> None:
        """The objective over ``encoder`` (binned tokenization, or a profile token alone) with its decoder."""
        super().__init__(encoder)
        width = encoder.output_dim
        self.from_profile = encoder.trunk is None
        if self.from_profile:
            self.masker = ProfileMasker(encoder.featurizer, mask_ratio=mask_ratio)
            # scGPT's MVCDecoder ("inner product"): a query from the cell, one vector per gene
            self.query = nn.Sequential(nn.Linear(width, width), nn.Sigmoid())
            self.gene_vectors = nn.Embedding(encoder.featurizer.vocab_size, width)
            self.gene_bias = nn.Embedding(encoder.featurizer.vocab_size, 1)
            nn.init.zeros_(self.gene_bias.weight)
            return
        if encoder.featurizer.tokenization != "binning":
            raise ValueError(
                "masked_expression predicts binned values; this cell encoder ranks genes: use objective 'rank_mlm'"
            )
        self.masker = MaskedExpressionMasker(encoder.featurizer, mask_ratio=mask_ratio)
        # scGPT's ExprDecoder
        self.decoder = nn.Sequential(
            nn.Linear(width, width), nn.LeakyReLU(), nn.Linear(width, width), nn.LeakyReLU(), nn.Linear(width, 1)
        )

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """Loss = mean squared error over the hidden genes' values."""
        if self.from_profile:
            inputs = {k: v for k, v in batch.items() if k not in _TARGET_KEYS}
            cell = self.encoder(**inputs).embeddings[:, 0]  # [B, D]
            masked = batch["profile_masked"]
            genes = batch["profile_index"]
            predicted = (self.gene_vectors(genes) * self.query(cell).unsqueeze(1)).sum(-1) + self.gene_bias(genes)[..., 0]
            predicted, target = predicted[masked], batch["profile_targets"][masked]
        else:
            states = _gene_states(self.encoder, batch)
            masked = batch["masked"]
            predicted = self.decoder(states[masked]).squeeze(-1)
            target = batch["target_values"][masked]
        loss = F.mse_loss(predicted, target)
        return ObjectiveOutput(
            loss, {"mse": loss.detach(), "n_masked": masked.sum().detach().to(torch.float32)}
        )


class RankMasker:
    """Selects ``mask_ratio`` of a cell's gene tokens (not CLS/EOS); 80% -> ``<mask>``, 10% random gene, 10% kept.

    Adds ``labels`` (the selected tokens' true ids, -100 elsewhere).
    """

    def __init__(self, featurizer: Any, *, mask_id: int, mask_ratio: float) -> None:
        """Mask for ``featurizer``'s rank-ordered cells, with ``mask_id`` as ``<mask>``."""
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.featurizer = featurizer
        self.mask_id = mask_id
        self.mask_ratio = mask_ratio
        self.specials = [i for i in (featurizer.cls_id, featurizer.eos_id, featurizer.pad_id) if i is not None]

    def __call__(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Corrupted features of one cell, with its labels."""
        out = dict(features)
        ids = features["gene_ids"]
        candidates = torch.nonzero(~torch.isin(ids, torch.tensor(self.specials))).flatten()
        selected = torch.zeros(len(ids), dtype=torch.bool)
        selected[candidates[torch.randperm(len(candidates))[: _n_masked(len(candidates), self.mask_ratio)]]] = True
        draw = torch.rand(len(ids))
        to_mask = selected & (draw < 0.8)
        to_random = selected & (draw >= 0.8) & (draw < 0.9)
        gene_pool = torch.as_tensor(self.featurizer.token_ids)
        random_ids = gene_pool[torch.randint(len(gene_pool), (len(ids),))]
        corrupted = torch.where(to_mask, torch.full_like(ids, self.mask_id), ids)
        out["gene_ids"] = torch.where(to_random, random_ids, corrupted)
        out["labels"] = torch.where(selected, ids, torch.full_like(ids, -100))
        _hide_from_profile(out, ids[selected], self.featurizer.token_ids)
        return out

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The featurizer's batch plus labels [B, N] (-100 where nothing is predicted)."""
        return _collate_with(self.featurizer, items, {"labels": -100})


@register_objective("cell", "rank_mlm")
class RankMLM(PretrainObjective):
    """Geneformer's masked LM over rank-ordered gene tokens (``mask_ratio`` 0.15, 80/10/10)."""

    tiny_overrides: ClassVar[dict[str, Any]] = {"tokenization": "rank", "mask_id": 2}

    def __init__(self, encoder: CellEncoder, *, mask_ratio: float = 0.15) -> None:
        """The objective over ``encoder`` (rank tokenization with a ``mask_id``) with its LM head."""
        super().__init__(encoder)
        if encoder.featurizer.tokenization != "rank":
            raise ValueError("rank_mlm predicts rank-ordered gene tokens: use a rank-tokenized encoder (preset geneformer)")
        _needs_trunk(encoder, self.name)
        mask_id = encoder.config.mask_id
        if mask_id is None:
            raise ValueError("rank_mlm needs a <mask> token: set mask_id in the cell encoder's config (preset geneformer has one)")
        self.masker = RankMasker(encoder.featurizer, mask_id=mask_id, mask_ratio=mask_ratio)
        width = encoder.output_dim
        n_token_ids = encoder.config.n_token_ids or encoder.featurizer.n_token_ids
        # BERT's LM prediction head: dense -> GELU -> LayerNorm -> vocabulary
        self.head = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=encoder.config.layer_norm_eps),
            nn.Linear(width, n_token_ids),
        )

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """Loss = cross-entropy of the selected tokens' ids."""
        states = _gene_states(self.encoder, batch)
        labels = batch["labels"]
        selected = labels != -100
        logits = self.head(states[selected])
        target = labels[selected]
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.argmax(-1) == target).to(torch.float32).mean()
        return ObjectiveOutput(
            loss,
            {"masked_accuracy": accuracy.detach(), "n_masked": selected.sum().detach().to(torch.float32)},
        )

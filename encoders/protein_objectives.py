"""Masked-residue language modelling for the protein encoder, as ESM-2 was trained.

Lin et al. 2023 (ESM-2, Science 379:1123; the training recipe of Rives et al. 2021, PNAS 118):
15% of the residues of a sequence are selected; of those, 80% are replaced by ``<mask>``, 10% by a
random amino acid and 10% are left unchanged; the loss is the cross-entropy of the original
residue at the selected positions only. ``<cls>``, ``<eos>`` and padding are never selected.

The predictions come from ESM-2's own LM head (``esm.ESM2.lm_head``: dense, GELU, LayerNorm,
projection tied to the token embedding). The encoder keeps that head frozen for fusion
(``never_trained``); this objective unfreezes it, because pretraining is what trains it. The
forward pass is fair-esm's own, so ESM-2's token dropout (the ``<mask>`` embeddings zeroed and the
rest rescaled by the masked share) applies exactly as in its training.
"""

from __future__ import annotations

from kiban.encoders.pretraining import (
    ObjectiveOutput,
    PretrainObjective,
    TokenMasker,
    masked_lm_output,
    register_objective,
)
from kiban.encoders.protein import ProteinEncoder
from torch import Tensor

__all__ = ["ProteinMaskedLM"]

#: Random replacements are drawn from the 20 standard amino acids (not X, B, Z, U, O).
STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"


@register_objective("protein", "mlm")
class ProteinMaskedLM(PretrainObjective):
    """ESM-2's masked-residue LM over ``encoder.model`` (an ``esm.ESM2``) and its LM head.

    Batch: ``{"tokens": [B, T] corrupted, "targets": [B, T]}`` from ``self.masker``. Metrics:
    ``masked_accuracy``, ``perplexity`` (over the selected residues), ``n_masked``.
    Options: ``rate`` (0.15), ``mask_fraction`` (0.8), ``random_fraction`` (0.1).
    """

    def __init__(
        self,
        encoder: ProteinEncoder,
        *,
        rate: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
    ) -> None:
        """Build the masker over the encoder's vocabulary and unfreeze what the loss trains."""
        super().__init__(encoder)
        featurizer = encoder.featurizer
        alphabet = encoder.model.alphabet
        self.masker = TokenMasker(
            mask_id=alphabet.mask_idx,
            pad_id=featurizer.padding_idx,
            special_ids=(alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx),
            random_ids=[featurizer.token_ids[letter] for letter in STANDARD_RESIDUES],
            rate=rate,
            mask_fraction=mask_fraction,
            random_fraction=random_fraction,
        )
        # Every layer and the LM head take part in the masked-LM pass; only the contact
        # regression (read by contacts(), never by this loss) stays frozen.
        for name, parameter in encoder.model.named_parameters():
            parameter.requires_grad_(not name.startswith("contact_head."))

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """Masked-residue loss of a collated, masked batch."""
        logits = self.encoder.model(batch["tokens"])["logits"]
        return masked_lm_output(logits, batch["targets"])

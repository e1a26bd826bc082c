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

Pretraining from scratch (``stage: pretrain`` with no ``weights_path``) first re-initialises the
encoder for training (``init_for_training``):
fair-esm's modules keep PyTorch's defaults, which give the token embedding (and so the tied LM
head) unit-variance weights and masked-LM logits of about ``sqrt(embed_dim)`` in size, a starting
loss near 25 instead of ln(33) = 3.5. The re-initialisation is the one of the Hugging Face ESM-2
(``EsmPreTrainedModel._init_weights``, BERT's): normal(0, 0.02) weights for linear layers and
embeddings, zero biases, unit LayerNorms, the padding embedding zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kiban.encoders.pretraining import (
    ObjectiveOutput,
    PretrainObjective,
    TokenMasker,
    masked_lm_output,
    register_objective,
)
from kiban.encoders.protein import ProteinEncoder

__all__ = ["ProteinMaskedLM", "init_for_training"]

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

    def init_for_training(self) -> None:
        """ESM-2's training initialisation of the whole ESM-2 (LM head included)."""
        init_for_training(self.encoder.model)

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """Masked-residue loss of a collated, masked batch."""
        logits = self.encoder.model(batch["tokens"])["logits"]
        return masked_lm_output(logits, batch["targets"])


@torch.no_grad()
def init_for_training(model: nn.Module, *, std: float = 0.02) -> None:
    """ESM-2's training initialisation (Hugging Face ``EsmPreTrainedModel._init_weights``) in place."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
    lm_bias = getattr(getattr(model, "lm_head", None), "bias", None)
    if isinstance(lm_bias, nn.Parameter):
        lm_bias.zero_()

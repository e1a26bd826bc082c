"""Masked-token language modelling for the DNA encoder, over its own tokens.

As the Nucleotide Transformer (Dalla-Torre et al. 2024) and DNABERT (Ji et al. 2021) are trained:
15% of the sequence tokens (bases or k-mers) are selected; of those 80% become ``[MASK]``, 10% a
random sequence token and 10% stay; the loss is the cross-entropy at the selected tokens only.
``[CLS]``, ``[SEP]``, padding, and a Hugging Face tokenizer's special tokens are never selected.

Overlapping k-mers (DNABERT) leak a masked token from its neighbours; DNABERT masks spans of k
tokens for that reason. This objective masks single tokens, which suits single bases and the
non-overlapping 6-mers of the default preset; use those for pretraining.

The predictions come from the encoder's masked-LM head (``DnaEncoder.lm_head``, the head that
variant scoring reads). An encoder built without one (``mlm_head=False``) gets a new head here,
and its config is switched to ``mlm_head=True``, so the saved encoder rebuilds with the head.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from kiban.encoders.dna import DnaEncoder, DnaLmHead
from kiban.encoders.pretraining import (
    ObjectiveOutput,
    PretrainObjective,
    TokenMasker,
    masked_lm_output,
    register_objective,
)

__all__ = ["DnaMaskedLM"]


@register_objective("dna", "mlm")
class DnaMaskedLM(PretrainObjective):
    """Masked-token LM over the DNA encoder's backbone and masked-LM head.

    Batch: ``{"tokens": [B, T] corrupted, "targets": [B, T]}`` from ``self.masker``. Metrics:
    ``masked_accuracy``, ``perplexity`` (per selected token), ``n_masked``.
    Options: ``rate`` (0.15), ``mask_fraction`` (0.8), ``random_fraction`` (0.1).
    """

    def __init__(
        self,
        encoder: DnaEncoder,
        *,
        rate: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
    ) -> None:
        """Build the masker over the encoder's vocabulary and unfreeze what the loss trains."""
        super().__init__(encoder)
        featurizer = encoder.featurizer
        if featurizer.mask_id is None:
            raise ValueError(
                f"the DNA encoder's tokenizer ({encoder.config.hf_path}) has no mask token; "
                "masked-token pretraining needs one"
            )
        if encoder.lm_head is None:
            if encoder.config.hf_path is not None:
                raise ValueError(
                    "masked-token pretraining of a Hugging Face DNA model needs its masked-LM head: "
                    "build the encoder with mlm_head=True from a masked-LM directory"
                )
            encoder.lm_head = DnaLmHead(width=encoder.output_dim, vocab_size=featurizer.vocab_size)
            encoder.config = dataclasses.replace(encoder.config, mlm_head=True)
            encoder.never_trained = (*encoder.never_trained, "lm_head.")
        special = set(featurizer.boundary_ids) | {featurizer.mask_id, featurizer.unk_id}
        if featurizer.hf_tokenizer is not None:
            special |= set(featurizer.hf_tokenizer.all_special_ids)
        # random replacements: real sequence tokens (bases, k-mers), never N or a special token
        random_ids = [
            i
            for token, i in featurizer.vocab.items()
            if i not in special and token.upper().strip("ACGT") == "" and token
        ]
        self.masker = TokenMasker(
            mask_id=featurizer.mask_id,
            pad_id=featurizer.pad_id,
            special_ids=sorted(i for i in special if i is not None),
            random_ids=random_ids,
            rate=rate,
            mask_fraction=mask_fraction,
            random_fraction=random_fraction,
        )
        for parameter in encoder.parameters():  # pretraining trains the backbone and the head
            parameter.requires_grad_(True)
        if encoder.config.hf_path is not None and hasattr(encoder.backbone.model, "contact_head"):
            for parameter in encoder.backbone.model.contact_head.parameters():
                parameter.requires_grad_(False)

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """Masked-token loss of a collated, masked batch (forward strand, as the head reads it)."""
        logits = self.encoder.masked_lm_logits(batch["tokens"])
        return masked_lm_output(logits, batch["targets"])

"""Property-condition encoder: the ranges a design is asked to meet, as tokens the backbone reads.

    "logP 1 to 3, MW at most 450"   (or a list of ``kiban.design.Condition``)
      -> one row per property in ``NAMES``: [asked, has low, low, has high, high]  (bounds scaled)
      -> property embedding + MLP(row) -> LayerNorm  -> ModalityTokens [B, 7, D], every token real

A byte- or BPE-level backbone has to learn to read "MW at most 450" digit by digit before a
condition can steer what it writes; on a CPU budget it does not (docs/design.md: a byte model
trained 3000 steps gave the same likelihood to a molecule after "MW at most 200" and "MW at least
500"). This encoder hands the backbone the numbers themselves, the way MolGPT (Bagal et al. 2021)
feeds property values to its decoder as learned condition embeddings, while the prompt's text keeps
saying the same conditions in words. ``kiban design records`` binds it to a ``<properties>``
placeholder in every conditioned record, and ``kiban design molecules`` does the same whenever the
model has this encoder.

A bound is scaled as (value - centre) / scale with a drug-like centre and scale per property
(``SCALES``), clipped to ±8, so "MW at most 450" and "logP at least 2" arrive at the same order of
magnitude. An open end (``at most``, ``at least``) has its flag 0 and its value 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kiban.encoders.base import Encoder, InvalidInput, ModalityTokens, register_encoder, register_preset

__all__ = ["NAMES", "SCALES", "PropertiesEncoder", "PropertiesEncoderConfig", "PropertiesFeaturizer", "tiny"]

MODALITY = "properties"

#: (centre, scale) per property, in ``kiban.design.conditions.PROPERTIES`` order: about the median
#: and spread of drug-like molecules (MoleculeNet / ChEMBL-like sets).
SCALES: dict[str, tuple[float, float]] = {
    "logP": (2.5, 2.0),
    "MW": (350.0, 125.0),
    "QED": (0.55, 0.2),
    "TPSA": (75.0, 35.0),
    "HBD": (1.5, 1.5),
    "HBA": (5.0, 2.5),
    "RotB": (5.0, 3.5),
}
#: The properties, one token each, in this order.
NAMES: tuple[str, ...] = tuple(SCALES)
_FEATURES = 5  # asked, has low, low, has high, high
_CLIP = 8.0


@dataclass
class PropertiesEncoderConfig:
    """Settings of the property-condition encoder: token width ``dim``, the MLP's ``hidden`` width."""

    dim: int = 128
    hidden: int = 256


class PropertiesFeaturizer:
    """A condition text or list of ``Condition`` -> ``{"values": [len(NAMES), 5]}``."""

    modality = MODALITY

    def __call__(self, item: Any, *, item_id: Any = None) -> dict[str, Tensor]:
        """One item's rows; ``InvalidInput`` names the item and the condition it cannot read."""
        from kiban.design.conditions import Condition, ConditionError, parse_conditions

        if isinstance(item, str):
            try:
                conditions = parse_conditions(item, what="properties input")
            except ConditionError as error:
                raise InvalidInput(MODALITY, item_id if item_id is not None else item, str(error)) from None
        elif isinstance(item, Sequence) and all(isinstance(c, Condition) for c in item):
            conditions = list(item)
        else:
            raise InvalidInput(
                MODALITY, item_id, f"expected conditions as text ('logP 1-3, MW < 450') or Conditions, got {type(item).__name__}"
            )
        values = torch.zeros(len(NAMES), _FEATURES)
        for condition in conditions:
            if condition.name not in SCALES:
                raise InvalidInput(MODALITY, item_id, f"no token for property {condition.name!r} (known: {', '.join(NAMES)})")
            row, (centre, scale) = NAMES.index(condition.name), SCALES[condition.name]
            values[row, 0] = 1.0
            for flag, bound in ((1, condition.low), (3, condition.high)):
                if math.isfinite(bound):
                    values[row, flag] = 1.0
                    values[row, flag + 1] = max(-_CLIP, min(_CLIP, (bound - centre) / scale))
        return {"values": values}

    def collate(self, features: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Stack: every item has one row per property, so nothing is padded."""
        return {"values": torch.stack([f["values"] for f in features])}


def _examples() -> list[Any]:
    return ["logP 1 to 3", "MW at most 450, QED at least 0.6", "logP 2, MW 300-400, TPSA < 90, HBD <= 2, RotB 0-5"]


@register_encoder(MODALITY, config=PropertiesEncoderConfig, examples=_examples)
class PropertiesEncoder(Encoder):
    """One token per property: a learned property embedding plus an MLP of its asked bounds."""

    modality = MODALITY
    trains_with_projector = True  # nothing pretrains it: it learns with its projector in every stage

    def __init__(self, config: PropertiesEncoderConfig) -> None:
        super().__init__()
        if config.dim < 1 or config.hidden < 1:
            raise ValueError(f"properties encoder: dim and hidden must be at least 1, got {config.dim}, {config.hidden}")
        self.config = config
        self.output_dim = config.dim
        self.featurizer = PropertiesFeaturizer()
        self.property_embedding = nn.Parameter(torch.randn(len(NAMES), config.dim) * 0.02)
        self.bounds = nn.Sequential(nn.Linear(_FEATURES, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.dim))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, values: Tensor) -> ModalityTokens:
        """Rows [B, len(NAMES), 5] -> tokens [B, len(NAMES), dim], all real."""
        tokens = self.norm(self.property_embedding + self.bounds(values.to(self.property_embedding.dtype)))
        return ModalityTokens(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))


@register_preset(MODALITY)
def tiny() -> PropertiesEncoderConfig:
    """16 wide: for tests."""
    return PropertiesEncoderConfig(dim=16, hidden=32)

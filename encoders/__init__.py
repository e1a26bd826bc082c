"""Per-modality encoders, all keeping one contract (see ``base.py`` and ``README.md``)."""

from kiban.encoders.base import (
    Encoder,
    EncoderSpec,
    Featurizer,
    InvalidInput,
    ModalityTokens,
    config_from_dict,
    config_to_dict,
    create_encoder,
    encoder_spec,
    list_encoders,
    list_presets,
    pad_stack,
    register_encoder,
    register_preset,
)

__all__ = [
    "Encoder",
    "EncoderSpec",
    "Featurizer",
    "InvalidInput",
    "ModalityTokens",
    "config_from_dict",
    "config_to_dict",
    "create_encoder",
    "encoder_spec",
    "list_encoders",
    "list_presets",
    "pad_stack",
    "register_encoder",
    "register_preset",
]

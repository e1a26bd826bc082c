"""kiban (基盤): a multimodal foundation model for the life sciences.

Encoders for proteins, DNA, single cells, microscopy images, molecules and text project into the
token space of an LLM backbone. The public surface:

    from kiban import create_encoder, list_encoders, KibanModel, KibanConfig
"""

from kiban.encoders import (
    InvalidInput,
    ModalityTokens,
    create_encoder,
    list_encoders,
)

__version__ = "0.1.0"

__all__ = [
    "InvalidInput",
    "ModalityTokens",
    "__version__",
    "create_encoder",
    "list_encoders",
]

"""kiban (基盤): a multimodal foundation model for the life sciences.

Encoders for proteins, DNA, single cells, microscopy images, molecules and text project into the
token space of an LLM backbone. The public surface:

    from kiban import create_encoder, list_encoders, KibanModel, KibanConfig

``KibanModel`` and ``KibanConfig`` (``kiban.fusion``) load on first use, so ``import kiban`` does
not pay for the LLM libraries.
"""

from typing import Any

from kiban.encoders import (
    InvalidInput,
    ModalityTokens,
    create_encoder,
    list_encoders,
)
from kiban.version import __version__

__all__ = [
    "InvalidInput",
    "KibanConfig",
    "KibanModel",
    "ModalityTokens",
    "__version__",
    "create_encoder",
    "list_encoders",
]


def __getattr__(name: str) -> Any:
    if name in ("KibanModel", "KibanConfig"):
        from kiban.fusion import model

        return getattr(model, name)
    raise AttributeError(f"module 'kiban' has no attribute {name!r}")

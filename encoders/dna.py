"""DNA encoder: nucleotide sequences -> single-base or k-mer tokens -> a transformer encoder.

Tokenization follows the two common DNA language models: non-overlapping 6-mers as in the
Nucleotide Transformer (Dalla-Torre et al. 2024, Nature Methods 22:287) and overlapping k-mers as
in DNABERT (Ji et al. 2021, Bioinformatics 37:2112); single bases are the third option. The
encoder is a pre-norm ``nn.TransformerEncoder``; a Hugging Face model directory (for instance a
Nucleotide Transformer v1 checkpoint, an ``EsmForMaskedLM`` with an ``EsmTokenizer`` over 6-mers)
can replace it through ``hf_path``, local files only.

Sequence rule (every mode): case is ignored; ``U`` is read as ``T`` (so RNA is encoded as its DNA
equivalent); the IUPAC ambiguity codes R, Y, S, W, K, M, B, D, H, V are read as ``N`` (the
tokenizers know only A, C, G, T, N); leading and trailing whitespace is stripped. Anything else
(digits, gaps ``-``, other letters, whitespace inside) is rejected, naming the letters and their
1-based positions.

Tokens (own vocabulary): ``[PAD] [UNK] [CLS] [SEP] [MASK]``, then ``A C G T N``, then, in k-mer
mode, all 4**k k-mers over ACGT in lexicographic order. An item is ``[CLS] tokens [SEP]`` (``[SEP]``
is the end-of-sequence token).

* ``base``: one token per base.
* ``kmer``: non-overlapping k-mers read left to right, as the Nucleotide Transformer tokenizer
  does: a window of k bases without N is one k-mer token; otherwise (an N, or fewer than k bases
  left) the next base becomes a single-base token and reading resumes after it.
* ``kmer`` with ``overlapping=True``: every window of k bases, one base apart (L - k + 1 tokens);
  a window containing N is ``[UNK]``; a sequence shorter than k is read as single bases.

``max_length`` counts tokens without ``[CLS]``/``[SEP]``.

Reverse strand. ``strand="both"`` encodes the sequence and its reverse complement and averages the
two token embeddings that cover the same bases. The reverse-strand token list is the forward list
reversed with each token reverse-complemented (``ACGTTT`` -> ``AAACGT``, ``N`` -> ``N``), so token j of
the reverse strand covers exactly the bases of forward token n - 1 - j: for bases and overlapping
k-mers this is the reverse complement's own tokenization; for non-overlapping k-mers it keeps the
forward k-mer boundaries (leftover single bases come first on the reverse strand). The averaged
embeddings are therefore invariant to encoding a sequence or its reverse complement (exactly for
bases and overlapping k-mers, and for non-overlapping k-mers when the length is a multiple of k
and there is no N).

Masked-LM head (``mlm_head=True``, off by default so configs saved before it existed rebuild the
same parameters). The built-in transformer gets BERT's / ESM-2's head (dense, GELU, LayerNorm,
projection onto the vocabulary, its own output matrix); a Hugging Face directory is then read with
``AutoModelForMaskedLM`` and must hold that head's weights. ``masked_lm_logits(tokens)`` reads it
on the forward strand; ``[MASK]`` (``featurizer.mask_id``) marks the hidden tokens. The head is
in ``never_trained``: fusion never trains it (it stays what masked-LM pretraining made it), and
variant scoring (``kiban.tasks.variants``) reads it in eval.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kiban.encoders.base import (
    Encoder,
    InvalidInput,
    ModalityTokens,
    byte_table,
    pad_stack,
    read_sequence,
    register_encoder,
    register_preset,
    sequence_bytes,
)

__all__ = [
    "SPECIAL_TOKENS",
    "DnaEncoder",
    "DnaEncoderConfig",
    "DnaFeaturizer",
    "DnaLmHead",
    "DnaTransformer",
    "reverse_complement",
]

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_BASES = "ACGTN"
_AMBIGUOUS = "RYSWKMBDHV"  # IUPAC codes read as N
_IUPAC = "ACGTUN" + _AMBIGUOUS
# IUPAC complements: A-T, C-G, U-A, R(A/G)-Y(C/T), S and W self, K(G/T)-M(A/C), B(not A)-V(not T),
# D(not C)-H(not G), N self.
_COMPLEMENT = str.maketrans(
    "ACGTUNRYSWKMBDHV" + "acgtunryswkmbdhv",
    "TGCAANYRSWMKVHDB" + "tgcaanyrswmkvhdb",
)
_CLEAN = str.maketrans("U" + _AMBIGUOUS, "T" + "N" * len(_AMBIGUOUS))


def reverse_complement(sequence: str) -> str:
    """The reverse complement of a DNA/RNA string, IUPAC-aware and case-preserving.

    ``U`` complements to ``A`` (the result is DNA); ambiguity codes map to their complements
    (R<->Y, K<->M, B<->V, D<->H; S, W, N stay). Other characters raise ``ValueError``.
    """
    bad = sorted({c for c in sequence if c.upper() not in _IUPAC})
    if bad:
        raise ValueError(f"cannot reverse-complement {', '.join(map(repr, bad))}: not IUPAC nucleotide codes")
    return sequence.translate(_COMPLEMENT)[::-1]


@dataclass
class DnaEncoderConfig:
    """Tokenization, transformer and reverse-strand settings. Defaults are the ``default`` preset.

    tokenization: "base" (one token per base) or "kmer" (``k``-mers; ``overlapping`` as DNABERT,
        otherwise non-overlapping as the Nucleotide Transformer).
    max_length, truncate: the most tokens per item (without [CLS]/[SEP]); longer items are
        rejected, or cropped (logged) with ``truncate``.
    rc_augment: training augmentation: the probability that the featurizer replaces an item by its
        reverse complement. Set ``encoder.featurizer.rc_augment = 0`` for evaluation.
    strand: "forward", or "both" to average forward and reverse-complement embeddings per position.
    width, num_layers, num_heads, ff_dim, dropout, positions ("learned" or "sinusoidal"): the
        transformer.
    hf_path: a local Hugging Face model directory (model + tokenizer) to use instead of the
        transformer; the tokenization and transformer fields are then ignored.
    mlm_head: give the encoder a masked-language-model head (for zero-shot variant scoring);
        with ``hf_path`` the directory must hold a masked-LM model with its head weights.
    weights_path: a kiban encoder directory (``kiban pretrain dna`` writes one: config.json +
        model.safetensors) whose weights the built-in transformer loads; its architecture fields
        (tokenization, sizes, ``mlm_head``) replace these.
    """

    tokenization: str = "kmer"
    k: int = 6
    overlapping: bool = False
    max_length: int = 1000
    truncate: bool = False
    rc_augment: float = 0.0
    strand: str = "forward"
    width: int = 256
    num_layers: int = 4
    num_heads: int = 8
    ff_dim: int = 1024
    dropout: float = 0.1
    positions: str = "learned"
    hf_path: str | None = None
    mlm_head: bool = False
    weights_path: str | None = None


# Settings a saved encoder's weights do not fix: the rest come from its directory (``weights_path``).
_RUNTIME_FIELDS = ("truncate", "rc_augment", "strand", "dropout", "weights_path")


# ----------------------------------------------------------------------------------------------
# Featurizer


class DnaFeaturizer:
    """Nucleotide sequence (str, ``Bio.Seq`` or ``Bio.SeqRecord``) -> token ids.

    One item gives ``{"tokens": [n + 2] int64}`` (``[CLS]``, n sequence tokens, ``[SEP]``; with an
    ``hf_tokenizer``, whatever special tokens it adds); ``collate`` right-pads to
    ``{"tokens": [B, T]}``. Holds only the vocabulary and settings (or a Hugging Face tokenizer), so
    it pickles into DataLoader workers.
    """

    modality = "dna"

    def __init__(
        self,
        *,
        tokenization: str = "kmer",
        k: int = 6,
        overlapping: bool = False,
        max_length: int = 1000,
        truncate: bool = False,
        rc_augment: float = 0.0,
        hf_tokenizer: Any = None,
    ) -> None:
        if tokenization not in ("base", "kmer"):
            raise ValueError(f"tokenization must be 'base' or 'kmer', got {tokenization!r}")
        if tokenization == "kmer" and not 1 <= k <= 8:
            raise ValueError(f"k must be between 1 and 8 (4**k tokens), got {k}")
        if not 0.0 <= rc_augment <= 1.0:
            raise ValueError(f"rc_augment is a probability, got {rc_augment}")
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.tokenization = tokenization
        self.k = k
        self.overlapping = overlapping
        self.max_length = max_length
        self.truncate = truncate
        self.rc_augment = rc_augment
        self.hf_tokenizer = hf_tokenizer
        if hf_tokenizer is None:
            tokens = [*SPECIAL_TOKENS, *_BASES]
            if tokenization == "kmer":
                tokens += ["".join(kmer) for kmer in itertools.product("ACGT", repeat=k)]
            self.tokens = tokens
            self.vocab = {token: i for i, token in enumerate(tokens)}
            self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
            self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
            self.mask_id: int | None = self.vocab["[MASK]"]
            self.boundary_ids = (self.pad_id, self.cls_id, self.sep_id)
            # byte -> base token id; byte -> base code 0..3 (N: -1) for k-mer numbers
            self._base_ids = byte_table({base: self.vocab[base] for base in _BASES})
            self._codes = byte_table({base: i for i, base in enumerate("ACGT")})
            self._first_kmer = self.vocab["A" * k] if tokenization == "kmer" else 0
        else:
            self.vocab = dict(hf_tokenizer.get_vocab())
            self.pad_id, self.unk_id = hf_tokenizer.pad_token_id, hf_tokenizer.unk_token_id
            self.mask_id = hf_tokenizer.mask_token_id
            names = ("pad_token_id", "cls_token_id", "sep_token_id", "eos_token_id", "bos_token_id")
            ids = (getattr(hf_tokenizer, name, None) for name in names)
            self.boundary_ids = tuple(sorted({i for i in ids if i is not None}))

    @property
    def vocab_size(self) -> int:
        """The number of token ids (bases or k-mers plus specials)."""
        return max(self.vocab.values()) + 1

    def sequence(self, item: Any, *, item_id: Any = None) -> str:
        """The cleaned sequence an item's tokens are read from: upper case over ACGTN (``U`` as
        ``T``, ambiguity codes as ``N``). Raises ``InvalidInput`` as ``__call__`` does.
        """
        return self._sequence(item, item_id)[0]

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entries of token ids (``[7, 16]`` -> ``["G", "ACG"]``)."""
        if self.hf_tokenizer is not None:
            return list(self.hf_tokenizer.convert_ids_to_tokens(list(ids)))
        return [self.tokens[i] for i in ids]

    def rc_table(self) -> list[int]:
        """For every token id, the id of its reverse complement (special tokens map to themselves)."""
        table = list(range(self.vocab_size))
        for token, i in self.vocab.items():
            if token and all(c in _BASES for c in token):
                table[i] = self.vocab.get(reverse_complement(token), self.unk_id)
        return table

    def __call__(
        self, item: Any, *, item_id: Any = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Tokens of one item; ``generator`` makes ``rc_augment`` reproducible."""
        sequence, item_id = self._sequence(item, item_id)
        if self.rc_augment > 0 and torch.rand((), generator=generator).item() < self.rc_augment:
            sequence = reverse_complement(sequence)
        ids: Any = self._tokenize(sequence) if self.hf_tokenizer is not None else self._token_array(sequence)
        if len(ids) > self.max_length:
            if not self.truncate:
                raise InvalidInput(
                    "dna",
                    item_id,
                    f"is {len(sequence)} bases long ({len(ids)} tokens), over max_length {self.max_length} "
                    "tokens; set truncate=True to crop",
                )
            logger.warning(
                "dna %r: cropped from %d to max_length %d tokens",
                str(item_id)[:60],
                len(ids),
                self.max_length,
            )
            ids = ids[: self.max_length]
        if self.hf_tokenizer is not None:
            ids = self.hf_tokenizer.build_inputs_with_special_tokens(ids)
            return {"tokens": torch.tensor(ids, dtype=torch.long)}
        return {"tokens": torch.from_numpy(np.concatenate([[self.cls_id], ids, [self.sep_id]]).astype(np.int64))}

    def collate(self, features: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Pad tokens into ``tokens`` and ``padding`` tensors [B, N]."""
        tokens, _ = pad_stack([f["tokens"] for f in features], pad_value=self.pad_id)
        return {"tokens": tokens}

    def _sequence(self, item: Any, item_id: Any) -> tuple[str, Any]:
        """The cleaned sequence over ACGTN and the id to name the item by in errors."""
        sequence, item_id = read_sequence(
            item,
            item_id,
            modality="dna",
            kind="nucleotide",
            allowed=_IUPAC,
            allowed_text="A, C, G, T, N, U, and the IUPAC codes R, Y, S, W, K, M, B, D, H, V",
        )
        return sequence.translate(_CLEAN), item_id

    def _tokenize(self, sequence: str) -> list[int]:
        """Sequence tokens (no [CLS]/[SEP]) of a cleaned sequence."""
        if self.hf_tokenizer is not None:
            return self.hf_tokenizer(sequence, add_special_tokens=False)["input_ids"]
        return self._token_array(sequence).tolist()

    def _token_array(self, sequence: str) -> np.ndarray:
        """``_tokenize`` over byte lookup tables: no Python step per base.

        k-mers (``itertools.product`` order) are numbered in base 4, so a k-mer's id is the first
        k-mer's id plus its number. Non-overlapping: in each N-free run of m bases, ``m // k`` k-mers
        from its start, then the ``m % k`` bases left one by one, and every N alone (what reading
        greedily from the left gives: a window holding an N or the sequence end is one base).
        """
        raw = sequence_bytes(sequence)
        k = self.k
        if self.tokenization == "base" or len(raw) < k:
            return self._base_ids[raw]
        codes = self._codes[raw]
        n = len(codes)
        weights = 4 ** np.arange(k - 1, -1, -1)
        if self.overlapping:
            windows = np.lib.stride_tricks.sliding_window_view(codes, k)
            kmers = self._first_kmer + np.maximum(windows, 0) @ weights
            return np.where((windows < 0).any(axis=1), self.unk_id, kmers)
        if "N" not in sequence:  # the common case: k-mers from the start, the last n % k bases alone
            whole = n // k * k
            return np.concatenate([self._first_kmer + codes[:whole].reshape(-1, k) @ weights, self._base_ids[raw[whole:]]])
        is_n = codes < 0
        position = np.arange(n)
        run_start = np.maximum.accumulate(np.where(is_n, position, -1)) + 1
        run_end = np.minimum.accumulate(np.where(is_n, position, n)[::-1])[::-1]
        offset = position - run_start
        whole = (run_end - run_start) // k * k  # bases of each run covered by k-mers
        kmer_start = ~is_n & (offset < whole) & (offset % k == 0)
        single = is_n | (offset >= whole)
        starts = np.flatnonzero(kmer_start | single)
        at_kmer = kmer_start[starts]
        ids = self._base_ids[raw[starts]]
        first = starts[at_kmer]
        ids[at_kmer] = self._first_kmer + codes[first[:, None] + np.arange(k)] @ weights
        return ids


# ----------------------------------------------------------------------------------------------
# Transformer


class DnaTransformer(nn.Module):
    """Token embedding + learned or sinusoidal positions + a pre-norm transformer encoder.

    ``forward(tokens [B, T], padding [B, T] bool)`` -> hidden states [B, T, width].
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        padding_idx: int,
        max_tokens: int,
        width: int,
        num_layers: int,
        num_heads: int,
        ff_dim: int,
        dropout: float,
        positions: str,
    ) -> None:
        super().__init__()
        if positions not in ("learned", "sinusoidal"):
            raise ValueError(f"positions must be 'learned' or 'sinusoidal', got {positions!r}")
        self.embed_tokens = nn.Embedding(vocab_size, width, padding_idx=padding_idx)
        self.embed_positions = nn.Embedding(max_tokens, width) if positions == "learned" else None
        layer = nn.TransformerEncoderLayer(
            width, num_heads, ff_dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # Nested tensors only speed up inference and are incompatible with norm_first; off keeps
        # padded and unpadded results identical.
        self.layers = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(width), enable_nested_tensor=False
        )
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        with torch.no_grad():
            self.embed_tokens.weight[padding_idx].zero_()
        if self.embed_positions is not None:
            nn.init.normal_(self.embed_positions.weight, std=0.02)

    def forward(self, tokens: Tensor, padding: Tensor) -> Tensor:
        """Hidden states [B, N, D] of tokens [B, N]; ``padding`` is True at pad positions."""
        x = self.embed_tokens(tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(torch.arange(tokens.shape[1], device=tokens.device))
        else:
            x = x + _sinusoidal(tokens.shape[1], x.shape[-1], device=x.device, dtype=x.dtype)
        return self.layers(self.dropout(x), src_key_padding_mask=padding)


def _sinusoidal(length: int, width: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The fixed position encoding of Vaswani et al. 2017: [length, width]."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(
        torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width)
    )
    table = torch.zeros(length, width, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return table.to(dtype)


class _HuggingFaceBackbone(nn.Module):
    """A Hugging Face encoder behind the ``(tokens, padding) -> hidden [B, T, D]`` call of DnaTransformer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, padding: Tensor) -> Tensor:
        return self.model(input_ids=tokens, attention_mask=(~padding).long()).last_hidden_state


class DnaLmHead(nn.Module):
    """The masked-LM head of BERT and ESM-2: hidden [B, T, width] -> logits [B, T, vocab_size].

    dense -> GELU -> LayerNorm -> projection onto the vocabulary. The projection has its own
    matrix rather than being tied to the token embedding: the whole head is ``never_trained``, so
    fusion training (which may update the embedding) cannot move what it predicts.
    """

    def __init__(self, *, width: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.layer_norm = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """Token logits [B, N, V] from hidden states [B, N, D]."""
        return self.decoder(self.layer_norm(nn.functional.gelu(self.dense(hidden))))


class _HuggingFaceLmHead(nn.Module):
    """A Hugging Face masked-LM head (``EsmForMaskedLM.lm_head``, ``BertForMaskedLM.cls`` ...) kept
    under its own attribute name, so that ``export_assets`` can put it back into a masked-LM model.
    """

    def __init__(self, attribute: str, head: nn.Module) -> None:
        super().__init__()
        self.attribute = attribute
        self.add_module(attribute, head)

    def forward(self, hidden: Tensor) -> Tensor:
        return getattr(self, self.attribute)(hidden)


# ----------------------------------------------------------------------------------------------
# Encoder


def _examples() -> list[Any]:
    return [
        "ACGTACGTTAGC",
        "ttgacaNNNNtataatGCGCAAGGCTTACGATCGATCGGA",
        "ATGGCGTACGATCGATCGTAGCTAGCTAGCTRGATCGATGCTAGCTAGGCTAGCTAGCTGATCGATCGTAGCTAGCTAGCTAGCTAGCAUGA",
    ]


@register_encoder("dna", config=DnaEncoderConfig, examples=_examples, default_preset="default")
class DnaEncoder(Encoder):
    """Transformer encoder over DNA tokens (Nucleotide Transformer / DNABERT style tokenization).

    ``forward(tokens=[B, T])`` returns ``ModalityTokens`` with embeddings [B, N, D] and mask [B, N]:
    B sequences, N sequence tokens of the longest (bases or k-mers; [CLS]/[SEP] and the Hugging Face
    tokenizer's special tokens are dropped), D = ``width`` (or the Hugging Face model's hidden
    size). Padding positions are masked False and zeroed.
    """

    modality = "dna"

    def __init__(self, config: DnaEncoderConfig) -> None:
        super().__init__()
        if config.strand not in ("forward", "both"):
            raise ValueError(f"strand must be 'forward' or 'both', got {config.strand!r}")
        saved = None
        if config.weights_path is not None:
            from kiban.encoders.pretraining import read_encoder_dir

            values, saved = read_encoder_dir(config.weights_path, modality="dna")
            if values.get("hf_path") is not None:
                raise ValueError(f"dna weights_path {config.weights_path}: a Hugging Face model loads through hf_path")
            architecture = {k: v for k, v in values.items() if k not in _RUNTIME_FIELDS}
            config = dataclasses.replace(config, **architecture)
        self.config = config
        self.lm_head: nn.Module | None = None
        never_trained = []
        if config.hf_path is not None:
            model, head, tokenizer, max_length = _load_hugging_face(
                config.hf_path, max_length=config.max_length, mlm_head=config.mlm_head
            )
            self.featurizer = DnaFeaturizer(
                max_length=max_length,
                truncate=config.truncate,
                rc_augment=config.rc_augment,
                hf_tokenizer=tokenizer,
            )
            self.backbone: nn.Module = _HuggingFaceBackbone(model)
            self.output_dim = model.config.hidden_size
            if getattr(model, "contact_head", None) is not None:
                # ESM's protein contact head: the DNA tokens never use it.
                never_trained.append("backbone.model.contact_head.")
            if head is not None:
                self.lm_head = head
        else:
            self.featurizer = DnaFeaturizer(
                tokenization=config.tokenization,
                k=config.k,
                overlapping=config.overlapping,
                max_length=config.max_length,
                truncate=config.truncate,
                rc_augment=config.rc_augment,
            )
            self.backbone = DnaTransformer(
                vocab_size=self.featurizer.vocab_size,
                padding_idx=self.featurizer.pad_id,
                max_tokens=config.max_length + 2,
                width=config.width,
                num_layers=config.num_layers,
                num_heads=config.num_heads,
                ff_dim=config.ff_dim,
                dropout=config.dropout,
                positions=config.positions,
            )
            self.output_dim = config.width
            if config.mlm_head:
                self.lm_head = DnaLmHead(width=config.width, vocab_size=self.featurizer.vocab_size)
        if self.lm_head is not None:
            never_trained.append("lm_head.")
        # The tokens never pass through these: frozen, so that every trainable parameter gets a
        # gradient (DDP's unused-parameter check), and fusion's "full" stage re-freezes them after
        # unfreezing everything. A Hugging Face head's output matrix tied to the word embedding
        # is named under ``backbone.`` (registered first) and so stays trainable, as in ESM-2.
        self.never_trained = tuple(never_trained)
        for name, parameter in self.named_parameters():
            if name.startswith(self.never_trained):
                parameter.requires_grad_(False)
        self.register_buffer(
            "rc_ids", torch.tensor(self.featurizer.rc_table(), dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "boundary_ids", torch.tensor(self.featurizer.boundary_ids, dtype=torch.long), persistent=False
        )
        if saved is not None:
            missing, unexpected = self.load_state_dict(saved, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"weights in {config.weights_path} do not fit this DNA encoder: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )

    def portable_config(self) -> DnaEncoderConfig:
        """This config without ``weights_path``: it already holds the saved architecture."""
        return dataclasses.replace(self.config, weights_path=None)

    def export_assets(self, directory: Path) -> tuple[DnaEncoderConfig, tuple[str, ...]]:
        """With ``hf_path``: the Hugging Face model and tokenizer, so that a saved fused model
        rebuilds this encoder from its own folder (its saved weights then replace these).
        """
        if self.config.hf_path is None:
            return self.portable_config(), ()
        directory.mkdir(parents=True, exist_ok=True)
        model = self.backbone.model
        if self.lm_head is not None:
            model = _masked_lm_model(model, self.lm_head)
        model.save_pretrained(directory)
        self.featurizer.hf_tokenizer.save_pretrained(directory)
        return dataclasses.replace(self.portable_config(), hf_path=str(directory)), ("hf_path",)

    def masked_lm_logits(self, tokens: Tensor) -> Tensor:
        """Masked-LM logits [B, T, V] at every position of ``tokens`` [B, T] (featurizer ids, with
        ``featurizer.mask_id`` at the hidden positions; V is the head's vocabulary size).

        Reads the strand it is given: ``strand="both"`` averages embeddings, not predictions (the
        reverse strand's token at a position is the complement), so callers that want both
        strands score the reverse complement separately, as ``kiban.tasks.variants`` does.
        """
        if self.lm_head is None:
            raise ValueError(
                "this DNA encoder has no masked-LM head: build it with mlm_head=True (with hf_path, "
                "a directory holding a masked-LM model such as EsmForMaskedLM)"
            )
        return self.lm_head(self.backbone(tokens, tokens.eq(self.featurizer.pad_id)))

    def forward(self, tokens: Tensor) -> ModalityTokens:
        """tokens: [B, T] from the featurizer."""
        padding = tokens.eq(self.featurizer.pad_id)
        keep = ~torch.isin(tokens, self.boundary_ids)
        hidden = self.backbone(tokens, padding)
        if self.config.strand == "both":
            flip = _flip_index(keep)
            reverse = self.backbone(self.rc_ids[tokens.gather(1, flip)], padding)
            hidden = (hidden + reverse.gather(1, flip.unsqueeze(-1).expand_as(reverse))) / 2
        embeddings, mask = _left_pack(hidden, keep)
        return ModalityTokens(embeddings, mask)


def _flip_index(keep: Tensor) -> Tensor:
    """[B, T] positions that reverse each row's run of sequence tokens and leave the rest in place."""
    length = keep.shape[1]
    position = torch.arange(length, device=keep.device).expand_as(keep)
    first = keep.int().argmax(1, keepdim=True)
    last = length - 1 - keep.flip(1).int().argmax(1, keepdim=True)
    return torch.where(keep, first + last - position, position)


def _left_pack(hidden: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Move the kept positions of each row to the front: ([B, N, D] zero-padded, mask [B, N])."""
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, : int(keep.sum(1).max())]
    mask = keep.gather(1, order)
    embeddings = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return embeddings.masked_fill(~mask.unsqueeze(-1), 0.0), mask


def _load_hugging_face(
    path: str, *, max_length: int, mlm_head: bool
) -> tuple[nn.Module, nn.Module | None, Any, int]:
    """Base model, masked-LM head (with ``mlm_head``), tokenizer and the usable max_length from a
    local Hugging Face directory.
    """
    import transformers

    location = Path(path).expanduser()
    if not location.is_dir():
        raise FileNotFoundError(f"dna hf_path {str(path)!r} is not a local directory")
    hf_config = transformers.AutoConfig.from_pretrained(location, local_files_only=True)
    head = None
    if mlm_head:
        model, head = _load_masked_lm(location)
    else:
        # BERT-like encoders add a pooler that masked-LM checkpoints lack (it would be random) and
        # the tokens never use; leaving it out keeps every trainable parameter in the gradient path.
        extra = {"add_pooling_layer": False} if hf_config.model_type in ("esm", "bert", "roberta") else {}
        model = transformers.AutoModel.from_pretrained(location, local_files_only=True, **extra)
    tokenizer = transformers.AutoTokenizer.from_pretrained(location, local_files_only=True)
    # Absolute position tables bound the length; past it the model would fail deep inside torch.
    if getattr(hf_config, "position_embedding_type", "absolute") == "absolute":
        specials = len(tokenizer.build_inputs_with_special_tokens([]))
        # ESM numbers positions from padding_idx + 1 (RoBERTa style).
        offset = hf_config.pad_token_id + 1 if hf_config.model_type in ("esm", "roberta") else 0
        capacity = hf_config.max_position_embeddings - offset - specials
        if max_length > capacity:
            logger.warning(
                "dna: %s holds at most %d tokens; max_length %d lowered to it", path, capacity, max_length
            )
            max_length = capacity
    return model, head, tokenizer, max_length


def _load_masked_lm(location: Path) -> tuple[nn.Module, _HuggingFaceLmHead]:
    """(base model, head) of the ``AutoModelForMaskedLM`` in ``location``; its head weights must be
    there (a head transformers would initialise at random is refused). The base model is the one
    ``AutoModel`` would give without a pooler, so parameter names match the head-less encoder's.
    """
    import transformers

    try:
        model, info = transformers.AutoModelForMaskedLM.from_pretrained(
            location, local_files_only=True, output_loading_info=True
        )
    except ValueError as error:  # a model type with no masked-LM class
        raise ValueError(f"dna hf_path {str(location)!r} has no masked-LM model: {error}") from None
    prefix = model.base_model_prefix
    heads = [(name, module) for name, module in model.named_children() if name != prefix]
    if len(heads) != 1:
        found = ", ".join(name for name, _ in heads) or "none"
        raise ValueError(f"dna hf_path {str(location)!r}: expected one masked-LM head module, found {found}")
    name, head = heads[0]
    missing = [key for key in info["missing_keys"] if key.startswith(f"{name}.")]
    if missing:
        raise ValueError(
            f"dna hf_path {str(location)!r} holds no masked-LM head weights (missing {', '.join(missing[:4])}); "
            "use a masked-LM checkpoint or set mlm_head=False"
        )
    return model.base_model, _HuggingFaceLmHead(name, head)


def _masked_lm_model(base: nn.Module, head: _HuggingFaceLmHead) -> nn.Module:
    """A Hugging Face masked-LM model made of this encoder's own base model and head (for
    ``save_pretrained``); its skeleton is built on the meta device, so nothing is allocated twice.
    """
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForMaskedLM.from_config(base.config)
    setattr(model, model.base_model_prefix, base)
    setattr(model, head.attribute, getattr(head, head.attribute))
    return model


# ----------------------------------------------------------------------------------------------
# Presets


@register_preset("dna")
def tiny() -> DnaEncoderConfig:
    """Single bases, 16 wide, 2 layers: a few thousand parameters, for tests."""
    return DnaEncoderConfig(
        tokenization="base", max_length=128, width=16, num_layers=2, num_heads=2, ff_dim=32, dropout=0.0
    )


@register_preset("dna", "default")
def default() -> DnaEncoderConfig:
    """Non-overlapping 6-mers (Nucleotide Transformer style, 1000 tokens = 6 kb), 256 wide, 4 layers."""
    return DnaEncoderConfig(
        tokenization="kmer",
        k=6,
        max_length=1000,
        width=256,
        num_layers=4,
        num_heads=8,
        ff_dim=1024,
        dropout=0.1,
    )

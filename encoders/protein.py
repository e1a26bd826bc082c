"""Protein encoder: ESM-2 (fair-esm) over amino-acid sequences, one embedding per residue.

Follows Lin et al. 2023, "Evolutionary-scale prediction of atomic-level protein structure with a
language model" (Science 379:1123), using the ``esm.ESM2`` module of the ``fair-esm`` package, so
published ESM-2 checkpoints load as they are. Every published size is a preset (``esm2_t6_8m`` ...
``esm2_t48_15b``); ``tiny`` is a few-thousand-parameter model for tests.

Real weights come from a local path (``weights_path``), never from the network:

* a torch-hub ``.pt`` file as fair-esm publishes it (``{"model": fairseq state dict, "cfg":
  {"model": Namespace(...)}}``), read with ``torch.load(weights_only=True)``; a co-located
  ``<name>-contact-regression.pt`` is picked up for ``contacts()`` the way fair-esm does;
* a Hugging Face ESM-2 directory (``config.json`` + ``model.safetensors``), read by
  ``transformers.EsmForMaskedLM`` and converted key by key into ``esm.ESM2``, so both formats run
  through one forward pass and give attentions and contacts the same way;
* a kiban encoder directory as ``kiban pretrain protein`` writes it (``config.json`` with
  ``"format": "kiban-encoder"`` + ``model.safetensors``; ``kiban.encoders.pretraining.save_encoder``).

Residue rule: the 20 standard amino acids plus X (unknown), B (D/N), Z (E/Q), U (selenocysteine)
and O (pyrrolysine) are accepted in either case; these are exactly the residue letters of the ESM
alphabet. Anything else (digits, J, ``*`` stop codons, gaps ``-``/``.``, whitespace inside the
sequence) is rejected with the letters and their 1-based positions. Leading and trailing
whitespace is stripped.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import esm
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
    "RESIDUES",
    "EsmWeights",
    "ProteinEncoder",
    "ProteinEncoderConfig",
    "ProteinFeaturizer",
    "read_esm_checkpoint",
    "read_hf_esm",
    "read_kiban_esm",
]

logger = logging.getLogger(__name__)

#: Residue letters the featurizer accepts: the 20 standard amino acids, then X, B, Z, U, O.
RESIDUES = "ACDEFGHIKLMNPQRSTVWY" + "XBZUO"


@dataclass
class ProteinEncoderConfig:
    """ESM-2 architecture and featurizer settings. The defaults are ESM-2 8M (``esm2_t6_8m``).

    num_layers, embed_dim, attention_heads, token_dropout, layer_norm_eps: the ESM-2
        architecture; with ``weights_path`` set, the checkpoint's own values replace these.
    repr_layer: the layer whose output becomes the tokens: -1 is the last (after ESM-2's final
        layer norm), 0 the embedding layer, other negative values count back from the last.
    max_length: the longest sequence accepted, in residues (ESM-2 was trained on 1022 + BOS/EOS).
    truncate: crop longer sequences to ``max_length`` (logged) instead of rejecting them.
    weights_path: a local torch-hub ``.pt`` file, Hugging Face ESM-2 directory or kiban encoder
        directory (``kiban pretrain``); None gives a randomly initialised model.
    """

    num_layers: int = 6
    embed_dim: int = 320
    attention_heads: int = 20
    token_dropout: bool = True
    layer_norm_eps: float = 1e-5  # fair-esm's nn.LayerNorm default; HF ESM-2 configs say the same
    repr_layer: int = -1
    max_length: int = 1022
    truncate: bool = False
    weights_path: str | None = None


# ----------------------------------------------------------------------------------------------
# Featurizer


def _alphabet() -> esm.data.Alphabet:
    # ESM-2 uses the ESM-1b alphabet: <cls> <pad> <eos> <unk>, 29 letters, <null_1>, <mask>.
    return esm.data.Alphabet.from_architecture("ESM-1b")


class ProteinFeaturizer:
    """Amino-acid sequence (str, ``Bio.Seq`` or ``Bio.SeqRecord``) -> ESM alphabet tokens.

    One item gives ``{"tokens": [L + 2] int64}``: ``<cls>``, one token per residue, ``<eos>`` (what
    fair-esm's ``BatchConverter`` produces). ``collate`` right-pads with ``<pad>`` to
    ``{"tokens": [B, T]}``. Holds only the vocabulary and settings, so it pickles cheaply into
    DataLoader workers.
    """

    modality = "protein"

    def __init__(self, *, max_length: int = 1022, truncate: bool = False) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        alphabet = _alphabet()
        self.max_length = max_length
        self.truncate = truncate
        self.token_ids = {letter: alphabet.get_idx(letter) for letter in RESIDUES}
        self.cls_idx = alphabet.cls_idx
        self.eos_idx = alphabet.eos_idx
        self.padding_idx = alphabet.padding_idx
        self._table = byte_table(self.token_ids)  # residue byte -> ESM token id

    def __call__(self, item: Any, *, item_id: Any = None) -> dict[str, Tensor]:
        """ESM tokens of one sequence; ``InvalidInput`` names letters outside the alphabet."""
        sequence, item_id = self._sequence(item, item_id)
        if len(sequence) > self.max_length:
            if not self.truncate:
                raise InvalidInput(
                    "protein",
                    item_id,
                    f"is {len(sequence)} residues long, over max_length {self.max_length}; "
                    "set truncate=True to crop",
                )
            logger.warning(
                "protein %r: cropped from %d to max_length %d residues",
                str(item_id)[:60],
                len(sequence),
                self.max_length,
            )
            sequence = sequence[: self.max_length]
        ids = np.empty(len(sequence) + 2, dtype=np.int64)
        ids[0], ids[-1] = self.cls_idx, self.eos_idx
        ids[1:-1] = self._table[sequence_bytes(sequence)]  # read_sequence checked every letter
        return {"tokens": torch.from_numpy(ids)}

    def collate(self, features: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Pad token sequences into ``tokens`` [B, N] with the ESM padding index."""
        tokens, _ = pad_stack([f["tokens"] for f in features], pad_value=self.padding_idx)
        return {"tokens": tokens}

    def _sequence(self, item: Any, item_id: Any) -> tuple[str, Any]:
        """The cleaned, upper-case residue string and the id to name the item by in errors."""
        return read_sequence(
            item, item_id, modality="protein", kind="amino-acid", allowed=self.token_ids, allowed_text=", ".join(RESIDUES)
        )


# ----------------------------------------------------------------------------------------------
# Encoder


def _examples() -> list[Any]:
    return [
        "MKTAYIAKQR",
        "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF",
        "GSHMSLFDFFKNKGSAATATDRLKLLFGGSSXLNQVTELEKQLKEAGVDQAFQKIKDRLAL",
    ]


@register_encoder("protein", config=ProteinEncoderConfig, examples=_examples, default_preset="esm2_t6_8m")
class ProteinEncoder(Encoder):
    """ESM-2 (Lin et al. 2023) over a batch of protein sequences -> per-residue tokens.

    ``forward(tokens=[B, T])`` returns ``ModalityTokens`` with embeddings [B, N, D] and mask [B, N]:
    B sequences, N residues of the longest one (the BOS/EOS tokens are stripped, so token j is
    residue j + 1), D = ``embed_dim``. Padding positions are masked False and zeroed.
    """

    modality = "protein"

    def __init__(self, config: ProteinEncoderConfig) -> None:
        super().__init__()
        weights = None
        if config.weights_path is not None:
            weights = _read_weights(config.weights_path)
            if weights.architecture != _architecture(config):
                logger.info(
                    "protein: architecture %s taken from %s", weights.architecture, config.weights_path
                )
            config = dataclasses.replace(config, **weights.architecture)
        num_layers = config.num_layers
        repr_layer = config.repr_layer + num_layers + 1 if config.repr_layer < 0 else config.repr_layer
        if not 0 <= repr_layer <= num_layers:
            raise ValueError(
                f"repr_layer {config.repr_layer} is outside 0..{num_layers} (or -{num_layers + 1}..-1)"
            )

        self.config = config
        self.output_dim = config.embed_dim
        self.featurizer = ProteinFeaturizer(max_length=config.max_length, truncate=config.truncate)
        self.repr_layer = repr_layer
        self.model = esm.ESM2(
            num_layers=config.num_layers,
            embed_dim=config.embed_dim,
            attention_heads=config.attention_heads,
            alphabet=_alphabet(),
            token_dropout=config.token_dropout,
        )
        for module in self.model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = config.layer_norm_eps
        if weights is not None:
            _load_weights(self.model, weights, source=config.weights_path)

        # The MLM head and the contact regression stay in the module so real checkpoints load
        # strictly and variant scoring / contacts() can use them, but the tokens never pass
        # through them: frozen, every trainable parameter gets a gradient when the encoder trains
        # (DDP's unused-parameter check relies on that). The LM head's output matrix is the token
        # embedding itself (tied), which stays trainable, so it is not named here. Layers above
        # repr_layer, and the final layer norm unless the last layer is read, are unused too.
        unused = [
            "model.lm_head.dense.",
            "model.lm_head.layer_norm.",
            "model.lm_head.bias",
            "model.contact_head.",
        ]
        unused += [f"model.layers.{i}." for i in range(repr_layer, num_layers)]
        if repr_layer < num_layers:
            unused.append("model.emb_layer_norm_after.")
        self.never_trained = tuple(unused)  # fusion's "full" stage re-freezes these after unfreezing all
        for name, parameter in self.named_parameters():
            if name.startswith(self.never_trained):
                parameter.requires_grad_(False)

    def portable_config(self) -> ProteinEncoderConfig:
        """This config without ``weights_path``: it already holds the checkpoint's architecture."""
        return dataclasses.replace(self.config, weights_path=None)

    def forward(self, tokens: Tensor, *, return_attentions: bool = False) -> ModalityTokens:
        """tokens: [B, T] from the featurizer (T = longest sequence + 2).

        With ``return_attentions``, ``attentions`` is [B, layers, heads, N, N]: ESM-2's attention
        probabilities between residues (BOS/EOS rows and columns cut away, so rows sum to a little
        under 1; entries touching padding are 0), the input of ESM-2's contact head.
        """
        out = self.model(tokens, repr_layers=[self.repr_layer], need_head_weights=return_attentions)
        mask = self._residue_mask(tokens)
        embeddings = out["representations"][self.repr_layer][:, 1:-1].masked_fill(~mask.unsqueeze(-1), 0.0)
        attentions = None
        if return_attentions:
            pair = (mask.unsqueeze(1) & mask.unsqueeze(2)).to(embeddings.dtype)
            attentions = out["attentions"][..., 1:-1, 1:-1] * pair[:, None, None]
        return ModalityTokens(embeddings, mask, attentions)

    @torch.no_grad()
    def contacts(self, batch: Mapping[str, Tensor]) -> Tensor:
        """ESM-2's own contact probabilities for a collated batch: [B, N, N] over residues.

        Entries touching padding are 0. Meaningful only with real weights that include the contact
        regression (a warning says so when it was missing from the checkpoint).
        """
        tokens = batch["tokens"]
        contacts = self.model(tokens, return_contacts=True)["contacts"]
        mask = self._residue_mask(tokens)
        return contacts * (mask.unsqueeze(1) & mask.unsqueeze(2)).to(contacts.dtype)

    def _residue_mask(self, tokens: Tensor) -> Tensor:
        """[B, T - 2]: True at residues, once BOS and the last column are cut (EOS or padding there)."""
        residues = tokens[:, 1:-1]
        return residues.ne(self.featurizer.padding_idx) & residues.ne(self.featurizer.eos_idx)


# ----------------------------------------------------------------------------------------------
# Presets: the published ESM-2 sizes (Lin et al. 2023) and a tiny one for tests.


@register_preset("protein")
def tiny() -> ProteinEncoderConfig:
    """2 layers, 16 wide, 2 heads: about 7k parameters, for tests."""
    return ProteinEncoderConfig(num_layers=2, embed_dim=16, attention_heads=2)


@register_preset("protein")
def esm2_t6_8m() -> ProteinEncoderConfig:
    return ProteinEncoderConfig(num_layers=6, embed_dim=320, attention_heads=20)


@register_preset("protein")
def esm2_t12_35m() -> ProteinEncoderConfig:
    return ProteinEncoderConfig(num_layers=12, embed_dim=480, attention_heads=20)


@register_preset("protein")
def esm2_t30_150m() -> ProteinEncoderConfig:
    return ProteinEncoderConfig(num_layers=30, embed_dim=640, attention_heads=20)


@register_preset("protein")
def esm2_t33_650m() -> ProteinEncoderConfig:
    return ProteinEncoderConfig(num_layers=33, embed_dim=1280, attention_heads=20)


@register_preset("protein")
def esm2_t36_3b() -> ProteinEncoderConfig:
    return ProteinEncoderConfig(num_layers=36, embed_dim=2560, attention_heads=40)


@register_preset("protein")
def esm2_t48_15b() -> ProteinEncoderConfig:
    return ProteinEncoderConfig(num_layers=48, embed_dim=5120, attention_heads=40)


# ----------------------------------------------------------------------------------------------
# Real weights


@dataclass
class EsmWeights:
    """ESM-2 weights read from a file: the architecture (``ProteinEncoderConfig`` field values)
    and an ``esm.ESM2`` state dict.
    """

    architecture: dict[str, Any]
    state_dict: dict[str, Tensor]


def _architecture(config: ProteinEncoderConfig) -> dict[str, Any]:
    return {
        "num_layers": config.num_layers,
        "embed_dim": config.embed_dim,
        "attention_heads": config.attention_heads,
        "token_dropout": config.token_dropout,
        "layer_norm_eps": config.layer_norm_eps,
    }


def _read_weights(path: str) -> EsmWeights:
    location = Path(path).expanduser()
    if location.is_dir():
        if _is_kiban_encoder(location):
            return read_kiban_esm(location)
        return read_hf_esm(location)
    if location.is_file():
        return read_esm_checkpoint(location)
    raise FileNotFoundError(
        f"protein weights_path {str(path)!r} does not exist; give a local fair-esm .pt file or a "
        "Hugging Face ESM-2 directory"
    )


def read_esm_checkpoint(path: str | Path) -> EsmWeights:
    """Read a fair-esm torch-hub ESM-2 ``.pt`` file.

    The file holds ``{"model": state dict with fairseq keys (encoder.sentence_encoder.*,
    encoder.lm_head.*), "cfg": {"model": Namespace(encoder_layers, encoder_embed_dim,
    encoder_attention_heads, token_dropout, ...)}}``. It is unpickled with ``weights_only=True``,
    allowing only ``argparse.Namespace`` beyond tensors and containers. As fair-esm's
    ``load_model_and_alphabet_local`` does, ``<stem>-contact-regression.pt`` next to it is merged in.
    """
    path = Path(path)
    data = _torch_load(path)
    if not isinstance(data, dict) or "model" not in data or "cfg" not in data:
        raise ValueError(
            f"{path} is not a fair-esm ESM-2 checkpoint: expected a dict with 'model' and 'cfg' "
            "(ESM-1, ESM-1b and MSA Transformer checkpoints are not supported)"
        )
    cfg = data["cfg"]["model"]
    cfg = vars(cfg) if isinstance(cfg, argparse.Namespace) else dict(cfg)
    architecture = {
        "num_layers": int(cfg["encoder_layers"]),
        "embed_dim": int(cfg["encoder_embed_dim"]),
        "attention_heads": int(cfg["encoder_attention_heads"]),
        "token_dropout": bool(cfg["token_dropout"]),
        "layer_norm_eps": 1e-5,  # fair-esm's ESM-2 uses nn.LayerNorm's default
    }
    state_dict = dict(data["model"])
    regression = path.with_name(path.stem + "-contact-regression.pt")
    if regression.is_file():
        state_dict.update(_torch_load(regression)["model"])
    # fair-esm's upgrade_state_dict: drop the fairseq prefixes.
    prefix = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
    return EsmWeights(architecture, {prefix.sub("", key): value for key, value in state_dict.items()})


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds Python objects other than tensors and argparse.Namespace, which kiban "
            f"refuses to unpickle (weights_only=True): {str(error).splitlines()[0]}"
        ) from None


def _is_kiban_encoder(location: Path) -> bool:
    import json

    config = location / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == "kiban-encoder"
    except (ValueError, AttributeError):
        return False


def read_kiban_esm(path: str | Path) -> EsmWeights:
    """Read a protein encoder directory written by ``save_encoder`` (``kiban pretrain protein``).

    Its state dict is the encoder's own (``model.`` + ESM-2 names, the LM head included); the tied
    LM-head matrix is stored once, as ``save_model`` does, and restored to both names here.
    """
    from kiban.encoders.pretraining import read_encoder_dir

    values, state = read_encoder_dir(path, modality="protein")
    state_dict = {key.removeprefix("model."): value for key, value in state.items()}
    for one, other in (("embed_tokens.weight", "lm_head.weight"), ("lm_head.weight", "embed_tokens.weight")):
        if one in state_dict and other not in state_dict:
            state_dict[other] = state_dict[one]
    defaults = ProteinEncoderConfig()
    architecture = {name: values.get(name, getattr(defaults, name)) for name in _architecture(defaults)}
    return EsmWeights(architecture, state_dict)


# Hugging Face EsmForMaskedLM parameter names -> esm.ESM2 parameter names.
_HF_TO_ESM = [
    (r"^esm\.embeddings\.word_embeddings\.", "embed_tokens."),
    (r"^esm\.encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.self_attn.q_proj."),
    (r"^esm\.encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.self_attn.k_proj."),
    (r"^esm\.encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.self_attn.v_proj."),
    (r"^esm\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attn.out_proj."),
    (r"^esm\.encoder\.layer\.(\d+)\.attention\.LayerNorm\.", r"layers.\1.self_attn_layer_norm."),
    (r"^esm\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.fc1."),
    (r"^esm\.encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.fc2."),
    (r"^esm\.encoder\.layer\.(\d+)\.LayerNorm\.", r"layers.\1.final_layer_norm."),
    (r"^esm\.encoder\.emb_layer_norm_after\.", "emb_layer_norm_after."),
    (r"^esm\.contact_head\.", "contact_head."),
    (r"^lm_head\.(dense|layer_norm)\.", r"lm_head.\1."),
    (r"^lm_head\.bias$", "lm_head.bias"),
]


def read_hf_esm(path: str | Path) -> EsmWeights:
    """Read a Hugging Face ESM-2 directory (``EsmForMaskedLM`` or ``EsmModel``, safetensors).

    ``transformers.EsmForMaskedLM.from_pretrained`` reads the files (it knows the key spellings of
    old and new transformers versions); its parameters are then renamed to fair-esm's. Converting,
    rather than wrapping ``transformers.EsmModel``, keeps a single forward pass, so attentions,
    contacts and padding behave the same whichever format the weights came in. Only the ESM-2
    architecture converts (rotary positions, no embedding layer norm, 4x feed-forward, the 33-token
    ESM alphabet); anything else is refused with the reason.
    """
    import transformers

    path = Path(path)
    hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    _check_hf_esm2(hf_config, path)
    hf_model, info = transformers.EsmForMaskedLM.from_pretrained(
        path, local_files_only=True, output_loading_info=True, dtype=torch.float32
    )
    missing = set(info["missing_keys"])
    if any(not key.startswith("lm_head.") and ".contact_head." not in key for key in missing):
        raise ValueError(f"{path} lacks ESM-2 encoder weights: {', '.join(sorted(missing))}")
    if any(key.startswith("lm_head.") for key in missing):
        warnings.warn(f"{path} has no masked-LM head; ProteinEncoder.model.lm_head is random", stacklevel=4)

    state_dict: dict[str, Tensor] = {}
    for key, value in hf_model.state_dict().items():
        if key == "esm.rotary_embeddings.inv_freq":
            # transformers keeps one rotary table for the model, fair-esm one per layer.
            for i in range(hf_config.num_hidden_layers):
                state_dict[f"layers.{i}.self_attn.rot_emb.inv_freq"] = value
            continue
        if key == "lm_head.decoder.weight":
            continue  # tied to the word embeddings in both libraries
        for pattern, replacement in _HF_TO_ESM:
            if re.match(pattern, key):
                state_dict[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise ValueError(f"{path}: unexpected ESM parameter {key!r}; is this an ESM-2 model?")
    if any(".contact_head." in key for key in missing):
        # transformers filled these in at random; leave them out so the loader warns.
        state_dict.pop("contact_head.regression.weight", None)
        state_dict.pop("contact_head.regression.bias", None)
    state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"]
    architecture = {
        "num_layers": hf_config.num_hidden_layers,
        "embed_dim": hf_config.hidden_size,
        "attention_heads": hf_config.num_attention_heads,
        "token_dropout": bool(hf_config.token_dropout),
        "layer_norm_eps": float(hf_config.layer_norm_eps),
    }
    return EsmWeights(architecture, state_dict)


def _check_hf_esm2(hf_config: Any, path: Path) -> None:
    problems = []
    if hf_config.model_type != "esm" or getattr(hf_config, "is_folding_model", False):
        problems.append(f"model_type is {hf_config.model_type!r}, not an ESM language model")
    else:
        if hf_config.position_embedding_type != "rotary":
            problems.append(f"position_embedding_type is {hf_config.position_embedding_type!r}, not 'rotary'")
        if hf_config.emb_layer_norm_before:
            problems.append("emb_layer_norm_before is set (an ESM-1b trait)")
        if hf_config.intermediate_size != 4 * hf_config.hidden_size:
            problems.append(f"intermediate_size {hf_config.intermediate_size} is not 4 x hidden_size")
        if hf_config.vocab_size != len(_alphabet()):
            problems.append(f"vocab_size {hf_config.vocab_size} is not the ESM alphabet's {len(_alphabet())}")
        if getattr(hf_config, "rope_theta", 10000.0) != 10000.0:
            problems.append(f"rope_theta {hf_config.rope_theta} is not ESM-2's 10000")
    vocab = path / "vocab.txt"
    if vocab.is_file() and vocab.read_text().split() != _alphabet().all_toks:
        problems.append("vocab.txt differs from the ESM alphabet")
    if problems:
        raise ValueError(f"{path} is not an ESM-2 model kiban can load: {'; '.join(problems)}")


def _load_weights(model: esm.ESM2, weights: EsmWeights, *, source: str) -> None:
    """Load strictly, except that the contact regression may be absent (as fair-esm allows)."""
    regression = {"contact_head.regression.weight", "contact_head.regression.bias"}
    expected = set(model.state_dict())
    found = set(weights.state_dict)
    missing = expected - found - regression
    unexpected = found - expected
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"missing {', '.join(sorted(missing)[:8])}")
        if unexpected:
            details.append(f"unexpected {', '.join(sorted(unexpected)[:8])}")
        raise ValueError(f"weights in {source} do not fit ESM-2: {'; '.join(details)}")
    if not regression <= found:
        warnings.warn(
            f"{source} has no contact regression weights; ProteinEncoder.contacts() will not be meaningful",
            stacklevel=3,
        )
    model.load_state_dict(weights.state_dict, strict=False)

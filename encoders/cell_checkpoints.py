"""Published single-cell checkpoints read from local folders, without unpickling anything.

Two formats, one reader each, registered by the trunk they build (``CellEncoderConfig.arch``):

* ``geneformer`` (Theodoris et al. 2023): a Hugging Face ``BertForMaskedLM`` folder (``config.json``
  and ``model.safetensors`` or ``pytorch_model.bin``) plus Geneformer's two dictionaries, the gene
  token dictionary (Ensembl id -> token id, with ``<pad>``, ``<mask>`` and, in V2, ``<cls>`` and
  ``<eos>``) and the gene median dictionary (Ensembl id -> the gene's non-zero median over the
  pretraining corpus). Geneformer publishes them as pickles: ``read_plain_mapping`` reads those with
  an unpickler that builds nothing but str -> int / str -> float dictionaries (JSON copies work too).
* ``scgpt`` (Cui et al. 2024): ``best_model.pt`` (a plain state dict, read with
  ``weights_only=True``), ``vocab.json`` (gene -> id with ``<pad>``, ``<cls>``, ``<eoc>``) and
  ``args.json`` (its hyperparameters). Checkpoints trained with flash-attention name the attention
  input projection ``Wqkv``; scGPT's own ``load_pretrained`` renames it to torch's ``in_proj`` and so
  does this reader. The heads scGPT trains beside the encoder (expression decoders, classifier)
  are not part of the cell encoder and are left out (counted in the log).

A reader takes the config and returns it completed from the folder (architecture, vocabulary,
token ids, specials) with the trunk's state dict; ``CellEncoder`` then builds and loads the trunk.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from kiban.encoders.cell import CellEncoderConfig

__all__ = ["read_checkpoint", "read_geneformer", "read_plain_mapping", "read_scgpt"]

logger = logging.getLogger(__name__)

_READERS: dict[str, Callable[[CellEncoderConfig], tuple[CellEncoderConfig, dict[str, Tensor]]]] = {}


def _reader(arch: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        _READERS[arch] = fn
        return fn

    return wrap


def read_checkpoint(config: CellEncoderConfig) -> tuple[CellEncoderConfig, dict[str, Tensor]]:
    """The config completed from ``config.checkpoint_dir`` and the trunk's state dict, by ``config.arch``."""
    if config.arch not in _READERS:
        raise ValueError(
            f"checkpoint_dir is set but arch {config.arch!r} reads no published checkpoint; "
            f"set arch (or preset) to one of {', '.join(sorted(_READERS))}"
        )
    folder = Path(str(config.checkpoint_dir))
    if not folder.is_dir():
        raise FileNotFoundError(f"cell checkpoint_dir {str(folder)!r} is not a folder")
    return _READERS[config.arch](config)


# ----------------------------------------------------------------------------------------------
# Restricted pickles


class _PlainUnpickler(pickle.Unpickler):
    """Builds only built-in containers and numbers; numpy number scalars are the one class allowed.

    Geneformer's dictionaries were written from numpy arrays, so their values may be numpy scalars
    (pickled as ``numpy.core.multiarray.scalar(dtype, bytes)``): those two callables are replaced
    by versions that accept numeric dtypes only. Every other global raises.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _numeric_scalar
        if module == "numpy" and name == "dtype":
            return _numeric_dtype
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only plain str -> number dictionaries are read"
        )


def _numeric_dtype(code: Any, *args: Any) -> np.dtype:
    if not isinstance(code, str) or np.dtype(code).kind not in "biuf":
        raise pickle.UnpicklingError(f"refusing numpy dtype {code!r}: only numeric scalars are read")
    return np.dtype(code)


def _numeric_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("refusing a numpy scalar that is not a number")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def read_plain_mapping(path: str | Path, *, values: type) -> dict[str, Any]:
    """A str -> int (``values=int``) or str -> float (``values=float``) dictionary from .pkl or .json.

    The pickle is read by an unpickler that refuses every class (numpy numbers aside), and the
    result is checked: anything but such a dictionary raises ValueError naming the file.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"dictionary file {str(file)!r} does not exist")
    if file.suffix == ".json":
        data = json.loads(file.read_text())
    else:
        try:
            data = _PlainUnpickler(io.BytesIO(file.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise ValueError(f"{file}: not a plain dictionary pickle ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a dictionary, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ValueError(f"{file}: key {key!r} is a {type(key).__name__}, not a string")
        if isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{file}: value of {key!r} is a boolean, not a number")
        if values is int and isinstance(value, (int, np.integer)):
            out[key] = int(value)
        elif values is float and isinstance(value, (int, float, np.integer, np.floating)):
            out[key] = float(value)
        else:
            raise ValueError(f"{file}: value of {key!r} is {value!r}, not an {values.__name__}")
    return out


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a plain state dict of tensors")
    return state


def _find_one(folder: Path, pattern: str, *, given: str | None, what: str, key: str) -> Path:
    if given:
        return Path(given)
    hits = sorted(folder.glob(pattern))
    if len(hits) != 1:
        found = ", ".join(h.name for h in hits) or "none"
        raise FileNotFoundError(f"{folder}: set {key} (the {what}); files matching {pattern}: {found}")
    return hits[0]


def _specials(tokens: dict[str, int], names: dict[str, str]) -> dict[str, int | None]:
    return {field: tokens.get(token) for field, token in names.items()}


def _gene_layout(tokens: dict[str, int], genes: list[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Genes in token-id order and their ids (the vocabulary order does not matter to the model)."""
    ordered = sorted(genes, key=lambda gene: tokens[gene])
    return tuple(ordered), tuple(tokens[gene] for gene in ordered)


def _max_genes(config: CellEncoderConfig, limit: int) -> int:
    if config.max_genes <= 0:
        return limit
    if config.max_genes > limit:
        raise ValueError(f"max_genes {config.max_genes} exceeds what the checkpoint's input size allows ({limit})")
    return config.max_genes


# ----------------------------------------------------------------------------------------------
# Geneformer


@_reader("geneformer")
def read_geneformer(config: CellEncoderConfig) -> tuple[CellEncoderConfig, dict[str, Tensor]]:
    """A Geneformer BERT folder and its dictionaries -> (completed config, ``bert.*`` state dict)."""
    folder = Path(str(config.checkpoint_dir))
    bert = _read_json(folder / "config.json")
    if bert.get("model_type", "bert") != "bert":
        raise ValueError(f"{folder}/config.json: model_type {bert.get('model_type')!r}; Geneformer is a BERT model")
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")
    token_file = _find_one(
        folder, "*token_dictionary*", given=config.token_dictionary_path, what="gene token dictionary",
        key="token_dictionary_path",
    )
    median_file = _find_one(
        folder, "*gene_median*", given=config.gene_median_path, what="gene median dictionary", key="gene_median_path"
    )
    tokens = read_plain_mapping(token_file, values=int)
    medians = read_plain_mapping(median_file, values=float)
    specials = _specials(tokens, {"pad_id": "<pad>", "mask_id": "<mask>", "cls_id": "<cls>", "eos_id": "<eos>"})
    if specials["pad_id"] is None:
        raise ValueError(f"{token_file}: the gene token dictionary has no '<pad>' token")
    # Geneformer's tokenizer keeps the genes of the median dictionary, each with its token
    genes = [gene for gene in medians if gene in tokens and not gene.startswith("<")]
    missing = sum(1 for gene in medians if gene not in tokens)
    if missing:
        logger.warning("%d genes of %s have no token in %s and are not used", missing, median_file, token_file)
    vocab, ids = _gene_layout(tokens, genes)
    max_position = int(bert["max_position_embeddings"])
    n_special = (specials["cls_id"] is not None) + (specials["eos_id"] is not None)
    completed = dataclasses.replace(
        config,
        tokenization="rank",
        gene_vocab=vocab,
        gene_vocab_path=None,
        gene_token_ids=ids,
        gene_medians=tuple(medians[gene] for gene in vocab),
        n_token_ids=int(bert["vocab_size"]),
        max_genes=_max_genes(config, max_position - n_special),
        width=int(bert["hidden_size"]),
        num_layers=int(bert["num_hidden_layers"]),
        num_heads=int(bert["num_attention_heads"]),
        ffn_dim=int(bert["intermediate_size"]),
        activation=str(bert.get("hidden_act", "gelu")),
        dropout=float(bert.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(bert.get("attention_probs_dropout_prob", 0.1)),
        max_position=max_position,
        layer_norm_eps=float(bert.get("layer_norm_eps", 1e-12)),
        **specials,
    )
    state: dict[str, Tensor] = {}
    for key, value in _read_state_dict(weights).items():
        name = key[len("bert.") :] if key.startswith("bert.") else key
        if name.startswith(("cls.", "pooler.")):
            continue  # the masked-LM head and the pooler: not the encoder
        state[f"bert.{name}"] = value
    return completed, state


# ----------------------------------------------------------------------------------------------
# scGPT


@_reader("scgpt")
def read_scgpt(config: CellEncoderConfig) -> tuple[CellEncoderConfig, dict[str, Tensor]]:
    """An scGPT folder (``best_model.pt``, ``vocab.json``, ``args.json``) -> (completed config, state dict)."""
    folder = Path(str(config.checkpoint_dir))
    args = _read_json(folder / "args.json")
    tokens = _read_json(folder / "vocab.json")
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in tokens.items()):
        raise ValueError(f"{folder}/vocab.json: expected a gene -> integer id mapping")
    weights = folder / "best_model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no best_model.pt")
    if args.get("pre_norm"):
        raise ValueError(f"{folder}/args.json: pre_norm models are not supported (scGPT's published ones are post-norm)")
    pad_token = args.get("pad_token", "<pad>")
    specials = _specials(tokens, {"pad_id": pad_token, "cls_id": "<cls>"})
    if specials["pad_id"] is None or specials["cls_id"] is None:
        raise ValueError(f"{folder}/vocab.json: needs {pad_token!r} and '<cls>' tokens")
    vocab, ids = _gene_layout(tokens, [g for g in tokens if not (g.startswith("<") and g.endswith(">"))])
    style = args.get("input_emb_style", "continuous")
    completed = dataclasses.replace(
        config,
        tokenization="binning",
        gene_vocab=vocab,
        gene_vocab_path=None,
        gene_token_ids=ids,
        n_token_ids=max(tokens.values()) + 1,
        n_bins=int(args.get("n_bins", 51)),
        max_genes=_max_genes(config, int(args.get("max_seq_len", 1200)) - 1),
        width=int(args["embsize"]),
        num_layers=int(args["nlayers"]),
        num_heads=int(args["nheads"]),
        ffn_dim=int(args["d_hid"]),
        dropout=float(args.get("dropout", 0.2)),
        value_encoder=style,
        pad_value=float(args.get("pad_value", -2)),
        mask_value=float(args.get("mask_value", -1)),
        eos_id=None,
        **specials,
    )
    raw = _read_state_dict(weights)
    if any(key.startswith(("dsbn.", "bn.", "batch_encoder.")) for key in raw):
        raise ValueError(f"{weights}: a batch-label checkpoint (dsbn / batch encoder) is not supported")
    state, skipped = {}, 0
    for key, value in raw.items():
        if key.startswith(("encoder.", "value_encoder.", "transformer_encoder.")):
            state[key.replace(".Wqkv.", ".in_proj_")] = value
        else:
            skipped += 1
    logger.info("%s: %d encoder tensors loaded; %d tensors of scGPT's heads left out", weights, len(state), skipped)
    return completed, state

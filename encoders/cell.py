"""The single-cell encoder: one cell's expression profile as a sequence of gene tokens.

A cell arrives as a one-row AnnData, a ``{"genes": [...], "values": [...]}`` dict (what the HTTP API
sends) or a ``(values, gene_names)`` tuple. The featurizer matches gene names against the encoder's
gene vocabulary, counts the names it could not match (never drops them silently), and turns the
expressed genes into tokens in one of two published styles:

* ``"binning"`` (scGPT, Cui et al. 2024, Nature Methods): each cell's non-zero values are cut into
  ``n_bins - 1`` quantile bins of that cell (bin 0 means zero); a token is gene embedding +
  value-bin embedding, and a CLS token comes first.
* ``"rank"`` (Geneformer, Theodoris et al. 2023, Nature): genes are ordered by expression, optionally
  divided by per-gene medians over a reference corpus; a token is gene embedding + rank-position
  embedding, after a CLS token (as in Geneformer V2).

Then a transformer encoder runs over the tokens. The module also holds the helpers the data layer
uses: ``match_genes`` (match a whole AnnData's genes once, with a report), ``vocab_from_adata`` and a
small deterministic test-data generator ``make_adata``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch
from torch import Tensor, nn

from kiban.encoders.base import (
    Encoder,
    InvalidInput,
    ModalityTokens,
    pad_stack,
    register_encoder,
    register_preset,
)
from kiban.encoders.cell_profile import fitted_profile
from kiban.encoders.cell_trunks import create_trunk

__all__ = [
    "CellEncoder",
    "CellEncoderConfig",
    "CellFeaturizer",
    "GeneMatchReport",
    "bin_values",
    "load_gene_vocab",
    "make_adata",
    "match_genes",
    "synthetic_gene_names",
    "vocab_from_adata",
]

logger = logging.getLogger(__name__)

MODALITY = "cell"
PAD_ID = 0  # token ids: 0 = padding, 1 = CLS, 2 + i = the i-th gene of the vocabulary
CLS_ID = 1
N_SPECIAL = 2
# An encoder built without a vocabulary gets these synthetic names (those of ``make_adata``), so
# that presets build and the registry-wide tests run; real data needs a real vocabulary.
SYNTHETIC_VOCAB_SIZE = 500
_EXAMPLE_LIMIT = 5  # unmatched gene names kept as examples in a report


@dataclass
class CellEncoderConfig:
    """Settings of the cell encoder; plain values, so it round-trips through YAML.

    gene_vocab / gene_vocab_path: the gene names the encoder knows (set at most one; the path is a
        text file with one gene per line). Both empty means the synthetic names GENE0..GENE499 of
        ``make_adata`` (for smoke tests; a warning is logged).
    gene_column: read gene names from this ``adata.var`` column (e.g. Ensembl ids) instead of
        ``var_names``. layer: read values from ``adata.layers[layer]`` instead of ``adata.X``.
    tokenization: "binning" (scGPT) or "rank" (Geneformer).
    n_bins: number of value bins in binning mode, bin 0 included (scGPT uses 51).
    max_genes: at most this many gene tokens per cell, the highest expressed kept (plus one CLS token).
    include_zeros: also make tokens of matched genes whose value is zero (after the expressed ones).
    gene_medians: rank mode only: per-gene medians, in vocabulary order, that values are divided by
        before ranking (Geneformer's normalisation); empty means rank the raw values.
    width, num_layers, num_heads, ffn_dim, dropout: the transformer.
    weights_path: a local state dict of this encoder (.safetensors, or .pt/.pth read with weights_only), or a
        folder written by ``kiban pretrain cell`` (its config, vocabulary included, then replaces this one).
    arch: the trunk (``cell_trunks``): "kiban", "scgpt" (scGPT's encoder) or "geneformer" (BERT).
    checkpoint_dir: a published checkpoint folder of that arch (``cell_checkpoints``): it sets the
        architecture, vocabulary, token ids and weights. token_dictionary_path / gene_median_path:
        Geneformer's dictionaries (.pkl or .json), when they are not the one match in the folder.
    gene_token_ids: the token id of each vocabulary gene; empty means consecutive ids after the
        largest special id. pad_id / cls_id / eos_id / mask_id: special token ids (None = absent).
        n_token_ids: rows of the token embedding; 0 means the largest id + 1.
    target_sum: counts are scaled to this total per cell before medians and profiles (Geneformer).
    value_encoder, pad_value, mask_value: scGPT's value input ("continuous" or "category") and the
        values it gives CLS/padding and masked genes.
    activation, attention_dropout, max_position, layer_norm_eps: the BERT of arch "geneformer".
    profile_token: "first" puts one whole-profile token before the trunk's tokens: the
        log-normalised expression of every matched gene through a linear map over the vocabulary
        (an EmbeddingBag), so the cell's full profile reaches the output even where the gene tokens
        are truncated or untrained; "only" outputs that token alone (no trunk); "none" (default).
    profile_mean, profile_std: per-gene statistics in vocabulary order (``cell_profile.profile_statistics``
        over training cells) that the profile token starts from: each chosen gene z-scored on its
        own dimension (``cell_profile.fitted_profile``); empty means random gene vectors.
    """

    gene_vocab: tuple[str, ...] = ()
    gene_vocab_path: str | None = None
    gene_column: str | None = None
    layer: str | None = None
    tokenization: str = "binning"
    n_bins: int = 51
    max_genes: int = 1200
    include_zeros: bool = False
    gene_medians: tuple[float, ...] = ()
    width: int = 512
    num_layers: int = 12
    num_heads: int = 8
    ffn_dim: int = 512
    dropout: float = 0.1
    weights_path: str | None = None
    arch: str = "kiban"
    checkpoint_dir: str | None = None
    token_dictionary_path: str | None = None
    gene_median_path: str | None = None
    gene_token_ids: tuple[int, ...] = ()
    pad_id: int = PAD_ID
    cls_id: int | None = CLS_ID
    eos_id: int | None = None
    mask_id: int | None = None
    n_token_ids: int = 0
    target_sum: float = 10_000.0
    value_encoder: str = "continuous"
    pad_value: float = -2.0
    mask_value: float = -1.0
    activation: str = "gelu"
    attention_dropout: float = 0.1
    max_position: int = 2048
    layer_norm_eps: float = 1e-12
    profile_token: str = "none"
    profile_mean: tuple[float, ...] = ()
    profile_std: tuple[float, ...] = ()


# ----------------------------------------------------------------------------------------------
# Gene matching


@dataclass
class GeneMatchReport:
    """How many gene names matched the vocabulary, over one or more gene lists (cells or datasets).

    Counts are of gene names per list, summed over lists: 3 cells with 765 genes each count 2,295.
    n_case_insensitive: names matched only after ignoring case (included in n_matched).
    n_duplicates: names whose vocabulary gene had already appeared earlier in the same list; the
        first occurrence is used and the repeats are counted here (not in n_matched or n_unmatched).
    """

    vocab_size: int
    n_lists: int = 0
    n_matched: int = 0
    n_unmatched: int = 0
    n_case_insensitive: int = 0
    n_duplicates: int = 0
    unmatched_examples: list[str] = field(default_factory=list)

    @property
    def fraction_matched(self) -> float:
        """Share of the matched gene names among all names, matched or not (0.0 when there were none)."""
        total = self.n_matched + self.n_unmatched
        return self.n_matched / total if total else 0.0

    def add(self, other: GeneMatchReport) -> None:
        """Accumulate another report into this one (in place)."""
        self.n_lists += other.n_lists
        self.n_matched += other.n_matched
        self.n_unmatched += other.n_unmatched
        self.n_case_insensitive += other.n_case_insensitive
        self.n_duplicates += other.n_duplicates
        for name in other.unmatched_examples:
            if len(self.unmatched_examples) >= _EXAMPLE_LIMIT:
                break
            if name not in self.unmatched_examples:
                self.unmatched_examples.append(name)

    def summary(self) -> str:
        """One line for the log: lists, matched and unmatched counts, case-only matches, repeats, examples."""
        text = (
            f"{self.n_lists} gene list(s): {self.n_matched} gene names matched the vocabulary of "
            f"{self.vocab_size} genes and {self.n_unmatched} did not "
            f"({100 * self.fraction_matched:.1f}% matched)"
        )
        if self.n_case_insensitive:
            text += f"; {self.n_case_insensitive} matched only when ignoring case"
        if self.n_duplicates:
            text += f"; {self.n_duplicates} repeated names ignored"
        if self.unmatched_examples:
            text += f"; unmatched e.g. {', '.join(self.unmatched_examples)}"
        return text


def synthetic_gene_names(n: int) -> tuple[str, ...]:
    """GENE0 .. GENE{n-1}: the names ``make_adata`` gives its genes."""
    return tuple(f"GENE{i}" for i in range(n))


def load_gene_vocab(config: CellEncoderConfig) -> tuple[str, ...]:
    """The vocabulary a config names: ``gene_vocab``, or the lines of ``gene_vocab_path``."""
    if config.gene_vocab and config.gene_vocab_path:
        raise ValueError("CellEncoderConfig: set gene_vocab or gene_vocab_path, not both")
    if config.gene_vocab_path:
        path = Path(config.gene_vocab_path)
        if not path.is_file():
            raise FileNotFoundError(f"gene vocabulary file {str(path)!r} does not exist")
        vocab = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    else:
        vocab = tuple(str(gene) for gene in config.gene_vocab)
    if not vocab:
        logger.warning(
            "CellEncoderConfig has no gene vocabulary; using the %d synthetic names GENE0.. of make_adata. "
            "Set gene_vocab (see vocab_from_adata) or gene_vocab_path for real data.",
            SYNTHETIC_VOCAB_SIZE,
        )
        return synthetic_gene_names(SYNTHETIC_VOCAB_SIZE)
    seen: set[str] = set()
    repeated = [gene for gene in vocab if gene in seen or seen.add(gene)]
    if repeated:
        raise ValueError(
            f"the gene vocabulary repeats {len(repeated)} name(s), e.g. {', '.join(repeated[:5])}"
        )
    return vocab


def match_genes(gene_names: Sequence[Any], *, vocab: Sequence[str]) -> GeneMatchReport:
    """Match a whole dataset's gene names (e.g. ``adata.var_names``) against a vocabulary, in one call.

    The same rules as the featurizer (exact, then case-insensitive when unambiguous); with an
    encoder at hand, ``encoder.featurizer.match_genes(names)`` does the same without rebuilding the lookup.
    """
    return CellFeaturizer(vocab).match_genes(gene_names)


def vocab_from_adata(adata: Any, *, column: str | None = None) -> tuple[str, ...]:
    """The gene names of an AnnData (``var_names`` or ``var[column]``), first occurrences in order."""
    names = adata.var_names if column is None else adata.var[column]
    return tuple(dict.fromkeys(str(name) for name in names))


# ----------------------------------------------------------------------------------------------
# Featurizer


def bin_values(values: np.ndarray, *, n_bins: int) -> np.ndarray:
    """ScGPT value binning of one cell: zero stays bin 0; non-zero values get bins 1..n_bins-1.

    The bin edges are ``n_bins - 1`` quantiles of the cell's own non-zero values (evenly spaced from
    its minimum to its maximum), so binning removes the cell's scale (sequencing depth) and keeps
    only the order of magnitude within the cell. Deterministic: ``np.digitize`` on the edges, as in
    scGPT's original ``binning`` (the later random tie-breaking is not used).
    """
    bins = np.zeros(len(values), dtype=np.int64)
    expressed = values > 0
    if expressed.any():
        edges = np.quantile(values[expressed], np.linspace(0.0, 1.0, n_bins - 1))
        bins[expressed] = np.digitize(values[expressed], edges)
    return bins


class CellFeaturizer:
    """One cell -> ``gene_ids``, ``value_ids`` [N] and its gene-match counts.

    Gene names are matched exactly first; a name with no exact match is then matched ignoring case,
    if exactly one vocabulary gene has that lower-cased spelling (so ``Cd3e`` finds ``CD3E`` but a
    vocabulary holding both ``Foo`` and ``FOO`` never guesses). Names that still do not match are
    counted in the output (``n_genes_unmatched``) and in the running ``report``.

    Picklable and weight-free: it runs in DataLoader workers, each of which keeps its own ``report``;
    use ``match_genes`` on a whole dataset's genes for one report in the main process.
    """

    modality = MODALITY

    def __init__(
        self,
        vocab: Sequence[str],
        *,
        tokenization: str = "binning",
        n_bins: int = 51,
        max_genes: int = 1200,
        include_zeros: bool = False,
        gene_medians: Sequence[float] = (),
        gene_column: str | None = None,
        layer: str | None = None,
        gene_token_ids: Sequence[int] = (),
        pad_id: int = PAD_ID,
        cls_id: int | None = CLS_ID,
        eos_id: int | None = None,
        mask_id: int | None = None,
        target_sum: float = 10_000.0,
        profile: bool = False,
    ) -> None:
        if tokenization not in ("binning", "rank"):
            raise ValueError(f"tokenization must be 'binning' or 'rank', got {tokenization!r}")
        if n_bins < 3:
            raise ValueError(f"n_bins must be at least 3 (bin 0 for zero and two bins above), got {n_bins}")
        if max_genes < 1:
            raise ValueError(f"max_genes must be at least 1, got {max_genes}")
        if gene_medians and tokenization != "rank":
            raise ValueError("gene_medians are used by rank tokenization only")
        if gene_medians and len(gene_medians) != len(vocab):
            raise ValueError(
                f"gene_medians has {len(gene_medians)} values for a vocabulary of {len(vocab)} genes"
            )
        medians = np.asarray(gene_medians, dtype=np.float64)
        if medians.size and not (np.isfinite(medians).all() and (medians > 0).all()):
            raise ValueError("gene_medians must all be finite and positive")
        if not target_sum > 0:
            raise ValueError(f"target_sum must be positive, got {target_sum}")
        specials = [i for i in (pad_id, cls_id, eos_id, mask_id) if i is not None]
        if gene_token_ids:
            if len(gene_token_ids) != len(vocab):
                raise ValueError(f"gene_token_ids has {len(gene_token_ids)} ids for a vocabulary of {len(vocab)} genes")
            token_ids = np.asarray(gene_token_ids, dtype=np.int64)
            clash = set(token_ids.tolist()) & set(specials)
            if len(set(token_ids.tolist())) != len(token_ids) or clash:
                raise ValueError("gene_token_ids must be distinct and differ from the special token ids")
        else:  # consecutive ids after the specials (kiban's layout: 0 padding, 1 CLS, genes from 2)
            token_ids = np.arange(len(vocab), dtype=np.int64) + max(N_SPECIAL, max(specials) + 1)
        self.vocab = tuple(vocab)
        self.tokenization = tokenization
        self.n_bins = n_bins
        self.max_genes = max_genes
        self.include_zeros = include_zeros
        self.gene_medians = medians if medians.size else None
        self.gene_column = gene_column
        self.layer = layer
        self.token_ids = token_ids
        self.pad_id, self.cls_id, self.eos_id, self.mask_id = pad_id, cls_id, eos_id, mask_id
        self.target_sum = float(target_sum)
        self.profile = profile
        self.report = GeneMatchReport(vocab_size=len(self.vocab))
        self._build_lookup()

    @classmethod
    def from_config(cls, config: CellEncoderConfig, *, vocab: Sequence[str] | None = None) -> CellFeaturizer:
        """The featurizer of a ``CellEncoderConfig`` (its vocabulary read unless ``vocab`` is given)."""
        return cls(
            load_gene_vocab(config) if vocab is None else vocab,
            tokenization=config.tokenization,
            n_bins=config.n_bins,
            max_genes=config.max_genes,
            include_zeros=config.include_zeros,
            gene_medians=config.gene_medians,
            gene_column=config.gene_column,
            layer=config.layer,
            gene_token_ids=config.gene_token_ids,
            pad_id=config.pad_id,
            cls_id=config.cls_id,
            eos_id=config.eos_id,
            mask_id=config.mask_id,
            target_sum=config.target_sum,
            profile=config.profile_token != "none",
        )

    @property
    def n_token_ids(self) -> int:
        """Rows a token embedding needs: the largest id (gene or special) + 1."""
        specials = [i for i in (self.pad_id, self.cls_id, self.eos_id, self.mask_id) if i is not None]
        return int(max(specials + [int(self.token_ids.max()) if len(self.token_ids) else 0])) + 1

    def _build_lookup(self) -> None:
        self._exact = {gene: i for i, gene in enumerate(self.vocab)}
        lowered: dict[str, int] = {}
        ambiguous: set[str] = set()
        for i, gene in enumerate(self.vocab):
            key = gene.lower()
            if key in lowered:
                ambiguous.add(key)
            lowered[key] = i
        self._lower = {key: i for key, i in lowered.items() if key not in ambiguous}
        # The last gene list matched and its result: the rows of one AnnData share one var_names
        # object, so matching 30k names once per dataset instead of once per cell.
        self._cache: tuple[Any, Any, np.ndarray, GeneMatchReport] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_exact", "_lower", "_cache"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build_lookup()

    @property
    def vocab_size(self) -> int:
        """Number of genes in the vocabulary."""
        return len(self.vocab)

    def match_genes(self, gene_names: Sequence[Any]) -> GeneMatchReport:
        """Match one list of gene names (e.g. a whole AnnData's ``var_names``) and report; no state kept."""
        return self._match(gene_names)[1]

    def lookup(self, gene_names: Sequence[Any]) -> np.ndarray:
        """Vocabulary index of each name by the matching rule (-1: no match); repeats keep their index.

        For matching a file's genes once (the data layer's batch featurizer resolves repeats per cell).
        """
        exact, lower = self._exact, self._lower
        hits = (exact.get(name, lower.get(name.lower(), -1)) for name in map(str, gene_names))
        return np.fromiter(hits, dtype=np.int64, count=len(gene_names))

    def _match(self, gene_names: Sequence[Any]) -> tuple[np.ndarray, GeneMatchReport]:
        """Vocabulary index per name (-1 where unmatched or repeated) and the report of this list."""
        index = np.full(len(gene_names), -1, dtype=np.int64)
        report = GeneMatchReport(vocab_size=self.vocab_size, n_lists=1)
        used: set[int] = set()
        for position, raw in enumerate(gene_names):
            name = str(raw)
            hit = self._exact.get(name)
            by_case = hit is None
            if by_case:
                hit = self._lower.get(name.lower())
            if hit is None:
                report.n_unmatched += 1
                if len(report.unmatched_examples) < _EXAMPLE_LIMIT:
                    report.unmatched_examples.append(name)
            elif hit in used:
                report.n_duplicates += 1
            else:
                used.add(hit)
                index[position] = hit
                report.n_matched += 1
                report.n_case_insensitive += by_case
        return index, report

    def _match_cached(self, gene_names: Any, owner: Any, key: Any) -> tuple[np.ndarray, GeneMatchReport]:
        """``_match``, reused while ``owner`` (an AnnData's var_names object) and ``key`` stay the same."""
        if self._cache is not None and self._cache[0] is owner and self._cache[1] == key:
            return self._cache[2], self._cache[3]
        index, report = self._match(gene_names)
        self._cache = (owner, key, index, report)
        return index, report

    # -- reading one cell ------------------------------------------------------------------------

    def _read(self, item: Any, name: Any) -> tuple[Any, Any, np.ndarray, np.ndarray]:
        """(gene names, cache key, positions into the names, values there) of one cell.

        Sparse rows give only their stored entries, so a cell of a 30k-gene sparse matrix is never
        made dense, unless ``include_zeros`` needs every matched gene's value.
        """
        if _is_anndata(item):
            if item.n_obs != 1:
                raise InvalidInput(
                    MODALITY, name, f"an AnnData item must hold exactly one cell, got {item.n_obs} rows"
                )
            if self.gene_column is None:
                genes: Any = item.var_names
            elif self.gene_column in item.var.columns:
                genes = item.var[self.gene_column].to_numpy()
            else:
                raise InvalidInput(
                    MODALITY, name, f"adata.var has no column {self.gene_column!r} (gene_column)"
                )
            if self.layer is not None:
                if self.layer not in item.layers:
                    raise InvalidInput(MODALITY, name, f"adata.layers has no layer {self.layer!r}")
                row = item.layers[self.layer]
            else:
                row = item.X
            if row is None:
                raise InvalidInput(MODALITY, name, "the AnnData has no expression matrix (X is None)")
            # var_names is shared by every row of a dataset; the column array is not, so key on var_names.
            cache_owner, cache_key = item.var_names, self.gene_column
        elif isinstance(item, dict):
            missing = [key for key in ("genes", "values") if key not in item]
            if missing:
                raise InvalidInput(
                    MODALITY, name, f"a dict item needs keys 'genes' and 'values'; missing {missing}"
                )
            genes, row = item["genes"], item["values"]
            cache_owner, cache_key = None, None
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            row, genes = item
            cache_owner, cache_key = None, None
        else:
            raise InvalidInput(
                MODALITY,
                name,
                "expected a one-row AnnData, a dict {'genes': [...], 'values': [...]} or a "
                f"(values, gene_names) tuple, got {type(item).__name__}",
            )
        if isinstance(genes, str) or not hasattr(genes, "__len__"):
            raise InvalidInput(MODALITY, name, "gene names must be a list of names, not a single string")
        positions, values = self._row_values(row, n_genes=len(genes), name=name)
        return genes, (cache_owner, cache_key), positions, values

    def _row_values(self, row: Any, *, n_genes: int, name: Any) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(row, Tensor):
            row = row.detach().cpu().to(torch.float64).numpy()
        if scipy.sparse.issparse(row):
            if row.ndim != 2 or row.shape[0] != 1:
                raise InvalidInput(
                    MODALITY, name, f"expected one row of values, got a sparse matrix of shape {row.shape}"
                )
            length = row.shape[1]
            if self.include_zeros:
                positions, values = np.arange(length), _as_float(row.toarray().reshape(-1), name)
            else:
                # a copy of the one row in canonical form (repeated entries summed, as toarray would)
                row = scipy.sparse.csr_matrix(row, copy=True)
                row.sum_duplicates()
                positions, values = row.indices.astype(np.int64), _as_float(row.data, name)
        else:
            values = _as_float(row, name)
            if values.ndim == 2 and values.shape[0] == 1:
                values = values[0]  # a (1, G) row of a dense AnnData
            if values.ndim != 1:
                raise InvalidInput(
                    MODALITY, name, f"expected a 1-D row of values, got shape {tuple(values.shape)}"
                )
            length, positions = len(values), np.arange(len(values))
        if length != n_genes:
            raise InvalidInput(
                MODALITY, name, f"has {length} values but {n_genes} gene names; they must pair up"
            )
        if not np.isfinite(values).all():
            raise InvalidInput(
                MODALITY, name, f"has {int((~np.isfinite(values)).sum())} NaN or infinite value(s)"
            )
        if (values < 0).any():
            raise InvalidInput(
                MODALITY,
                name,
                f"has {int((values < 0).sum())} negative value(s) (min {values.min():.3g}); expression must "
                "be counts or normalised counts, not scaled/centred data",
            )
        return positions, values

    # -- tokens -----------------------------------------------------------------------------------

    def __call__(self, item: Any, *, item_id: Any = None) -> dict[str, Tensor]:
        """Features of one cell; raises InvalidInput naming ``item_id`` (or describing the item)."""
        name = item_id if item_id is not None else _describe_cell(item)
        genes, (owner, key), positions, values = self._read(item, name)
        index, report = self._match(genes) if owner is None else self._match_cached(genes, owner, key)
        self.report.add(report)
        if report.n_matched == 0:
            raise InvalidInput(
                MODALITY,
                name,
                f"none of its {len(genes)} genes are in the vocabulary of {self.vocab_size} genes"
                + (
                    f" (e.g. {', '.join(report.unmatched_examples[:3])})" if report.unmatched_examples else ""
                ),
            )
        values_all_sum = values.sum()
        if values_all_sum <= 0:
            raise InvalidInput(MODALITY, name, f"all {len(values)} of its values are 0")
        gene_index = index[positions]
        keep = gene_index >= 0
        if not self.include_zeros:
            keep &= values > 0
        gene_index, values = gene_index[keep], values[keep]
        if not len(gene_index):
            raise InvalidInput(
                MODALITY, name, f"all {report.n_matched} of its genes in the vocabulary have value 0"
            )

        # Geneformer's normalisation: counts over the cell's total (all its genes, matched or not,
        # as Geneformer's n_counts) times target_sum
        scale = self.target_sum / float(values_all_sum)
        cls = [self.cls_id] if self.cls_id is not None else []
        if self.tokenization == "binning":
            # Bins come from all matched genes of the cell, before truncation, as scGPT bins the
            # whole profile and then samples its sequence.
            bins = bin_values(values, n_bins=self.n_bins)
            chosen = _top(values, gene_index, self.max_genes)
            chosen = chosen[np.argsort(gene_index[chosen], kind="stable")]  # order is irrelevant to the model
            gene_ids = np.concatenate([cls, self.token_ids[gene_index[chosen]]])
            value_ids = np.concatenate([[self.n_bins] * len(cls), bins[chosen]])  # n_bins = "no value" (CLS)
        else:
            score = values * scale
            if self.gene_medians is not None:
                score = score / self.gene_medians[gene_index]
            chosen = _top(score, gene_index, self.max_genes)  # already in rank order
            eos = [self.eos_id] if self.eos_id is not None else []
            gene_ids = np.concatenate([cls, self.token_ids[gene_index[chosen]], eos])
            value_ids = np.arange(len(gene_ids))  # rank position; CLS is position 0
        features = {
            "gene_ids": torch.as_tensor(gene_ids, dtype=torch.long),
            "value_ids": torch.as_tensor(value_ids, dtype=torch.long),
            "n_genes_matched": torch.tensor(report.n_matched),
            "n_genes_unmatched": torch.tensor(report.n_unmatched),
        }
        if self.profile:
            # every expressed matched gene, never truncated: log1p of counts per target_sum
            features["profile_index"] = torch.as_tensor(gene_index, dtype=torch.long)
            features["profile_values"] = torch.as_tensor(np.log1p(values * scale), dtype=torch.float32)
        return features

    def collate(self, features: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Pad to the longest cell: gene_ids, value_ids, mask [B, N]; match counts [B]; profiles [B, G]."""
        gene_ids, mask = pad_stack([f["gene_ids"] for f in features], pad_value=self.pad_id)
        value_ids, _ = pad_stack([f["value_ids"] for f in features], pad_value=0)
        batch = {
            "gene_ids": gene_ids,
            "value_ids": value_ids,
            "mask": mask,
            "n_genes_matched": torch.stack([f["n_genes_matched"] for f in features]),
            "n_genes_unmatched": torch.stack([f["n_genes_unmatched"] for f in features]),
        }
        if self.profile:
            # padding weighs 0, so it adds nothing to the profile's sum
            batch["profile_index"], _ = pad_stack([f["profile_index"] for f in features], pad_value=0)
            batch["profile_values"], _ = pad_stack([f["profile_values"] for f in features], pad_value=0.0)
        return batch


def _top(score: np.ndarray, gene_index: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first; ties go to the earlier vocabulary gene."""
    order = np.lexsort((gene_index, -score))
    return order[:k]


def _as_float(values: Any, name: Any) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise InvalidInput(MODALITY, name, f"values are not numbers ({error})") from None


def _is_anndata(item: Any) -> bool:
    # Checked by name so that importing this module does not import anndata.
    return any(cls.__name__ == "AnnData" for cls in type(item).__mro__)


def _describe_cell(item: Any) -> str:
    if _is_anndata(item):
        return f"AnnData cell {item.obs_names[0]}" if item.n_obs == 1 else f"AnnData with {item.n_obs} cells"
    if isinstance(item, dict) and "genes" in item and hasattr(item["genes"], "__len__"):
        return f"cell with {len(item['genes'])} genes"
    if isinstance(item, (tuple, list)) and len(item) == 2 and hasattr(item[1], "__len__"):
        return f"cell with {len(item[1])} genes"
    return f"{type(item).__name__} item"


# ----------------------------------------------------------------------------------------------
# Encoder


def _examples() -> list[Any]:
    """Three valid cells of different sizes, one per accepted form, genes from the synthetic vocabulary."""
    adata = make_adata(1, 60, seed=3)
    return [
        {"genes": ["GENE0", "GENE3", "GENE7", "GENE12"], "values": [1.0, 4.0, 0.0, 2.5]},
        (np.array([3.0, 0.0, 1.0, 8.0, 2.0, 5.0, 1.0, 0.0, 6.0, 2.0]), [f"GENE{i}" for i in range(10, 20)]),
        adata,
    ]


@register_encoder(MODALITY, config=CellEncoderConfig, examples=_examples, default_preset="scgpt")
class CellEncoder(Encoder):
    """Gene-token encoder of single cells (scGPT / Geneformer style), with an optional profile token.

    Input (from ``CellFeaturizer.collate``): gene_ids, value_ids, mask [B, N] (+ profile_index,
    profile_values [B, G] with a profile token). Output ModalityTokens: B cells; N = the trunk's
    tokens (CLS first where the vocabulary has one, then at most ``max_genes`` genes, then EOS
    where it has one), plus one profile token first when ``profile_token="first"`` (only that token
    when "only"); D = ``width``. Padded positions are masked False and set to zero.

    The trunk (``config.arch``, see ``cell_trunks``) is kiban's own, scGPT's (Cui et al. 2024) or
    Geneformer's BERT (Theodoris et al. 2023); ``checkpoint_dir`` loads a published checkpoint
    into it (``cell_checkpoints``). The profile token is LayerNorm(sum over expressed genes of
    log1p(normalised count) x a gene vector): a linear map of the whole profile, which at random
    initialisation (vectors of norm ~1, nearly orthogonal) keeps the distances between profiles,
    and with ``profile_mean`` / ``profile_std`` starts as the z-scores of the chosen genes
    (``cell_profile``), each on its own dimension.
    """

    modality = MODALITY

    def __init__(self, config: CellEncoderConfig) -> None:
        """Build the trunk (and profile token) of ``config``; load ``checkpoint_dir`` / ``weights_path``."""
        super().__init__()
        if config.profile_token not in ("none", "first", "only"):
            raise ValueError(f"profile_token must be 'none', 'first' or 'only', got {config.profile_token!r}")
        state: dict[str, Tensor] = {}
        if config.checkpoint_dir:
            from kiban.encoders.cell_checkpoints import read_checkpoint

            config, state = read_checkpoint(config)
        kiban_folder = bool(config.weights_path) and Path(config.weights_path).is_dir()
        if kiban_folder:
            # a folder written by ``kiban pretrain cell``: its config (architecture, vocabulary) wins
            from kiban.encoders.base import config_from_dict
            from kiban.encoders.pretraining import read_encoder_dir

            values, folder_state = read_encoder_dir(config.weights_path, modality=MODALITY)
            config = dataclasses.replace(
                config_from_dict(CellEncoderConfig, values), weights_path=config.weights_path
            )
        if config.max_genes <= 0:
            # 0: as many genes as the model's input allows (its positions less the special tokens)
            n_special = (config.cls_id is not None) + (config.eos_id is not None)
            config = dataclasses.replace(config, max_genes=config.max_position - n_special)
        self.config = config
        self.featurizer = CellFeaturizer.from_config(config)
        self.output_dim = config.width
        n_token_ids = config.n_token_ids or self.featurizer.n_token_ids
        if n_token_ids < self.featurizer.n_token_ids:
            raise ValueError(f"n_token_ids {n_token_ids} is smaller than the largest token id + 1 ({self.featurizer.n_token_ids})")
        self.trunk = None if config.profile_token == "only" else create_trunk(config, n_token_ids=n_token_ids)
        self.profile = None
        if config.profile_token != "none":
            self.profile = nn.EmbeddingBag(self.featurizer.vocab_size, config.width, mode="sum")
            nn.init.normal_(self.profile.weight, std=config.width**-0.5)
            self.profile_norm = nn.LayerNorm(config.width)
            self.profile_bias = None
            if config.profile_mean or config.profile_std:
                weight, bias = fitted_profile(*self._profile_statistics(config), width=config.width)
                with torch.no_grad():
                    self.profile.weight.copy_(weight)
                self.profile_bias = nn.Parameter(bias)
        elif config.profile_mean or config.profile_std:
            raise ValueError("profile_mean / profile_std need a profile token (profile_token 'first' or 'only')")
        # state dicts saved before the trunks were split out hold kiban's trunk at the top level
        self.register_load_state_dict_pre_hook(_nest_kiban_trunk)
        if state:
            self.trunk.load_state_dict(state)
        if config.weights_path:
            self.load_state_dict(folder_state if kiban_folder else load_weights(config.weights_path))

    def _profile_statistics(self, config: CellEncoderConfig) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the config, checked against the vocabulary."""
        mean = np.asarray(config.profile_mean, dtype=np.float64)
        std = np.asarray(config.profile_std, dtype=np.float64)
        size = self.featurizer.vocab_size
        for name, values in (("profile_mean", mean), ("profile_std", std)):
            if values.shape != (size,):
                raise ValueError(f"{name} has {values.size} values for a vocabulary of {size} genes")
            if not (np.isfinite(values).all() and (values >= 0).all()):
                raise ValueError(f"{name} must be finite and non-negative (statistics of log1p values)")
        return mean, std

    def portable_config(self) -> CellEncoderConfig:
        """The config with the vocabulary inlined and no weights path: rebuilds this architecture anywhere."""
        # no vocabulary configured means the synthetic one, which an empty vocabulary rebuilds
        configured = bool(self.config.gene_vocab or self.config.gene_vocab_path)
        inline = self.featurizer.vocab if configured else ()
        return dataclasses.replace(
            self.config,
            gene_vocab=inline,
            gene_vocab_path=None,
            weights_path=None,
            checkpoint_dir=None,
            token_dictionary_path=None,
            gene_median_path=None,
        )

    def forward(
        self,
        *,
        gene_ids: Tensor,
        value_ids: Tensor,
        mask: Tensor,
        n_genes_matched: Tensor | None = None,
        n_genes_unmatched: Tensor | None = None,
        profile_index: Tensor | None = None,
        profile_values: Tensor | None = None,
    ) -> ModalityTokens:
        """Tokens [B, N, D] of a collated batch; the match counts ride along in the batch, unused here."""
        parts, masks = [], []
        if self.profile is not None:
            if profile_index is None or profile_values is None:
                raise ValueError("this cell encoder has a profile token: the batch needs profile_index and profile_values")
            bag = self.profile(profile_index, per_sample_weights=profile_values.to(self.profile.weight.dtype))
            if self.profile_bias is not None:
                bag = bag + self.profile_bias
            parts.append(self.profile_norm(bag).unsqueeze(1))
            masks.append(mask.new_ones(mask.shape[0], 1))
        if self.trunk is not None:
            parts.append(self.trunk(gene_ids=gene_ids, value_ids=value_ids, mask=mask))
            masks.append(mask)
        x, mask = torch.cat(parts, dim=1), torch.cat(masks, dim=1)
        x = x * mask.unsqueeze(-1).to(x.dtype)
        return ModalityTokens(embeddings=x, mask=mask)


_KIBAN_TRUNK_PARTS = ("gene_embedding.", "value_embedding.", "embedding_norm.", "transformer.")


def _nest_kiban_trunk(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Move the top-level ``gene_embedding.*`` ... keys of an old cell state dict under ``trunk.``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.startswith(_KIBAN_TRUNK_PARTS):
            state_dict[f"{prefix}trunk.{rest}"] = state_dict.pop(key)


def load_weights(path: str) -> dict[str, Tensor]:
    """A state dict from a local .safetensors file, or a .pt/.pth file read with ``weights_only``."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"weights file {str(file)!r} does not exist")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


@register_preset(MODALITY)
def tiny() -> CellEncoderConfig:
    """A 2-layer, 32-wide encoder over the synthetic vocabulary, for tests."""
    return CellEncoderConfig(
        n_bins=11, max_genes=64, width=32, num_layers=2, num_heads=2, ffn_dim=64, dropout=0.0
    )


@register_preset(MODALITY)
def scgpt() -> CellEncoderConfig:
    """The architecture of scGPT's whole-human model: 51 bins, 1200 genes, 12 layers of width 512, 8 heads.

    With ``checkpoint_dir`` (``best_model.pt``, ``vocab.json``, ``args.json``) the published weights,
    vocabulary and hyperparameters load; the cell's embedding is then its CLS token (token 0).
    """
    return CellEncoderConfig(
        arch="scgpt",
        tokenization="binning",
        n_bins=51,
        max_genes=1199,
        width=512,
        num_layers=12,
        num_heads=8,
        ffn_dim=512,
        dropout=0.2,
        value_encoder="continuous",
    )


@register_preset(MODALITY)
def geneformer() -> CellEncoderConfig:
    """Geneformer-V1-6L-30M's architecture: rank tokens of 2,048 genes, a 6-layer BERT of width 256.

    With ``checkpoint_dir`` (a ``BertForMaskedLM`` folder holding, or beside ``token_dictionary_path``
    and ``gene_median_path``, Geneformer's dictionaries) any published Geneformer loads: V1 (no
    special tokens) or V2 (``<cls>`` ... ``<eos>``), at the model's own input size.
    """
    return CellEncoderConfig(
        arch="geneformer",
        tokenization="rank",
        max_genes=0,
        width=256,
        num_layers=6,
        num_heads=4,
        ffn_dim=512,
        activation="relu",
        dropout=0.02,
        attention_dropout=0.02,
        max_position=2048,
        layer_norm_eps=1e-12,
        pad_id=0,
        mask_id=1,
        cls_id=None,
        eos_id=None,
    )


# ----------------------------------------------------------------------------------------------
# Test data


def make_adata(
    n_cells: int = 50,
    n_genes: int = 100,
    *,
    seed: int = 0,
    sparse: bool = True,
    cell_types: Sequence[str] = ("T cell", "B cell", "NK cell", "monocyte"),
) -> Any:
    """A small deterministic AnnData of counts: genes GENE0.., cells cell0.., ``obs["cell_type"]``.

    Each cell type over-expresses its own block of marker genes, so a classifier can learn the
    types; library sizes vary between cells. X is float32 CSR when ``sparse`` (else dense).
    """
    import anndata
    import pandas as pd

    rng = np.random.default_rng(seed)
    types = rng.integers(len(cell_types), size=n_cells)
    gene_mean = rng.gamma(0.5, 2.0, size=n_genes)
    program = np.ones((len(cell_types), n_genes))
    block = max(1, n_genes // (2 * len(cell_types)))
    for t in range(len(cell_types)):
        program[t, t * block : (t + 1) * block] = 8.0
    library = rng.lognormal(0.0, 0.3, size=n_cells)
    counts = rng.poisson(gene_mean[None, :] * program[types] * library[:, None]).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([cell_types[t] for t in types], categories=list(cell_types))},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=list(synthetic_gene_names(n_genes)))
    return anndata.AnnData(X=scipy.sparse.csr_matrix(counts) if sparse else counts, obs=obs, var=var)

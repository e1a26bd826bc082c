"""The cell encoder's profile token fitted to data: per-gene statistics and the map they give.

A random profile token (``CellEncoderConfig.profile_token`` with no statistics) maps the profile
through random gene vectors. When the vocabulary has more genes than the token has dimensions the
map must drop directions, and which ones depends on the draw: on pbmc68k_reduced (765 genes into
576 dimensions) logistic regression on the token ranged over 0.771–0.879 accuracy across eight
draws (docs/results.md). A fitted token drops no chosen gene instead:

* ``profile_statistics`` reads training cells through the encoder's own featurizer and returns each
  vocabulary gene's mean and standard deviation of the value the token sees (log1p of the count
  per ``target_sum``), zeros included;
* ``fitted_profile`` gives every chosen gene its own dimension, z-scored: weight ``1 / std`` on its
  dimension and a bias ``-mean / std`` there, so the token is LayerNorm(the z-scores of the chosen
  genes). When there are more genes with variance than dimensions, the genes with the highest
  dispersion (variance / mean) are chosen, as highly-variable-gene selection does; genes that never
  vary in the training cells carry nothing and are left out.

The weights stay trainable parameters; the fitted values are only where they start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kiban.encoders.base import InvalidInput

__all__ = [
    "ProfileMoments",
    "ProfileStatistics",
    "chosen_genes",
    "fitted_profile",
    "profile_statistics",
]

_CHUNK = 256  # cells featurized per collated batch while accumulating


@dataclass
class ProfileStatistics:
    """Per-gene statistics, in vocabulary order, over ``n_cells`` cells (``n_rejected`` refused).

    mean, std: of log1p(count per target_sum) over the cells, a gene absent from a cell counting 0.
    rejects: (cell, reason) of each refused cell, at most the first 20.
    """

    mean: np.ndarray
    std: np.ndarray
    n_cells: int
    n_rejected: int = 0
    rejects: tuple[tuple[str, str], ...] = ()


class ProfileMoments:
    """Running per-gene sums of the profile token's values over collated batches of accepted cells,
    and the count of refused ones; ``result()`` gives the ``ProfileStatistics``.
    """

    def __init__(self, vocab_size: int) -> None:
        """Empty sums over a vocabulary of ``vocab_size`` genes."""
        self.total = np.zeros(vocab_size, dtype=np.float64)
        self.squares = np.zeros(vocab_size, dtype=np.float64)
        self.n_cells = 0
        self.n_rejected = 0
        self.rejects: list[tuple[str, str]] = []

    def add_batch(self, batch: Mapping[str, Tensor]) -> None:
        """Add a collated batch (``profile_index`` / ``profile_values`` [B, G], padding valued 0)."""
        index = batch["profile_index"].numpy().ravel()
        values = batch["profile_values"].numpy().astype(np.float64).ravel()
        np.add.at(self.total, index, values)  # padding adds 0 to either sum
        np.add.at(self.squares, index, values * values)
        self.n_cells += int(batch["profile_index"].shape[0])

    def add_rejected(self, cell: str, reason: str) -> None:
        """Count one refused cell (the first 20 reasons are kept)."""
        self.n_rejected += 1
        if len(self.rejects) < 20:
            self.rejects.append((cell, reason))

    def result(self) -> ProfileStatistics:
        """Mean and standard deviation per gene; ValueError when no cell was accepted."""
        if not self.n_cells:
            raise ValueError(f"no cell to fit the profile token on: {self.n_rejected} cells read, all refused")
        mean = self.total / self.n_cells
        variance = np.maximum(self.squares / self.n_cells - mean * mean, 0.0)
        return ProfileStatistics(
            mean=mean,
            std=np.sqrt(variance),
            n_cells=self.n_cells,
            n_rejected=self.n_rejected,
            rejects=tuple(self.rejects),
        )


def profile_statistics(featurizer: Any, cells: Iterable[Any]) -> ProfileStatistics:
    """Statistics of ``cells`` (items the featurizer takes) as the featurizer's profile token sees them.

    A cell the featurizer refuses (no vocabulary gene, all zeros) is counted in ``n_rejected`` with
    its reason, not in the statistics. Raises ValueError when no cell is left.
    """
    if not getattr(featurizer, "profile", False):
        raise ValueError("profile_statistics needs a featurizer of an encoder with a profile token")
    moments = ProfileMoments(featurizer.vocab_size)
    chunk: list[dict[str, Tensor]] = []
    for position, cell in enumerate(cells):
        try:
            chunk.append(featurizer(cell, item_id=f"cell {position}"))
        except InvalidInput as error:
            moments.add_rejected(str(error.item_id), error.problem)
            continue
        if len(chunk) == _CHUNK:
            moments.add_batch(featurizer.collate(chunk))
            chunk = []
    if chunk:
        moments.add_batch(featurizer.collate(chunk))
    return moments.result()


def chosen_genes(mean: np.ndarray, std: np.ndarray, width: int) -> np.ndarray:
    """Vocabulary indices of the genes a fitted token of ``width`` dimensions keeps, in vocabulary order.

    Every gene with a positive standard deviation when they fit; else the ``width`` of highest
    dispersion (variance / mean), ties to the earlier gene.
    """
    varies = np.flatnonzero(std > 0)
    if len(varies) <= width:
        return varies
    dispersion = std[varies] ** 2 / mean[varies]  # mean > 0 wherever std > 0: the values are >= 0
    order = np.argsort(-dispersion, kind="stable")[:width]
    return np.sort(varies[order])


def fitted_profile(mean: Any, std: Any, *, width: int) -> tuple[Tensor, Tensor]:
    """(weight [G, width], bias [width]) of the profile token that z-scores the chosen genes.

    Gene ``chosen[k]`` maps to dimension ``k`` with weight ``1 / std``; the bias there is
    ``-mean / std``. Dimensions past the chosen genes stay 0 for every cell.
    """
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    chosen = chosen_genes(mean, std, width)
    weight = torch.zeros(len(mean), width, dtype=torch.float32)
    bias = torch.zeros(width, dtype=torch.float32)
    columns = torch.arange(len(chosen))
    weight[torch.as_tensor(chosen), columns] = torch.as_tensor(1.0 / std[chosen], dtype=torch.float32)
    bias[columns] = torch.as_tensor(-mean[chosen] / std[chosen], dtype=torch.float32)
    return weight, bias


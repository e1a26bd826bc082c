"""Honest train / valid / test splits: by scaffold (molecules), by group (donors, batches) and by
length strata (proteins). Each returns a ``Split`` that names its method and seed, so every metric
can say which split it came from.

Scaffold split: Bemis–Murcko scaffolds (RDKit ``MurckoScaffold``), whole scaffold sets assigned
largest first to train, then valid, then test (the deepchem / chemprop "scaffold_balanced" idea,
with the sets in a seeded random order after the big ones so that test is not only singletons).
No scaffold ever appears on two sides.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Split",
    "group_split",
    "length_stratified_split",
    "murcko_scaffold",
    "random_split",
    "kmer_clusters",
    "scaffold_split",
    "similarity_split",
]


@dataclass(frozen=True)
class Split:
    """Row indices of each side, and how they were drawn."""

    method: str
    seed: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    def describe(self) -> dict:
        """Sizes and method of the split, for metrics.json."""
        return {
            "method": self.method,
            "seed": self.seed,
            "sizes": {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)},
        }


def _fractions(valid: float, test: float) -> None:
    if not (0 <= valid < 1 and 0 < test < 1 and valid + test < 1):
        raise ValueError(f"valid ({valid}) and test ({test}) fractions must be in [0, 1) and sum below 1")


def random_split(n: int, *, valid: float = 0.1, test: float = 0.2, seed: int = 0) -> Split:
    """A seeded random train / valid / test split of ``n`` rows."""
    _fractions(valid, test)
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_valid = max(1, round(n * test)), round(n * valid)
    return Split(
        "random",
        seed,
        np.sort(order[n_test + n_valid :]),
        np.sort(order[n_test : n_test + n_valid]),
        np.sort(order[:n_test]),
    )


def _assign_groups(groups: Sequence, *, method: str, valid: float, test: float, seed: int) -> Split:
    """Whole groups to sides: groups bigger than half the test size first (to train), the rest shuffled."""
    _fractions(valid, test)
    members: dict = defaultdict(list)
    for row, group in enumerate(groups):
        members[group].append(row)
    n = len(groups)
    if len(members) < 2:
        raise ValueError(f"a {method} split needs at least 2 distinct groups, got {len(members)}")
    rng = np.random.default_rng(seed)
    sets = list(members.values())
    big = sorted((s for s in sets if len(s) > n * test / 2), key=len, reverse=True)
    small = [s for s in sets if len(s) <= n * test / 2]
    small = [small[k] for k in rng.permutation(len(small))]
    train_cap, valid_cap = n * (1 - valid - test), n * (1 - test)
    train, valid_rows, test_rows = [], [], []
    filled = 0
    for rows in big + small:
        if filled + len(rows) <= train_cap or not train:
            train.extend(rows)
        elif filled + len(rows) <= valid_cap and valid > 0:
            valid_rows.extend(rows)
        else:
            test_rows.extend(rows)
        filled += len(rows)
    if not test_rows:
        raise ValueError(f"a {method} split could not fill a test set: one group holds most rows")
    return Split(method, seed, np.sort(train), np.sort(valid_rows).astype(int), np.sort(test_rows))


def murcko_scaffold(smiles: str) -> str:
    """The Bemis–Murcko scaffold SMILES of a molecule ("" for an acyclic one)."""
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse SMILES {smiles!r}")
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)


def scaffold_split(smiles: Sequence[str], *, valid: float = 0.1, test: float = 0.2, seed: int = 0) -> Split:
    """Split molecules so that no Bemis–Murcko scaffold is on two sides."""
    return _assign_groups(
        [murcko_scaffold(s) for s in smiles], method="scaffold", valid=valid, test=test, seed=seed
    )


def group_split(groups: Sequence, *, valid: float = 0.1, test: float = 0.2, seed: int = 0) -> Split:
    """Held-out groups (donors, batches, sections): no group on two sides."""
    return _assign_groups(list(groups), method="group", valid=valid, test=test, seed=seed)


def length_stratified_split(
    lengths: Sequence[int], *, valid: float = 0.1, test: float = 0.2, seed: int = 0, n_strata: int = 5
) -> Split:
    """A random split within each length quantile, so every side covers short and long proteins alike.

    No sequence-identity clustering (that needs MMseqs2); this is the issue's "at least" option.
    """
    _fractions(valid, test)
    lengths = np.asarray(lengths)
    edges = np.quantile(lengths, np.linspace(0, 1, n_strata + 1)[1:-1])
    strata = np.searchsorted(edges, lengths, side="right")
    rng = np.random.default_rng(seed)
    train, valid_rows, test_rows = [], [], []
    for stratum in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == stratum))
        n_test, n_valid = round(len(rows) * test), round(len(rows) * valid)
        test_rows.extend(rows[:n_test])
        valid_rows.extend(rows[n_test : n_test + n_valid])
        train.extend(rows[n_test + n_valid :])
    return Split(
        "length-stratified",
        seed,
        np.sort(train),
        np.sort(valid_rows).astype(int),
        np.sort(test_rows).astype(int),
    )


def kmer_clusters(sequences: Sequence[str], *, k: int = 3, threshold: float = 0.15, chunk: int = 512) -> np.ndarray:
    """Cluster ids [N] of sequences grouped by k-mer Jaccard similarity (CD-HIT-like greedy star
    clustering): longest first, each unassigned sequence founds a cluster and takes every
    unassigned sequence whose set of k-mers has Jaccard similarity >= ``threshold`` with its own.
    Pairs are found ``chunk`` rows at a time through a sparse product (no [N, N] matrix held).
    """
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer

    texts = [str(s).upper() for s in sequences]
    x = CountVectorizer(analyzer="char", ngram_range=(k, k), lowercase=False, binary=True).fit_transform(texts)
    x = sparse.csr_matrix(x, dtype=np.float32)
    sizes = np.asarray(x.sum(1)).ravel()
    neighbours: list[np.ndarray] = []
    for start in range(0, len(texts), chunk):
        shared = (x[start : start + chunk] @ x.T).toarray()
        union = sizes[start : start + chunk, None] + sizes[None, :] - shared
        jaccard = shared / np.maximum(union, 1)
        neighbours.extend(np.flatnonzero(row >= threshold) for row in jaccard)
    cluster = np.full(len(texts), -1)
    for i in np.argsort([-len(t) for t in texts], kind="stable"):
        if cluster[i] >= 0:
            continue
        members = neighbours[i][cluster[neighbours[i]] < 0]
        cluster[members] = i
        cluster[i] = i
    return cluster


def similarity_split(
    sequences: Sequence[str],
    *,
    k: int = 3,
    threshold: float = 0.15,
    valid: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
) -> Split:
    """Whole k-mer similarity clusters (``kmer_clusters``) to sides: no test sequence has a training
    sequence of its cluster. The method names k and the threshold.
    """
    clusters = kmer_clusters(sequences, k=k, threshold=threshold)
    if len(set(clusters.tolist())) < 3:
        raise ValueError(
            f"the {len(clusters)} sequences fall into {len(set(clusters.tolist()))} k-mer similarity cluster(s) "
            f"(k={k}, Jaccard >= {threshold}): too few to split; give --groups COL (e.g. the mutated position)"
        )
    return _assign_groups(
        clusters, method=f"kmer-jaccard (k={k}, >= {threshold})", valid=valid, test=test, seed=seed
    )

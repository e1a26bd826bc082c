"""The scores the field reports for generated molecules, and the baselines they are read against.

Definitions follow MOSES (Polykovskiy et al. 2020) and GuacaMol (Brown et al. 2019):

* validity: valid / sampled (RDKit parses it and it has at least one atom);
* uniqueness: distinct canonical SMILES / valid;
* novelty: distinct valid molecules not in the training set / distinct valid;
* internal diversity (MOSES IntDiv1): 1 - mean Tanimoto similarity over all ordered pairs of the
  distinct valid molecules (Morgan radius 2, 1024 bits; the diagonal included, as MOSES does);
* FCD: Fréchet distance between ChemNet's penultimate activations of the generated and the
  reference molecules (Preuer et al. 2018; PyPI ``fcd``, which ships ChemNet's weights); lower is
  closer. It is biased upward for small sets, so compare only numbers over equally many molecules;
* KL score (GuacaMol): for 9 physico-chemical descriptors and the nearest-neighbour similarity
  inside each set, KL(reference || generated) (continuous ones by Gaussian KDE on a 1000-point
  grid, counts by 10-bin histograms), reported as mean exp(-KL) in (0, 1]; higher is closer.

Baselines: ``sample_training`` (draws molecules from the training set: novelty 0 by construction,
every other score is what "perfectly copying the data" gives) and ``NgramSmiles`` (a character-level
SMILES n-gram model with add-k smoothing fitted on the same training molecules).
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "NgramSmiles",
    "fcd",
    "internal_diversity",
    "kl_score",
    "molecule_scores",
    "sample_training",
]


def _mols(smiles: Sequence[str | None]) -> list[Any]:
    from rdkit import Chem, rdBase

    _quiet = rdBase.BlockLogs()  # noqa: F841 - invalid samples are counted, not logged one by one
    out = []
    for text in smiles:
        mol = Chem.MolFromSmiles(text) if text else None
        out.append(mol if mol is not None and mol.GetNumAtoms() else None)
    return out


def _fingerprints(mols: Sequence[Any]) -> list[Any]:
    from rdkit.Chem import rdFingerprintGenerator

    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
    return [generator.GetFingerprint(m) for m in mols]


def internal_diversity(smiles: Sequence[str]) -> float:
    """MOSES IntDiv1 of distinct molecules: 1 - mean pairwise Tanimoto (diagonal included)."""
    from rdkit import DataStructs

    mols = [m for m in _mols(sorted(set(smiles))) if m is not None]
    if not mols:
        return float("nan")
    fps = _fingerprints(mols)
    total = sum(sum(DataStructs.BulkTanimotoSimilarity(fp, fps)) for fp in fps)
    return 1.0 - total / len(fps) ** 2


def _chemnet() -> Any:
    import fcd as fcd_package
    import torch

    # fcd calls torch.load on its own bundled file; it holds a pickled config, which torch's
    # weights-only default refuses. The file ships inside the pinned package, so it is trusted.
    load = torch.load
    torch.load = lambda *args, **kwargs: load(*args, **{**kwargs, "weights_only": False})
    try:
        return fcd_package.load_ref_model()
    finally:
        torch.load = load


def fcd(generated: Sequence[str], reference: Sequence[str]) -> float:
    """Fréchet ChemNet Distance between two sets of SMILES (canonicalised first); lower is closer."""
    import fcd as fcd_package
    import torch

    model = _chemnet()
    a = [s for s in generated if s]
    b = [s for s in reference if s]
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    with torch.no_grad():
        act_a = fcd_package.get_predictions(model, a, device="cpu")
        act_b = fcd_package.get_predictions(model, b, device="cpu")
    return float(
        fcd_package.calculate_frechet_distance(
            mu1=act_a.mean(0), sigma1=np.cov(act_a.T), mu2=act_b.mean(0), sigma2=np.cov(act_b.T)
        )
    )


def _descriptors(mols: Sequence[Any]) -> dict[str, np.ndarray]:
    from rdkit.Chem import Descriptors

    names = {
        "BertzCT": (Descriptors.BertzCT, False),
        "MolLogP": (Descriptors.MolLogP, False),
        "MolWt": (Descriptors.MolWt, False),
        "TPSA": (Descriptors.TPSA, False),
        "NumHAcceptors": (Descriptors.NumHAcceptors, True),
        "NumHDonors": (Descriptors.NumHDonors, True),
        "NumRotatableBonds": (Descriptors.NumRotatableBonds, True),
        "NumAliphaticRings": (Descriptors.NumAliphaticRings, True),
        "NumAromaticRings": (Descriptors.NumAromaticRings, True),
    }
    return {name: np.array([fn(m) for m in mols], dtype=float) for name, (fn, _) in names.items()}


_DISCRETE = {"NumHAcceptors", "NumHDonors", "NumRotatableBonds", "NumAliphaticRings", "NumAromaticRings"}


def _nearest_similarity(mols: Sequence[Any]) -> np.ndarray:
    from rdkit import DataStructs

    fps = _fingerprints(mols)
    out = []
    for i, fp in enumerate(fps):
        sims = DataStructs.BulkTanimotoSimilarity(fp, fps[:i] + fps[i + 1 :])
        out.append(max(sims) if sims else 0.0)
    return np.array(out)


def _continuous_kl(p: np.ndarray, q: np.ndarray) -> float:
    from scipy.stats import entropy, gaussian_kde

    if np.ptp(p) == 0 or np.ptp(q) == 0:  # a KDE of a constant is undefined; fall back to histograms
        return _discrete_kl(p, q)
    grid = np.linspace(min(p.min(), q.min()), max(p.max(), q.max()), 1000)
    return float(entropy(gaussian_kde(p)(grid) + 1e-10, gaussian_kde(q)(grid) + 1e-10))


def _discrete_kl(p: np.ndarray, q: np.ndarray) -> float:
    from scipy.stats import entropy

    top = max(p.max(), q.max())
    hp, _ = np.histogram(p, bins=10, range=(0, top), density=True)
    hq, _ = np.histogram(q, bins=10, range=(0, top), density=True)
    return float(entropy(hp + 1e-10, hq + 1e-10))


def kl_score(generated: Sequence[str], reference: Sequence[str]) -> float:
    """GuacaMol's KL-divergence score of the valid generated molecules against the reference (0..1)."""
    gen = [m for m in _mols(generated) if m is not None]
    ref = [m for m in _mols(reference) if m is not None]
    if len(gen) < 2 or len(ref) < 2:
        return float("nan")
    dg, dr = _descriptors(gen), _descriptors(ref)
    kls = [(_discrete_kl if name in _DISCRETE else _continuous_kl)(dr[name], dg[name]) for name in dr]
    kls.append(_continuous_kl(_nearest_similarity(ref), _nearest_similarity(gen)))
    return float(np.mean([math.exp(-k) for k in kls]))


def molecule_scores(
    sampled: Sequence[str | None], *, training: set[str], reference: Sequence[str], with_fcd: bool = True
) -> dict[str, float]:
    """Every score above for one set of sampled molecules (None or "" = an invalid sample).

    training: canonical SMILES of the training set (novelty); reference: held-out molecules FCD and
    KL compare with. The molecules are canonicalised here; invalid ones count against validity only.
    """
    from rdkit import Chem

    mols = _mols(sampled)
    valid = [Chem.MolToSmiles(m) for m in mols if m is not None]
    distinct = sorted(set(valid))
    n = len(sampled)
    return {
        "n": n,
        "validity": len(valid) / n if n else float("nan"),
        "uniqueness": len(distinct) / len(valid) if valid else float("nan"),
        "novelty": sum(s not in training for s in distinct) / len(distinct) if distinct else float("nan"),
        "int_div": internal_diversity(distinct),
        "fcd": fcd(valid, reference) if with_fcd else float("nan"),
        "kl_score": kl_score(valid, reference),
    }


def sample_training(training: Sequence[str], n: int, *, seed: int = 0) -> list[str]:
    """``n`` molecules drawn with replacement from the training set (the copy-the-data baseline)."""
    rng = random.Random(seed)
    return [rng.choice(list(training)) for _ in range(n)]


class NgramSmiles:
    """A character-level SMILES n-gram model (order ``order``, add-k smoothing over the characters seen).

    The simplest generative baseline: it learns local SMILES syntax and composition, but not ring
    closures or branch balance, so many of its samples do not parse; its validity is what a model
    that knows only local statistics reaches.
    """

    START, END = "^", "$"

    def __init__(self, *, order: int = 6, k: float = 0.01) -> None:
        """order: characters of context + 1; k: the smoothing pseudo-count."""
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        self.order, self.k = order, k
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.alphabet: list[str] = []

    def fit(self, smiles: Sequence[str]) -> "NgramSmiles":
        """Count every (context, next character) in the training SMILES."""
        chars = set()
        for text in smiles:
            padded = self.START * (self.order - 1) + text + self.END
            chars.update(text)
            for i in range(self.order - 1, len(padded)):
                self.counts[padded[i - self.order + 1 : i]][padded[i]] += 1
        self.alphabet = sorted(chars) + [self.END]
        return self

    def sample(self, n: int, *, seed: int = 0, max_length: int = 120) -> list[str]:
        """``n`` SMILES strings (each at most ``max_length`` characters)."""
        if not self.alphabet:
            raise ValueError("fit the n-gram model before sampling")
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            context, text = self.START * (self.order - 1), ""
            while len(text) < max_length:
                counts = self.counts.get(context[-(self.order - 1) :] if self.order > 1 else "", Counter())
                weights = [counts.get(c, 0) + self.k for c in self.alphabet]
                char = rng.choices(self.alphabet, weights)[0]
                if char == self.END:
                    break
                text += char
                context += char
            out.append(text)
        return out

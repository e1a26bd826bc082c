"""Baselines a specialist would run, fitted on the same split as the head and scored by the same
metrics: random forest (regression) / logistic regression (classification) on Morgan
fingerprints for molecules, logistic regression on log-normalised expression (scanpy-style:
counts per 10k, log1p) for cells, and the trivial predictor (majority class / training mean).

Each returns raw outputs in the head's layout, [N, K] logits or values, so ``head_metrics``
scores baseline and head alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse

__all__ = ["expression_logreg", "fingerprint_model", "log_normalise", "morgan_fingerprints", "trivial"]


def morgan_fingerprints(smiles: Sequence[str], *, radius: int = 2, n_bits: int = 2048) -> np.ndarray:
    """[N, n_bits] 0/1 ECFP4-style bits (RDKit Morgan, radius 2)."""
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    out = np.zeros((len(smiles), n_bits), dtype=np.uint8)
    for row, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        if mol is None:
            raise ValueError(f"RDKit cannot parse SMILES {s!r}")
        out[row] = generator.GetFingerprintAsNumPy(mol)
    return out


def _fit_predict(
    kind: str, model: object, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int
) -> np.ndarray:
    if kind == "classification":
        model.fit(x_train, y_train)
        logits = np.full((len(x_test), n_classes), -1e9)
        # log-probabilities as logits; classes absent from training stay at -inf-like
        logits[:, model.classes_] = np.log(np.clip(model.predict_proba(x_test), 1e-12, None))
        return logits
    if kind == "multilabel":
        # one classifier per task on its measured rows; logit of P(positive)
        columns = []
        for k in range(y_train.shape[1]):
            known = ~np.isnan(y_train[:, k])
            y = y_train[known, k].astype(int)
            if len(np.unique(y)) < 2:  # a task with one class in training: its training rate
                rate = float(np.clip(y.mean() if len(y) else 0.5, 1e-6, 1 - 1e-6))
                columns.append(np.full(len(x_test), np.log(rate / (1 - rate))))
                continue
            model.fit(x_train[known], y)
            p = np.clip(model.predict_proba(x_test)[:, list(model.classes_).index(1)], 1e-9, 1 - 1e-9)
            columns.append(np.log(p / (1 - p)))
        return np.stack(columns, 1)
    columns = []
    for k in range(y_train.shape[1]):
        known = ~np.isnan(y_train[:, k])
        columns.append(model.fit(x_train[known], y_train[known, k]).predict(x_test))
    return np.stack(columns, 1)


def fingerprint_model(
    kind: str,
    fingerprints_train: np.ndarray,
    y_train: np.ndarray,
    fingerprints_test: np.ndarray,
    *,
    n_classes: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """Random forest (regression, 200 trees) / logistic regression (classification) on fingerprints."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import LogisticRegression

    if kind in ("classification", "multilabel"):
        model = LogisticRegression(C=0.1, max_iter=2000)
    else:
        model = RandomForestRegressor(n_estimators=200, random_state=seed, n_jobs=1)
    return _fit_predict(kind, model, fingerprints_train, y_train, fingerprints_test, n_classes)


def log_normalise(
    matrix: np.ndarray | scipy.sparse.spmatrix, *, target_sum: float = 1e4, already_log: bool = False
) -> np.ndarray:
    """Counts per ``target_sum`` then log1p (scanpy's normalize_total + log1p); dense [N, G]."""
    x = matrix.toarray() if scipy.sparse.issparse(matrix) else np.asarray(matrix, dtype=float)
    if already_log:
        return x
    totals = x.sum(1, keepdims=True)
    return np.log1p(x / np.where(totals > 0, totals, 1) * target_sum)


def expression_logreg(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, n_classes: int, seed: int = 0
) -> np.ndarray:
    """Logistic regression on (already) log-normalised expression, features standardised."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
    model.fit(x_train, y_train)
    logits = np.full((len(x_test), n_classes), -1e9)
    logits[:, model.classes_] = np.log(np.clip(model.predict_proba(x_test), 1e-12, None))
    return logits


def trivial(kind: str, y_train: np.ndarray, n_test: int, *, n_classes: int = 0) -> np.ndarray:
    """Majority class (as a one-hot logit row), each task's training positive rate (as a logit;
    multilabel) or the training mean of each target, for every test row.
    """
    if kind == "multilabel":
        rate = np.clip(np.nan_to_num(np.nanmean(y_train, 0), nan=0.5), 1e-6, 1 - 1e-6)
        return np.tile(np.log(rate / (1 - rate)), (n_test, 1))
    if kind == "classification":
        logits = np.zeros((n_test, n_classes))
        logits[:, np.bincount(y_train.astype(int), minlength=n_classes).argmax()] = 1.0
        return logits
    return np.tile(np.nanmean(y_train, 0), (n_test, 1))

"""Drug–target interaction / affinity from a (protein, molecule) pair.

Features of a pair are the frozen model's pooled states of the protein and of the molecule,
concatenated: [N, 2H] (each distinct protein and drug embedded once). ``PairHead`` (architecture
"pair", ``modality="protein+molecule"``, ``input_dim`` 2H) is a ``PooledHead`` over them that maps a
pair to the affinity (Davis pKd, KIBA score); its ``predict`` takes ``(protein, SMILES)`` pairs, so
``kiban predict`` and ``kiban serve`` use it like any other head. Baseline, as a chemist would run
it: a random forest on the drug's Morgan fingerprint joined to a one-hot of the target (and, in
``kiban finetune``, the target's amino-acid composition). Metrics: RMSE and MSE (= RMSE², DeepDTA
reports MSE), Spearman, concordance index.

``read_pairs`` reads a pairs table: SMILES and sequence columns, or ``drug_id`` / ``target_id``
columns resolved through separate drug and target tables (the DeepDTA Davis / KIBA layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiban.tasks.heads import HeadConfig, PooledHead, create_head, register_head
from kiban.tasks.models import embed_items
from kiban.tasks.splits import Split
from kiban.tasks.training import FitSettings, fit_head

__all__ = [
    "PAIR_MODALITIES",
    "PairHead",
    "evaluate_pairs",
    "pair_features",
    "read_pairs",
    "target_fingerprint_baseline",
]

PAIR_MODALITIES = ("protein", "molecule")  # the order of a pair's two inputs, and of its features
SMILES_COLUMNS = ("smiles", "SMILES", "drug_smiles", "compound_smiles")
SEQUENCE_COLUMNS = ("sequence", "target_sequence", "protein_sequence")
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def pair_features(
    model: Any,
    proteins: Sequence[str],
    smiles: Sequence[str],
    *,
    layer: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """[N, 2H]: pooled protein state ‖ pooled molecule state of each pair (``layer`` as ``embed``'s)."""
    unique_proteins, protein_index = np.unique(np.asarray(proteins, dtype=object), return_inverse=True)
    unique_smiles, smiles_index = np.unique(np.asarray(smiles, dtype=object), return_inverse=True)
    p = embed_items(model, "protein", list(unique_proteins), batch_size=8, layer=layer, progress=progress)
    m = embed_items(model, "molecule", list(unique_smiles), layer=layer, progress=progress)
    return torch.cat([p[torch.as_tensor(protein_index)], m[torch.as_tensor(smiles_index)]], 1)


@register_head("pair")
class PairHead(PooledHead):
    """A pooled head over a (protein, molecule) pair: [pooled protein ‖ pooled molecule] [B, 2H].

    ``config.modality`` is "protein+molecule" and ``config.input_dim`` 2H. ``predict`` takes
    ``(protein sequence, SMILES)`` pairs; rows are those of the head's kind (regression:
    ``{"values": {target: value}}``). Regression metrics add MSE beside RMSE.
    """

    def __init__(self, config: HeadConfig) -> None:
        if tuple(config.modality.split("+")) != PAIR_MODALITIES:
            raise ValueError(
                f"head {config.task!r}: a pair head reads {'+'.join(PAIR_MODALITIES)}, got {config.modality!r}"
            )
        super().__init__(config)

    def check_model(self, model: Any) -> None:
        """Raise ValueError unless ``model`` has both encoders and pooled states half this head's width."""
        missing = [m for m in PAIR_MODALITIES if m not in model.encoders]
        if missing:
            raise ValueError(
                f"head {self.task!r} reads (protein, molecule) pairs, but the model has no "
                f"{' or '.join(missing)} encoder"
            )
        width = model.llm.get_input_embeddings().embedding_dim
        if self.config.input_dim != 2 * width:
            raise ValueError(
                f"head {self.task!r} reads {self.config.input_dim}-wide pair features; the model's "
                f"pooled states give 2 x {width}"
            )

    def predict(self, model: Any, items: Sequence[Any]) -> list[dict[str, Any]]:
        """Outputs for ``(protein, SMILES)`` pairs; a bad side raises the encoder's ``InvalidInput``."""
        from kiban.encoders.base import InvalidInput

        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise InvalidInput("protein+molecule", item, "is not a (protein, molecule) pair")
        proteins, smiles = [p for p, _ in items], [m for _, m in items]
        return self.outputs(pair_features(model, proteins, smiles, layer=self.config.layer))

    def metrics(self, outputs: Any, targets: Any) -> dict[str, Any]:
        """RMSE, MSE, Spearman and concordance index of predicted affinities."""
        metrics = super().metrics(outputs, targets)
        if self.config.kind == "regression":
            for values in metrics.values():
                values["mse"] = values["rmse"] ** 2
        return metrics


def amino_acid_composition(sequences: Sequence[str]) -> np.ndarray:
    """[N, 20] fraction of each standard amino acid (others ignored)."""
    index = {a: k for k, a in enumerate(AMINO_ACIDS)}
    out = np.zeros((len(sequences), len(AMINO_ACIDS)))
    for row, sequence in enumerate(sequences):
        for letter in sequence:
            if letter in index:
                out[row, index[letter]] += 1
        out[row] /= max(len(sequence), 1)
    return out


def target_fingerprint_baseline(
    target_ids: Sequence[str],
    smiles: Sequence[str],
    y: np.ndarray,
    split: Split,
    *,
    seed: int = 0,
    rows: np.ndarray | None = None,
    sequences: Sequence[str] | None = None,
    n_estimators: int = 200,
    max_features: float = 1.0,
) -> np.ndarray:
    """Random forest on [Morgan fingerprint of the drug ‖ one-hot target (‖ the target's amino-acid
    composition, when ``sequences`` are given)], fitted on ``split.train``; predictions for ``rows``
    (default ``split.test``). ``max_features``: the fraction of features tried per split
    (scikit-learn's default 1.0; ``kiban finetune`` uses 100 trees at 0.3: 4x faster, and no worse
    on Davis). A target never seen in training has a one-hot column the forest never split on;
    composition lets it still say something about such a target (a cold-target split).
    """
    from sklearn.ensemble import RandomForestRegressor

    from kiban.tasks.baselines import morgan_fingerprints

    unique_smiles, smiles_index = np.unique(np.asarray(smiles, dtype=object), return_inverse=True)
    fingerprints = morgan_fingerprints(list(unique_smiles))[smiles_index]
    targets, target_index = np.unique(np.asarray(target_ids, dtype=object), return_inverse=True)
    blocks = [fingerprints, np.eye(len(targets), dtype=np.uint8)[target_index]]
    if sequences is not None:
        unique_sequences, sequence_index = np.unique(np.asarray(sequences, dtype=object), return_inverse=True)
        blocks.append(amino_acid_composition(list(unique_sequences))[sequence_index])
    x = np.hstack(blocks)
    forest = RandomForestRegressor(
        n_estimators=n_estimators, max_features=max_features, random_state=seed, n_jobs=1
    )
    forest.fit(x[split.train], y[split.train])
    return forest.predict(x[split.test if rows is None else rows])


def evaluate_pairs(
    model: Any,
    *,
    target_ids: Sequence[str],
    proteins: Sequence[str],
    smiles: Sequence[str],
    y: np.ndarray,
    split: Split,
    label: str = "pKd",
    hidden_dim: int = 64,
    seed: int = 0,
    epochs: int = 200,
) -> tuple[PairHead, list[dict[str, Any]]]:
    """Fit the pair head on ``split.train`` (early stopping on ``split.valid``); score head, baseline
    and the training mean on ``split.test``. Returns (head, results as in metrics.json).
    """
    from kiban.tasks.baselines import trivial

    features = pair_features(model, proteins, smiles)
    targets = torch.as_tensor(np.asarray(y, dtype=np.float32)).unsqueeze(1)
    torch.manual_seed(seed)
    head = create_head(
        HeadConfig(
            task="dti",
            modality="+".join(PAIR_MODALITIES),
            kind="regression",
            architecture="pair",
            labels=[label],
            input_dim=features.shape[1],
            hidden_dim=hidden_dim,
            extra={"seed": seed},
        )
    )
    fit_head(
        head,
        features[split.train],
        targets[split.train],
        valid=(features[split.valid], targets[split.valid]) if len(split.valid) else None,
        settings=FitSettings(epochs=epochs, seed=seed, progress=False),
    )
    truth = targets[split.test].numpy()
    with torch.no_grad():
        predicted = head(features[split.test]).numpy()
    baseline = target_fingerprint_baseline(target_ids, smiles, np.asarray(y, dtype=float), split, seed=seed)[
        :, None
    ]
    mean = trivial("regression", targets[split.train].numpy(), len(split.test))
    side = {"split": "test", **split.describe()}
    return head, [
        {"model": "pair head over pooled states", **side, "metrics": head.metrics(predicted, truth)},
        {
            "model": "random forest on Morgan FP + target one-hot",
            **side,
            "metrics": head.metrics(baseline, truth),
        },
        {"model": "trivial (training mean)", **side, "metrics": head.metrics(mean, truth)},
    ]


# ----------------------------------------------------------------------------------------------
# Reading a pairs table


def read_pairs(
    path: str | Path,
    *,
    label: str | None,
    rejects: Any,
    drugs: str | Path | None = None,
    targets: str | Path | None = None,
    max_length: int | None = None,
) -> Any:
    """The accepted rows of a pairs table (a pandas DataFrame, its own columns kept) with columns
    ``id``, ``drug_id``, ``target_id``, ``smiles`` and ``sequence`` filled in.

    The drug side is a SMILES column (``smiles``, ``drug_smiles``, ...) or a ``drug_id`` column
    looked up in ``drugs`` (a table of drug_id, smiles); the target side a sequence column
    (``sequence``, ``target_sequence``, ...) or a ``target_id`` column looked up in ``targets``
    (target_id, sequence). Rows with an unknown id, an unparseable SMILES, letters outside the
    amino-acid alphabet, a protein over ``max_length`` residues or a missing / non-numeric
    ``label`` go to ``rejects`` with the reason. A missing column is a ValueError naming it.
    """
    import pandas as pd
    from rdkit import Chem
    from rdkit.rdBase import BlockLogs

    from kiban.encoders.base import InvalidInput
    from kiban.tasks.structure import protein_sequence

    path = Path(path)
    table = _table(path)
    columns = list(table.columns)
    if label is not None and label not in columns:
        raise ValueError(f"{path}: no label column {label!r}; columns: {', '.join(columns)}")
    smiles = _side(table, path, SMILES_COLUMNS, "drug_id", drugs, "smiles", "drug", "--drugs")
    sequences = _side(table, path, SEQUENCE_COLUMNS, "target_id", targets, "sequence", "target", "--targets")
    out = table.copy()
    out["drug_id"] = table["drug_id"] if "drug_id" in columns else smiles
    out["target_id"] = table["target_id"] if "target_id" in columns else sequences
    out["smiles"], out["sequence"] = smiles, sequences
    if "drug_id" in columns and "target_id" in columns:
        out["id"] = out["drug_id"].astype(str) + "|" + out["target_id"].astype(str)
    else:
        out["id"] = [f"line {n}" for n in range(2, len(table) + 2)]
    block = BlockLogs()  # RDKit's own messages for the bad SMILES; each is reported below instead
    parses = {s: Chem.MolFromSmiles(s) is not None for s in set(smiles.dropna())}
    del block
    checked: dict[str, str | None] = {}  # sequence -> cleaned, or None when invalid

    def clean(sequence: str) -> str | None:
        if sequence not in checked:
            try:
                checked[sequence] = protein_sequence(sequence)
            except InvalidInput:
                checked[sequence] = None
        return checked[sequence]

    keep = []
    for n, row in enumerate(out.itertuples(index=False)):
        where, ident = f"{path}:line {n + 2}", out["id"].iat[n]
        problem = None
        if not isinstance(row.smiles, str) or not row.smiles:
            problem = ("unknown drug", f"drug {out['drug_id'].iat[n]!r} is not in {drugs}")
        elif not isinstance(row.sequence, str) or not row.sequence:
            problem = ("unknown target", f"target {out['target_id'].iat[n]!r} is not in {targets}")
        elif not parses[row.smiles]:
            problem = ("unparseable SMILES", f"RDKit cannot parse SMILES {row.smiles!r}")
        elif clean(row.sequence) is None:
            problem = ("invalid residues", f"target {out['target_id'].iat[n]!r} has non-amino-acid letters")
        elif max_length is not None and len(checked[row.sequence]) > max_length:
            problem = (
                "too long",
                f"target of {len(checked[row.sequence])} residues, over --max-length {max_length}",
            )
        elif label is not None and not _number(out[label].iat[n]):
            value = out[label].iat[n]
            problem = (
                ("missing label", f"{label} is empty")
                if value == ""
                else ("non-numeric label", f"{label} is {value!r}")
            )
        if problem is not None:
            rejects.reject(id=ident, location=where, reason=problem[0], detail=problem[1])
            continue
        rejects.accept()
        keep.append(n)
    out = out.iloc[keep].reset_index(drop=True)
    out["sequence"] = [checked[s] for s in out["sequence"]]
    if label is not None:
        out[label] = pd.to_numeric(out[label])
    return out


def _table(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    table = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _side(
    table: Any,
    path: Path,
    candidates: Sequence[str],
    id_column: str,
    lookup: str | Path | None,
    value_column: str,
    what: str,
    flag: str,
) -> Any:
    """A column of SMILES / sequences for every row: the table's own, or ids mapped through ``lookup``."""
    present = next((c for c in candidates if c in table.columns), None)
    if present is not None and lookup is None:
        return table[present].str.strip()
    if lookup is None or id_column not in table.columns:
        raise ValueError(
            f"{path}: no {what} column: give a {' / '.join(repr(c) for c in candidates)} column, or a "
            f"{id_column!r} column and {flag} FILE ({id_column}, {value_column}); columns: {', '.join(table.columns)}"
        )
    ids = _table(Path(lookup))
    if id_column not in ids.columns or value_column not in ids.columns:
        raise ValueError(
            f"{lookup}: a {what} table needs {id_column!r} and {value_column!r} columns; "
            f"columns: {', '.join(ids.columns)}"
        )
    mapping = dict(zip(ids[id_column], ids[value_column].str.strip()))
    return table[id_column].map(mapping)


def _number(text: Any) -> bool:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite(value))

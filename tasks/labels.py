"""Label columns of a user's table: which columns, and what kind of task their values make.

``resolve_labels`` maps ``--labels`` values to columns; ``parse_targets`` turns label strings into
(kind, class names or target names, targets, rows kept): one column of classes or 0/1 is a
classification, several 0/1 columns (blanks = not measured, Tox21 style) a multi-task
"multilabel" head, numeric columns a regression (blanks masked).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

__all__ = ["header", "is_number", "one_label", "parse_targets", "resolve_labels"]


def header(path: Path) -> list[str]:
    """The column names of a CSV / TSV (tab-separated when the name ends in .tsv); [] when empty."""
    with Path(path).open(newline="") as handle:
        row = next(csv.reader(handle, delimiter="\t" if Path(path).suffix == ".tsv" else ","), [])
    return [c.strip() for c in row]


def resolve_labels(requested: list[str], columns: list[str], *, missing: str) -> list[str]:
    """The label columns ``requested`` names, in order, without repeats.

    Each value is a column name; a value that is no column is read as a comma-separated list of
    columns (``--labels a,b``). Unknown names raise ValueError ``"{missing} 'x'; columns: ..."``:
    the pieces that are no column, or the whole value when none of its pieces is one (a
    mistyped name that contains commas).
    """
    chosen, unknown = [], []
    for value in requested:
        if value in columns:
            chosen.append(value)
            continue
        pieces = [p.strip() for p in value.split(",") if p.strip()]
        absent = [p for p in pieces if p not in columns]
        if not absent:
            chosen.extend(pieces)
        else:
            unknown.extend(absent if len(absent) < len(pieces) else [value])
    if unknown:
        raise ValueError(
            f"{missing} {', '.join(map(repr, unknown))}; columns: {', '.join(map(str, columns))}"
        )
    return list(dict.fromkeys(chosen))


def one_label(requested: list[str], columns: list[str], path: Path, *, what: str) -> str:
    """The one label column ``requested`` names; none or several is a ValueError naming ``path``."""
    if not requested:
        raise ValueError(f"{path}: name the {what} column with --labels COL; columns: {', '.join(columns)}")
    labels = resolve_labels(requested, columns, missing=f"{path}: no label column")
    if len(labels) != 1:
        raise ValueError(f"{path}: name exactly one {what} column with --labels (got {len(labels)})")
    return labels[0]


def parse_targets(
    raw: list[list[str]], columns: list[str], path: Path, *, force_classes: bool = False
) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """(kind, labels, targets, rows kept) from label strings; '' = missing. One column of 0/1 or of
    non-numeric values is a classification (``force_classes``: always); numeric columns are
    regression targets; several 0/1 columns a multilabel task.
    """
    values = np.array(raw, dtype=object).reshape(len(raw), len(columns))
    numeric = not force_classes and all(is_number(v) for v in values.ravel() if v != "")
    if len(columns) == 1 and (not numeric or set(v for v in values[:, 0] if v) <= {"0", "1", "0.0", "1.0"}):
        keep = values[:, 0] != ""
        names = values[keep, 0]
        if numeric:
            names = np.array([str(int(float(v))) for v in names], dtype=object)
        classes = sorted(set(names))
        if len(classes) < 2:
            raise ValueError(
                f"{path}: label column {columns[0]!r} has a single class ({classes[0] if classes else 'none'}); a classifier needs at least two"
            )
        index = {c: k for k, c in enumerate(classes)}
        return "classification", classes, np.array([index[n] for n in names]), keep
    if not numeric:
        raise ValueError(
            f"{path}: several label columns must all be numeric (0/1: multi-task classification; else regression)"
        )
    targets = np.array([[float(v) if v != "" else np.nan for v in row] for row in raw]).reshape(len(raw), -1)
    keep = ~np.isnan(targets).all(1)
    known_values = set(np.unique(targets[~np.isnan(targets)]).tolist())
    if known_values <= {0.0, 1.0}:
        # Tox21 / SIDER style: one binary task per column, a blank = not measured (masked in loss and metrics)
        for k, column in enumerate(columns):
            known = targets[keep, k][~np.isnan(targets[keep, k])]
            if len(np.unique(known)) < 2:
                raise ValueError(
                    f"{path}: label column {column!r} has a single class; every task needs both 0 and 1"
                )
        return "multilabel", list(columns), targets[keep], keep
    for k, column in enumerate(columns):
        known = targets[keep, k][~np.isnan(targets[keep, k])]
        if len(np.unique(known)) < 2:
            raise ValueError(f"{path}: label column {column!r} has a single value; nothing to learn")
    return "regression", list(columns), targets[keep], keep


def is_number(text: str) -> bool:
    """Whether ``text`` parses as a float."""
    try:
        float(text)
    except ValueError:
        return False
    return True

"""``--type image``: microscopy image classification (or regression) from a table of image files.

The table (CSV/TSV) has a file column (``file``, ``path`` or ``image``; paths relative to the
table) and label column(s). Split: whole groups of ``--groups COL``, by default the
``source_image`` column when there is one, so no two crops of one field of view fall on both
sides; else random. Baseline: logistic regression (ridge for regression) on HOG features of the
grey image resized to 64 x 64 (scikit-image), and the trivial predictor. Unreadable images and
rows without a label go to rejects.jsonl.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiban.tasks.labels import header, parse_targets, resolve_labels
from kiban.tasks.pipeline import FinetuneOptions, LabelledData, register_task_type, require_rows
from kiban.tasks.pooled import pooled_type, side_outputs
from kiban.tasks.types.protein import linear_baseline

__all__ = ["FILE_COLUMNS", "hog_features", "read_image_table"]

FILE_COLUMNS = ("file", "path", "image")
GROUP_COLUMN = "source_image"


def read_image_table(path: Path, rejects: Any) -> tuple[list[Any], list[dict[str, str]]]:
    """(records of the images, their rows' other columns) of a table naming image files; an
    unreadable image is a reject. Records' items are (Z, C, H, W) arrays, as ``kiban.data`` reads.
    """
    import csv

    from kiban.data import Record
    from kiban.data.images import image_stacks

    path = Path(path)
    columns = header(path)
    column = next((c for c in columns if c.lower() in FILE_COLUMNS), None)
    if column is None:
        raise ValueError(f"{path}: no image file column ({' / '.join(FILE_COLUMNS)}); columns: {', '.join(columns)}")
    records, rows = [], []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            name, location = row.get(column, ""), f"{path}:line {line}"
            try:
                stacks = list(image_stacks(path.parent / name)) if name else []
                if not stacks:
                    raise ValueError("no file named")
            except Exception as error:  # decoders raise many types (OSError, ValueError, TiffFileError, ...)
                rejects.reject(
                    id=name or None,
                    location=location,
                    reason="unreadable image",
                    detail=f"{name or '(empty)'} cannot be read ({type(error).__name__}: {error})",
                )
                continue
            rejects.accept()
            records.append(Record(name, "image", stacks[0][1], location))
            rows.append(row)
    return records, rows


def hog_features(images: list[np.ndarray], *, size: int = 64) -> np.ndarray:
    """[N, F] HOG descriptors (9 orientations, 8 x 8 cells, 2 x 2 blocks) of each image's first
    plane averaged over channels, resized to ``size`` x ``size``.
    """
    from skimage.feature import hog
    from skimage.transform import resize

    out = []
    for image in images:
        plane = np.asarray(image, dtype=float)[0].mean(0)  # (Z, C, H, W) -> the first z, channel mean
        span = plane.max() - plane.min()
        plane = (plane - plane.min()) / span if span > 0 else np.zeros_like(plane)
        plane = resize(plane, (size, size), anti_aliasing=True)
        out.append(hog(plane, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2)))
    return np.stack(out)


def _load(options: FinetuneOptions, model: Any, rejects: Any) -> LabelledData:
    path = Path(options.data)
    columns = header(path)
    if not options.labels:
        raise ValueError(f"{path}: name the label column(s) with --labels COL; columns: {', '.join(columns)}")
    label_columns = resolve_labels(options.labels, columns, missing=f"{path}: no label column")
    group = options.groups or (GROUP_COLUMN if GROUP_COLUMN in columns else None)
    if group is not None and group not in columns:
        raise ValueError(f"{path}: no group column {group!r}; columns: {', '.join(columns)}")
    records, rows = read_image_table(path, rejects)
    require_rows(len(records), 10, path, rejects, what="image(s)")
    raw = [[row.get(c, "") for c in label_columns] for row in rows]
    kind, labels, targets, keep = parse_targets(raw, label_columns, path)
    records = [r for r, k in zip(records, keep) if k]
    groups = np.array([row[group] for row, k in zip(rows, keep) if k], dtype=object) if group else None
    return LabelledData(
        "image",
        [r.id for r in records],
        [r.item for r in records],
        kind,
        labels,
        targets,
        groups,
        extra={"label_columns": label_columns, "groups": group},
    )


def _split(data: LabelledData, options: FinetuneOptions) -> Any:
    from kiban.tasks.splits import group_split, random_split

    if data.groups is not None:
        return group_split(data.groups, seed=options.seed)
    return random_split(len(data.ids), seed=options.seed)


def _baselines(data: LabelledData, split: Any, seed: int) -> dict[str, dict[str, np.ndarray]]:
    x = hog_features(data.items)
    both = np.concatenate([split.valid, split.test])
    predicted = linear_baseline(
        data.kind, x[split.train], data.targets[split.train], x[both], n_classes=len(data.labels), seed=seed
    )
    model = "ridge regression" if data.kind == "regression" else "logistic regression"
    return {f"{model} on HOG features": side_outputs(predicted, split)}


register_task_type(
    pooled_type(
        "image",
        modality="image",
        load=_load,
        split=_split,
        baselines=_baselines,
        description="a table of image files (file column) with label column(s); split by source image",
        default_epochs=200,
    )
)

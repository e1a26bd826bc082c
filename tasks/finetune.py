"""``kiban finetune``: from a user's labelled file to a trained, evaluated and saved head.

    data check (kiban.data readers; rejects.jsonl + counts.json) -> labels -> honest split
    -> states of the frozen model -> head fitted (progress bar) -> the same split scored
    for the head, a specialist's baseline and the trivial predictor -> metrics.json, plots, head

Everything is written into a hidden temporary folder beside ``out`` and renamed to ``out`` only
when the run succeeds, so a failed run (a missing label column, a single class, a file where
nothing parses) leaves nothing behind. Output folder::

    metrics.json         task, type, kind, labels, split (method, seed, sizes), results: one entry
                         per (model, split side), each naming its side, split method and seed
    predictions.csv      test rows: id, true and predicted values (not for contacts)
    split.csv            pooled heads: id, side (train / valid / test) of every row
    plots/*.png          parity (regression), ROC (binary), confusion matrix (classification,
                         per-residue states), contact_map.png (contacts)
    heads/<task>/        head.json + head.safetensors (``load_heads(out)`` / ``kiban serve`` layout)
    model/               with ``--model tiny`` or ``--mode lora``: the model the head reads
    rejects.jsonl, counts.json   what the data check rejected, and why (read = accepted + rejected)

Data types (``--type``; one module each in ``kiban.tasks.types``, registered by name; the shared
driver is ``kiban.tasks.pipeline``, the pooled-head pipeline ``kiban.tasks.pooled``):

    contacts    a folder of PDB / mmCIF files, or its manifest.csv (pairwise contact head)
    cells       an .h5ad (labels from adata.obs; --groups a donor / batch column)
    dti         a drug–target pairs table with a numeric label (pair head)
    secondary   a table with sequence and per-residue states (ss3 / ss8; per-residue head)
    molecules   a SMILES table (CSV/TSV; --labels names one or more label columns)
    protein     FASTA or a sequence table; classification or regression; k-mer similarity split
    dna         FASTA or a sequence table; k-mer count baseline
    image       a table of image files and labels; split by source image
    text        a table of passages and labels (TF-IDF + LR baseline)
    text-tags   a table of passages and entity spans: entity tagging scored by entity-level F1

``auto`` tells apart contacts, cells, dti, secondary and molecules (in that order); the others
are named with ``--type``. Labels: one column of classes or 0/1 -> classification; several 0/1
columns -> multilabel; numeric columns -> regression (``kiban.tasks.labels``).
"""

from __future__ import annotations

from typing import Any

from kiban.tasks import types  # noqa: F401 - registers every task type
from kiban.tasks.labels import resolve_labels
from kiban.tasks.models import build_model
from kiban.tasks.pipeline import FinetuneOptions, LabelledData, data_type, run, task_types

__all__ = [
    "FinetuneOptions",
    "LabelledData",
    "build_model",
    "data_type",
    "finetune",
    "resolve_labels",
    "task_types",
]


def finetune(options: FinetuneOptions) -> dict[str, Any]:
    """Run the whole pipeline for ``options``; returns metrics.json's content. Bad input raises
    ValueError (one line, naming the file and the problem).
    """
    return run(options)

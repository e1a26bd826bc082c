"""Predicting with a saved head on a file: the Python side of ``kiban predict``, and the head
checks ``kiban serve`` shares.

The model comes from ``--model``, else from the head's ``extra["model"]``: the model folder,
relative to the head's folder (so a moved run folder still works; older heads hold an absolute
path or ``"run:model"``, both still read). ``kiban finetune --model tiny`` saves its tiny model
beside ``heads/`` in the run folder, so a smoke-test run is self-contained; to serve it, copy
``RUN/heads`` into ``RUN/model`` and run ``kiban serve RUN/model``.

Heads and what ``kiban predict`` reads and writes (CSV, to ``--out`` or stdout):

    classification      SMILES table / FASTA / h5ad / images / text table -> id, label, p:LABEL...
    regression          the same inputs               -> id, TARGET...
    multilabel          the same inputs               -> id, p:LABEL...
    residue_classification   FASTA / sequence table -> id, position, residue, label, p:STATE...
    contact             FASTA / sequence table        -> id, i, j, separation, probability (top-k per protein)
    token_classification   text table                -> id, start, end, label, text, score (one row per entity)
    pair head (protein+molecule)   pairs table         -> id, drug_id, target_id, TARGET...

Importing this module registers the "residue", "contact", "pair" and "token" architectures (they
live in ``kiban.tasks.secondary``, ``.structure``, ``.dti`` and ``.tagging``), so ``load_head`` finds every kind.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiban.tasks import dti, secondary, structure, tagging  # noqa: F401 - registers the pair / residue / contact / token heads
from kiban.tasks.heads import PooledHead, load_head, load_heads, resolve_model_reference

__all__ = [
    "check_head_fits",
    "input_modalities",
    "load_model_heads",
    "load_model_with_heads",
    "model_for_head",
    "predict_file",
    "read_inputs",
]


def input_modalities(config: Any) -> list[str]:
    """The modalities of one input of a head: ``["molecule"]``, or ``["protein", "molecule"]`` for a
    pair head (``modality="protein+molecule"``).
    """
    return config.modality.split("+")


def check_head_fits(head: Any, model: Any) -> None:
    """Raise ValueError, naming the head, when it cannot read ``model``'s states.

    Heads over other states than the pooled fused ones (protein tokens, pair features) check
    themselves (``check_model``); a pooled head needs its modality's encoder (or text) and the
    model's width.
    """
    if hasattr(head, "check_model"):
        head.check_model(model)
        return
    modality = head.config.modality
    if modality not in (*model.encoders, "text"):
        raise ValueError(
            f"head {head.task!r} reads {modality} inputs, but the model has no {modality} encoder "
            f"(it has: {', '.join(model.encoders)})"
        )
    layer = head.config.layer
    if layer is not None and layer > model.num_layers:
        raise ValueError(f"head {head.task!r} reads layer {layer}; the model has {model.num_layers} layers")
    width = model.llm.get_input_embeddings().embedding_dim
    if head.config.input_dim != width:
        raise ValueError(
            f"head {head.task!r} reads {head.config.input_dim}-wide states; the model's are {width}-wide"
        )


def load_model_heads(model_dir: str | Path, model: Any) -> dict[str, Any]:
    """Every head under ``model_dir/heads/`` (task -> head), each checked against ``model``."""
    heads = load_heads(model_dir)
    for head in heads.values():
        check_head_fits(head, model)
    return heads


def load_model_with_heads(
    model_dir: str | Path, *, quantize: str | None = None, placement: Any = None
) -> tuple[Any, dict[str, Any]]:
    """(model, task -> head) of a saved model folder: the model as ``kiban.adapt.quantize.load_model``
    loads it, quantised keeping float the decoder layers under the states its heads read (so they
    read float32's states), and every head under ``heads/``, each checked against the model.
    """
    from kiban.adapt.quantize import load_model

    heads = load_heads(model_dir)
    layers = [head.config.layer for head in heads.values()]
    model = load_model(model_dir, quantize=quantize, placement=placement, head_layers=layers)
    for head in heads.values():
        check_head_fits(head, model)
    return model, heads


def model_for_head(
    head_dir: Path,
    head: PooledHead,
    model: str | None = None,
    *,
    quantize: str | None = None,
    placement: Any = None,
) -> Any:
    """The model a head predicts with: ``model`` if given, else the one its head.json names;
    ``quantize`` and ``placement`` as ``kiban.adapt.quantize.load_model`` (None: as the model was
    saved, on the CPU).
    """
    from kiban.adapt.quantize import load_model

    spec = model or head.config.extra.get("model")
    if not spec:
        raise ValueError(f"{head_dir}/head.json names no model; pass --model")
    if not model:
        spec = str(resolve_model_reference(spec, head_dir))
    # quantised, the decoder layers under the head's states stay float: the head reads float32's
    return load_model(spec, quantize=quantize, placement=placement, head_layers=[head.config.layer])


_SEQUENCE_READERS = ("fasta", "genbank", "sequence-table")


def read_inputs(
    path: Path, modality: str, model: Any, *, use_raw: bool = False, rejects: Any = None
) -> list[Any]:
    """Records of a file for a head of ``modality`` (SMILES table / .smi, FASTA or sequence table
    read as that modality, or h5ad matched to the vocabulary; ``use_raw`` reads ``raw.X``, as the
    head was trained when its extra says so).
    """
    from kiban.data import Rejects, detect_kind, read, read_h5ad

    if modality == "cell":
        vocab = model.encoders["cell"].featurizer.vocab
        return list(read_h5ad(path, vocab=vocab, use_raw=use_raw, rejects=rejects))
    if modality == "image" and path.suffix in (".csv", ".tsv"):
        # the table ``kiban finetune --type image`` trains on: a file column, paths relative to it
        from kiban.tasks.types.image import read_image_table

        return read_image_table(path, rejects if rejects is not None else Rejects())[0]
    if modality in ("protein", "dna") and detect_kind(path) in _SEQUENCE_READERS:
        # a FASTA of short peptides could pass for DNA: the head says what the sequences are
        return list(read(path, rejects=rejects, modality=modality))
    return [r for r in read(path, rejects=rejects) if r.modality == modality]


def predict_file(
    head_dir: str | Path,
    data: str | Path,
    *,
    model: str | None = None,
    out: str | Path | None = None,
    top_k: int | None = None,
    drugs: str | Path | None = None,
    targets: str | Path | None = None,
    quantize: str | None = None,
    placement: Any = None,
) -> int:
    """Write prediction rows as CSV (to ``out`` or stdout; columns by head kind, see the module
    docstring); returns the number of inputs predicted. ``top_k``: contact heads, pairs per protein
    (default: its length). ``drugs`` / ``targets``: pair heads, id tables for a pairs file that
    names drugs and targets by id. ``placement``: where the model runs (``kiban.device.resolve_device``;
    None: the CPU, in float32).
    """
    from kiban.data import Rejects

    head_dir = Path(head_dir)
    head = load_head(head_dir)
    fused = model_for_head(head_dir, head, model, quantize=quantize, placement=placement)
    check_head_fits(head, fused)
    rejects = Rejects()
    limit = _protein_limit(fused)
    if len(input_modalities(head.config)) == 2:
        table = dti.read_pairs(
            data, label=None, rejects=rejects, drugs=drugs, targets=targets, max_length=limit
        )
        ids, items = list(table["id"]), list(zip(table["sequence"], table["smiles"]))
        extra = [{"drug_id": d, "target_id": t} for d, t in zip(table["drug_id"], table["target_id"])]
    else:
        use_raw = bool(head.config.extra.get("use_raw", False))
        records = read_inputs(Path(data), head.config.modality, fused, use_raw=use_raw, rejects=rejects)
        if head.config.modality == "protein" and limit is not None:
            records = _within(records, limit, rejects)
        ids, items, extra = [r.id for r in records], [r.item for r in records], [{}] * len(records)
    if not items:
        raise ValueError(
            f"{data}: no usable {head.config.modality} input ({rejects.rejected} rejected: {dict(rejects.by_reason)})"
        )
    options = {"top_k": top_k} if head.config.kind == "contact" else {}
    # a pair head embeds each distinct protein and drug once per call: give it the whole file
    rows = _predict(
        head,
        fused,
        items,
        batch_size=len(items) if len(input_modalities(head.config)) == 2 else 64,
        **options,
    )
    handle = open(out, "w", newline="") if out else sys.stdout
    try:
        writer = csv.writer(handle)
        _WRITERS[head.config.kind](writer, head.config.labels, ids, rows, extra)
    finally:
        if out:
            handle.close()
    if rejects.rejected:
        print(
            f"kiban predict: {rejects.rejected} input(s) rejected: {dict(rejects.by_reason)}", file=sys.stderr
        )
    return len(items)


def _protein_limit(model: Any) -> int | None:
    """The longest protein the model's encoder reads (None: it crops longer ones, or has none)."""
    if "protein" not in model.encoders:
        return None
    featurizer = model.encoders["protein"].featurizer
    return None if featurizer.truncate else featurizer.max_length


def _within(records: list[Any], limit: int, rejects: Any) -> list[Any]:
    """Records of at most ``limit`` residues; longer ones are rejected (one long protein in a FASTA
    would otherwise fail the whole file in the encoder).
    """
    kept = []
    for record in records:
        length = len(str(record.item).strip())
        if length > limit:
            rejects.accepted -= 1  # the reader counted it as accepted
            rejects.reject(
                id=record.id,
                location=record.location,
                reason="too long",
                detail=f"{length} residues, over the protein encoder's max_length {limit}",
            )
        else:
            kept.append(record)
    return kept


def _predict(head: Any, model: Any, items: list[Any], *, batch_size: int = 64, **options: Any) -> list[dict]:
    """``head.predict`` in batches (pooled heads embed a batch at once), with a bar on a terminal."""
    batches = range(0, len(items), batch_size)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"predicting {len(items)} inputs", unit="batch", leave=False)
    return [
        row for start in batches for row in head.predict(model, items[start : start + batch_size], **options)
    ]


def _number(value: float) -> str:
    return f"{value:.6g}"


def _write_classification(writer, labels, ids, rows, extra) -> None:
    writer.writerow(["id", "label", *(f"p:{label}" for label in labels)])
    for ident, row in zip(ids, rows):
        writer.writerow([ident, row["label"], *(_number(row["probabilities"][name]) for name in labels)])


def _write_multilabel(writer, labels, ids, rows, extra) -> None:
    writer.writerow(["id", *(f"p:{label}" for label in labels)])
    for ident, row in zip(ids, rows):
        writer.writerow([ident, *(_number(row["probabilities"][name]) for name in labels)])


def _write_regression(writer, labels, ids, rows, extra) -> None:
    keys = list(extra[0]) if extra else []  # pair heads: drug_id, target_id
    writer.writerow(["id", *keys, *labels])
    for ident, more, row in zip(ids, extra, rows):
        writer.writerow([ident, *(more[k] for k in keys), *(_number(row["values"][t]) for t in labels)])


def _write_residues(writer, labels, ids, rows, extra) -> None:
    writer.writerow(["id", "position", "residue", "label", *(f"p:{label}" for label in labels)])
    for ident, row in zip(ids, rows):
        for residue in row["residues"]:
            writer.writerow(
                [
                    ident,
                    residue["position"],
                    residue["residue"],
                    residue["label"],
                    *(_number(residue["probabilities"][name]) for name in labels),
                ]
            )


def _write_contacts(writer, labels, ids, rows, extra) -> None:
    writer.writerow(["id", "i", "j", "separation", "probability"])
    for ident, row in zip(ids, rows):
        for contact in row["contacts"]:
            i, j = contact["i"], contact["j"]
            writer.writerow([ident, i, j, j - i, _number(contact["probability"])])


def _write_entities(writer, labels, ids, rows, extra) -> None:
    writer.writerow(["id", "start", "end", "label", "text", "score"])
    for ident, row in zip(ids, rows):
        for entity in row["entities"]:
            writer.writerow([ident, entity["start"], entity["end"], entity["label"], entity["text"], _number(entity["score"])])


# head kind -> CSV writer(writer, labels, ids, rows, extra columns per row)
_WRITERS: dict[str, Callable[..., None]] = {
    "classification": _write_classification,
    "multilabel": _write_multilabel,
    "regression": _write_regression,
    "residue_classification": _write_residues,
    "contact": _write_contacts,
    "token_classification": _write_entities,
}

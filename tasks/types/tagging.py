"""``--type text-tags``: entity tagging in text (e.g. chemicals and diseases in abstracts).

The table (CSV/TSV) has a text column (as ``--type text``) and an entity column named with
``--labels``: a JSON list of ``[start, end, type]`` character spans per row (``[]``: none). A row
whose spans are not JSON, fall outside the text or overlap is rejected to rejects.jsonl. Split:
``--groups COL`` or random. Head: BIO logits per word over the backbone's states
(``kiban.tasks.tagging``), scored by entity-level micro F1 (seqeval's rules) beside a dictionary
longest-match tagger built from the training entities, and the all-O trivial tagger.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from kiban.tasks.heads import HeadConfig
from kiban.tasks.labels import header, one_label
from kiban.tasks.pipeline import (
    FinetuneOptions,
    TaskType,
    bar,
    register_task_type,
    require_rows,
    sample,
    save_head,
    score_entry,
    write_metrics,
)

__all__ = ["read_tagged", "run_tagging"]


def read_tagged(path: Path, column: str, rejects: Any) -> tuple[list[str], list[str], list[list[tuple]], list[dict]]:
    """(ids, texts, entity spans, other fields) of a tagged table; bad rows go to ``rejects``."""
    from kiban.data import read_text_table

    ids, texts, spans, fields = [], [], [], []
    for record in read_text_table(path, rejects=rejects):
        text, raw = record.item, record.fields.get(column, "")
        try:
            found = [(int(s), int(e), str(t)) for s, e, t in json.loads(raw)]
            problem = next(
                (f"span {s}-{e} is outside the text of {len(text)} characters" for s, e, _ in found if not 0 <= s < e <= len(text)),
                None,
            )
            ordered = sorted(found)
            if problem is None and any(a[1] > b[0] for a, b in zip(ordered, ordered[1:])):
                problem = "entity spans overlap"
        except (ValueError, TypeError) as error:
            problem = f"column {column!r} is not a JSON list of [start, end, type] spans ({error})"
        if problem:
            rejects.accepted -= 1  # the reader counted it as accepted
            rejects.reject(id=record.id, location=record.location, reason="unreadable entities", detail=problem)
            continue
        ids.append(record.id)
        texts.append(text)
        spans.append(ordered)
        fields.append(record.fields)
    return ids, texts, spans, fields


def run_tagging(options: FinetuneOptions, work: Path) -> dict[str, Any]:
    """Tagged table -> token head, dictionary baseline, metrics.json, predictions.csv, the saved head."""
    from kiban.data import rejects_log
    from kiban.tasks.splits import group_split, random_split
    from kiban.tasks.tagging import (
        TokenTagHead,
        bio_tags,
        dictionary_tagger,
        entity_scores,
        spans_of,
        word_states,
        words,
    )
    from kiban.tasks.training import train_loop

    path = Path(options.data)
    columns = header(path)
    column = one_label(options.labels, columns, path, what="entity-span")
    if options.groups is not None and options.groups not in columns:
        raise ValueError(f"{path}: no group column {options.groups!r}; columns: {', '.join(columns)}")
    with rejects_log(work) as rejects:
        ids, texts, spans, fields = read_tagged(path, column, rejects)
    require_rows(len(ids), 10, path, rejects, what="tagged text(s)")
    rows = sample(len(ids), options.max_rows, options.seed)
    ids, texts, spans, fields = ([x[i] for i in rows] for x in (ids, texts, spans, fields))
    types = sorted({t for found in spans for _, _, t in found})
    if not types:
        raise ValueError(f"{path}: column {column!r} holds no entity; nothing to learn")
    labels = ["O", *(f"{p}-{t}" for t in types for p in ("B", "I"))]
    index = {tag: k for k, tag in enumerate(labels)}
    word_spans = [words(t) for t in texts]
    tags = [bio_tags(w, s) for w, s in zip(word_spans, spans)]
    if options.groups is not None:
        split = group_split([f[options.groups] for f in fields], seed=options.seed)
    else:
        split = random_split(len(ids), seed=options.seed)
    model = options.model_for(("text",))
    states = [
        word_states(model, t, w)
        for t, w in bar(list(zip(texts, word_spans)), progress=options.progress, desc="encoding texts", unit="text")
    ]
    width = model.llm.get_input_embeddings().embedding_dim
    config = HeadConfig(
        task=options.task,
        modality="text",
        kind="token_classification",
        architecture="token",
        labels=labels,
        input_dim=width,
        extra={"entity_column": column, "trained_on": str(options.data), "seed": options.seed, "type": "text-tags"},
    )
    torch.manual_seed(options.seed)
    head = TokenTagHead(config)
    train = [i for i in split.train if len(word_spans[i])]
    targets = [torch.as_tensor([index[t] for t in tags[i]]) for i in range(len(ids))]
    # standardise word states with the training statistics (folded into the layer afterwards)
    stacked = torch.cat([states[i] for i in train])
    mean, std = stacked.mean(0), stacked.std(0).clamp(min=1e-6)
    history = train_loop(
        [head],
        torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3),
        batches=lambda g: ((i, 1) for i in (train[k] for k in torch.randperm(len(train), generator=g).tolist())),
        loss=lambda i: head.loss(head((states[i] - mean) / std), targets[i]),
        epochs=options.epochs_for("text-tags"),
        seed=options.seed,
        progress=options.progress,
        desc="training token head",
    )
    with torch.no_grad():
        linear = head.net[0]
        linear.bias -= linear.weight @ (mean / std)
        linear.weight /= std
    dictionary = dictionary_tagger([texts[i] for i in split.train], [spans[i] for i in split.train])
    results, test_predictions = [], []
    for side, side_rows in (("valid", split.valid), ("test", split.test)):
        if not len(side_rows):
            continue
        true = [tags[i] for i in side_rows]
        with torch.no_grad():
            guessed = [[labels[k] for k in head(states[i]).argmax(-1).tolist()] if len(states[i]) else [] for i in side_rows]
        for name, predicted in (
            (f"token head (linear, {options.model})", guessed),
            ("dictionary longest-match (training entities)", [dictionary(texts[i], word_spans[i]) for i in side_rows]),
            ("trivial (no entity)", [["O"] * len(t) for t in true]),
        ):
            results.append(score_entry(name, split, side, entity_scores(true, predicted)))
        if side == "test":
            test_predictions = list(zip(side_rows, guessed))
    metrics = {
        "task": options.task,
        "type": "text-tags",
        "kind": "token_classification",
        "labels": labels,
        "entity_types": types,
        "data": str(options.data),
        "modality": "text",
        "model": options.model,
        "n": len(ids),
        "seed": options.seed,
        "split": split.describe(),
        "train_loss": history["train"],
        "results": results,
    }
    write_metrics(work / "metrics.json", metrics)
    with (work / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "true", "predicted"])
        for i, guessed in test_predictions:
            true = spans_of(texts[i], word_spans[i], tags[i])
            found = spans_of(texts[i], word_spans[i], guessed)
            writer.writerow([ids[i], json.dumps(true), json.dumps(found)])
    save_head(head, options, model, work)
    return metrics


register_task_type(
    TaskType(
        name="text-tags",
        run=run_tagging,
        description="a table with a text column and an entity-span column ([[start, end, type], ...] JSON)",
        modalities=("text",),
        default_epochs=20,
    )
)

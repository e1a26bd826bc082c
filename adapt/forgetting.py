"""What a fine-tune or a merge cost the model elsewhere: perplexity before and after.

Two figures, each token-weighted over a whole file (``exp`` of the mean next-token loss):

    general text   held-out plain text (``--lm-data``: .txt, documents separated by blank lines,
                   or a .jsonl of {"text": ...}); without one, ``general_text.txt`` shipped here:
                   short encyclopaedic paragraphs on many subjects, none about biology
    instructions   an instruction JSONL (kiban's chat records, modality inputs included): the loss
                   over the assistant turns, as the instruct stage trains it

A LoRA fine-tune is measured on one model object: ``before`` with the adapters switched off
(peft's ``disable_adapter``), ``after`` with them on, so nothing is loaded twice.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "GENERAL_TEXT",
    "adapters_off",
    "instruction_perplexity",
    "language_figures",
    "lora_forgetting",
    "read_instructions",
    "read_texts",
    "text_perplexity",
]

GENERAL_TEXT = Path(__file__).with_name("general_text.txt")


def read_texts(path: str | Path, *, limit: int | None = None) -> list[str]:
    """Documents of a text file (blank-line separated; one per line when it has no blank line) or
    of a JSONL file of ``{"text": ...}`` objects; at most ``limit``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such text file: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(value, dict) or not isinstance(value.get("text"), str):
                raise ValueError(f'{path}:{number}: expected an object with a "text" string')
            texts.append(value["text"])
    else:
        blocks = [b.strip() for b in raw.split("\n\n")]
        texts = [b for b in blocks if b] if len(blocks) > 1 else [t.strip() for t in raw.splitlines() if t.strip()]
    if not texts:
        raise ValueError(f"{path}: no text in it")
    return texts[:limit] if limit is not None else texts


def read_instructions(path: str | Path, *, limit: int | None = None) -> list[dict[str, Any]]:
    """The resolved chat records of an instruction JSONL; a file with any bad record is refused."""
    from kiban.data.instructions import InstructionSource
    from kiban.data.rejects import Reject

    source = InstructionSource(path)
    records, rejected = [], []
    for item in source:
        (rejected if isinstance(item, Reject) else records).append(item)
    if rejected:
        first = rejected[0]
        raise ValueError(f"{path}: {len(rejected)} bad record(s); first: {first.location}: {first.reason} ({first.detail})")
    if not records:
        raise ValueError(f"{path}: no instruction records in it")
    return [r.item for r in records[:limit]]


@torch.no_grad()
def text_perplexity(model: Any, texts: Sequence[str], *, max_length: int = 256, batch_size: int = 8) -> dict[str, float]:
    """Perplexity of the backbone on plain texts (each cut to ``max_length`` tokens, led by the
    tokenizer's BOS when it has one): ``{"perplexity", "nll", "tokens", "texts"}``.
    """
    from kiban.fusion.prompt import encode_text

    tokenizer = model.tokenizer
    lead = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [(lead + encode_text(tokenizer, t))[:max_length] for t in texts]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("no text long enough to score (each needs 2 tokens)")
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model.llm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((targets != -100).sum())
    return _figures(total, count, len(rows))


@torch.no_grad()
def instruction_perplexity(model: Any, records: Sequence[dict[str, Any]], *, batch_size: int = 8) -> dict[str, float]:
    """Perplexity over the assistant turns of chat records (modality inputs encoded as in training)."""
    total, count = 0.0, 0
    for start in range(0, len(records), batch_size):
        batch = model.prepare(list(records[start : start + batch_size]))
        embeds, mask, labels = model.embed_inputs(batch)
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("the instruction records have no assistant tokens to score")
    return _figures(total, count, len(records))


def _figures(total: float, count: int, texts: int) -> dict[str, float]:
    nll = total / count
    return {"perplexity": math.exp(min(nll, 700.0)), "nll": nll, "tokens": count, "texts": texts}


def language_figures(
    model: Any, *, texts: Sequence[str] | None = None, instructions: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """``{"general_text": ..., "instructions": ...}`` for what is given (perplexity figures each)."""
    was_training = model.training
    model.eval()
    try:
        figures: dict[str, Any] = {}
        if texts:
            figures["general_text"] = text_perplexity(model, texts)
        if instructions:
            figures["instructions"] = instruction_perplexity(model, instructions)
        return figures
    finally:
        model.train(was_training)


@contextlib.contextmanager
def adapters_off(model: Any):
    """Run the block with the backbone's LoRA adapters switched off (the model as before tuning)."""
    if not model.has_lora:
        yield model
        return
    with model.llm.disable_adapter():
        yield model


def lora_forgetting(
    model: Any,
    *,
    lm_data: str | Path | None = None,
    instructions: str | Path | None = None,
    max_texts: int = 200,
) -> dict[str, Any]:
    """Before/after figures of a LoRA fine-tune (for its metrics.json): perplexity on general text
    (``lm_data``, default ``GENERAL_TEXT``) and on an instruction set when given, with the adapters
    off (``before``) and on (``after``), and ``after / before`` as ``ratio``.
    """
    texts = read_texts(lm_data or GENERAL_TEXT, limit=max_texts)
    records = read_instructions(instructions, limit=max_texts) if instructions else None
    with adapters_off(model):
        before = language_figures(model, texts=texts, instructions=records)
    after = language_figures(model, texts=texts, instructions=records)
    return {
        "lm_data": str(lm_data or GENERAL_TEXT.name),
        "instructions": str(instructions) if instructions else None,
        "before": before,
        "after": after,
        "ratio": {k: after[k]["perplexity"] / before[k]["perplexity"] for k in after},
    }

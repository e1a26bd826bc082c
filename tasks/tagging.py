"""Entity tagging over text: words with character offsets, BIO tags, entity-level scores as
seqeval computes them, a dictionary longest-match baseline, and the saved token head.

Words are runs of letters, digits and underscores, and single punctuation marks, each with its character span. A word gets
``B-TYPE`` where an entity starts in it, ``I-TYPE`` inside one, else ``O``. Entities are read back
from tags by the CoNLL rules seqeval's default mode uses: an ``I-`` that follows ``O`` or another
type opens a new entity; scores are micro precision / recall / F1 over exact (type, first word,
last word) matches.

The head (architecture "token", kind "token_classification") reads the backbone's final hidden
states of the text's own tokens, averaged over each word's tokens ([W, H]), through a linear layer
to BIO logits; it predicts entity spans with character offsets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kiban.tasks.heads import PooledHead, register_head

__all__ = [
    "TokenTagHead",
    "bio_tags",
    "dictionary_tagger",
    "entities",
    "entity_scores",
    "spans_of",
    "word_states",
    "words",
]

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the words of ``text``."""
    return [m.span() for m in _WORD.finditer(text)]


def bio_tags(spans: Sequence[tuple[int, int]], entity_spans: Sequence[tuple[int, int, str]]) -> list[str]:
    """BIO tags of words ``spans`` from entity spans (start, end, type) in characters."""
    tags = ["O"] * len(spans)
    for start, end, label in entity_spans:
        inside = [k for k, (s, e) in enumerate(spans) if s < end and e > start]
        for n, k in enumerate(inside):
            tags[k] = ("B-" if n == 0 else "I-") + label
    return tags


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first word, last word) of every entity in a BIO sequence (CoNLL / seqeval default rules)."""
    found, current = set(), None
    for k, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        starts = prefix == "B" or (prefix == "I" and (current is None or current[0] != label))
        if current is not None and (prefix == "O" or starts):
            found.add((current[0], current[1], k - 1))
            current = None
        if starts:
            current = (label, k)
    return found


def entity_scores(true: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Micro precision, recall and F1 over exact entity matches, overall and per type (seqeval's
    ``classification_report`` numbers), with the entity counts.
    """
    gold = [{(i, *e) for e in entities(t)} for i, t in enumerate(true)]
    guess = [{(i, *e) for e in entities(p)} for i, p in enumerate(predicted)]
    gold, guess = set().union(*gold), set().union(*guess)

    def score(g: set, p: set) -> dict[str, Any]:
        hit = len(g & p)
        precision = hit / len(p) if p else 0.0
        recall = hit / len(g) if g else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "true_entities": len(g), "predicted_entities": len(p)}

    types = sorted({e[1] for e in gold | guess})
    return {
        **score(gold, guess),
        "per_type": {t: score({e for e in gold if e[1] == t}, {e for e in guess if e[1] == t}) for t in types},
    }


def spans_of(text: str, spans: Sequence[tuple[int, int]], tags: Sequence[str]) -> list[dict[str, Any]]:
    """Entity spans {start, end, label, text} (characters) of word tags."""
    out = []
    for label, first, last in sorted(entities(tags), key=lambda e: e[1]):
        start, end = spans[first][0], spans[last][1]
        out.append({"start": start, "end": end, "label": label, "text": text[start:end]})
    return out


def dictionary_tagger(
    train_texts: Sequence[str], train_entities: Sequence[Sequence[tuple[int, int, str]]]
) -> Any:
    """A dictionary longest-match tagger: every entity surface seen in training (case-folded, its
    most frequent type) is matched in new text, longest first, at word boundaries, without overlaps.
    Returns tag(text, word spans) -> BIO tags.
    """
    from collections import Counter, defaultdict

    seen: dict[str, Counter] = defaultdict(Counter)
    for text, found in zip(train_texts, train_entities):
        for start, end, label in found:
            seen[text[start:end].lower()][label] += 1
    lexicon = {surface: counts.most_common(1)[0][0] for surface, counts in seen.items() if surface.strip()}
    pattern = (
        re.compile(r"(?<!\w)(" + "|".join(re.escape(s) for s in sorted(lexicon, key=len, reverse=True)) + r")(?!\w)")
        if lexicon
        else None
    )

    def tag(text: str, spans: Sequence[tuple[int, int]]) -> list[str]:
        if pattern is None:
            return ["O"] * len(spans)
        found = [(m.start(), m.end(), lexicon[m.group(0)]) for m in pattern.finditer(text.lower())]
        return bio_tags(spans, found)

    return tag


@torch.no_grad()
def word_states(model: Any, text: str, spans: Sequence[tuple[int, int]]) -> Tensor:
    """[W, H]: the backbone's final hidden states of ``text``'s tokens, averaged over each word's."""
    encoded = model.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = torch.tensor([encoded["input_ids"]], device=model.device)
    hidden = model.llm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].float().cpu()
    offsets = np.array(encoded["offset_mapping"]).reshape(-1, 2)
    out = torch.zeros(len(spans), hidden.shape[-1])
    for k, (start, end) in enumerate(spans):
        inside = np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))
        if len(inside):
            out[k] = hidden[inside].mean(0)
    return out


@register_head("token")
class TokenTagHead(PooledHead):
    """Word states [W, H] -> BIO logits [W, len(labels)] (a linear layer; labels are the BIO tags)."""

    def metrics(self, outputs: Any, targets: Any) -> dict[str, Any]:
        """Entity scores of per-text logits against per-text gold tag indices."""
        labels = self.config.labels
        predicted = [[labels[k] for k in np.asarray(o).argmax(-1)] for o in outputs]
        true = [[labels[k] for k in t] for t in targets]
        return entity_scores(true, predicted)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy over words."""
        return torch.nn.functional.cross_entropy(outputs, targets)

    def check_model(self, model: Any) -> None:
        """Raise ValueError unless the backbone's width is this head's."""
        width = model.llm.get_input_embeddings().embedding_dim
        if width != self.config.input_dim:
            raise ValueError(f"head {self.task!r} reads {self.config.input_dim}-wide states; the model's are {width}-wide")

    def predict(self, model: Any, items: Sequence[Any], **options: Any) -> list[dict[str, Any]]:
        """One row per text: ``{"entities": [{start, end, label, text, score}]}``, character offsets."""
        rows = []
        labels = self.config.labels
        for text in items:
            spans = words(str(text))
            if not spans:
                rows.append({"entities": []})
                continue
            with torch.no_grad():
                probabilities = self(word_states(model, str(text), spans)).softmax(-1)
            tags = [labels[k] for k in probabilities.argmax(-1).tolist()]
            found = spans_of(str(text), spans, tags)
            for entity in found:
                covered = [k for k, (s, e) in enumerate(spans) if s < entity["end"] and e > entity["start"]]
                entity["score"] = float(probabilities[covered].max(-1).values.mean())
            rows.append({"entities": found})
        return rows

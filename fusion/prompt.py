"""Chat prompts with modality placeholders, turned into token ids, labels and encoder features.

A record is ``{"messages": [{"role": ..., "content": ...}, ...], "inputs": {"protein": [...], ...}}``.
Message text may hold placeholders ``<protein>``, ``<dna>``, ``<cell>``, ``<image>``, ``<molecule>``
(one per registered encoder). The k-th ``<protein>`` of a record is bound to ``inputs["protein"][k]``;
a placeholder with no input, an input with no placeholder, or a placeholder for a modality the
model has no encoder for is an ``InvalidInput`` naming the record.

Each placeholder becomes ONE slot id in ``input_ids`` (a negative number, ``-1 - modality index``);
the fused model widens every slot to that input's projected tokens at the embedding layer
(``merge.py``). Labels are the token ids of assistant turns and ``-100`` everywhere else, so the
loss is next-token loss on assistant tokens only.

The processor runs on the CPU, in DataLoader workers: it holds the tokenizer and the featurizers,
never model weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kiban.encoders.base import Featurizer, InvalidInput, list_encoders

__all__ = ["FusedBatch", "KibanProcessor", "ProcessedRecord", "IGNORE_INDEX", "encode_text", "slot_id"]

IGNORE_INDEX = -100


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text someone typed, special-token strings in it read as plain characters.

    ``<|im_end|>`` typed by a person is encoded as the literal characters it is made of, never as
    the control token it spells, so user text cannot end a turn or open a system turn.
    """
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _marks(messages: Sequence[Mapping]) -> tuple[str, str]:
    """Two private-use characters that occur in no message, to stand in for message contents."""
    used = set("".join(str(m.get("content", "")) for m in messages))
    free = (chr(c) for c in range(0xF0000, 0xFFFFE) if chr(c) not in used)  # plane 15, private use
    return next(free), next(free)


def slot_id(modality_index: int) -> int:
    """The token id that marks a slot of the modality at ``modality_index``."""
    return -1 - modality_index


@dataclass
class ProcessedRecord:
    """One record after the processor: token ids, labels, and its featurized inputs by modality."""
    input_ids: list[int]
    labels: list[int]
    features: list[tuple[str, dict[str, Tensor]]]  # (modality, features) per slot, in prompt order


@dataclass
class FusedBatch:
    """A collated batch: text ids with slots, labels, and per-modality encoder inputs.

    input_ids / labels / attention_mask: [B, T], right-padded; slots are negative ids.
    features: modality -> collated featurizer output, items in row-major slot order.
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    features: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "FusedBatch":
        """The same batch with every tensor on ``device``."""
        return FusedBatch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.attention_mask.to(device),
            {m: {k: v.to(device) for k, v in f.items()} for m, f in self.features.items()},
        )


class KibanProcessor:
    """Renders chats with the tokenizer's chat template and featurizes the bound inputs."""

    def __init__(self, tokenizer: Any, featurizers: Mapping[str, Featurizer], *, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.featurizers = dict(featurizers)
        self.modalities = sorted(self.featurizers)
        self.max_length = max_length
        known = sorted(set(list_encoders()) | set(self.modalities))
        self._placeholder = re.compile("<(" + "|".join(map(re.escape, known)) + ")>")

    # -- one record ------------------------------------------------------------------------------

    def process(
        self, record: Mapping[str, Any], *, record_id: Any = None, add_generation_prompt: bool = False
    ) -> ProcessedRecord:
        """Tokenize one chat record and featurize its inputs; ``InvalidInput`` names what is wrong."""
        rid = record_id if record_id is not None else record.get("id", "record")
        messages = record.get("messages")
        if not isinstance(messages, Sequence) or not messages:
            raise InvalidInput("prompt", rid, "has no messages (expected a non-empty list of {role, content})")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
                raise InvalidInput("prompt", rid, f"message {i} needs a string 'content' and a 'role'")
        if messages[0].get("role") == "assistant":
            # chat templates render a conversation from its first prompt turn; one that opens with an
            # answer has no prompt to answer
            raise InvalidInput("prompt", rid, "starts with an assistant message; the first must be system or user")
        inputs = self._bound_inputs(record.get("inputs") or {}, messages, rid)

        input_ids: list[int] = []
        labels: list[int] = []
        features: list[tuple[str, dict[str, Tensor]]] = []
        used = {m: 0 for m in inputs}
        for text, trained, typed in self._segments(messages, add_generation_prompt):
            parts = self._placeholder.split(text)
            # re.split with one group alternates: text, modality, text, modality, ..., text
            for j, part in enumerate(parts):
                if j % 2 == 0:
                    # the template's own markup may hold special tokens; text someone typed never does
                    ids = (encode_text(self.tokenizer, part) if typed else self.tokenizer(
                        part, add_special_tokens=False)["input_ids"]) if part else []
                    input_ids += ids
                    labels += ids if trained else [IGNORE_INDEX] * len(ids)
                    continue
                modality = part
                item = inputs[modality][used[modality]]
                used[modality] += 1
                item_id = f"{rid}: {modality} input {used[modality]}" if record_id is not None else None
                features.append((modality, self.featurizers[modality](item, item_id=item_id)))
                input_ids.append(slot_id(self.modalities.index(modality)))
                labels.append(IGNORE_INDEX)
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise InvalidInput("prompt", rid, f"is {len(input_ids)} text tokens, over max_length {self.max_length}")
        return ProcessedRecord(input_ids, labels, features)

    def _bound_inputs(self, inputs: Mapping[str, Any], messages: Sequence[Mapping], rid: Any) -> dict[str, list]:
        counts: dict[str, int] = {}
        for message in messages:
            for modality in self._placeholder.findall(message["content"]):
                counts[modality] = counts.get(modality, 0) + 1
        bound = {m: list(v) if isinstance(v, (list, tuple)) else [v] for m, v in inputs.items()}
        for modality, n in counts.items():
            if modality not in self.featurizers:
                raise InvalidInput(
                    "prompt", rid, f"uses <{modality}> but this model has no {modality} encoder "
                    f"(it has: {', '.join(self.modalities)})"
                )
            given = len(bound.get(modality, []))
            if given < n:
                raise InvalidInput(
                    "prompt", rid, f"placeholder <{modality}> number {given + 1} has no input bound to it "
                    f"({n} placeholder(s), {given} {modality} input(s))"
                )
        for modality, items in bound.items():
            if len(items) > counts.get(modality, 0):
                raise InvalidInput(
                    "prompt", rid, f"has {len(items)} {modality} input(s) but {counts.get(modality, 0)} "
                    f"<{modality}> placeholder(s) to bind them to"
                )
        return bound

    def _segments(self, messages: Sequence[Mapping], add_generation_prompt: bool) -> list[tuple[str, bool, bool]]:
        """Split the rendered chat into (text, is_assistant_turn, is_message_content) pieces.

        Rendering prefixes of the conversation and taking differences works for any chat template
        that renders a prefix of the chat as a prefix of the text (ChatML, Llama, Mistral, ...).
        Each message's content is rendered as a stand-in mark and put back afterwards, so the
        pieces a person typed are told apart from the template's markup: a typed ``<|im_end|>`` is
        text, never the control token (a template that edits content, e.g. trims it, sees the mark).
        """
        opening, closing = _marks(messages)
        stand_ins = [{**m, "content": f"{opening}{i}{closing}"} for i, m in enumerate(messages)]
        mark = re.compile(re.escape(opening) + r"(\d+)" + re.escape(closing))
        render = self.tokenizer.apply_chat_template
        rendered: list[tuple[str, bool]] = []
        previous = ""
        for i, message in enumerate(stand_ins):
            if message.get("role") == "assistant":
                # the assistant header ("<|im_start|>assistant\n") is prompt, the answer is trained
                header = render(stand_ins[:i], tokenize=False, add_generation_prompt=True)
                full = render(stand_ins[: i + 1], tokenize=False)
                rendered += [(header[len(previous):], False), (full[len(header):], True)]
                previous = full
            else:
                full = render(stand_ins[: i + 1], tokenize=False)
                rendered.append((full[len(previous):], False))
                previous = full
        if add_generation_prompt:
            full = render(stand_ins, tokenize=False, add_generation_prompt=True)
            rendered.append((full[len(previous):], False))
        segments: list[tuple[str, bool, bool]] = []
        for text, trained in rendered:
            pieces = mark.split(text)  # markup, message index, markup, message index, ..., markup
            for j, piece in enumerate(pieces):
                if j % 2:
                    segments.append((messages[int(piece)]["content"], trained, True))
                elif piece:
                    segments.append((piece, trained, False))
        return segments

    # -- a batch ---------------------------------------------------------------------------------

    def collate(self, records: Sequence[ProcessedRecord]) -> FusedBatch:
        """Pad processed records into one ``FusedBatch``."""
        pad = self.tokenizer.pad_token_id
        longest = max(len(r.input_ids) for r in records)
        input_ids = torch.full((len(records), longest), pad, dtype=torch.long)
        labels = torch.full((len(records), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(records), longest), dtype=torch.bool)
        grouped: dict[str, list[dict[str, Tensor]]] = {}
        for i, record in enumerate(records):
            n = len(record.input_ids)
            input_ids[i, :n] = torch.tensor(record.input_ids)
            labels[i, :n] = torch.tensor(record.labels)
            attention_mask[i, :n] = True
            for modality, features in record.features:
                grouped.setdefault(modality, []).append(features)
        features = {m: self.featurizers[m].collate(items) for m, items in grouped.items()}
        return FusedBatch(input_ids, labels, attention_mask, features)

    def __call__(self, records: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False) -> FusedBatch:
        """Process and collate chat records in one call."""
        return self.collate([self.process(r, add_generation_prompt=add_generation_prompt) for r in records])

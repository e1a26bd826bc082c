"""Batched generation where every row keeps its own token budget, stop signal and text stream.

``KibanModel.generate`` answers a batch with one ``max_new_tokens`` and streams a batch of one. A
server batches requests that asked for different ``max_tokens``, some streamed, some cancelled by
their client halfway. ``generate_rows`` runs the same steps as ``KibanModel.generate`` (prepare,
embed with left padding, the backbone's ``generate``) with one extra stopping criterion that reads
each new token per row: it ends a row at EOS, at the row's own budget, or when the row's caller
stopped waiting, and hands streamed rows their new text as it appears. Greedy rows therefore get
exactly the tokens they would get alone (left padding is masked), just truncated at their budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

__all__ = ["GREEDY_BELOW", "Completion", "RowControl", "generate_rows", "sampling_key"]

# Temperatures under this decode greedily: the distribution is all but an argmax there, and dividing
# logits by a denormal temperature overflows to inf and NaN probabilities.
GREEDY_BELOW = 1e-2

# Byte-level tokenizers can end a step halfway through a UTF-8 character; its decoded text then ends
# in U+FFFD until the next byte arrives, so streaming holds such text back.
_PARTIAL = "\ufffd"


@dataclass
class Completion:
    """One generated answer.

    finish_reason: "stop" (the model ended it), "length" (``max_tokens`` reached) or "cancelled"
    (the caller stopped waiting; the text is what was generated until then).
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class RowControl:
    """Per-row settings: the token budget, an optional text sink (streaming) and a stop signal."""

    max_tokens: int
    on_text: Callable[[str], None] | None = None
    should_stop: Callable[[], bool] = lambda: False


class _Rows(StoppingCriteria):
    """Reads the newest token of every row each step; says which rows are finished."""

    def __init__(self, tokenizer: Any, controls: Sequence[RowControl], eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.controls = controls
        self.eos_ids = eos_ids
        self.ids: list[list[int]] = [[] for _ in controls]
        self.reasons: list[str | None] = [None] * len(controls)
        self.sent = [""] * len(controls)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if self.reasons[row] is not None:
                continue  # finished rows receive padding from here on
            control = self.controls[row]
            if token in self.eos_ids:
                self.reasons[row] = "stop"
            else:
                self.ids[row].append(token)
                if control.on_text is not None:
                    self._stream(row, final=False)
                if len(self.ids[row]) >= control.max_tokens:
                    self.reasons[row] = "length"
            if self.reasons[row] is None and control.should_stop():
                self.reasons[row] = "cancelled"
        return torch.tensor([reason is not None for reason in self.reasons], device=input_ids.device)

    def text(self, row: int) -> str:
        return self.tokenizer.decode(self.ids[row], skip_special_tokens=True)

    def _stream(self, row: int, *, final: bool) -> None:
        text = self.text(row)
        if not final and text.endswith(_PARTIAL):
            return
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self.controls[row].on_text(text[len(self.sent[row]) :])
            self.sent[row] = text

    def finish(self, prompt_tokens: Sequence[int]) -> list[Completion]:
        out = []
        for row, control in enumerate(self.controls):
            if control.on_text is not None:
                self._stream(row, final=True)
                text = self.sent[row]  # what the client saw is the answer, byte for byte
            else:
                text = self.text(row)
            # a row still open when the backbone stopped has used up the shared budget
            reason = self.reasons[row] or "length"
            out.append(Completion(text, reason, int(prompt_tokens[row]), len(self.ids[row])))
        return out


def sampling_key(temperature: float, top_p: float) -> tuple[float, float]:
    """The (temperature, top_p) actually used: (0, 1) for greedy decoding; rows with equal keys batch."""
    return (0.0, 1.0) if temperature < GREEDY_BELOW else (float(temperature), float(top_p))


@torch.inference_mode()
def generate_rows(
    model: Any,
    records: Sequence[Mapping[str, Any]],
    controls: Sequence[RowControl],
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[Completion]:
    """Answer each record (its last turn the user's); ``temperature`` under ``GREEDY_BELOW`` is greedy.

    Raises the model's ``InvalidInput`` before any forward pass when a record's inputs are bad.
    """
    if len(records) != len(controls) or not records:
        raise ValueError("generate_rows needs one RowControl per record, and at least one record")
    batch = model.prepare(records, add_generation_prompt=True)
    embeds, mask, _ = model.embed_inputs(batch, padding_side="left")
    tokenizer = model.tokenizer
    rows = _Rows(tokenizer, controls, {tokenizer.eos_token_id})
    temperature, top_p = sampling_key(temperature, top_p)
    options: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        options.update(temperature=temperature, top_p=top_p)
    model.llm.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=max(control.max_tokens for control in controls),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([rows]),
        **options,
    )
    return rows.finish(mask.sum(1).tolist())

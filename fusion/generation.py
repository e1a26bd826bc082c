"""The one generation path of the fused model: encode once, prefill once, then decode step by step.

    records --prepare/embed_inputs (left padded)--> prefill --> step loop --> Completion per row

``KibanModel.generate`` (Python) and the inference server (``kiban.serve``) both call
``generate_completions``; they differ only in the hooks they pass. Every row of a batch carries its
own ``GenerationSettings`` (token budget, temperature, top-p, seed, stop strings, penalties,
logprobs) and its own ``RowHooks`` (a text sink for streaming, a ``should_stop`` callable checked
before encoding, before the prefill and between decoding steps: a deadline or a client that left).

Why a plain loop instead of Hugging Face ``generate``: per-row seeds (a row's sampled answer does
not depend on its neighbours in a batch), per-row temperatures and stop strings, logprobs of the
model's own distribution, and a cancellation check between steps all need the step in our hands.
Left padding is masked and positions are counted per row, so a greedy row gets exactly the tokens
it gets alone.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kiban.encoders.base import InvalidInput

__all__ = [
    "GREEDY_BELOW",
    "Completion",
    "GenerationSettings",
    "Guidance",
    "PromptTooLong",
    "RowHooks",
    "TokenLogprob",
    "check_guidance_scale",
    "context_length",
    "generate_completions",
]

# Temperatures under this decode greedily: the distribution is all but an argmax there, and dividing
# logits by a denormal temperature overflows to inf and NaN probabilities.
GREEDY_BELOW = 1e-2

# Byte-level tokenizers can end a step halfway through a UTF-8 character; its decoded text then ends
# in U+FFFD until the next byte arrives, so streaming holds such text back.
_PARTIAL = "\ufffd"


@dataclass(frozen=True)
class GenerationSettings:
    """How one row is decoded.

    max_tokens: the most new tokens. temperature: under ``GREEDY_BELOW`` decodes greedily (seed and
    top_p then change nothing). top_p: nucleus sampling mass. seed: the row's own random stream
    (None: a fresh random seed). stop: strings that end the answer (not included in it).
    repetition_penalty: Hugging Face's (divides positive logits of tokens already generated).
    presence_penalty / frequency_penalty: OpenAI's (subtracted once per generated token kind / per
    occurrence). logit_bias: token id -> value added to its logit. logprobs: None for none, else
    how many alternatives (0..20) to report beside each chosen token's log-probability.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        """True when the row decodes greedily (temperature under ``GREEDY_BELOW``)."""
        return self.temperature < GREEDY_BELOW


@dataclass
class RowHooks:
    """Per-row callbacks of one generation.

    Per-row callbacks: ``on_text(piece)`` receives the answer as it grows (streaming);
    ``should_stop()`` returning True ends the row with finish_reason "cancelled";
    ``process_logits(ids, logits)`` gets the row's generated token ids so far and its next-token
    logits [V] (float32, after penalties and biases, before temperature) and returns the logits to
    choose from: constrained decoding sets the tokens it forbids to -inf (``kiban.design``). It must
    leave at least one token finite.
    """

    on_text: Callable[[str], None] | None = None
    should_stop: Callable[[], bool] | None = None
    process_logits: Callable[[Sequence[int], Tensor], Tensor] | None = None


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance for one row (Ho & Salimans, 2022, applied to next-token logits).

    The row decodes from ``log p_u + scale * (log p_c - log p_u)``, where ``p_c`` is the model's
    next-token distribution given the row's own record and ``p_u`` given ``record`` (the same
    request without what is to be followed: conditions, a target). Both see the same generated
    tokens: ``record`` is decoded as a partner row fed the guided row's choices. scale 1 is plain
    conditional decoding, 0 the unconditional one, above 1 pushes away from the unconditional.
    Penalties, biases and ``process_logits`` apply after the mix; logprobs stay the model's ``p_c``.
    """

    record: Mapping[str, Any]
    scale: float

    def __post_init__(self) -> None:
        check_guidance_scale(self.scale)


def check_guidance_scale(scale: float, *, what: str = "guidance scale") -> None:
    """Raise ValueError naming ``what`` unless ``scale`` is a finite number at least 0."""
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"{what} must be a finite number at least 0, got {scale}")


@dataclass
class TokenLogprob:
    """One generated token with its log-probability under the model, and the most likely alternatives.

    raw, top_raw: the token's bytes (and each alternative's). A token may hold part of a character
    (a byte-level tokenizer splits "é" in two), so its ``token`` text alone can be a replacement
    character; the bytes of the answer's tokens, joined, decode to the answer (OpenAI's ``bytes``).
    """

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)
    raw: bytes = b""
    top_raw: list[bytes] = field(default_factory=list)


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet (transformers' ``bytes_to_unicode``), inverted: character -> byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes one token stands for: exact for byte-level BPE tokenizers (GPT-2, SmolLM2, kiban's
    byte tokenizer), whose tokens may hold part of a UTF-8 character; else its decoded text in UTF-8.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.decoder).__name__ == "ByteLevel" and token_id not in tokenizer.all_special_ids:
        piece, table = tokenizer.convert_ids_to_tokens(token_id), _byte_level_table()
        if isinstance(piece, str) and piece and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


@dataclass
class Completion:
    """One generated answer.

    finish_reason: "stop" (end of sequence or a stop string), "length" (``max_tokens`` reached) or
    "cancelled" (``should_stop`` said so; the text is what was generated until then).
    prompt_tokens: text tokens plus projected modality tokens the model attended to.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


class PromptTooLong(InvalidInput):
    """A prompt whose tokens plus its ``max_tokens`` do not fit the backbone's context."""

    def __init__(self, item_id: Any, *, prompt_tokens: int, max_tokens: int, context: int) -> None:
        """Name the prompt, its token count and the context it does not fit."""
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context
        super().__init__(
            "prompt",
            item_id,
            f"is {prompt_tokens} tokens; with max_tokens={max_tokens} that is over the limit "
            f"context_length={context} tokens of the backbone (at most {max(context - max_tokens, 0)} "
            "prompt tokens)",
        )


def context_length(llm: Any) -> int | None:
    """The most positions the backbone attends over (prompt plus answer), from its Hugging Face config."""
    config = getattr(llm, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _Row:
    """The state of one row while it is decoded."""

    def __init__(self, settings: GenerationSettings, hooks: RowHooks, tokenizer: Any, device: torch.device):
        self.settings, self.hooks, self.tokenizer = settings, hooks, tokenizer
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if settings.logprobs is not None else None
        self.reason: str | None = None
        self.text = ""  # the answer so far, cut at a stop string
        self.sent = ""  # what on_text has received
        self.generator = None
        if not settings.greedy:
            self.generator = torch.Generator(device=device)
            seed = settings.seed if settings.seed is not None else secrets.randbits(63)
            self.generator.manual_seed(seed % 2**63)

    def stopped(self) -> bool:
        return self.hooks.should_stop is not None and self.hooks.should_stop()

    def add(self, token: int) -> None:
        """Record a generated (non-EOS) token; end the row at a stop string or its budget."""
        self.ids.append(token)
        if self.settings.stop or self.hooks.on_text is not None:
            self._refresh()
        if self.reason is None and len(self.ids) >= self.settings.max_tokens:
            self.reason = "length"

    def _refresh(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.settings.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.reason = text[:cut], "stop"
        self.text = text
        if self.hooks.on_text is not None and self.reason is None:
            self._emit(final=False)

    def _emit(self, *, final: bool) -> None:
        text = self.text
        if not final:
            if text.endswith(_PARTIAL):
                return
            # hold back a tail that may still grow into a stop string
            held = max((k for s in self.settings.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - held]
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.hooks.on_text(text[len(self.sent) :])
            self.sent = text

    def finish(self, prompt_tokens: int) -> Completion:
        if not (self.settings.stop or self.hooks.on_text is not None):
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.hooks.on_text is not None:
            self._emit(final=True)
            text = self.sent  # what the client saw is the answer, byte for byte
        else:
            text = self.text
        return Completion(text, self.reason or "length", prompt_tokens, len(self.ids), self.logprobs)


def _penalised(logits: Tensor, row: _Row) -> Tensor:
    """The row's logits [V] after its penalties and biases (float32, a copy)."""
    settings = row.settings
    logits = logits.clone()
    if row.ids and (
        settings.repetition_penalty != 1.0 or settings.presence_penalty or settings.frequency_penalty
    ):
        seen, counts = torch.tensor(row.ids, device=logits.device).unique(return_counts=True)
        if settings.repetition_penalty != 1.0:
            values = logits[seen]
            logits[seen] = torch.where(
                values > 0, values / settings.repetition_penalty, values * settings.repetition_penalty
            )
        logits[seen] -= settings.presence_penalty + settings.frequency_penalty * counts.to(logits.dtype)
    for token, bias in settings.logit_bias.items():
        logits[token] += bias
    return logits


def _choose(logits: Tensor, row: _Row) -> int:
    """The next token of one row: argmax when greedy, else a draw from its own generator."""
    if row.generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits / row.settings.temperature, dim=-1)
    if row.settings.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < row.settings.top_p  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=row.generator))


def _logprob(raw: Tensor, token: int, row: _Row) -> TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives.

    The chosen token's log-probability under the model's distribution (raw logits, before
    temperature and penalties) and the ``logprobs`` most likely alternatives.
    """
    logp = torch.log_softmax(raw, dim=-1)
    decode = row.tokenizer.decode
    top, top_raw = [], []
    if row.settings.logprobs:
        values, ids = logp.topk(row.settings.logprobs)
        top = [(decode([int(i)]), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
        top_raw = [token_bytes(row.tokenizer, int(i)) for i in ids.tolist()]
    value = float(logp[token])
    raw = token_bytes(row.tokenizer, int(token))
    return TokenLogprob(decode([token]), value if math.isfinite(value) else -9999.0, top, raw, top_raw)


@torch.inference_mode()
def generate_completions(
    model: Any,
    records: Sequence[Mapping[str, Any]],
    settings: Sequence[GenerationSettings],
    hooks: Sequence[RowHooks] | None = None,
    guidance: Sequence[Guidance | None] | None = None,
) -> list[Completion]:
    """Answer each record (its last turn the user's) under its own settings, hooks and guidance.

    ``model`` is a ``KibanModel`` (``prepare``, ``embed_inputs``, ``llm``, ``tokenizer``). Raises the
    model's ``InvalidInput`` before any forward pass when a record's inputs are bad, and
    ``PromptTooLong`` (an ``InvalidInput``) before the prefill when a prompt and its ``max_tokens``
    do not fit the backbone's context.
    """
    if (
        not records
        or len(records) != len(settings)
        or (hooks is not None and len(hooks) != len(records))
        or (guidance is not None and len(guidance) != len(records))
    ):
        raise ValueError("generate_completions needs one GenerationSettings (and RowHooks, Guidance) per record")
    if any(s.max_tokens < 1 for s in settings):
        raise ValueError("max_tokens must be at least 1")
    tokenizer = model.tokenizer
    hooks = list(hooks) if hooks is not None else [RowHooks() for _ in records]
    rows = [_Row(s, h, tokenizer, model.device) for s, h in zip(settings, hooks)]
    # a guided row's unconditional partner is decoded as an extra row after all the asked ones
    guided = [i for i, g in enumerate(guidance or ()) if g is not None]
    partner = {i: len(records) + k for k, i in enumerate(guided)}
    batch_records = [*records, *(guidance[i].record for i in guided)]
    batch_settings = [*settings, *(settings[i] for i in guided)]

    def cancelled() -> bool:  # before the expensive phases: every row's caller gone -> skip the work
        for row in rows:
            if row.reason is None and row.stopped():
                row.reason = "cancelled"
        return all(row.reason is not None for row in rows)

    if cancelled():
        return [row.finish(0) for row in rows]
    batch = model.prepare(batch_records, add_generation_prompt=True)  # featurizers: bad inputs raise here
    if cancelled():
        return [row.finish(0) for row in rows]
    context = context_length(model.llm)
    if context is not None:
        # slots widen to their modality's tokens, so count text tokens first (cheap) and then again
        # after encoding; neither count reaches the backbone when it is over
        text_tokens = batch.attention_mask.sum(1).tolist()
        _check_context(batch_records, text_tokens, batch_settings, context)
    embeds, mask, _ = model.embed_inputs(batch, padding_side="left")
    prompt_tokens = [int(n) for n in mask.sum(1).tolist()]
    if context is not None:
        _check_context(batch_records, prompt_tokens, batch_settings, context)
    if cancelled():
        return [row.finish(n) for row, n in zip(rows, prompt_tokens)]

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    mask = mask.long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    # logits_to_keep=1: the prefill needs the last position's logits only, not [B, L, vocab]
    out = model.llm(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    cache = out.cache
    for _ in range(max(s.max_tokens for s in settings)):
        logits = out.logits[:, -1, :].float()
        next_ids = []
        for i, row in enumerate(rows):
            if row.reason is None and row.stopped():
                row.reason = "cancelled"
            if row.reason is not None:
                next_ids.append(pad)  # a finished row is fed padding (masked out) from here on
                continue
            if i in partner:
                mixed = torch.log_softmax(logits[i], -1), torch.log_softmax(logits[partner[i]], -1)
                scores = _penalised(mixed[1] + guidance[i].scale * (mixed[0] - mixed[1]), row)
            else:
                scores = _penalised(logits[i], row)
            if row.hooks.process_logits is not None:
                scores = row.hooks.process_logits(row.ids, scores)
            token = _choose(scores, row)
            if token == eos:
                row.reason = "stop"
            else:
                if row.logprobs is not None:
                    row.logprobs.append(_logprob(logits[i], token, row))
                row.add(token)
            next_ids.append(token)
        live = [row.reason is None for row in rows]
        if not any(live):
            break
        next_ids += [next_ids[i] for i in guided]  # a partner row reads what its guided row chose
        live += [live[i] for i in guided]
        mask = torch.cat([mask, torch.tensor(live, device=mask.device).long()[:, None]], dim=1)
        positions = positions[:, -1:] + 1
        out = model.llm(
            input_ids=torch.tensor(next_ids, device=mask.device)[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        cache = out.cache
    return [row.finish(n) for row, n in zip(rows, prompt_tokens)]  # zip: partner rows report nothing


def _check_context(
    records: Sequence[Mapping[str, Any]], tokens: Sequence[int], settings: Sequence[GenerationSettings], context: int
) -> None:
    for record, n, s in zip(records, tokens, settings):
        if n + s.max_tokens > context:
            raise PromptTooLong(
                record.get("id", "record"), prompt_tokens=int(n), max_tokens=s.max_tokens, context=context
            )

"""HTTP requests -> engine inputs: chat records and (modality, item) pairs, with the server's limits.

Everything here is plain checking and reshaping; the featurizers still validate the inputs
themselves (amino-acid letters, SMILES syntax, image shapes) when the engine runs them. What is
checked here is what only the server knows: its configured limits, which modalities the loaded
model has, and how OpenAI-style parts map onto kiban placeholders.

A chat message's parts are joined with single spaces; each non-text part becomes its placeholder
(``<protein>``, ``<molecule>``, ...) in place and its input is bound in order, so
``[text "Does", protein, text "bind", molecule, text "?"]`` reads ``Does <protein> bind <molecule> ?``.

A predict request's input is one item of the head's modality (a bare string, or a typed part), or,
for a pair head (modality ``protein+molecule``), a two-item array of them in that order, decoded to
a ``(protein, molecule)`` tuple; a pair counts as one input against ``max_inputs``.

One rule for placeholders in every route: text a client sends (message text, text parts, text to
embed, text to predict on) may not contain a placeholder tag (``<protein>``, ``<molecule>``, ...);
modality inputs are typed parts, and a tag typed into text is a 422 that says so. Special tokens
of the tokenizer typed into text are not refused: the model reads them as the literal characters
(``kiban.fusion.prompt.encode_text``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from kiban.encoders.base import list_encoders
from kiban.fusion.generation import GenerationSettings
from kiban.serve.images import ImageError, decode_data_url
from kiban.serve.schemas import (
    REFUSED_CHAT_FIELDS,
    CellPart,
    ChatCompletionRequest,
    DnaPart,
    EmbeddingRequest,
    ImagePart,
    MoleculePart,
    PredictRequest,
    ProteinPart,
    TextPart,
)
from kiban.serve.settings import Limits

__all__ = [
    "RequestError",
    "chat_record",
    "embedding_items",
    "generation_settings",
    "max_tokens",
    "predict_items",
    "prompt_tokens",
]


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status, ``param`` where the problem is."""

    def __init__(
        self, message: str, *, status: int = 422, param: str | None = None, code: str | None = None
    ) -> None:
        """A refusal with its HTTP status, the field it is about and a machine-readable code."""
        self.status = status
        self.param = param
        self.code = code
        super().__init__(message)


def _over(what: str, size: int, unit: str, limit: str, value: int, *, param: str) -> RequestError:
    return RequestError(
        f"{what} is {size} {unit}, over the limit {limit}={value}", param=param, code="limit_exceeded"
    )


def _placeholder_tags() -> re.Pattern:
    return re.compile("<(" + "|".join(map(re.escape, sorted(list_encoders()))) + ")>")


_TAGS = _placeholder_tags()


def _plain_text(text: str, *, where: str) -> str:
    """``text`` if it holds no placeholder tag, else the 422 of the one placeholder rule."""
    found = _TAGS.search(text)
    if found:
        raise RequestError(
            f"{where} contains the placeholder tag {found.group(0)}: text may not hold placeholder "
            f"tags; send the input as a typed part (e.g. {{'type': '{found.group(1)}', ...}}) instead",
            param=where,
            code="placeholder_in_text",
        )
    return text


# part model -> (modality, raw item, length counted against max_sequence_length)
_READERS: dict[type, Callable[[Any], tuple[str, Any, int]]] = {
    TextPart: lambda p: ("text", p.text, 0),
    ImagePart: lambda p: ("image", p.image_url.url, 0),  # decoded below, once the modality is known
    ProteinPart: lambda p: ("protein", p.protein.sequence, len(p.protein.sequence)),
    MoleculePart: lambda p: ("molecule", p.molecule.smiles, len(p.molecule.smiles)),
    DnaPart: lambda p: ("dna", p.dna.sequence, len(p.dna.sequence)),
    CellPart: lambda p: ("cell", {"genes": p.cell.genes, "values": p.cell.values}, len(p.cell.genes)),
}


def _part_item(part: Any, *, where: str, limits: Limits, modalities: Sequence[str]) -> tuple[str, Any]:
    """(modality, raw item) of one typed part or bare string; text gives ("text", str)."""
    if isinstance(part, str):
        return "text", _plain_text(part, where=where)
    if isinstance(part, TextPart):
        return "text", _plain_text(part.text, where=f"{where}.text")
    reader = _READERS.get(type(part))
    if reader is None:  # the schema's union admits nothing else; this guards a part added there only
        raise RequestError(f"{where}: unsupported part type {getattr(part, 'type', '?')!r}", param=where)
    modality, item, length = reader(part)
    if modality == "text":
        return modality, item
    if modality not in modalities:
        raise RequestError(
            f"{where}: a {part.type!r} part needs a {modality} encoder, which this model does not have "
            f"(it has: {', '.join(modalities)})",
            param=where,
            code="unsupported_modality",
        )
    if modality == "image":
        try:
            return modality, decode_data_url(
                item, max_voxels=limits.max_image_voxels, max_passes=limits.max_image_passes
            )
        except ImageError as error:
            raise RequestError(
                f"{where}.image_url.url {error}",
                param=f"{where}.image_url.url",
                code="limit_exceeded" if error.limit else "invalid_image",
            ) from None
    if length > limits.max_sequence_length:
        unit = "genes" if modality == "cell" else "characters"
        raise _over(
            f"{where} ({modality})",
            length,
            unit,
            "max_sequence_length",
            limits.max_sequence_length,
            param=where,
        )
    return modality, item


def chat_record(
    request: ChatCompletionRequest, *, limits: Limits, modalities: Sequence[str]
) -> dict[str, Any]:
    """The kiban chat record of an OpenAI-style chat request (``{"messages": ..., "inputs": ...}``)."""
    messages, inputs, n_inputs, chars = [], {}, 0, 0
    for i, message in enumerate(request.messages):
        content = message.content
        if message.role == "user" and (not content or all(isinstance(p, TextPart) and not p.text for p in content)):
            raise RequestError(
                f"messages[{i}].content: a user message needs content (got {content!r})",
                param=f"messages[{i}].content",
            )
        if content is None or isinstance(content, str):
            text = _plain_text(content or "", where=f"messages[{i}].content")
        else:
            pieces = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if isinstance(part, TextPart):
                    pieces.append(_plain_text(part.text, where=f"{where}.text"))
                    continue
                n_inputs += 1
                if n_inputs > limits.max_inputs:
                    raise RequestError(
                        f"{where}: more than max_inputs={limits.max_inputs} non-text parts in one request",
                        param=where,
                        code="limit_exceeded",
                    )
                modality, item = _part_item(part, where=where, limits=limits, modalities=modalities)
                inputs.setdefault(modality, []).append(item)
                pieces.append(f"<{modality}>")
            text = " ".join(pieces)
        chars += len(text)
        if chars > limits.max_text_chars:
            raise _over(
                "the messages' text",
                chars,
                "characters",
                "max_text_chars",
                limits.max_text_chars,
                param="messages",
            )
        # OpenAI's "developer" role is the newer name of "system"
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": text})
    if messages[-1]["role"] != "user":
        raise RequestError("the last message must be the user's (the model answers it)", param="messages")
    if messages[0]["role"] == "assistant":
        # kiban's prompt builder renders the turns before each assistant turn as its prompt; a
        # conversation that opens with the assistant has none
        raise RequestError(
            "messages[0]: a conversation must start with a system or user message, not the assistant's",
            param="messages[0]",
        )
    return {"messages": messages, "inputs": inputs}


def max_tokens(request: ChatCompletionRequest, *, limits: Limits) -> int:
    """The completion's token budget: ``max_completion_tokens``, ``max_tokens`` or the default."""
    wanted = request.max_completion_tokens or request.max_tokens or limits.default_max_tokens
    if wanted > limits.max_tokens:
        raise _over("max_tokens", wanted, "tokens", "max_tokens", limits.max_tokens, param="max_tokens")
    return wanted


_ACCEPTED_VALUES: dict[str, tuple[Any, ...]] = {
    "tool_choice": (None, "none"),
    "store": (None, False),
    "modalities": (None, ["text"]),
    "service_tier": (None, "auto", "default"),
}


def generation_settings(request: ChatCompletionRequest, *, limits: Limits, vocab_size: int) -> GenerationSettings:
    """The per-row settings of a chat request; a 422 naming the field for anything not honoured."""
    for name, why in REFUSED_CHAT_FIELDS.items():
        if getattr(request, name) is not None:
            raise RequestError(f"{name} is not supported: {why}", param=name, code="unsupported_field")
    for name, accepted in _ACCEPTED_VALUES.items():
        if getattr(request, name) not in accepted:
            shown = " or ".join(repr(v) for v in accepted if v is not None)
            raise RequestError(
                f"{name}={getattr(request, name)!r} is not supported: only {shown} (or leaving it out)",
                param=name,
                code="unsupported_value",
            )
    if request.response_format is not None and request.response_format.type != "text":
        raise RequestError(
            f"response_format {request.response_format.type!r} is not supported: this server does not "
            "constrain decoding to JSON (see docs/api.md); only {'type': 'text'}",
            param="response_format",
            code="unsupported_value",
        )
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise RequestError("stop takes at most 4 strings, none empty", param="stop")
    if request.top_logprobs is not None and not request.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    if request.logprobs and request.stream:
        raise RequestError(
            "logprobs are not streamed: ask for them without stream: true", param="logprobs", code="unsupported_value"
        )
    bias = {}
    for key, value in (request.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise RequestError(
                f"logit_bias: {key!r} is not a token id of this model (0..{vocab_size - 1})", param="logit_bias"
            )
        bias[int(key)] = float(value)
    return GenerationSettings(
        max_tokens=max_tokens(request, limits=limits),
        temperature=request.temperature or 0.0,
        top_p=request.top_p or 1.0,
        seed=request.seed,
        stop=tuple(stop),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=bias,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
    )


def prompt_tokens(record: dict[str, Any], tokenizer: Any) -> int:
    """A lower bound of a chat record's prompt tokens, counted before any model work.

    Tokens of a chat record's prompt before its inputs are encoded: the rendered chat with every
    placeholder as one token (each later widens to its input's projected tokens, so this never
    over-counts; typed special-token strings count as one token here, as several in the model).
    Cheap: no featurizer and no model runs.
    """
    rendered = tokenizer.apply_chat_template(record["messages"], tokenize=False, add_generation_prompt=True)
    pieces = _TAGS.split(rendered)  # text, modality, text, ...
    text = [piece for piece in pieces[::2] if piece]
    counted = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return sum(len(ids) for ids in counted) + len(pieces) // 2


def _items(raw: list[Any], *, name: str, limits: Limits, modalities: Sequence[str]) -> list[tuple[str, Any]]:
    if len(raw) > limits.max_inputs:
        raise _over(name, len(raw), "inputs", "max_inputs", limits.max_inputs, param=name)
    items, chars = [], 0
    for i, entry in enumerate(raw):
        modality, item = _part_item(entry, where=f"{name}[{i}]", limits=limits, modalities=modalities)
        if modality == "text":
            chars += len(item)
            if chars > limits.max_text_chars:
                raise _over(
                    f"the text of {name}",
                    chars,
                    "characters",
                    "max_text_chars",
                    limits.max_text_chars,
                    param=name,
                )
        items.append((modality, item))
    return items


def embedding_items(
    request: EmbeddingRequest, *, limits: Limits, modalities: Sequence[str]
) -> list[tuple[str, Any]]:
    """(modality or "text", item) pairs of an embeddings request."""
    raw = request.input if isinstance(request.input, list) else [request.input]
    if not raw:
        raise RequestError("input is an empty list", param="input")
    return _items(raw, name="input", limits=limits, modalities=[*modalities, "text"])


def predict_items(
    request: PredictRequest, *, reads: Sequence[str], limits: Limits, modalities: Sequence[str]
) -> list[Any]:
    """Raw items of a predict request for a head that reads ``reads``.

    Raw items for a head whose one input is of the modalities ``reads``: one modality (a bare
    string is an item of it) or two for a pair head, whose every input is a two-item array of them
    in order (a tuple item). The request's inputs count against ``max_inputs``, a pair as one.
    """
    if len(request.inputs) > limits.max_inputs:
        raise _over("inputs", len(request.inputs), "inputs", "max_inputs", limits.max_inputs, param="inputs")
    known = [*modalities, "text"]
    chars = [0]  # text characters so far (bare strings included), against max_text_chars
    items = []
    for i, entry in enumerate(request.inputs):
        where = f"inputs[{i}]"
        if isinstance(entry, list) != (len(reads) == 2):
            wanted = (
                f"({reads[0]}, {reads[1]}) pairs: send each input as a two-item array [{reads[0]}, {reads[1]}]"
                if len(reads) == 2
                else f"single {reads[0]} inputs, not arrays"
            )
            raise RequestError(f"{where}: this task reads {wanted}", param=where)
        if isinstance(entry, list):
            items.append(
                tuple(
                    _predict_item(part, f"{where}[{k}]", reads[k], chars, limits=limits, modalities=known)
                    for k, part in enumerate(entry)
                )
            )
        else:
            items.append(_predict_item(entry, where, reads[0], chars, limits=limits, modalities=known))
    return items


def _predict_item(
    entry: Any, where: str, modality: str, chars: list[int], *, limits: Limits, modalities: Sequence[str]
) -> Any:
    kind, item = _part_item(entry, where=where, limits=limits, modalities=modalities)
    if kind == "text":
        chars[0] += len(item)
        if chars[0] > limits.max_text_chars:
            raise _over(
                "the text of inputs",
                chars[0],
                "characters",
                "max_text_chars",
                limits.max_text_chars,
                param="inputs",
            )
    if kind == "text" and isinstance(entry, str):
        kind = modality  # a bare string: a sequence, SMILES or passage for this head
        if modality in ("protein", "dna", "molecule") and len(item) > limits.max_sequence_length:
            raise _over(
                f"{where} ({modality})",
                len(item),
                "characters",
                "max_sequence_length",
                limits.max_sequence_length,
                param=where,
            )
    if kind != modality:
        raise RequestError(f"{where} is a {kind} input, but this task reads {modality} inputs", param=where)
    return item

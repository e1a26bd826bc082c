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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kiban.serve.images import ImageError, decode_data_url
from kiban.serve.schemas import (
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

__all__ = ["RequestError", "chat_record", "embedding_items", "max_tokens", "predict_items"]


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status, ``param`` where the problem is."""

    def __init__(
        self, message: str, *, status: int = 422, param: str | None = None, code: str | None = None
    ) -> None:
        self.status = status
        self.param = param
        self.code = code
        super().__init__(message)


def _over(what: str, size: int, unit: str, limit: str, value: int, *, param: str) -> RequestError:
    return RequestError(
        f"{what} is {size} {unit}, over the limit {limit}={value}", param=param, code="limit_exceeded"
    )


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
        return "text", part
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
            return modality, decode_data_url(item, max_pixels=limits.max_image_pixels)
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
        if content is None or isinstance(content, str):
            text = content or ""
        else:
            pieces = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if isinstance(part, TextPart):
                    pieces.append(part.text)
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
    wanted = request.max_completion_tokens or request.max_tokens or limits.default_max_tokens
    if wanted > limits.max_tokens:
        raise _over("max_tokens", wanted, "tokens", "max_tokens", limits.max_tokens, param="max_tokens")
    return wanted


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
    """Raw items for a head whose one input is of the modalities ``reads``: one modality (a bare
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

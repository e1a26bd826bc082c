"""Request and response models of the HTTP API (pydantic), shaped like OpenAI's where OpenAI has one.

They are the OpenAPI document: every part type is its own model in a union discriminated by
``type``, so a client generator (or schemathesis) sees exactly what a part may hold.

Requests are read strictly: no coercion (``true`` is no number, ``"1"`` no integer, ``"yes"`` no
boolean), and a field the model does not declare is refused, so nothing a client sends is silently
ignored. OpenAI fields the server does not honour (``tools``, ``response_format`` of a JSON kind,
...) are declared, so that ``decode.py`` can refuse them with a 422 that says why. Every string is
checked to be valid Unicode (JSON can carry a lone UTF-16 surrogate, which no tokenizer can read).

Server limits (``max_sequence_length``, ``max_inputs``, ...) are set when the server starts, so
they are not in the schema; a request over one gets a 422 naming the limit (see ``docs/api.md``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "CellPart",
    "Citation",
    "DocumentList",
    "RetrievalOptions",
    "SearchRequest",
    "SearchResponse",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ContactPair",
    "EntitySpan",
    "ContentPart",
    "DnaPart",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ErrorResponse",
    "error_responses",
    "ImagePart",
    "ModelList",
    "MoleculePart",
    "PredictRequest",
    "PredictResponse",
    "ProteinPart",
    "REFUSED_CHAT_FIELDS",
    "ResiduePrediction",
    "ResponseFormat",
    "Text",
    "TextPart",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Request(BaseModel):
    """A request body (or a part of one): strict types, no undeclared fields."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"is not valid Unicode: an unpaired UTF-16 surrogate ({text[error.start]!r}) at character {error.start}"
        ) from None
    return text


# Every string a request may carry: valid Unicode, or a 422 naming the field.
Text = Annotated[str, AfterValidator(_valid_unicode)]


# ----------------------------------------------------------------------------------------------
# Content parts: OpenAI's text and image_url, plus one typed part per modality


class TextPart(_Request):
    """Plain text (in chat: part of the prompt; in embeddings / predict: a passage)."""

    type: Literal["text"]
    text: Text


class ImageURL(_Request):
    url: Text = Field(
        description="a data URL: data:image/png;base64,... (PNG, JPEG or TIFF); remote URLs are refused"
    )
    detail: Literal["auto", "low", "high"] | None = Field(default=None, description="accepted and ignored")


class ImagePart(_Request):
    """A microscopy image, inline as a base64 data URL (OpenAI's image_url part)."""

    type: Literal["image_url"]
    image_url: ImageURL


class ProteinInput(_Request):
    sequence: Text = Field(min_length=1, description="amino-acid letters; at most max_sequence_length")


class ProteinPart(_Request):
    """A protein sequence, bound to a ``<protein>`` placeholder at this position."""

    type: Literal["protein"]
    protein: ProteinInput


class MoleculeInput(_Request):
    smiles: Text = Field(min_length=1, description="a SMILES string; at most max_sequence_length characters")


class MoleculePart(_Request):
    """A small molecule as SMILES, bound to a ``<molecule>`` placeholder at this position."""

    type: Literal["molecule"]
    molecule: MoleculeInput


class DnaInput(_Request):
    sequence: Text = Field(
        min_length=1, description="nucleotides (ACGTN and IUPAC codes); at most max_sequence_length"
    )


class DnaPart(_Request):
    """A DNA sequence, bound to a ``<dna>`` placeholder at this position."""

    type: Literal["dna"]
    dna: DnaInput


class CellInput(_Request):
    genes: list[Text] = Field(min_length=1, description="gene names (symbols); at most max_sequence_length")
    values: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        min_length=1, description="expression values (counts or normalised counts), one per gene"
    )

    @model_validator(mode="after")
    def _same_length(self) -> CellInput:
        if len(self.genes) != len(self.values):
            raise ValueError(
                f"genes ({len(self.genes)}) and values ({len(self.values)}) must have the same length"
            )
        return self


class CellPart(_Request):
    """One cell's expression profile, bound to a ``<cell>`` placeholder at this position."""

    type: Literal["cell"]
    cell: CellInput


ContentPart = Annotated[
    TextPart | ImagePart | ProteinPart | MoleculePart | DnaPart | CellPart, Field(discriminator="type")
]


# ----------------------------------------------------------------------------------------------
# Chat completions


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = Field(
        default=None,
        description="text, or a list of parts; each non-text part becomes a placeholder in place. "
        "A user message needs content (not null, \"\" or [])",
    )
    name: Text | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    """OpenAI's ``response_format``; only ``{"type": "text"}`` is served (see docs/api.md)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


# OpenAI chat fields that are declared only so that the server can refuse them by name (a 422 that
# says why) instead of answering as if they had been honoured: field -> why it is refused.
REFUSED_CHAT_FIELDS = {
    "tools": "server-side tool calling is not served (the 135M default backbone does not call tools reliably); to ground an answer in your documents send 'retrieval': {} instead (docs/api.md)",
    "functions": "server-side tool calling is not served (the 135M default backbone does not call tools reliably); to ground an answer in your documents send 'retrieval': {} instead (docs/api.md)",
    "function_call": "server-side tool calling is not served (the 135M default backbone does not call tools reliably); to ground an answer in your documents send 'retrieval': {} instead (docs/api.md)",
    "audio": "this model answers in text only",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "this server searches nothing",
    "metadata": "completions are not stored (store: true is refused too)",
    "reasoning_effort": "this model has no reasoning-effort setting",
    "verbosity": "this model has no verbosity setting",
}


class RetrievalOptions(_Request):
    """kiban's extension of a chat request: answer from the caller's documents, citing them.

    The last user message is the query; the ``k`` best passages the caller's groups may read are
    put before the conversation as numbered sources, and the answer lists the sources it was given.
    """

    k: int = Field(default=4, ge=1, le=20, description="passages to ground the answer in")
    mode: Literal["hybrid", "dense", "lexical"] = Field(
        default="hybrid", description="hybrid: dense + lexical fused by reciprocal rank; or one of them"
    )


class ChatCompletionRequest(_Request):
    """OpenAI's chat completion request, with the kiban part types (docs/api.md lists every field)."""
    model: Text | None = Field(default=None, description="the served model's id (GET /v1/models); optional")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description="at most the server's max_tokens limit and the context left by the prompt"
    )
    max_completion_tokens: int | None = Field(default=None, ge=1, description="alias of max_tokens")
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="0 or absent: greedy decoding; under 0.01 is 0"
    )
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(
        default=None,
        ge=-(2**63),
        lt=2**64,
        description="with temperature > 0: the same seed gives the same answer (here and from "
        "KibanModel.generate); absent: a fresh random seed",
    )
    stop: Text | list[Text] | None = Field(
        default=None, description="up to 4 non-empty strings; the answer ends before the first one"
    )
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[Text, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, description="token id (as a string) -> bias added to its logit, -100..100"
    )
    logprobs: bool | None = Field(default=None, description="the log-probability of each answer token")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=20, description="with logprobs: the most likely alternatives per token"
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1, description="only 1 is supported")
    response_format: ResponseFormat | None = Field(
        default=None, description="only {'type': 'text'}; JSON formats are refused (see docs/api.md)"
    )
    tool_choice: Literal["none"] | dict[str, Any] | Text | None = Field(
        default=None, description="absent or 'none' only: tools are not served yet"
    )
    parallel_tool_calls: bool | None = Field(default=None, description="accepted; without tools it has no effect")
    store: bool | None = Field(default=None, description="absent or false: nothing is stored")
    modalities: list[Text] | None = Field(default=None, description="absent or ['text']")
    service_tier: Text | None = Field(default=None, description="absent, 'auto' or 'default'")
    user: Text | None = Field(default=None, description="accepted; an identifier that changes nothing")
    safety_identifier: Text | None = Field(default=None, description="accepted; changes nothing")
    prompt_cache_key: Text | None = Field(default=None, description="accepted; changes nothing")
    retrieval: RetrievalOptions | None = Field(
        default=None,
        description="kiban extension: ground the answer in the caller's documents (needs a server "
        "started with --index); the response's 'citations' lists the passages used",
    )
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    metadata: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Model):
    content: list[TokenLogprob]


class Choice(_Model):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class Citation(_Model):
    """A passage an answer was grounded in: source [index] of the answer's text."""

    index: int = Field(description="the number the answer's text cites it by, [index]")
    doc_id: str
    chunk_id: str
    title: str
    section: str
    source: str = Field(description="where the document was read from (a path, path#pmid=..., ...)")
    start: int = Field(description="first character of the passage in the document's text")
    end: int = Field(description="one past the last character")
    score: float


class ChatCompletion(_Model):
    """OpenAI's chat completion response (``citations``: kiban's extension, with ``retrieval``)."""
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    citations: list[Citation] | None = Field(
        default=None, description="with 'retrieval': the passages given to the model, in [index] order"
    )


class Delta(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Model):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Model):
    """One server-sent event of a streamed completion (``data: {...}``); ``data: [DONE]`` ends the stream."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# ----------------------------------------------------------------------------------------------
# Embeddings and predictions

InputItem = Union[Text, ContentPart]  # noqa: UP007 - ContentPart is an Annotated alias


class EmbeddingRequest(_Request):
    """OpenAI's embeddings request, with typed inputs for every modality."""
    input: Text | ContentPart | list[InputItem] = Field(
        description="text, a typed input ({'type': 'protein', 'protein': {...}}, ...), or a list of either; "
        "at most max_inputs items"
    )
    model: Text | None = None
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: little-endian float32 bytes, as OpenAI's clients expect"
    )
    dimensions: int | None = Field(default=None, ge=1, description="must equal the model's width if given")
    user: Text | None = Field(default=None, description="accepted; an identifier that changes nothing")


class EmbeddingData(_Model):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(_Model):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Model):
    """OpenAI's embeddings response."""
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


PairItem = Annotated[
    list[InputItem],
    Field(
        min_length=2,
        max_length=2,
        description="one input of a pair head: [protein, molecule] (the order of the head's 'inputs' in "
        "GET /v1/models), each a bare string or a typed input",
    ),
]


class PredictRequest(_Request):
    """Inputs for a task head, and the options of contact heads."""
    inputs: list[InputItem | PairItem] = Field(
        min_length=1,
        description="raw inputs of the head's modality: strings (sequence, SMILES, text) or typed inputs; "
        "a protein / dna head takes {type: protein|dna, ...} parts, an image head image_url parts (a base64 "
        "data URL), a text head plain strings; for a pair head (two 'inputs' in GET /v1/models), two-item "
        "arrays [protein, molecule]; at most max_inputs items",
    )
    model: Text | None = None
    top_k: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="contact heads only: the most probable residue pairs to return per protein "
        "(default: the protein's length L)",
    )
    min_separation: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="contact heads only: the smallest |i - j| of a returned pair (default: the head's, 6)",
    )


class ResiduePrediction(_Model):
    """One residue of a per-residue head's answer."""

    position: int = Field(description="1-based position in the sequence")
    residue: str = Field(description="the residue's one-letter code")
    label: str = Field(description="the most probable state (e.g. C, E or H)")
    probabilities: dict[str, float] = Field(description="state -> probability")


class ContactPair(_Model):
    """One residue pair of a contact head's answer."""

    i: int = Field(description="1-based position of the first residue (i < j)")
    j: int = Field(description="1-based position of the second residue")
    probability: float = Field(description="probability that the two residues are in contact (Cβ–Cβ < 8 Å)")


class EntitySpan(_Model):
    """One entity a token head found in a text: character offsets into the input, end exclusive."""

    start: int = Field(description="offset of the entity's first character in the input text")
    end: int = Field(description="offset just past its last character (text[start:end] is the entity)")
    label: str = Field(description="the entity type (e.g. Chemical, Disease)")
    text: str = Field(description="the entity's text, text[start:end]")
    score: float = Field(description="mean probability of the entity's word tags")


class Prediction(_Model):
    """One input's answer; which fields are present depends on the head's kind (GET /v1/models)."""

    index: int
    label: str | None = Field(default=None, description="classification: the most probable label")
    probabilities: dict[str, float] | None = Field(
        default=None,
        description="classification: label -> probability (they sum to 1); multilabel: label -> "
        "independent probability",
    )
    values: dict[str, float] | None = Field(
        default=None, description="regression (pair heads too): target -> value"
    )
    residues: list[ResiduePrediction] | None = Field(
        default=None, description="residue_classification: one entry per residue, in sequence order"
    )
    length: int | None = Field(default=None, description="contact: the protein's length L")
    contacts: list[ContactPair] | None = Field(
        default=None, description="contact: the top_k most probable pairs, most probable first"
    )
    entities: list[EntitySpan] | None = Field(
        default=None, description="token_classification: the entities found in the text, in order"
    )


class PredictResponse(_Model):
    """A task head's answers, one row per input."""
    object: Literal["list"] = "list"
    task: str
    model: str
    data: list[Prediction]


# ----------------------------------------------------------------------------------------------
# Models, health, errors


class HeadInfo(_Model):
    task: str
    modality: str = Field(description="what the head reads: an encoder name, 'text', or 'protein+molecule'")
    inputs: list[str] = Field(
        default_factory=list,
        description="the modalities of one input: one, or two for a pair head (send [protein, molecule])",
    )
    kind: Literal[
        "classification", "regression", "multilabel", "residue_classification", "contact", "token_classification"
    ] = Field(
        description="classification: label + probabilities; regression: values; multilabel: a probability "
        "per label; residue_classification: residues; contact: length + contacts; token_classification: "
        "entities (character offsets into the text)"
    )
    labels: list[str]
    version: str
    endpoint: str

    @model_validator(mode="after")
    def _inputs_from_modality(self) -> HeadInfo:
        if not self.inputs:
            self.inputs = self.modality.split("+")
        return self


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kiban"
    modalities: list[str]
    embedding_dim: int
    heads: list[HeadInfo]


class ModelList(_Model):
    """OpenAI's model list: the one served model."""
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Status(_Model):
    status: Literal["ok", "ready", "loading", "failed", "saturated", "stopping"]
    detail: str | None = None


class ErrorBody(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Model):
    """OpenAI's error shape, so clients raise their usual exceptions with the message."""

    error: ErrorBody


_ERROR_DESCRIPTIONS = {
    400: "malformed JSON body",
    401: "missing or invalid API key",
    404: "unknown model or task",
    413: "request body over max_body_bytes",
    422: "invalid request or input; the message names the field, the input or the limit",
    429: "rate limit exceeded (see Retry-After)",
    503: "model not loaded yet, or the queue is full (see Retry-After)",
    504: "not answered within the server's timeout",
}


def error_responses(*codes: int) -> dict[int, dict[str, Any]]:
    """The OpenAPI ``responses`` entries of a route's documented error ``codes`` (every route's
    errors share this shape and wording).
    """
    return {code: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}


def error_payload(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code)).model_dump()


# ----------------------------------------------------------------------------------------------
# Document search (servers started with --index)


class SearchRequest(_Request):
    """A search of the caller's documents."""

    query: Text = Field(min_length=1, max_length=4000)
    k: int = Field(default=10, ge=1, le=100, description="results to return")
    mode: Literal["hybrid", "dense", "lexical"] = Field(
        default="hybrid", description="hybrid: dense + lexical fused by reciprocal rank; or one of them"
    )


class SearchHit(_Model):
    """One passage found, with where it lies in its document."""

    doc_id: str
    chunk_id: str
    title: str
    section: str
    source: str
    start: int
    end: int
    score: float = Field(description="hybrid: the fused reciprocal-rank score; dense: cosine; lexical: the store's")
    ranks: dict[str, int] = Field(description="the passage's 1-based rank in each list it was found in")
    text: str


class SearchResponse(_Model):
    """Passages of documents the caller's groups may read, best first."""

    object: Literal["list"] = "list"
    data: list[SearchHit]


class DocumentEntry(_Model):
    """A document the caller may read (its groups: the caller's groups it belongs to)."""

    doc_id: str
    title: str
    source: str
    groups: list[str]
    chunks: int
    chars: int


class DocumentList(_Model):
    """The documents the caller's groups may read."""

    object: Literal["list"] = "list"
    data: list[DocumentEntry]

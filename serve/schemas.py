"""Request and response models of the HTTP API (pydantic), shaped like OpenAI's where OpenAI has one.

They are the OpenAPI document: every part type is its own model in a union discriminated by
``type``, so a client generator (or schemathesis) sees exactly what a part may hold. Fields a
client may send that the server does not use are ignored, as OpenAI-compatible servers commonly do;
fields that would change the answer and are not supported (``n`` > 1) are refused.

Server limits (``max_sequence_length``, ``max_inputs``, ...) are set when the server starts, so
they are not in the schema; a request over one gets a 422 naming the limit (see ``docs/api.md``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "CellPart",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ContactPair",
    "ContentPart",
    "DnaPart",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ErrorResponse",
    "ImagePart",
    "ModelList",
    "MoleculePart",
    "PredictRequest",
    "PredictResponse",
    "ProteinPart",
    "ResiduePrediction",
    "TextPart",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ----------------------------------------------------------------------------------------------
# Content parts: OpenAI's text and image_url, plus one typed part per modality


class TextPart(_Model):
    """Plain text (in chat: part of the prompt; in embeddings / predict: a passage)."""

    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str = Field(
        description="a data URL: data:image/png;base64,... (PNG, JPEG or TIFF); remote URLs are refused"
    )
    detail: Literal["auto", "low", "high"] | None = Field(default=None, description="accepted and ignored")


class ImagePart(_Model):
    """A microscopy image, inline as a base64 data URL (OpenAI's image_url part)."""

    type: Literal["image_url"]
    image_url: ImageURL


class ProteinInput(_Model):
    sequence: str = Field(min_length=1, description="amino-acid letters; at most max_sequence_length")


class ProteinPart(_Model):
    """A protein sequence, bound to a ``<protein>`` placeholder at this position."""

    type: Literal["protein"]
    protein: ProteinInput


class MoleculeInput(_Model):
    smiles: str = Field(min_length=1, description="a SMILES string; at most max_sequence_length characters")


class MoleculePart(_Model):
    """A small molecule as SMILES, bound to a ``<molecule>`` placeholder at this position."""

    type: Literal["molecule"]
    molecule: MoleculeInput


class DnaInput(_Model):
    sequence: str = Field(
        min_length=1, description="nucleotides (ACGTN and IUPAC codes); at most max_sequence_length"
    )


class DnaPart(_Model):
    """A DNA sequence, bound to a ``<dna>`` placeholder at this position."""

    type: Literal["dna"]
    dna: DnaInput


class CellInput(_Model):
    genes: list[str] = Field(min_length=1, description="gene names (symbols); at most max_sequence_length")
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


class CellPart(_Model):
    """One cell's expression profile, bound to a ``<cell>`` placeholder at this position."""

    type: Literal["cell"]
    cell: CellInput


ContentPart = Annotated[
    TextPart | ImagePart | ProteinPart | MoleculePart | DnaPart | CellPart, Field(discriminator="type")
]


# ----------------------------------------------------------------------------------------------
# Chat completions


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = Field(
        default=None,
        description="text, or a list of parts; each non-text part becomes a placeholder in place",
    )
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    model: str | None = Field(default=None, description="the served model's id (GET /v1/models); optional")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="at most the server's max_tokens limit")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="alias of max_tokens")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 or absent: greedy decoding")
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1, description="only 1 is supported")
    user: str | None = None


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(_Model):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


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

InputItem = Union[str, ContentPart]  # noqa: UP007 - ContentPart is an Annotated alias


class EmbeddingRequest(_Model):
    input: str | ContentPart | list[InputItem] = Field(
        description="text, a typed input ({'type': 'protein', 'protein': {...}}, ...), or a list of either; "
        "at most max_inputs items"
    )
    model: str | None = None
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: little-endian float32 bytes, as OpenAI's clients expect"
    )
    dimensions: int | None = Field(default=None, ge=1, description="must equal the model's width if given")
    user: str | None = None


class EmbeddingData(_Model):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(_Model):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Model):
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


class PredictRequest(_Model):
    inputs: list[InputItem | PairItem] = Field(
        min_length=1,
        description="raw inputs of the head's modality: strings (sequence, SMILES, text) or typed inputs; "
        "for a pair head (two 'inputs' in GET /v1/models), two-item arrays [protein, molecule]; "
        "at most max_inputs items",
    )
    model: str | None = None
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


class PredictResponse(_Model):
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
    kind: Literal["classification", "regression", "multilabel", "residue_classification", "contact"] = Field(
        description="classification: label + probabilities; regression: values; multilabel: a probability "
        "per label; residue_classification: residues; contact: length + contacts"
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
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Status(_Model):
    status: Literal["ok", "ready", "loading", "failed"]
    detail: str | None = None


class ErrorBody(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Model):
    """OpenAI's error shape, so clients raise their usual exceptions with the message."""

    error: ErrorBody


def error_payload(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code)).model_dump()

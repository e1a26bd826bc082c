"""Plain-value settings of the inference server: batching, limits, keys and rate limits.

``BatchingOptions`` configures the engine (no HTTP); ``Limits`` bounds what one request may ask
for; ``ServeSettings`` adds what only the HTTP layer needs (address, keys, rate limit). Every field
is a CLI flag of ``kiban serve`` (see ``serve/cli.py``) and is listed in ``docs/api.md``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BatchingOptions", "Limits", "ServeSettings", "read_api_keys"]


@dataclass(frozen=True)
class BatchingOptions:
    """How the engine groups work.

    max_batch: most rows (chat completions, embedding inputs, prediction inputs) in one forward pass.
    max_wait_ms: how long the first request of a group waits for others to join it.
    max_queue: most requests waiting for the model; one more is refused (``Overloaded``, HTTP 503).
    timeout_s: most seconds a request may take from arrival to answer (``RequestTimeout``, HTTP 504);
        a generation or encoding past it stops at its next step.
    drain_s: on shutdown, how long running work may take to finish before it is cancelled.
    """

    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    timeout_s: float = 60.0
    drain_s: float = 10.0

    def __post_init__(self) -> None:
        """Refuse values that cannot work."""
        if self.max_batch < 1 or self.max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        if self.max_wait_ms < 0 or self.timeout_s <= 0 or self.drain_s < 0:
            raise ValueError("max_wait_ms and drain_s must be >= 0 and timeout_s > 0")


@dataclass(frozen=True)
class Limits:
    """Bounds on one request; going over one is a 413 (body) or 422 naming the limit.

    max_body_bytes: request body size, checked before the body is parsed.
    max_sequence_length: characters of one protein or DNA sequence or SMILES, or genes of one cell.
    max_inputs: modality inputs (non-text parts) in one chat request; inputs of one embeddings or
        predict request.
    max_image_voxels: values in one decoded image, every axis counted (height x width x channels x
        slices ...), checked from the header before decoding.
    max_image_passes: image-encoder passes one image may cost (z-slices x tiles; one per z-slice).
    max_tokens: the most tokens one chat completion may ask for (``max_tokens``); the prompt's
        tokens plus ``max_tokens`` must also fit the backbone's context (checked before any model work).
    default_max_tokens: what a chat completion generates when it does not say.
    max_text_chars: characters of all text in one request (message text, text inputs).
    """

    max_body_bytes: int = 8 * 1024 * 1024
    max_sequence_length: int = 10_000
    max_inputs: int = 32
    max_image_voxels: int = 4096 * 4096 * 3
    max_image_passes: int = 16
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_text_chars: int = 100_000

    def __post_init__(self) -> None:
        """Refuse limits under 1, and a default over the maximum."""
        for name in (
            "max_body_bytes",
            "max_sequence_length",
            "max_inputs",
            "max_image_voxels",
            "max_image_passes",
            "max_tokens",
            "default_max_tokens",
            "max_text_chars",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"limit {name} must be at least 1")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must not exceed max_tokens")


@dataclass(frozen=True)
class ServeSettings:
    """Everything the HTTP layer needs besides the engine.

    api_keys: accepted bearer tokens; empty means no authentication (allowed on loopback only).
    api_keys_file: the keys file they came from; when set, the server re-reads it when it changes,
        so keys and their document groups change without a restart (``serve/auth.py``).
    index: a document index (a folder or a ``postgresql://`` URL, see ``kiban index``) that
        ``/v1/search`` and chat completions with ``retrieval`` read; None serves neither.
    reranker: a local cross-encoder folder that re-ranks retrieved passages; None: fused order.
    rate_limit: requests per second per key (token bucket, refilled continuously); 0 turns it off.
    rate_burst: bucket size, i.e. how many requests a key may send at once after idling.
    model_name: the id reported by ``/v1/models`` and echoed in responses.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    api_keys_file: str | None = None
    index: str | None = None
    reranker: str | None = None
    rate_limit: float = 50.0
    rate_burst: int = 100
    limits: Limits = field(default_factory=Limits)
    model_name: str = "kiban"

    def __post_init__(self) -> None:
        """Refuse a rate limit that cannot work, and serving beyond loopback without keys."""
        if self.rate_limit < 0 or self.rate_burst < 1:
            raise ValueError("rate_limit must be >= 0 and rate_burst >= 1")
        if not self.api_keys and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve on {self.host} without API keys: pass --api-keys-file, or bind 127.0.0.1"
            )

    def __repr__(self) -> str:  # keys never reach a log line, even through a repr
        """The settings with the keys counted, never shown."""
        return (
            f"ServeSettings(host={self.host!r}, port={self.port}, api_keys=<{len(self.api_keys)} keys>, "
            f"rate_limit={self.rate_limit}, rate_burst={self.rate_burst}, limits={self.limits}, "
            f"model_name={self.model_name!r}, index={_redacted(self.index)!r}, reranker={self.reranker!r})"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_keys(path: str | Path) -> tuple[str, ...]:
    """Keys from a keys file (format: ``serve/auth.py``); blank lines and ``#`` comments are skipped.

    Raises ValueError (never showing a key) when the file holds no key, a key is too short to be
    a secret, or a line's fields are malformed.
    """
    from kiban.serve.auth import read_keys_file

    return tuple(read_keys_file(path))


def _redacted(location: str | None) -> str | None:
    """An index location without a URL's password."""
    import re

    return None if location is None else re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", location)

"""Sentence embeddings for the index: the packaged all-MiniLM-L6-v2 text encoder.

``SentenceEmbedder`` turns passages and queries into L2-normalised float32 vectors (cosine
similarity is a dot product) with ``TextEncoder.embed_sentences``, the sentence-transformers
computation of that model. The encoder is built on first use and shared by threads under a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

__all__ = ["SentenceEmbedder"]


class SentenceEmbedder:
    """Texts -> float32 vectors [N, dim], L2-normalised; ``name`` and ``dim`` are recorded by the store."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, *, batch_size: int = 32) -> None:
        """An embedder that builds the text encoder on its first call."""
        self.batch_size = batch_size
        self._encoder = None
        self._lock = threading.Lock()

    def _model(self):
        if self._encoder is None:
            from kiban.encoders import create_encoder

            encoder = create_encoder("text").eval()
            if encoder.output_dim != self.dim:
                raise ValueError(f"the text encoder is {encoder.output_dim} wide, not {self.dim}")
            self._encoder = encoder
        return self._encoder

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors [len(texts), dim] (float32); an empty list gives an empty [0, dim] array."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self._model().embed_sentences(list(texts), batch_size=self.batch_size)
        return vectors.float().cpu().numpy().astype(np.float32, copy=False)

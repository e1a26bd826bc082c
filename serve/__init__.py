"""Inference API: an OpenAI-compatible HTTP server over KibanModel, and the engine beneath it.

    from kiban.serve import InferenceEngine, BatchingOptions, ServeSettings, create_app

``InferenceEngine`` (``engine.py``) is the Python API: dynamic batching, a bounded queue, one model
thread; it works without HTTP. ``create_app`` (``app.py``) puts the HTTP layer on top: decode
(``decode.py``, ``images.py``) -> engine -> encode, behind the ``Guard`` middleware (keys, rate
limit, body size) and with Prometheus metrics. ``kiban serve`` (``cli.py``) runs it on uvicorn.

Names are imported on first use, so ``kiban --help`` does not pay for FastAPI and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BatchingOptions",
    "Completion",
    "InferenceEngine",
    "Limits",
    "NotReady",
    "Overloaded",
    "RequestTimeout",
    "ServeSettings",
    "UnknownTask",
    "create_app",
    "load_model_dir",
    "read_api_keys",
]

_HOMES = {
    "BatchingOptions": "settings",
    "Limits": "settings",
    "ServeSettings": "settings",
    "read_api_keys": "settings",
    "Completion": "engine",
    "InferenceEngine": "engine",
    "NotReady": "engine",
    "Overloaded": "engine",
    "RequestTimeout": "engine",
    "UnknownTask": "engine",
    "create_app": "app",
    "load_model_dir": "loading",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'kiban.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kiban.serve.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)

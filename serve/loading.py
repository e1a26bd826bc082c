"""Load a saved model and its task heads for serving, from one directory and nowhere else.

``KibanModel.from_pretrained`` reads only JSON and safetensors. What it reads is decided by the
directory's ``config.json``, and a config can name files: a backbone ``path`` or ``gguf``, an
encoder's ``weights_path``, ``hf_path``, ``model_path`` or ``gene_vocab_path``. A model saved by
``save_pretrained`` names none (weights travel in ``model.safetensors``), so the server refuses a
config that points at any file outside the directory before anything is loaded: copying a model
folder onto a server can never make it read other files on that machine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["check_model_dir", "load_model_dir"]

log = logging.getLogger(__name__)

# Config keys that name a file or folder (their values are paths when set).
_PATH_KEYS = ("path", "gguf", "file", "dir")
# An inline Hugging Face architecture is built with ``from_config``, which reads no file; its
# ``_name_or_path``-like entries only record where it first came from.
_ARCHITECTURE_ONLY = ("hf_config",)


def _path_values(values: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(values, dict):
        for key, value in values.items():
            here = f"{where}.{key}" if where else str(key)
            if key in _ARCHITECTURE_ONLY:
                continue
            if isinstance(value, str) and value and str(key).lower().endswith(_PATH_KEYS):
                yield here, value
            else:
                yield from _path_values(value, here)
    elif isinstance(values, list):
        for i, value in enumerate(values):
            yield from _path_values(value, f"{where}[{i}]")


def check_model_dir(model_dir: str | Path) -> Path:
    """Raise ValueError when the directory's config.json names a file outside the directory."""
    root = Path(model_dir).resolve()
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{root} is not a saved kiban model (no config.json)")
    config = json.loads(config_file.read_text())
    # Files save_pretrained copied into the folder are named relative to it (``relative_paths``).
    for spec in (config.get("encoders") or {}).values():
        for name in spec.get("relative_paths", ()) if isinstance(spec, dict) else ():
            spec["config"][name] = str(root / spec["config"][name])
    for where, value in _path_values(config):
        # Loaders resolve a relative path against the working directory, not the model's: refuse it too.
        target = Path(value).resolve()
        if not Path(value).is_absolute() or not target.is_relative_to(root):
            raise ValueError(
                f"{config_file}: {where} points outside the model directory ({value!r}); the server "
                "loads files from the model directory only (save the model with save_pretrained)"
            )
    return root


def load_model_dir(model_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """(model in eval mode, task name -> head) from a directory written by ``save_pretrained``
    (plus ``heads/<task>/`` folders written by ``PooledHead.save``).
    """
    from kiban.fusion.model import KibanModel
    from kiban.tasks.predict import load_model_heads

    root = check_model_dir(model_dir)
    model = KibanModel.from_pretrained(root).eval()
    heads = load_model_heads(root, model)  # each head checked against the model by its own rule
    return model, heads

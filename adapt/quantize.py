"""Weight-only quantisation of the backbone with torchao: ``--quantize int8|int4``.

Every ``nn.Linear`` of the LLM backbone (attention and MLP projections and the LM head) gets
quantised weights; activations stay float, and the encoders, projectors, embeddings and norms are
untouched (they are a small part of the compute). LoRA adapters are merged into the weights first
(quantising the tiny adapter matrices would cost accuracy and buy nothing).

    int8   symmetric, one scale per output row (torchao ``Int8WeightOnlyConfig``), CPU and CUDA
    int4   asymmetric, one scale and zero point per group of 128/64/32 input weights (the largest
           that divides the layer's width), tinygemm kernels: on the CPU torchao's
           ``Int4OpaqueTensor`` (``_weight_int4pack_mm_for_cpu``, float32 activations), on CUDA
           ``Int4WeightOnlyConfig`` with the tile-packed layout (bfloat16 activations, so the
           backbone is cast to bfloat16 there)

A model is saved quantised with ``save_quantized``: ``quantization.json`` beside ``config.json``
records the scheme and the weights stay the float originals (plain safetensors); ``load_model``
(what ``kiban serve``, ``predict`` and ``embed`` use) quantises them on load, so the served model is
exactly the one quantised in memory. Disk size is therefore not reduced; memory in use is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "QUANTIZATION_FILE",
    "QUANTIZE_MODES",
    "load_model",
    "quantize_model",
    "save_quantized",
    "saved_quantization",
]

log = logging.getLogger(__name__)

QUANTIZATION_FILE = "quantization.json"
TORCHAO_VERSION = "0.18.0"  # pinned in pyproject.toml; recorded with every saved quantised model


def _int8(device: torch.device) -> Callable[[int], Any]:
    from torchao.quantization import Int8WeightOnlyConfig

    return lambda width: Int8WeightOnlyConfig()


def _int4(device: torch.device) -> Callable[[int], Any]:
    if device.type == "cuda":
        from torchao.quantization import Int4WeightOnlyConfig

        return lambda width: Int4WeightOnlyConfig(
            group_size=_group_size(width), int4_packing_format="tile_packed_to_4d"
        )
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

    return lambda width: PrototypeInt4WeightOnlyConfig(group_size=_group_size(width))


def _group_size(width: int) -> int:
    return next(g for g in (128, 64, 32) if width % g == 0)


# mode -> (device -> (layer input width -> torchao config)); a layer no group size fits stays float
QUANTIZE_MODES: dict[str, Callable[[torch.device], Callable[[int], Any]]] = {"int8": _int8, "int4": _int4}
# which nn.Linear a mode can quantise: int4's CPU packing needs out_features % 16, groups of >= 32 inputs
_FITS: dict[str, Callable[[nn.Linear], bool]] = {
    "int8": lambda layer: True,
    "int4": lambda layer: layer.in_features % 32 == 0 and layer.out_features % 16 == 0,
}
_DESCRIPTIONS = {
    "int8": "torchao Int8WeightOnlyConfig: int8 weights, one symmetric scale per output row",
    "int4": "torchao int4 weight-only (tinygemm): int4 weights, scale and zero point per group of 128/64/32",
}


def quantize_model(model: Any, mode: str | None) -> Any:
    """Quantise ``model``'s backbone in place (``mode`` "int8" / "int4"; None: leave it float).

    Sets ``model.quantization`` to the mode. Raises ValueError for an unknown mode or a model that
    is quantised already.
    """
    if mode is None:
        return model
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is quantised already ({model.quantization})")
    from torchao.quantization import quantize_

    if model.has_lora:
        model.llm = model.llm.merge_and_unload()
        model.config.backbone = dataclasses.replace(model.config.backbone, lora=None)
    device = model.device
    if mode == "int4" and device.type == "cuda":
        model.llm.to(torch.bfloat16)
    configs = QUANTIZE_MODES[mode](device)
    linears = [m for m in model.llm.modules() if isinstance(m, nn.Linear)]
    skipped = [m for m in linears if not _FITS[mode](m)]
    for module in linears:
        if module in skipped:
            continue
        # one module at a time: each gets the config its width allows (int4 group size)
        quantize_(module, configs(module.in_features), filter_fn=lambda m, fqn, target=module: m is target)
    if skipped:
        log.warning("%d linear layer(s) kept float: their shape fits no %s kernel", len(skipped), mode)
    model.quantization = mode
    return model


def save_quantized(model: Any, directory: str | Path, mode: str) -> Path:
    """Save a float model to be served ``mode``-quantised: ``save_pretrained`` plus ``quantization.json``.

    The weights stay the float originals: torchao's symmetric int8 scale is ``max|w| / 127.5``, so
    quantising de-quantised weights again would not give back the same integers, while quantising
    the originals on every load always gives the same quantised model.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if getattr(model, "quantization", None):
        raise ValueError("save the float model: quantisation is applied again when it is loaded")
    from kiban.atomic import write_json

    directory = Path(directory)
    model.save_pretrained(directory)
    write_json(
        directory / QUANTIZATION_FILE,
        {
            "method": mode,
            "scheme": _DESCRIPTIONS[mode],
            "scope": "every nn.Linear of the LLM backbone whose shape the kernels take (weights only)",
            "library": f"torchao=={TORCHAO_VERSION}",
            "weights_on_disk": "float32 originals; quantised when the model is loaded",
        },
    )
    return directory


def saved_quantization(directory: str | Path) -> str | None:
    """The mode a saved model folder was quantised with (its ``quantization.json``), or None."""
    path = Path(directory) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        mode = json.loads(path.read_text()).get("method")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}: not a quantisation record (expected a JSON object with 'method')") from None
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"{path}: unknown quantisation method {mode!r} (known: {', '.join(QUANTIZE_MODES)})")
    return mode


def load_model(directory: str | Path, *, quantize: str | None = None, placement: Any = None) -> Any:
    """``KibanModel.from_pretrained(directory)`` in eval mode, on ``placement``'s device and dtype
    (``kiban.device.resolve_device``; None: the CPU in float32), then quantised as ``quantize`` says,
    else as the folder was saved (``quantization.json``), else left float.

    The model is placed before it is quantised: torchao picks its kernels by the device the weights
    are on (int4: tinygemm's CUDA or CPU packing), and a quantised tensor is not moved or cast after.
    """
    from kiban.fusion.model import KibanModel

    saved = saved_quantization(directory)
    if quantize is not None and saved is not None and quantize != saved:
        log.warning("%s was saved %s-quantised; quantising it as %s instead", directory, saved, quantize)
    model = KibanModel.from_pretrained(directory).eval()
    if placement is not None:
        from kiban.device import place_model

        model = place_model(model, placement)
    return quantize_model(model, quantize or saved)

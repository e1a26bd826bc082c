"""Weight-only quantisation of the backbone: ``--quantize int8|int4``.

Every ``nn.Linear`` of the LLM backbone (attention and MLP projections and the LM head) gets
quantised weights, except those of the decoder layers in ``float_layers`` (default
``DEFAULT_FLOAT_LAYERS``: the first); activations stay float, and the encoders, projectors,
embeddings and norms are untouched (they are a small part of the compute). LoRA adapters are merged
into the weights first (quantising the tiny adapter matrices would cost accuracy and buy nothing).

Why the first layer stays float: on the default model the pooled states of molecule inputs move by
~4.6x the relative weight error of the backbone's layers (Gaussian weight noise of 0.1 / 0.3 / 0.9%
moves them 0.5 / 1.4 / 4.1%), and per-row int8 rounds every weight by ~0.9%, so int8 states sit
~6% from float32's. Of the single layers, decoder layer 0 moves them most (5.0% alone; the next,
layer 2, 2.5%); kept float it takes the int8 state error to ~4.7% for 1/30 of the decode time. The
rest is spread over all layers: more float layers buy little per layer and cost speed
(benchmarks/README.md, "Quantised inference").

    int8   symmetric, one scale per output row
    int4   asymmetric, one scale and zero point per group of 128/64/32 input weights (the largest
           that divides the layer's width), tinygemm's convention

The decoder layers under the states a head reads (``head_layers``: a head on ``hidden_states[k]``
reads layers ``0..k-1``) stay float as well when the model is loaded with its heads
(``kiban.tasks.predict.load_model_with_heads``, ``model_for_head``): such a head then sees exactly
float32's states, whatever the mode.

On the CPU the layers are kiban's own (``kiban.adapt.qlinear``), calling PyTorch's packed-weight
kernels (``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``, bfloat16 activations;
int8 decode steps: kiban's AVX-512 kernel ``kiban.adapt.int8_gemv``, float32 activations):
torchao 0.18's eager int8 layer de-quantises the whole weight on every call there and is slower
than float32. On CUDA torchao does it (``Int8WeightOnlyConfig``; ``Int4WeightOnlyConfig`` with the
tile-packed layout and bfloat16 activations, so the backbone is cast to bfloat16 there).

A model is saved quantised with ``save_quantized``: ``quantization.json`` beside ``config.json``
records the scheme and the weights stay the float originals (plain safetensors); ``load_model``
(what ``kiban serve``, ``predict`` and ``embed`` use) quantises them on load, so the served model is
exactly the one quantised in memory. Disk size is therefore not reduced; memory in use is, after
load (the float weights are loaded first, then replaced and handed back to the system).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiban.adapt.int8_gemv import kernel_available
from kiban.adapt.qlinear import Int4Linear, Int8Linear

__all__ = [
    "QUANTIZATION_FILE",
    "QUANTIZE_MODES",
    "below_heads",
    "load_model",
    "quantize_model",
    "DEFAULT_FLOAT_LAYERS",
    "save_quantized",
    "saved_float_layers",
    "saved_quantization",
]

log = logging.getLogger(__name__)

QUANTIZATION_FILE = "quantization.json"
TORCHAO_VERSION = "0.18.0"  # pinned in pyproject.toml; recorded with every saved quantised model


def _cpu_int8(linear: nn.Linear) -> nn.Module:
    return Int8Linear.from_linear(linear)


def _cpu_int4(linear: nn.Linear) -> nn.Module:
    return Int4Linear.from_linear(linear, group_size=_group_size(linear.in_features))


def _cuda_int8(linear: nn.Linear) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(linear, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: module is linear)
    return linear


def _cuda_int4(linear: nn.Linear) -> nn.Module:
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    config = Int4WeightOnlyConfig(group_size=_group_size(linear.in_features), int4_packing_format="tile_packed_to_4d")
    quantize_(linear, config, filter_fn=lambda module, fqn: module is linear)
    return linear


def _group_size(width: int) -> int:
    return next(g for g in (128, 64, 32) if width % g == 0)


# (mode, device type) -> the layer that replaces an nn.Linear (the same one, quantised in place, for
# torchao). On the CPU kiban's own layers (kiban.adapt.qlinear): torchao's eager int8 there
# de-quantises the whole weight on every call and is slower than float32 (benchmarks/README.md).
_QUANTIZERS: dict[tuple[str, str], Callable[[nn.Linear], nn.Module]] = {
    ("int8", "cpu"): _cpu_int8,
    ("int4", "cpu"): _cpu_int4,
    ("int8", "cuda"): _cuda_int8,
    ("int4", "cuda"): _cuda_int4,
}
QUANTIZE_MODES = ("int8", "int4")
# decoder layers left float by default (0-based; negative: from the last). Layer 0 alone moves the
# default model's pooled states most when quantised (benchmarks/README.md, "Quantised inference"),
# and is one layer in 30 of the decode time
DEFAULT_FLOAT_LAYERS: tuple[int, ...] = (0,)
# which nn.Linear a mode can quantise: int8's kernel needs in_features % 16 (else it crashes); int4's
# packing out_features % 16 and groups of >= 32 inputs
_FITS: dict[str, Callable[[nn.Linear], bool]] = {
    "int8": lambda layer: Int8Linear.fits(layer.in_features),
    "int4": lambda layer: layer.in_features % 32 == 0 and layer.out_features % 16 == 0,
}
_DESCRIPTIONS = {
    "int8": "int8 weights, one symmetric scale per output row (CPU: aten._weight_int8pack_mm; "
    "CUDA: torchao Int8WeightOnlyConfig)",
    "int4": "int4 weights, scale and zero point per group of 128/64/32 (tinygemm; CPU: "
    "aten._weight_int4pack_mm_for_cpu; CUDA: torchao Int4WeightOnlyConfig)",
}


def quantize_model(
    model: Any,
    mode: str | None,
    *,
    float_layers: Sequence[int] | None = None,
    head_layers: Iterable[int | None] = (),
) -> Any:
    """Quantise ``model``'s backbone in place (``mode`` "int8" / "int4"; None: leave it float).

    Every ``nn.Linear`` of ``model.llm`` whose shape the mode's kernel takes is replaced by its
    quantised counterpart on the model's device, except those inside the decoder layers
    ``float_layers`` (0-based, negative from the last; None: ``DEFAULT_FLOAT_LAYERS``; ``()``:
    quantise every layer) and those below the hidden states a head reads: for each ``k`` in
    ``head_layers`` (``hidden_states[k]``, as ``KibanModel.embed(layer=k)``; None, the final states,
    keeps nothing) decoder layers ``0..k-1`` stay float, so that head sees exactly float32's states.
    Sets ``model.quantization`` to the mode. Raises ValueError for an unknown mode, a layer the
    backbone does not have, a device with no kernels, or a model that is quantised already.
    """
    if mode is None:
        return model
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is quantised already ({model.quantization})")
    float_indices = _layer_indices(model, DEFAULT_FLOAT_LAYERS if float_layers is None else float_layers)
    float_indices |= below_heads(head_layers, model.num_layers)
    device = model.device
    quantizer = _QUANTIZERS.get((mode, device.type))
    if quantizer is None:
        raise ValueError(f"--quantize {mode} runs on the CPU or CUDA, not on {device.type}")
    if model.has_lora:
        model.llm = model.llm.merge_and_unload()
        model.config.backbone = dataclasses.replace(model.config.backbone, lora=None)
    if mode == "int4" and device.type == "cuda":
        model.llm.to(torch.bfloat16)  # torchao's CUDA tinygemm takes bfloat16 activations
    if (mode, device.type) == ("int8", "cpu"):
        kernel_available()  # build (or load) the decode kernel now, not inside the first request
    kept = _linears_in_layers(model.llm, float_indices, model.num_layers)
    skipped = 0
    # list first: the walk must not see the layers it is replacing
    for name, module in list(model.llm.named_modules()):
        if not isinstance(module, nn.Linear) or id(module) in kept:
            continue
        if not _FITS[mode](module):
            skipped += 1
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.llm.get_submodule(parent_name)
        with torch.no_grad():
            setattr(parent, child, quantizer(module))
    if skipped:
        log.warning("%d linear layer(s) kept float: their shape fits no %s kernel", skipped, mode)
    _return_freed_memory()
    model.quantization = mode
    return model


def below_heads(head_layers: Iterable[int | None], num_layers: int) -> set[int]:
    """The decoder layers (0-based) whose outputs the heads reading ``hidden_states[k]`` for ``k`` in
    ``head_layers`` depend on: ``0..k-1`` for each ``k`` below ``num_layers``. A head on the final
    states (None, or ``num_layers``) reads every layer; keeping them all float would undo the
    quantisation, so it adds none (its metric moves: benchmarks/README.md, "Quantised inference").
    """
    return {i for k in head_layers if k is not None and 0 < k < num_layers for i in range(k)}


def _layer_indices(model: Any, layers: Sequence[int]) -> set[int]:
    """``layers`` as 0-based decoder layer indices (negative ones count from the last); ValueError
    for a layer the backbone does not have.
    """
    count = model.num_layers
    chosen = set()
    for index in layers:
        if not (type(index) is int and -count <= index < count):  # type(): True is an int, but no layer
            raise ValueError(
                f"float_layers: {index!r} is not a decoder layer of this backbone "
                f"(0..{count - 1}, or -1..-{count})"
            )
        chosen.add(index % count)
    return chosen


def _linears_in_layers(llm: nn.Module, indices: set[int], count: int) -> set[int]:
    """The ids of the ``nn.Linear`` modules inside decoder layers ``indices`` of ``llm``."""
    if not indices:
        return set()
    # the decoder's layers: the backbone's ModuleList of its num_layers blocks (model.layers in
    # Llama-style models, transformer.h in GPT-2-style ones)
    blocks = next(m for m in llm.modules() if isinstance(m, nn.ModuleList) and len(m) == count)
    return {id(m) for i in indices for m in blocks[i].modules() if isinstance(m, nn.Linear)}


def _return_freed_memory() -> None:
    """Hand the freed float weights back to the system (glibc keeps freed heap for reuse otherwise,
    so the process's resident memory would not show what quantisation saved).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the memory is reused, just not returned
        pass


def save_quantized(
    model: Any, directory: str | Path, mode: str, *, float_layers: Sequence[int] = DEFAULT_FLOAT_LAYERS
) -> Path:
    """Save a float model to be served ``mode``-quantised: ``save_pretrained`` plus ``quantization.json``
    (the mode and the decoder layers left float, ``float_layers`` as ``quantize_model`` takes them).

    The weights stay the float originals: quantising them on every load gives the same quantised
    model each time, on whichever device it is loaded (the CPU and CUDA kernels pack differently,
    so no one packed form would serve both).
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if getattr(model, "quantization", None):
        raise ValueError("save the float model: quantisation is applied again when it is loaded")
    float_layers = list(float_layers)
    _layer_indices(model, float_layers)  # refused before anything is written
    from kiban.atomic import write_json

    directory = Path(directory)
    model.save_pretrained(directory)
    write_json(
        directory / QUANTIZATION_FILE,
        {
            "method": mode,
            "scheme": _DESCRIPTIONS[mode],
            "scope": "every nn.Linear of the LLM backbone whose shape the kernels take (weights only), "
            "except those of the decoder layers in float_layers",
            "float_layers": float_layers,
            "library": f"torchao=={TORCHAO_VERSION} on CUDA; torch=={torch.__version__.split('+')[0]} kernels on the CPU",
            "weights_on_disk": "float32 originals; quantised when the model is loaded",
        },
    )
    return directory


def saved_quantization(directory: str | Path) -> str | None:
    """The mode a saved model folder was quantised with (its ``quantization.json``), or None."""
    record = _saved_record(directory)
    return None if record is None else record["method"]


def saved_float_layers(directory: str | Path) -> tuple[int, ...]:
    """The decoder layers a saved quantised model keeps float (``quantization.json``'s
    ``float_layers``; ``DEFAULT_FLOAT_LAYERS`` for a record without one, or no record).
    """
    record = _saved_record(directory)
    if record is None or "float_layers" not in record:
        return DEFAULT_FLOAT_LAYERS
    layers = record["float_layers"]
    if not (isinstance(layers, list) and all(type(i) is int for i in layers)):
        path = Path(directory) / QUANTIZATION_FILE
        raise ValueError(f"{path}: float_layers must be a list of decoder layer numbers, got {layers!r}")
    return tuple(layers)


def _saved_record(directory: str | Path) -> dict | None:
    path = Path(directory) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        mode = record.get("method")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}: not a quantisation record (expected a JSON object with 'method')") from None
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"{path}: unknown quantisation method {mode!r} (known: {', '.join(QUANTIZE_MODES)})")
    return record


def load_model(
    directory: str | Path,
    *,
    quantize: str | None = None,
    placement: Any = None,
    head_layers: Iterable[int | None] = (),
) -> Any:
    """``KibanModel.from_pretrained(directory)`` in eval mode, on ``placement``'s device and dtype
    (``kiban.device.resolve_device``; None: the CPU in float32), then quantised as ``quantize`` says,
    else as the folder was saved (``quantization.json``), else left float. The decoder layers kept
    float are the saved record's (``saved_float_layers``), whichever mode quantises, and those below
    ``head_layers`` (the layers of the heads that will read the model; see ``quantize_model``).

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
    return quantize_model(
        model, quantize or saved, float_layers=saved_float_layers(directory), head_layers=head_layers
    )

"""Model FLOPs and MFU (model FLOPs utilisation), as defined in PaLM (Chowdhery et al. 2022, app. B).

    FLOPs per trained token  = 6·N + 12·L·d·T
    MFU                      = (6·N·tokens + 12·L·d·Σ tokens·T) / (seconds · devices · peak FLOP/s)

N: parameters of the LLM backbone doing matmuls (the input-embedding table is a lookup and is left
out, unless it is tied to the output head, which is a matmul); L: layers; d: hidden width; T: the
(padded) sequence length each token attends over. 6 = 2 (forward) + 4 (backward) FLOPs per
parameter and token; 12·L·d·T is the attention score and value product. This is the standard
definition, counted as if every weight were trained: frozen stages (align) do less real work, and
the encoders' own FLOPs are not counted, so both make MFU read low rather than high.

The peak is a device's dense peak for the run's precision: Lightning's table of known GPUs
(``get_available_flops``), or ``callbacks.throughput.peak_tflops``. A CPU has no entry: MFU is not
reported there unless a peak is configured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kiban.fusion.backbone import base_model

__all__ = ["FORMULA", "ModelFlops", "model_flops", "peak_flops"]

FORMULA = "MFU = (6·N·tokens + 12·L·d·Σ tokens·T) / (seconds · devices · peak)"


@dataclass(frozen=True)
class ModelFlops:
    """The model sizes in the MFU formula: N parameters, L layers, width d."""
    params: int  # N
    layers: int  # L
    width: int  # d

    def step_flops(self, *, tokens: int, attention_units: int) -> float:
        """FLOPs of a step that trained ``tokens`` tokens; ``attention_units`` = Σ tokens·T."""
        return 6.0 * self.params * tokens + 12.0 * self.layers * self.width * attention_units


def model_flops(llm: nn.Module) -> ModelFlops:
    """N, L, d of a Hugging Face causal LM (peft-wrapped or not)."""
    base = base_model(llm)
    config = base.config
    embedding = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    # ds_numel: a ZeRO-3 partitioned parameter's full size (numel() is 0 on every rank)
    sizes = {id(p): getattr(p, "ds_numel", p.numel()) for p in base.parameters()}
    params = sum(sizes.values()) - (0 if tied else sizes.get(id(embedding), 0))
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    return ModelFlops(params, int(layers), int(width))


def peak_flops(
    device: torch.device, precision: str, *, override_tflops: float | None = None
) -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None, how that figure was obtained) for ``precision``."""
    if override_tflops:
        return (
            override_tflops * 1e12,
            f"{override_tflops:g} TFLOP/s per device (callbacks.throughput.peak_tflops)",
        )
    if device.type != "cuda":
        return None, f"no peak known for {device.type} (set callbacks.throughput.peak_tflops to report MFU)"
    from lightning_fabric.utilities.throughput import get_available_flops

    dtype = (
        torch.bfloat16
        if precision.startswith("bf16")
        else torch.float16
        if precision.startswith("16")
        else torch.float32
    )
    flops = get_available_flops(device, dtype)
    name = torch.cuda.get_device_name(device)
    if flops is None:
        return None, f"no peak known for {name} at {dtype} (set callbacks.throughput.peak_tflops)"
    return float(flops), f"{flops / 1e12:g} TFLOP/s per device ({name}, {dtype}, Lightning's table, dense)"

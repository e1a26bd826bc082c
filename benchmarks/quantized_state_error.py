"""Where int8's state error comes from: the default backbone's pooled molecule states (the states a
head reads, ``KibanModel.embed``) under one source of error at a time.

Model and molecules as ``quantized_inference.py`` (SmolLM2-135M GGUF, default molecule encoder,
seeded untrained projector; BBBP molecules after the first 300). Each figure is the median over
``--molecules`` of ``|h - h_float| / |h_float|``. The int8 variants are emulated in float32 (the
weight ``round(w / s) * s`` with ``s = max|w| / 127`` per row), so one source can be switched on
without the others; "kernel" rows run kiban's ``Int8Linear`` (``aten._weight_int8pack_mm``).

    sources      weight rounding, bfloat16 activations (input and output, as the kernel does),
                 both, the scale in float32 instead of bfloat16
    noise        Gaussian noise of 0.1 / 0.3 / 0.9% of each weight matrix's std on every backbone
                 linear: how much the states amplify a weight error of known size
    kinds        int8 (emulated, as the kernel) on one kind of linear only (q_proj, ..., lm_head)
    layers       int8 on one decoder layer only
    float        kiban's int8 with ``float_layers`` kept float (the option of ``quantize_model``)

    .venv/bin/python benchmarks/quantized_state_error.py [--molecules 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))


class EmulatedInt8(nn.Module):
    """An ``nn.Linear`` with per-row int8 weights and/or bfloat16 activations, computed in float32."""

    def __init__(self, linear: nn.Linear, *, weights: bool, activations: bool, bf16_scale: bool = True) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        if weights:
            scale = w.abs().amax(1).clamp(min=1e-12) / 127
            scale = scale.bfloat16().float() if bf16_scale else scale
            w = torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None]
        self.weight, self.bias, self.activations = w, linear.bias, activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.bfloat16().float() if self.activations else x
        y = x @ self.weight.T
        y = y.bfloat16().float() if self.activations else y  # the kernel returns bfloat16
        return y if self.bias is None else y + self.bias


def replaced(model, choose, make):
    """A copy of ``model`` whose backbone linears named ``choose(name)`` are ``make(linear)``."""
    model = copy.deepcopy(model)
    for name, module in list(model.llm.named_modules()):
        if isinstance(module, nn.Linear) and choose(name):
            parent, _, child = name.rpartition(".")
            setattr(model.llm.get_submodule(parent), child, make(module))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from heads_vs_generation import load_molecules
    from quantized_inference import build_model, states

    from kiban.adapt.quantize import quantize_model

    smiles = load_molecules(300 + args.molecules)[0][300:]
    reference = build_model()
    base = states(reference, smiles)
    load_before, started = os.getloadavg(), time.time()

    def error(model) -> float:
        h = states(model, smiles)
        return float(((h - base).norm(dim=1) / base.norm(dim=1)).median())

    def emulated(choose=lambda name: True, **kind):
        return replaced(reference, choose, lambda linear: EmulatedInt8(linear, **kind))

    def row(section: str, what: str, model) -> None:
        print(f"| {section} | {what} | {error(model):.4f} |", flush=True)

    print("| test | variant | median state error |")
    print("| --- | --- | --- |")
    row("sources", "kernel int8 (Int8Linear, every layer)", quantize_model(copy.deepcopy(reference), "int8", float_layers=()))
    row("sources", "weights rounded + bf16 activations", emulated(weights=True, activations=True))
    row("sources", "weights rounded, float32 activations", emulated(weights=True, activations=False))
    row("sources", "weights rounded, float32 activations, float32 scale",
        emulated(weights=True, activations=False, bf16_scale=False))
    row("sources", "float weights, bf16 activations", emulated(weights=False, activations=True))
    for relative in (0.001, 0.003, 0.009):
        noisy = copy.deepcopy(reference)
        generator = torch.Generator().manual_seed(1)
        for name, module in noisy.llm.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                w = module.weight.data
                w.add_(torch.randn(w.shape, generator=generator) * w.std() * relative)
        row("noise", f"Gaussian weight noise {relative:.1%} of std", noisy)
    kinds = sorted({name.rsplit(".", 1)[-1] for name, m in reference.llm.named_modules() if isinstance(m, nn.Linear)})
    for kind in kinds:
        row("kinds", f"int8 on {kind} only", emulated(lambda name: name.rsplit(".", 1)[-1] == kind, weights=True, activations=True))
    for layer in range(reference.num_layers):
        row("layers", f"int8 on decoder layer {layer} only",
            emulated(lambda name: f".layers.{layer}." in name, weights=True, activations=True))
    for kept in [(0,), (0, 1, 2), (0, 1, 2, -2, -1), (0, 1, 2, 9, 11, -2, -1)]:
        row("float", f"kernel int8, float_layers={kept}", quantize_model(copy.deepcopy(reference), "int8", float_layers=kept))
    print(f"\n{args.molecules} molecules; load average before {' '.join(f'{v:.1f}' for v in load_before)}, after "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; {time.time() - started:.0f} s; {args.threads} threads; "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()

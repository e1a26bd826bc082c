"""Weight-only linear kernels on the CPU at SmolLM2-135M's real shapes: float32 vs int8 vs int4.

One ``y = x @ W.T`` per call, ``x`` float32 [batch, in], for each of the backbone's linear shapes
(in -> out: 576 -> 576 attention q/o, 576 -> 192 k/v, 576 -> 1536 MLP gate/up, 1536 -> 576 MLP down,
576 -> 49152 LM head) at batch 1 and batch 8:

    float32          ``F.linear`` (MKL sgemm)
    torchao int8     torchao 0.18 ``Int8WeightOnlyConfig`` on an ``nn.Linear`` (eager)
    int8 pack_mm     ``kiban.adapt.qlinear.Int8Linear``: ``aten._weight_int8pack_mm``, one scale per row,
                     bfloat16 activations inside the kernel (float32 in and out)
    torchao int4     torchao 0.18 ``PrototypeInt4WeightOnlyConfig`` (``Int4OpaqueTensor``), group 64,
                     float32 activations
    int4 pack_mm     ``kiban.adapt.qlinear.Int4Linear``: ``aten._weight_int4pack_mm_for_cpu``, group 64,
                     bfloat16 activations inside the kernel

The kernels run in turn, ``--rounds`` times round (so a burst of load from other jobs on a shared
machine does not fall on one kernel alone); each kernel's best round counts, a round being the mean
of ``--calls`` calls. Prints a Markdown table of microseconds per call, the speed-up over float32
(×, above 1 is faster) and the largest error relative to the float32 output's largest value.

    .venv/bin/python benchmarks/quantized_kernels.py [--rounds 15] [--calls 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from torch import nn

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]


def kernels(linear: nn.Linear) -> dict[str, nn.Module]:
    """Every kernel under test, each built from a copy of ``linear``."""
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from kiban.adapt.qlinear import Int4Linear, Int8Linear

    torchao_int8, torchao_int4 = copy.deepcopy(linear), copy.deepcopy(linear)
    quantize_(torchao_int8, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: True)
    quantize_(torchao_int4, PrototypeInt4WeightOnlyConfig(group_size=64), filter_fn=lambda m, fqn: True)
    return {
        "float32": linear,
        "torchao int8": torchao_int8,
        "int8 pack_mm": Int8Linear.from_linear(linear),
        "torchao int4": torchao_int4,
        "int4 pack_mm": Int4Linear.from_linear(linear, group_size=64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"load average before: {os.getloadavg()}")
    names = ["float32", "torchao int8", "int8 pack_mm", "torchao int4", "int4 pack_mm"]
    print("| in → out | batch | " + " | ".join(f"{n} µs" for n in names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |", flush=True)
    for width, out in SHAPES:
        linear = nn.Linear(width, out, bias=False).eval()
        candidates = kernels(linear)
        for batch in (1, 8):
            x = torch.randn(batch, width)
            best = dict.fromkeys(candidates, float("inf"))
            with torch.no_grad():
                reference = linear(x)
                error = {n: float((k(x) - reference).abs().max() / reference.abs().max()) for n, k in candidates.items()}
                for _ in range(args.rounds):
                    for name, kernel in candidates.items():
                        kernel(x)  # warm
                        started = time.perf_counter()
                        for _ in range(args.calls):
                            kernel(x)
                        best[name] = min(best[name], (time.perf_counter() - started) / args.calls)
            base = best["float32"]
            cells = [f"{base * 1e6:.0f}"] + [
                f"{best[n] * 1e6:.0f} (×{base / best[n]:.2f}, err {error[n]:.3f})" for n in names[1:]
            ]
            print(f"| {width} → {out} | {batch} | " + " | ".join(cells) + " |", flush=True)
    print(f"load average after: {os.getloadavg()}")

if __name__ == "__main__":
    main()

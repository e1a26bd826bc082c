"""Where a command runs the model: ``--device auto|cpu|cuda|cuda:N`` and the precision that goes with it.

One helper for every command that runs the model (serve, finetune, predict, embed, variants,
quickstart), so they all read the flag, choose the precision and refuse a missing device alike:

    add_device_argument(parser)               # in the command's argument builder
    placement = resolve_device(args.device)   # first thing in the command: a missing GPU fails here
    model = place_model(model, placement)     # weights on the device, in its precision

auto is CUDA when torch sees a GPU, else the CPU. On CUDA the weights are bfloat16 where the GPU
supports it (compute capability 8.0 and up: A100, H100, L4, ...), float32 otherwise: float16
overflows in activations of models trained in bf16/fp32, so it is never chosen silently. On the
CPU the weights stay float32 (bf16 matmuls are slower than fp32 on most CPUs).
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # torch is imported on use: every command's parser imports this module
    import torch

__all__ = ["DEVICE_CHOICES", "DeviceError", "Placement", "add_device_argument", "place_model", "resolve_device"]

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A ``--device`` that names no device on this machine; the message is one line that says why."""


class Placement(NamedTuple):
    """A device and the dtype the model's weights take there."""

    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        """``cuda:0 (NVIDIA H100, bfloat16)`` / ``cpu (float32)``: for logs and reports."""
        import torch

        dtype = str(self.dtype).removeprefix("torch.")
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)}, {dtype})"
        return f"{self.device} ({dtype})"


def add_device_argument(parser: argparse.ArgumentParser | Any, *, default: str = "auto") -> None:
    """Add ``--device`` to a command's parser (or argument group)."""
    parser.add_argument(
        "--device",
        default=default,
        metavar=DEVICE_CHOICES,
        help="where the model runs: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or "
        "cuda:N; bfloat16 on GPUs that support it, float32 on the CPU (default: %(default)s)",
    )


def resolve_device(text: str = "auto") -> Placement:
    """The device and weight dtype ``text`` names; ``DeviceError`` when this machine lacks it."""
    import torch

    match = _PATTERN.match(text.strip().lower())
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        raise DeviceError(f"--device {text!r} is not a device; use one of {DEVICE_CHOICES}")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return Placement(torch.device("cpu"), torch.float32)
    if not torch.cuda.is_available():
        why = (
            "this torch is built without CUDA"
            if torch.version.cuda is None
            else "torch sees no GPU (no driver, or CUDA_VISIBLE_DEVICES hides them)"
        )
        raise DeviceError(f"--device {text}: no CUDA device here ({why}); use --device cpu")
    count = torch.cuda.device_count()
    device = torch.device("cuda", int(index) if index is not None else torch.cuda.current_device())
    if device.index >= count:
        raise DeviceError(
            f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    major, _ = torch.cuda.get_device_capability(device)
    return Placement(device, torch.bfloat16 if major >= 8 else torch.float32)


def place_model(model: Any, placement: Placement) -> Any:
    """Move ``model`` (any ``nn.Module``) to the placement's device and cast its floating weights to
    its dtype; returns the model. Integer buffers (token ids, counters) keep their dtype.
    """
    return model.to(device=placement.device, dtype=placement.dtype)

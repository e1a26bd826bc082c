"""Distributed-strategy presets shipped as files: ``hpc/presets/<strategy>.json``.

One file per YAML ``trainer.strategy`` that needs settings beyond its name:

    deepspeed_stage_2[_offload].json   DeepSpeed ZeRO-2 (optimizer states + gradients sharded)
    deepspeed_stage_3[_offload].json   DeepSpeed ZeRO-3 (parameters sharded too)
    fsdp.json                          PyTorch FSDP settings for Lightning's FSDPStrategy

The DeepSpeed files hold only what is independent of the run (the ZeRO section); the values that
belong to the run — micro-batch size, gradient accumulation, clipping, precision — come from the
YAML, filled in by :func:`deepspeed_config` on the raw-DeepSpeed CPU path and by Lightning's
``DeepSpeedStrategy`` on GPUs, so both paths read the same file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

__all__ = ["PRESET_DIR", "deepspeed_config", "list_presets", "load_preset"]

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def list_presets() -> list[str]:
    """The names of the shipped DeepSpeed/FSDP presets, sorted."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset file ``hpc/presets/<name>.json`` as a dict (a fresh copy each call)."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no strategy preset {name!r} in {PRESET_DIR} (presets: {', '.join(list_presets())})"
        )
    return copy.deepcopy(json.loads(path.read_text()))


def deepspeed_config(
    name: str,
    *,
    micro_batch_size: int,
    accumulate_grad_batches: int,
    gradient_clip_val: float | None,
    precision: str,
) -> dict[str, Any]:
    """A complete DeepSpeed config: preset ``name`` plus the run's batch, clipping and precision.

    This is what Lightning's ``DeepSpeedStrategy`` derives from its Trainer arguments; the raw
    ``deepspeed.initialize`` path (CPU) needs it spelled out.
    """
    config = load_preset(name)
    config.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=accumulate_grad_batches,
        gradient_clipping=gradient_clip_val or 0.0,
    )
    config["bf16"] = {"enabled": precision.startswith("bf16")}
    config["fp16"] = {"enabled": precision.startswith("16")}
    return config

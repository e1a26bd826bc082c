"""Whole weights out of any kiban checkpoint, sharded or not (``run.init_from``, ``kiban export``).

A checkpoint (``checkpoint.py``) holds the trainer's own state in one of four forms:

    state.ckpt            a file: one process, DDP, FSDP with full state dicts (Lightning)
    state.ckpt/<tag>/     DeepSpeed ZeRO-2/3 under Lightning (GPU runs): ``latest`` names the tag
    state.ckpt/.metadata  FSDP with sharded state dicts (torch.distributed.checkpoint, Lightning)
    state/                raw DeepSpeed ZeRO-2/3 on the CPU (``deepspeed_cpu.py``), tag "state"

``checkpoint_weights`` reads each into one state dict of whole float tensors, keyed as the
LightningModule names them (``model.`` + KibanModel names; ``objective.`` for pretraining), in
one process without a process group: ZeRO partitions are merged by DeepSpeed's own
``zero_to_fp32`` (frozen parameters included), FSDP shards by torch's DCP reader. It reads the
shards every rank wrote, so it needs the checkpoint on a filesystem they all share — which Slurm
runs already need for resuming.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from kiban.train.checkpoint import CheckpointError, complete_checkpoints, verify_checkpoint

__all__ = ["checkpoint_weights", "find_checkpoint", "load_exactly", "load_stage_weights"]

log = logging.getLogger(__name__)

_LIGHTNING_WRAPPER = "_forward_module."  # DeepSpeed wraps the LightningModule under this name
_RAW_DEEPSPEED_TAG = "state"


def find_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a checkpoint directory; for a run directory, its newest complete checkpoint."""
    path = Path(path)
    if (path / "manifest.json").is_file() or path.name.startswith("ckpt-"):
        return path
    complete = complete_checkpoints(path / "checkpoints")
    if complete:
        return complete[-1][1]
    if path.is_dir():
        raise CheckpointError(f"{path} is neither a kiban checkpoint nor a run directory with checkpoints")
    raise CheckpointError(f"checkpoint {path} does not exist")


def checkpoint_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The LightningModule's whole state dict from a verified checkpoint, whatever its strategy."""
    checkpoint = Path(checkpoint)
    verify_checkpoint(checkpoint)
    state = checkpoint / "state.ckpt"
    if state.is_file():
        weights = torch.load(state, map_location="cpu", weights_only=True)["state_dict"]
    elif (state / ".metadata").is_file():
        weights = _fsdp_sharded(state)
    elif state.is_dir():
        weights = _zero(state, _tag(state))
    elif (checkpoint / _RAW_DEEPSPEED_TAG).is_dir():
        # the raw loop's engine wraps the KibanModel itself: name it as the LightningModule does
        weights = {f"model.{k}": v for k, v in _zero(checkpoint, _RAW_DEEPSPEED_TAG).items()}
    else:
        raise CheckpointError(f"checkpoint {checkpoint} holds neither state.ckpt nor a DeepSpeed state/ directory")
    return {k.removeprefix(_LIGHTNING_WRAPPER): v for k, v in weights.items()}


def load_stage_weights(model: Any, checkpoint: Path) -> None:
    """Start ``model`` (a KibanModel) from the weights of an earlier stage's checkpoint, sharded or
    not (``run.init_from``). Parameters the earlier stage did not have (new LoRA adapters) keep their
    initialisation; anything else that does not fit is an error.
    """
    state = checkpoint_weights(checkpoint)
    names = set(model.state_dict())
    weights = {_peft_name(k.removeprefix("model."), names): v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in _untied(model, missing) if "lora_" not in k]
    if missing or unexpected:
        raise ValueError(
            f"run.init_from {checkpoint} does not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    log.info("initialised the model from %s", checkpoint)


def load_exactly(module: Any, weights: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """Load ``weights`` into ``module``; a missing (untied) or unexpected name is a ``CheckpointError``."""
    missing, unexpected = module.load_state_dict(weights, strict=False)
    missing = _untied(module, missing)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {checkpoint} does not match the model its config.yaml describes: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


# ----------------------------------------------------------------------------------------------


def _zero(directory: Path, tag: str) -> dict[str, torch.Tensor]:
    # DeepSpeed reports on stdout, which `kiban export` keeps for the path it wrote
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # frozen parameters too: the align stage freezes the encoders and the LLM
        state = get_fp32_state_dict_from_zero_checkpoint(
            str(directory), tag=tag, exclude_frozen_parameters=False
        )
    return {k: v.detach().clone() for k, v in state.items()}  # own storage: no views of merged buffers


def _tag(state: Path) -> str:
    latest = state / "latest"
    if latest.is_file():
        return latest.read_text().strip()
    tags = [p.name for p in state.iterdir() if p.is_dir() and any(p.glob("*model_states.pt"))]
    if len(tags) != 1:
        raise CheckpointError(f"{state}: no DeepSpeed 'latest' file and {len(tags)} tag directories")
    return tags[0]


def _fsdp_sharded(state: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    # only the model entry: the optimizer's shards (twice the model's size for Adam) stay on disk
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
        warnings.simplefilter("ignore", UserWarning)
        loaded = _load_state_dict_from_keys(keys={"model"}, storage_reader=FileSystemReader(str(state)))
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in loaded["model"].items()}


def _untied(model: Any, missing: list[str]) -> list[str]:
    """The missing names that are not one storage with a loaded one (a tied LM head may be saved once)."""
    state = model.state_dict(keep_vars=True)
    loaded = {state[k].data_ptr() for k in state if k not in set(missing)}
    return [k for k in missing if state[k].data_ptr() not in loaded]


def _peft_name(name: str, names: set[str]) -> str:
    """A plain backbone's parameter name as it reads once peft wraps the LLM for LoRA:
    ``llm.model.x.q_proj.weight`` -> ``llm.base_model.model.model.x.q_proj.base_layer.weight``.
    """
    if name in names or not name.startswith("llm."):
        return name
    wrapped = "llm.base_model.model." + name.removeprefix("llm.")
    if wrapped in names:
        return wrapped
    head, _, leaf = wrapped.rpartition(".")
    layered = f"{head}.base_layer.{leaf}"
    return layered if layered in names else name

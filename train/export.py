"""The servable form of a run: ``kiban export``, and the ``model/`` (``encoder/`` for pretraining)
every finished fit leaves behind, whatever its strategy. Reading the (sharded) checkpoint is
``weights.py``'s; this module builds the model the checkpoint's config.yaml describes, loads the
whole weights and saves it as ``save_pretrained`` (or ``save_encoder``) does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kiban.atomic import staged_folder
from kiban.train.checkpoint import CheckpointError
from kiban.train.config import TrainConfig, load_config
from kiban.train.weights import checkpoint_weights, find_checkpoint, load_exactly

__all__ = ["export_checkpoint", "export_encoder", "export_model"]

log = logging.getLogger(__name__)


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the servable form of a checkpoint (or of a run directory's newest one) to ``out``:
    ``save_pretrained``'s folder for align/instruct, ``save_encoder``'s for pretraining. Returns ``out``.
    """
    checkpoint = find_checkpoint(checkpoint)
    config_file = checkpoint / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has no config.yaml; it was not written by kiban fit")
    config = load_config(config_file)
    weights = checkpoint_weights(checkpoint)
    step = _step(checkpoint)
    if config.stage == "pretrain":
        return export_encoder(_pretrain_module(config, weights, checkpoint), Path(out), step=step)
    from kiban.fusion.model import KibanModel

    model = KibanModel.from_config(config.model)
    load_exactly(model, {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}, checkpoint)
    return export_model(model, Path(out))


def export_model(model: Any, target: Path) -> Path:
    """The model as ``save_pretrained`` writes it (what ``kiban serve`` and ``kiban finetune
    --model`` read), replacing an older export only once the new one is complete.
    """
    with staged_folder(target) as staging:
        model.save_pretrained(staging)
    log.info("saved the trained model to %s (kiban serve %s)", target, target)
    return target


def export_encoder(module: Any, target: Path, *, step: int) -> Path:
    """A pretraining module's encoder alone (``save_encoder``: config.json + model.safetensors),
    replacing an older export only once the new one is complete.
    """
    from kiban.encoders.pretraining import save_encoder

    objective = module.objective
    with staged_folder(target) as staging:
        save_encoder(objective.encoder, staging, extra={"objective": objective.name, "step": step})
    log.info("saved the pretrained %s encoder to %s", objective.encoder.modality, target)
    return target


# ----------------------------------------------------------------------------------------------


def _pretrain_module(config: TrainConfig, weights: dict[str, torch.Tensor], checkpoint: Path) -> Any:
    from kiban.train.pretrain_module import PretrainLightningModule

    module = PretrainLightningModule(config=config)
    module.configure_model()
    load_exactly(module, weights, checkpoint)
    return module


def _step(checkpoint: Path) -> int:
    import json

    meta = checkpoint / "meta.json"
    return int(json.loads(meta.read_text())["step"]) if meta.is_file() else -1



"""The LightningModule of ``stage: pretrain``: one encoder and its self-supervised objective.

Thin glue, like ``KibanLightningModule``: the encoder and the objective (which owns the encoder as
``objective.encoder`` and its prediction heads) are built in ``configure_model``, so DeepSpeed and
FSDP can shard them; the loss is the objective's; the optimizer and schedule are the same
``optim.py`` builders as the other stages. Each step leaves its figures in ``self.stats`` (loss,
the objective's metrics, lr, ids, samples, tokens) for the step log, the NaN guard and the
throughput monitor.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kiban.data.resumable import TrainBatch
from kiban.encoders.base import create_encoder
from kiban.encoders.pretraining import PretrainObjective, create_objective
from kiban.train.config import TrainConfig, config_from_dict
from kiban.train.flops import ModelFlops
from kiban.train.module import StageModule, StepStats
from kiban.train.pretrain_data import PretrainProcessor

__all__ = ["PretrainLightningModule", "build_pretrain_encoder"]

log = logging.getLogger(__name__)


def build_pretrain_encoder(config: TrainConfig) -> Any:
    """The encoder the ``pretrain`` section describes (``{preset, ...overrides}`` or ``{config}``)."""
    p = config.pretrain
    spec = dict(p.encoder or {})
    if "config" in spec:
        return create_encoder(p.modality, dict(spec["config"]))
    preset = spec.pop("preset", None)
    return create_encoder(p.modality, preset=preset, **spec)


def _loads_weights(spec: dict[str, Any]) -> bool:
    """Whether an encoder spec (``{preset, ...}`` or ``{config: {...}}``) names weights to load."""
    values = {**spec, **(spec.get("config") or {})}
    return any(values.get(key) for key in ("weights_path", "hf_path", "path"))


class PretrainLightningModule(StageModule):
    """Pretrains one encoder on its objective. ``config``: the run's TrainConfig (or its dict)."""

    def __init__(self, *, config: TrainConfig | dict[str, Any]) -> None:
        """Keep the config only; the encoder and objective come in ``configure_model``."""
        super().__init__()
        self.config = config if isinstance(config, TrainConfig) else config_from_dict(config)
        self.save_hyperparameters({"config": self.config.to_dict()})
        self.objective: PretrainObjective | None = None
        self.stats = StepStats()
        self._stats_step = -1
        self.init_weights = True  # kept for the runner's symmetry with the fused stages

    def configure_model(self) -> None:
        """Build the encoder and its objective (where DeepSpeed / FSDP can shard them)."""
        if self.objective is not None:  # Lightning may call this again (validate after fit)
            return
        p = self.config.pretrain
        encoder = build_pretrain_encoder(self.config)
        self.objective = create_objective(p.modality, encoder, name=p.objective, **p.options)
        if not _loads_weights(p.encoder):  # from scratch: start as the objective's own training does
            self.objective.init_for_training()
        trainable = sum(q.numel() for q in self.objective.parameters() if q.requires_grad)
        total = sum(q.numel() for q in self.objective.parameters())
        log.info(
            "pretrain %s/%s: %d of %d parameters trainable", p.modality, self.objective.name, trainable, total
        )

    @property
    def processor(self) -> PretrainProcessor:
        """Crops, featurizes and masks records for the data module (built with the objective)."""
        if self.objective is None:
            raise RuntimeError("the objective is built in configure_model(); no processor before that")
        return PretrainProcessor(
            self.objective.encoder.featurizer, self.objective.masker, crop=self.config.pretrain.crop
        )

    @property
    def encoder(self) -> Any:
        """The encoder being pretrained."""
        return self.objective.encoder

    def model_flops(self) -> ModelFlops:
        """N (trained parameters), L, d for the throughput monitor's 6·N·tokens estimate."""
        params = sum(q.numel() for q in self.objective.parameters() if q.requires_grad)
        config = self.encoder.config
        layers = int(getattr(config, "num_layers", 0) or 0)
        return ModelFlops(params, layers, int(self.encoder.output_dim))

    # -- steps -----------------------------------------------------------------------------------

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor:
        """The objective's loss; its figures go to ``self.stats`` and the logger."""
        if self.trainer.global_step != self._stats_step:  # micro-batches of one step share global_step
            self.stats, self._stats_step = StepStats(), self.trainer.global_step
            self.stats.lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        out = self.objective(batch.inputs)
        s = self.stats
        s.loss += float(out.loss.detach())
        s.micro_batches += 1
        s.samples += len(batch.ids)
        s.ids += batch.ids
        tokens = batch.inputs.get("tokens")
        if tokens is not None:
            s.padded_tokens += tokens.numel()
            pad = getattr(self.objective.masker, "pad_id", None)  # a masker over tokens pads with it
            s.tokens += tokens.numel() if pad is None else int(tokens.ne(pad).sum())
        for name, value in out.metrics.items():  # summed over micro-batches, averaged in the log
            s.metrics[name] = s.metrics.get(name, 0.0) + float(value)
        size = len(batch.ids)
        self.log("train/loss", out.loss.detach(), on_step=True, prog_bar=True, batch_size=size)
        for name, value in out.metrics.items():
            self.log(f"train/{name}", value, on_step=True, batch_size=size)
        return out.loss

    def validation_step(self, batch: TrainBatch, batch_idx: int) -> None:
        """The objective's loss and metrics on held-out data, averaged over the epoch."""
        out = self.objective(batch.inputs)
        size = len(batch.ids)
        self.log("val/loss", out.loss, on_epoch=True, sync_dist=True, batch_size=size)
        for name, value in out.metrics.items():
            self.log(f"val/{name}", value, on_epoch=True, sync_dist=True, batch_size=size)

    # -- optimization ----------------------------------------------------------------------------

    def trained_parameters(self) -> Any:
        """(name, parameter) pairs the optimizer sees: the objective's, the encoder's included."""
        return self.objective.named_parameters()

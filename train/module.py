"""The LightningModule of the align and instruct stages: thin glue around KibanModel.

The fused model is built in ``configure_model`` (not ``__init__``), so DeepSpeed ZeRO-3 and FSDP
can create its parameters already sharded. The module itself holds only plain config values; the
objectives live in ``objectives.py``, optimizer and schedule in ``optim.py``.

Each training step leaves its figures in ``self.stats`` (loss, record ids, samples, tokens); the
callbacks (throughput, NaN guard, step log) read them there rather than recomputing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from kiban.data.resumable import TrainBatch
from kiban.fusion.model import KibanModel, apply_freeze_policy
from kiban.train.config import TrainConfig, config_from_dict
from kiban.train.objectives import FrozenPrefix, fused_losses
from kiban.train.optim import build_optimizer, build_scheduler
from kiban.train.weights import load_stage_weights

__all__ = ["KibanLightningModule", "StageModule", "StepStats"]

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What the current optimizer step has seen so far (summed over its micro-batches)."""

    loss: float = 0.0
    micro_batches: int = 0
    samples: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    ids: list[str] = field(default_factory=list)
    grad_norm: float | None = None
    lr: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # an objective's figures, summed

    @property
    def mean_loss(self) -> float:
        """Mean loss over the step's micro-batches so far."""
        return self.loss / max(1, self.micro_batches)


class StageModule(pl.LightningModule):
    """What every stage's LightningModule shares: the config's optimizer, schedule and clipping.

    Subclasses hold ``config`` (a ``TrainConfig``) and name what trains in ``trained_parameters``.
    """

    config: TrainConfig

    def trained_parameters(self) -> Any:  # pragma: no cover - abstract
        """(name, parameter) pairs the optimizer sees; ``requires_grad`` decides which are updated."""
        raise NotImplementedError

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer and its per-step learning-rate schedule from the config."""
        strategy = self.config.trainer.strategy
        optimizer = build_optimizer(
            self.trained_parameters(),
            self.config.optim,
            cpu_adam=strategy.startswith("deepspeed") and strategy.endswith("_offload"),
        )
        scheduler = build_scheduler(optimizer, self.config.schedule, max_steps=self.config.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip gradients by Lightning's means, or by FSDP's own ``clip_grad_norm_`` under FSDP."""
        if gradient_clip_val and self.config.trainer.strategy == "fsdp":
            # Lightning's FSDP precision plugin refuses norm clipping; FSDP's own method knows the shards
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(
            optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
        )


class KibanLightningModule(StageModule):
    """Trains a KibanModel at one stage. ``config``: the whole run's TrainConfig (or its dict)."""

    def __init__(self, *, config: TrainConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = config if isinstance(config, TrainConfig) else config_from_dict(config)
        self.save_hyperparameters({"config": self.config.to_dict()})
        self.model: KibanModel | None = None
        self.stats = StepStats()
        self._stats_step = -1  # the global step self.stats belongs to
        self.init_weights = True  # False when resuming: the checkpoint brings the weights
        self.prefix = FrozenPrefix()  # the shared text prefix's keys and values while the LLM is frozen

    def configure_model(self) -> None:
        """Build the model once, load ``run.init_from`` weights and freeze what the stage does not train."""
        if self.model is not None:  # Lightning may call this again (e.g. validate after fit)
            return
        self.model = KibanModel.from_config(self.config.model)
        if self.config.run.init_from and self.init_weights:
            load_stage_weights(self.model, Path(self.config.run.init_from))
        counts = apply_freeze_policy(self.model, self.config.stage)
        log.info("stage %s: trainable parameters %s", self.config.stage, counts)

    @property
    def processor(self):
        """Tokenizer + featurizers for the data loaders (they belong to the model)."""
        if self.model is None:
            raise RuntimeError("the model is built in configure_model(); no processor before that")
        return self.model.processor

    # -- steps -----------------------------------------------------------------------------------

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor:
        """One micro-batch: the fused loss, added to the step's stats and logged."""
        if self.trainer.global_step != self._stats_step:  # micro-batches of one step share global_step
            self.stats, self._stats_step = StepStats(), self.trainer.global_step
            self.stats.lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        out = fused_losses(
            self.model,
            batch.inputs,
            contrastive_weight=self.config.loss.contrastive_weight,
            temperature=self.config.loss.temperature,
            prefix=self.prefix,
        )
        s = self.stats
        s.loss += float(out.loss.detach())
        s.micro_batches += 1
        s.samples += len(batch.ids)
        s.tokens += out.tokens
        s.padded_tokens += out.padded_length * len(batch.ids)
        s.ids += batch.ids
        size = len(batch.ids)
        self.log("train/loss", out.loss.detach(), on_step=True, prog_bar=True, batch_size=size)
        if out.contrastive is not None:
            self.log("train/lm_loss", out.lm_loss, on_step=True, batch_size=size)
            self.log("train/contrastive", out.contrastive, on_step=True, batch_size=size)
        return out.loss

    def validation_step(self, batch: TrainBatch, batch_idx: int) -> None:
        """Log the loss of one validation batch (``val/loss``)."""
        self._eval_step(batch, "val")

    def test_step(self, batch: TrainBatch, batch_idx: int) -> None:
        """Log the loss of one test batch (``test/loss``)."""
        self._eval_step(batch, "test")

    def _eval_step(self, batch: TrainBatch, split: str) -> None:
        out = fused_losses(self.model, batch.inputs, prefix=self.prefix)
        self.log(f"{split}/loss", out.loss, on_epoch=True, sync_dist=True, batch_size=len(batch.ids))

    # -- optimization ----------------------------------------------------------------------------

    def trained_parameters(self) -> Any:
        """(name, parameter) pairs the optimizer sees: the fused model's (the freeze policy decides)."""
        return self.model.named_parameters()

"""YAML ``trainer.strategy`` -> a Lightning strategy, reading the presets shipped under ``hpc/presets``.

auto                      Lightning's choice (one device: no wrapper)
ddp                       DistributedDataParallel: gloo on CPU, NCCL on GPU
fsdp                      FSDPStrategy with hpc/presets/fsdp.json (GPU only)
deepspeed_stage_{2,3}     DeepSpeedStrategy(config=hpc/presets/<name>.json) on GPUs; on the CPU the
deepspeed_*_offload       same file drives a raw ``deepspeed.initialize`` loop (deepspeed_cpu.py),
                          because Lightning's DeepSpeed strategy refuses the CPU
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Iterator

from kiban.hpc.presets import load_preset
from kiban.train.config import TrainConfig

__all__ = ["build_strategy", "uses_raw_deepspeed"]


def uses_raw_deepspeed(config: TrainConfig, *, accelerator: str) -> bool:
    """Whether the run uses the raw DeepSpeed loop: a DeepSpeed strategy on the CPU."""
    return config.trainer.strategy.startswith("deepspeed") and accelerator == "cpu"


def build_strategy(config: TrainConfig, *, accelerator: str, world_size: int) -> Any:
    """The Lightning strategy (or ``"auto"``) for ``trainer.strategy`` on this accelerator and world size."""
    name = config.trainer.strategy
    if name == "auto" and world_size == 1:
        return "auto"
    if name in ("auto", "ddp"):
        from pytorch_lightning.strategies import DDPStrategy

        # A batch without some modality leaves that projector without a gradient; DDP must know
        # parameters may go unused, or it waits forever for their all-reduce.
        return DDPStrategy(
            process_group_backend="gloo" if accelerator == "cpu" else "nccl", find_unused_parameters=True
        )
    if name == "fsdp":
        return _fsdp(load_preset("fsdp"))
    # Lightning fills micro-batch size, accumulation, clipping and precision from the Trainer.
    return _deepspeed_strategy_class()(config=load_preset(name))


def _deepspeed_strategy_class() -> type:
    from pytorch_lightning.strategies import DeepSpeedStrategy

    class WholeInitDeepSpeedStrategy(DeepSpeedStrategy):
        """ZeRO-3 that builds the model whole (on the host) and partitions it in
        ``deepspeed.initialize``, instead of under ``deepspeed.zero.Init``.

        zero.Init shards each submodule's parameters the moment its ``__init__`` returns; fair-esm's
        ESM-2 then initialises a child's weights from the parent and meets an empty shard
        ("Fan in and fan out can not be computed"). The price: each rank holds the whole model in
        host memory once, while it is built.
        """

        @contextmanager
        def model_sharded_context(self) -> Iterator[None]:
            self._init_config_if_needed()
            yield

    return WholeInitDeepSpeedStrategy


def _fsdp(preset: dict[str, Any]) -> Any:
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    preset = dict(preset)
    min_params = int(preset.pop("auto_wrap_min_params", 1_000_000))
    return FSDPStrategy(
        auto_wrap_policy=functools.partial(size_based_auto_wrap_policy, min_num_params=min_params), **preset
    )

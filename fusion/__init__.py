"""Fusion: projectors into the LLM's token space, the backbone, and the fused multimodal model."""

from kiban.fusion.backbone import BackboneConfig, LoraSettings, byte_tokenizer, load_backbone, smollm2_gguf
from kiban.fusion.merge import merge_modality_tokens
from kiban.fusion.model import STAGES, KibanConfig, KibanModel, apply_freeze_policy, default_config
from kiban.fusion.projector import ProjectorConfig, create_projector, list_projectors, register_projector
from kiban.fusion.prompt import IGNORE_INDEX, FusedBatch, KibanProcessor

__all__ = [
    "IGNORE_INDEX",
    "STAGES",
    "BackboneConfig",
    "FusedBatch",
    "KibanConfig",
    "KibanModel",
    "KibanProcessor",
    "LoraSettings",
    "ProjectorConfig",
    "apply_freeze_policy",
    "byte_tokenizer",
    "create_projector",
    "default_config",
    "list_projectors",
    "load_backbone",
    "merge_modality_tokens",
    "register_projector",
    "smollm2_gguf",
]

"""Tiny, seeded builders for tests, benchmarks and debugging (like anndata's ``gen_adata``).

Everything here builds in well under a second on a CPU and needs no files: tiny encoder presets,
a tiny random Llama backbone with the byte-level tokenizer, and example records that mix every
modality with text.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from kiban.encoders.base import encoder_spec, list_encoders
from kiban.fusion.backbone import byte_tokenizer
from kiban.fusion.model import KibanConfig, KibanModel

__all__ = ["example_records", "tiny_backbone_config", "tiny_config", "tiny_model"]


def tiny_backbone_config(*, lora: bool = False, width: int = 32, layers: int = 2) -> dict[str, Any]:
    """The backbone config of a tiny random Llama (byte tokenizer) for tests."""
    config: dict[str, Any] = {
        "hf_config": {
            "model_type": "llama",
            "vocab_size": len(byte_tokenizer()),
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
        }
    }
    if lora:
        config["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    return config


def tiny_config(
    modalities: Sequence[str] | None = None,
    *,
    projector: str = "mlp2",
    lora: bool = False,
    encoders: Mapping[str, Any] | None = None,
) -> KibanConfig:
    """A ``KibanConfig`` with tiny presets of ``modalities`` (default: every encoder), or with the
    encoder entries ``encoders`` (modality -> its file form, e.g. ``{"config": {...}}``) instead.
    """
    if encoders is None:
        modalities = list(modalities) if modalities is not None else list_encoders()
        encoders = {m: {"preset": "tiny"} for m in modalities}
    return KibanConfig(
        encoders=dict(encoders),
        backbone=tiny_backbone_config(lora=lora),
        default_projector={"kind": projector, "num_tokens": 4, "depth": 1, "num_heads": 4},
    )


def tiny_model(modalities: Sequence[str] | None = None, *, seed: int = 0, **options: Any) -> KibanModel:
    """A tiny seeded ``KibanModel`` of ``modalities``, built in well under a second."""
    torch.manual_seed(seed)
    return KibanModel.from_config(tiny_config(modalities, **options))


_QUESTIONS = {
    "protein": "What family does <protein> belong to?",
    "dna": "Is <dna> a promoter?",
    "cell": "Which cell type is <cell>?",
    "image": "What does <image> show?",
    "molecule": "Is <molecule> soluble?",
    "text": "Summarise <text>.",
}


def example_records(modalities: Sequence[str] | None = None, *, n: int = 4) -> list[dict[str, Any]]:
    """``n`` chat records; record i mixes every modality, using example input i of each encoder,
    with a different assistant answer per record (so a model can overfit them).
    """
    modalities = list(modalities) if modalities is not None else list_encoders()
    examples = {m: encoder_spec(m).examples() for m in modalities}
    records = []
    for i in range(n):
        question = " Also, ".join(_QUESTIONS.get(m, f"Describe <{m}>.") for m in modalities)
        records.append(
            {
                "messages": [
                    {"role": "system", "content": "You are kiban, a biology assistant."},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": f"Answer number {i}: {'yes' if i % 2 else 'no'}."},
                ],
                "inputs": {m: [examples[m][i % len(examples[m])]] for m in modalities},
            }
        )
    return records

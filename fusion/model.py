"""The fused multimodal model: encoders + projectors + an LLM backbone.

    records --KibanProcessor--> FusedBatch --encoders--> ModalityTokens --projectors--> width H
        --merge_modality_tokens--> inputs_embeds --LLM--> logits / loss / generated text

Built from parts (``KibanModel(encoders=..., projectors=..., llm=..., tokenizer=...)``) or from a
plain-value ``KibanConfig`` (``KibanModel.from_config``); saved with ``save_pretrained(dir)`` as

    config.json               the KibanConfig, architecture only (no paths to outside files)
    model.safetensors         encoders, projectors and the backbone's base weights
    lora/                     LoRA adapters (peft's adapter_config.json + adapter_model.safetensors)
    tokenizer/                the backbone's tokenizer

and loaded with ``from_pretrained(dir)``, which reads only safetensors and JSON (nothing unpickled).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kiban.atomic import staged_file, write_json
from kiban.config import ConfigError
from kiban.encoders.base import Encoder, InvalidInput, ModalityTokens, create_encoder
from kiban.fusion.backbone import BackboneConfig, base_model, load_backbone, smollm2_gguf
from kiban.fusion.config import EncoderSpec, KibanConfig
from kiban.fusion.generation import Completion, GenerationSettings, RowHooks, generate_completions
from kiban.fusion.merge import merge_modality_tokens
from kiban.fusion.projector import ProjectorConfig, create_projector
from kiban.fusion.prompt import (
    IGNORE_INDEX,
    FusedBatch,
    KibanProcessor,
    ProcessedRecord,
    encode_text,
    slot_id,
)

__all__ = ["STAGES", "KibanConfig", "KibanModel", "apply_freeze_policy", "default_config"]

log = logging.getLogger(__name__)

STAGES = ("align", "instruct", "task", "full")


def default_config() -> KibanConfig:
    """The offline default: all six encoders at their default presets over SmolLM2-135M-Instruct."""
    return KibanConfig(
        encoders={m: EncoderSpec(preset="default") for m in ("protein", "dna", "cell", "image", "molecule", "text")},
        backbone=BackboneConfig(gguf=str(smollm2_gguf())),
    )


class KibanModel(nn.Module):
    """The fused model: per-modality encoders and projectors feeding their tokens into a causal LLM."""
    def __init__(
        self,
        *,
        encoders: Mapping[str, Encoder],
        projectors: Mapping[str, nn.Module],
        llm: nn.Module,
        tokenizer: Any,
        config: KibanConfig | None = None,
    ) -> None:
        super().__init__()
        if set(encoders) != set(projectors):
            raise ValueError(f"encoders {sorted(encoders)} and projectors {sorted(projectors)} must match")
        self.encoders = nn.ModuleDict(encoders)
        self.projectors = nn.ModuleDict(projectors)
        self.llm = llm
        self.tokenizer = tokenizer
        self.config = config
        self.processor = KibanProcessor(
            tokenizer,
            {m: e.featurizer for m, e in encoders.items()},
            max_length=config.max_length if config else None,
        )

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: KibanConfig) -> "KibanModel":
        """Build the encoders, projectors and backbone that a ``KibanConfig`` names."""
        config = dataclasses.replace(config)  # checks again what was changed since it was built
        llm, tokenizer = load_backbone(config.backbone)
        width = llm.get_input_embeddings().embedding_dim
        encoders = {m: create_encoder(m, spec.encoder_config(m)) for m, spec in config.encoders.items()}
        projectors = {}
        for modality, encoder in encoders.items():
            settings = config.projectors.get(modality, config.default_projector)
            projectors[modality] = create_projector(settings, in_dim=encoder.output_dim, out_dim=width)
        return cls(encoders=encoders, projectors=projectors, llm=llm, tokenizer=tokenizer, config=config)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.parameters()).device

    @property
    def has_lora(self) -> bool:
        """Whether the backbone carries LoRA adapters (any ``lora_`` parameter)."""
        return any("lora_" in name for name, _ in self.llm.named_parameters())

    # -- forward ---------------------------------------------------------------------------------

    def encode(self, batch: FusedBatch) -> dict[int, ModalityTokens]:
        """Encode and project every modality in the batch: slot id -> tokens of width H."""
        out = {}
        for modality, features in batch.features.items():
            encoder = self.encoders[modality]
            tokens = encoder(**_in_dtype_of(encoder, features))
            out[slot_id(self.processor.modalities.index(modality))] = self.projectors[modality](tokens)
        return out

    def embed_inputs(self, batch: FusedBatch, *, padding_side: str = "right") -> tuple[Tensor, Tensor, Tensor]:
        """inputs_embeds [B, L, H], attention_mask [B, L], labels [B, L] with modality tokens in place."""
        text = self.llm.get_input_embeddings()(batch.input_ids.clamp(min=0))
        return merge_modality_tokens(
            batch.input_ids, batch.attention_mask, batch.labels, text, self.encode(batch), padding_side=padding_side
        )

    def forward(self, batch: FusedBatch) -> Any:
        """Causal-LM output; ``.loss`` is next-token loss over assistant tokens only."""
        embeds, mask, labels = self.embed_inputs(batch)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels)

    def prepare(self, records: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False) -> FusedBatch:
        """Featurize and collate chat records into a ``FusedBatch`` on the model's device."""
        return self.processor(records, add_generation_prompt=add_generation_prompt).to(self.device)

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> list[str]:
        """Answer each record's conversation (the last turn must be the user's); the answers' text.

        Mixed modalities and lengths batch together: rows are left-padded after the modality tokens
        are in place, so a greedy row's answer does not depend on the others. ``do_sample`` draws
        each row from its own generator seeded with ``seed`` (the same seed gives the same answer,
        here and from ``kiban serve``). For streaming, per-row budgets, logprobs or cancellation use
        ``complete``.
        """
        settings = GenerationSettings(
            max_tokens=max_new_tokens,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop),
            repetition_penalty=repetition_penalty,
        )
        return [c.text for c in self.complete(records, [settings] * len(records))]

    def complete(
        self,
        records: Sequence[Mapping[str, Any]],
        settings: Sequence[GenerationSettings],
        hooks: Sequence[RowHooks] | None = None,
    ) -> list[Completion]:
        """One ``Completion`` per record under its own settings and hooks (``kiban.fusion.generation``)."""
        return generate_completions(self, records, settings, hooks)

    @property
    def num_layers(self) -> int:
        """How many decoder layers the backbone has: the largest ``layer`` that ``embed`` accepts."""
        return len(_layers(_decoder(self.llm)))

    @torch.no_grad()
    def embed(self, items: Sequence[tuple[str, Any]], *, layer: int | None = None) -> Tensor:
        """Pooled fused states [B, H] for single inputs: ``("protein", "MKT...")``, ``("text", "a passage")``.

        Each input goes alone through the LLM (a modality as its placeholder's tokens, text as its own
        tokens, no chat template); the hidden states are mean-pooled over the input's positions.
        Text and every modality thus land in one space, the LLM's; the contrastive align loss is what
        makes that space shared in meaning.

        layer: which hidden states are pooled, numbered as Hugging Face's ``hidden_states[layer]``
        (``output_hidden_states=True``). ``None``: the final states (last decoder layer, then the
        backbone's final norm). ``k`` in ``1..num_layers``: the output of decoder layer ``k`` (the
        residual stream, no final norm), and the forward stops there: layers ``k+1..`` never run, so
        a small ``k`` costs a fraction of the full forward. ``k == num_layers`` is the final normed
        states, exactly as ``None`` (Hugging Face ties its last hidden state to the normed output).
        A row's vector does not depend on the other rows in the batch.
        """
        # type(), not isinstance(): True is an int, but no layer
        if layer is not None and not (type(layer) is int and 1 <= layer <= self.num_layers):
            raise ValueError(f"embed: layer must be None or an integer in 1..{self.num_layers}, got {layer!r}")
        records = []
        for modality, item in items:
            if modality == "text" and "text" not in self.encoders:
                records.append(ProcessedRecord(encode_text(self.tokenizer, item), [], []))
                if not records[-1].input_ids:
                    raise InvalidInput("text", item, "is empty")
                continue
            if modality not in self.encoders:
                raise InvalidInput(modality, item, f"this model has no {modality} encoder ({', '.join(self.encoders)})")
            features = self.processor.featurizers[modality](item)
            records.append(ProcessedRecord([slot_id(self.processor.modalities.index(modality))], [], [(modality, features)]))
        for record in records:
            record.labels = [IGNORE_INDEX] * len(record.input_ids)
        batch = self.processor.collate(records).to(self.device)
        embeds, mask, _ = self.embed_inputs(batch)
        hidden = _hidden_states(_decoder(self.llm), embeds, mask, layer=layer)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def chat(self, question: str, *, max_new_tokens: int = 64, repetition_penalty: float = 1.0, **inputs: Any) -> str:
        """One question with its inputs: ``model.chat("What is <molecule>?", molecule="CCO")``."""
        record = {"messages": [{"role": "user", "content": question}], "inputs": inputs}
        answer = self.generate([record], max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)[0]
        return answer.strip()

    # -- save / load -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json, model.safetensors, lora/ and tokenizer/ to ``directory``; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self._portable_config(directory)
        write_json(directory / "config.json", config.to_plain())
        tensors, aliases = _unique_tensors({k: v for k, v in self.state_dict().items() if "lora_" not in k})
        with staged_file(directory / "model.safetensors") as staged:
            save_file(tensors, staged, metadata={"aliases": json.dumps(aliases)})
        if self.has_lora:
            self.llm.save_pretrained(directory / "lora")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "KibanModel":
        """Load a model that ``save_pretrained`` wrote to ``directory``."""
        directory = Path(directory)
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{directory} is not a saved kiban model (no config.json)")
        try:
            config = KibanConfig.from_plain(json.loads(config_file.read_text()))
        except ConfigError as error:
            raise ConfigError(f"{config_file}: {error.field}", error.problem) from None
        config.backbone = dataclasses.replace(config.backbone, tokenizer_path=str(directory / "tokenizer"))
        for spec in config.encoders.values():
            paths = {name: str(_inside(directory, getattr(spec.config, name))) for name in spec.relative_paths}
            spec.config, spec.relative_paths = dataclasses.replace(spec.config, **paths), []
        model = cls.from_config(config)
        model._load_weights(directory)
        return model

    def _load_weights(self, directory: Path) -> None:
        from safetensors import safe_open

        path = directory / "model.safetensors"
        with safe_open(path, framework="pt") as handle:
            aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
        tensors = load_file(path)
        for alias, source in aliases.items():
            tensors[alias] = tensors[source]
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if "lora_" not in k]
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the model in config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        if self.has_lora:
            from peft import set_peft_model_state_dict

            adapter = directory / "lora" / "adapter_model.safetensors"
            if not adapter.is_file():
                raise FileNotFoundError(f"config.json asks for LoRA adapters but {adapter} is missing")
            set_peft_model_state_dict(self.llm, load_file(adapter))

    def _portable_config(self, directory: Path) -> KibanConfig:
        """The config with every outside path replaced by the architecture it named, or by a copy
        of the files it named under ``directory/encoders/<modality>`` (stored relative).
        """
        llm = base_model(self.llm)
        hf_config = llm.config.to_dict()
        hf_config.pop("quantization_config", None)
        backbone = self.config.backbone if self.config else BackboneConfig(hf_config={})
        backbone = BackboneConfig(
            hf_config=hf_config,
            dtype=backbone.dtype,
            gradient_checkpointing=backbone.gradient_checkpointing,
            lora=backbone.lora,
        )
        encoders = {}
        for modality, encoder in self.encoders.items():
            config, path_fields = encoder.export_assets(directory / "encoders" / modality)
            relative = {name: str(Path(getattr(config, name)).relative_to(directory)) for name in path_fields}
            encoders[modality] = EncoderSpec(config=dataclasses.replace(config, **relative), relative_paths=list(path_fields))
        default = self.config.default_projector if self.config else ProjectorConfig()
        projectors = {
            m: p.config if hasattr(p, "config") else (self.config.projectors.get(m, default) if self.config else default)
            for m, p in self.projectors.items()
        }
        return KibanConfig(
            encoders=encoders,
            backbone=backbone,
            projectors=projectors,
            default_projector=default,
            max_length=self.config.max_length if self.config else None,
        )


# ----------------------------------------------------------------------------------------------
# Reading the backbone's hidden states part-way


def _decoder(llm: nn.Module) -> nn.Module:
    """The backbone's decoder stack (embeddings, ``layers``, final norm; no LM head), under LoRA too:
    peft injects its adapters into the base model's modules, so calling the decoder keeps them.
    """
    return base_model(llm).get_decoder()


def _layers(decoder: nn.Module) -> nn.ModuleList:
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(decoder).__name__} has no decoder layers at .layers: embed cannot stop in it")
    return layers


class _Stopped(Exception):
    """Raised by the hook on decoder layer k to end the forward there, carrying that layer's output."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def _hidden_states(decoder: nn.Module, embeds: Tensor, mask: Tensor, *, layer: int | None) -> Tensor:
    """Hugging Face's ``hidden_states[layer]`` of the decoder [B, L, H], running layers 1..layer only.

    The decoder's own forward does everything before the layers (causal + padding mask, rotary
    position embeddings, any embedding scaling), so it stays right for every architecture; a forward
    hook on layer ``layer`` then ends it by raising. The hook acts only in the thread that set it: a
    server thread generating with the same backbone at the same time runs straight through it.
    """
    if layer is None or layer == len(_layers(decoder)):
        return decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    owner = threading.get_ident()

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == owner:
            raise _Stopped(output[0] if isinstance(output, tuple) else output)

    handle = _layers(decoder)[layer - 1].register_forward_hook(stop)
    try:
        decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    except _Stopped as stopped:
        return stopped.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"decoder layer {layer} never ran")  # pragma: no cover - the hook always fires


def _in_dtype_of(module: nn.Module, features: dict[str, Tensor]) -> dict[str, Tensor]:
    """Floating-point features in the dtype of ``module``'s weights (bf16 when the model was placed
    in bf16 on a GPU); featurizers always give float32, and ids and masks keep their dtype.
    """
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    if weight is None or weight.dtype == torch.float32:
        return features
    return {k: v.to(weight.dtype) if v.is_floating_point() else v for k, v in features.items()}


def _inside(directory: Path, relative: str) -> Path:
    """``directory / relative``, refusing a path that leaves the model folder."""
    path = (directory / relative).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise ValueError(f"{directory}/config.json names {relative!r}, outside the model folder")
    return path


def _unique_tensors(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop tied duplicates (safetensors refuses shared storage); return (tensors, alias -> source)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tensors, aliases = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


# ----------------------------------------------------------------------------------------------
# Freeze policies


def apply_freeze_policy(model: KibanModel, stage: str) -> dict[str, int]:
    """Set ``requires_grad`` for a training stage; returns trainable parameter counts by part.

    align     projectors only (encoders and LLM frozen)
    instruct  projectors + LoRA adapters (needs a backbone with ``lora`` configured)
    task      nothing in the model (heads, outside it, train on its frozen states)
    full      everything, but parameters an encoder declares never trained (e.g. ESM-2's unused LM head)

    In align and instruct, an encoder marked ``trains_with_projector`` (one nothing pretrains: the
    property-condition encoder) trains with its projector.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if stage == "instruct" and not model.has_lora:
        raise ValueError("stage 'instruct' trains LoRA adapters, but the backbone has none: set backbone.lora")
    with_projector = tuple(f"encoders.{m}." for m, encoder in model.encoders.items() if encoder.trains_with_projector)
    for name, param in model.named_parameters():
        if stage == "full":
            param.requires_grad_(True)
        elif stage == "align":
            param.requires_grad_(name.startswith(("projectors.", *with_projector)))
        elif stage == "instruct":
            param.requires_grad_(name.startswith(("projectors.", *with_projector)) or "lora_" in name)
        else:
            param.requires_grad_(False)
    if stage == "full":
        for modality, encoder in model.encoders.items():
            for name, param in encoder.named_parameters():
                if name.startswith(tuple(encoder.never_trained)):
                    param.requires_grad_(False)
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = "lora" if "lora_" in name else name.split(".")[0]
            counts[part] = counts.get(part, 0) + param.numel()
    return counts

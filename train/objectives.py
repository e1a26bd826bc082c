"""Training objectives of the align and instruct stages, kept out of the model (STYLE habit 8).

next-token loss    cross-entropy on assistant tokens only (labels are -100 elsewhere), computed by
                   the LLM on the fused sequence: text with every placeholder widened to its
                   projected modality tokens.
contrastive loss   symmetric InfoNCE (CLIP, Radford et al. 2021) between a record's pooled modality
                   embedding and its pooled assistant text, each passed ALONE through the LLM and
                   mean-pooled over its last hidden states — exactly what ``KibanModel.embed`` does,
                   so the space this loss shapes is the one cross-modal search queries. In the
                   align stage the LLM is frozen: the gradient reaches the projectors only.

A frozen backbone also makes the text every row starts with (the chat template's system turn and
user header: 24 of the quickstart's ~60 positions) the same keys and values at every step:
``FrozenPrefix`` computes them once and the step runs the LLM on the rest of the sequence only.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kiban.encoders.base import ModalityTokens
from kiban.fusion.backbone import base_model
from kiban.fusion.merge import merge_modality_tokens
from kiban.fusion.model import KibanModel
from kiban.fusion.prompt import IGNORE_INDEX, FusedBatch

__all__ = ["FrozenPrefix", "StepLosses", "contrastive_loss", "fused_losses", "next_token_loss"]


@dataclass
class StepLosses:
    """The losses of one training batch (scalar tensors) and its token counts."""
    loss: Tensor  # what backward() sees
    lm_loss: Tensor
    contrastive: Tensor | None
    tokens: int  # real (non-pad) positions of the fused sequences: text + modality tokens
    padded_length: int  # L of the fused [B, L] batch


def fused_losses(
    model: KibanModel,
    batch: FusedBatch,
    *,
    contrastive_weight: float = 0.0,
    temperature: float = 0.07,
    prefix: FrozenPrefix | None = None,
) -> StepLosses:
    """The training loss of one batch. The model's own ``forward`` gives the next-token loss alone;
    here the merge is spelled out so the encoded tokens serve both losses and the token count.
    ``prefix``: a cache of the shared text prefix's keys and values, used while the LLM is frozen.
    """
    # Encoders and projectors run outside autocast (in their own dtype): under bf16 autocast the
    # molecule encoder's message passing mixes float32 and bfloat16 in index_add_ and fails. The
    # LLM, where the FLOPs are, keeps the run's mixed precision.
    with torch.autocast(batch.input_ids.device.type, enabled=False):
        encoded = model.encode(batch)
    text = model.llm.get_input_embeddings()(batch.input_ids.clamp(min=0))
    embeds, mask, labels = merge_modality_tokens(
        batch.input_ids, batch.attention_mask, batch.labels, text, encoded
    )
    lm_loss = next_token_loss(model.llm, embeds, mask, labels, prefix=prefix, input_ids=batch.input_ids)
    loss, contrastive = lm_loss, None
    if contrastive_weight > 0:
        contrastive = contrastive_loss(model, batch, encoded, temperature=temperature)
        loss = lm_loss + contrastive_weight * contrastive
    return StepLosses(
        loss,
        lm_loss.detach(),
        None if contrastive is None else contrastive.detach(),
        int(mask.sum()),
        int(mask.shape[1]),
    )


def next_token_loss(
    llm: torch.nn.Module,
    embeds: Tensor,
    mask: Tensor,
    labels: Tensor,
    *,
    prefix: FrozenPrefix | None = None,
    input_ids: Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy of the labelled next tokens: the Hugging Face causal-LM loss, computed lean.

    ``llm(..., labels=labels).loss`` projects every position onto the whole vocabulary ([B, L, V]
    float32 logits: 4 x 300 x 49,152 is 236 MB for SmolLM2, and as much again for their gradient,
    every step) although only the positions before an answer token carry loss. Here the LLM
    projects just those (its ``logits_to_keep`` mask) and the loss is Hugging Face's own formula
    (float32 logits, labels shifted by one, mean over the labelled tokens). Backbones whose
    forward has no ``logits_to_keep`` get the plain call.

    ``prefix`` with ``input_ids`` (the batch's ids before the merge, placeholders negative): the
    positions every row shares as the same text and that predict no label come from the cache as
    keys and values, and the LLM runs on the positions after them (``FrozenPrefix``).
    """
    if not _keeps_logits(llm):
        return llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX  # position p predicts token p + 1
    start, cache = 0, None
    if prefix is not None and input_ids is not None:
        start, cache = prefix.lookup(llm, input_ids, mask, keep)
    logits = llm(
        inputs_embeds=embeds[:, start:], attention_mask=mask, logits_to_keep=keep[:, start:], cache=cache
    ).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets[keep[:, :-1]])


class FrozenPrefix:
    """Keys and values of the text that every row of a batch starts with, computed once per text.

    With the backbone frozen (the align stage), the chat template's opening (system turn, user
    header) gives the same keys and values at every step, and no gradient needs to flow through it
    (nothing before the first modality token trains). ``lookup`` finds the batch's shared prefix:
    the longest run of positions where every row holds the same text token, unpadded, predicting no
    label. Its keys and values are computed once (one row, no gradient) and reused by every later
    batch with that prefix; the step's forward and backward then run over the other positions only.
    The loss and the gradient are those of the full forward up to float rounding (the prefix's
    matrix products have other shapes).

    Used only where that holds: no backbone parameter trains, no dropout is active, no gradient
    checkpointing (its recomputation would append to the cache twice), and plain tensors (not
    DeepSpeed ZeRO-3 partitions or DTensors); otherwise ``lookup`` returns (0, None) and the step
    runs the whole sequence. Cached entries are keyed by the prefix's ids, device, autocast dtype,
    inference mode (Lightning validates under it) and the parameters' version counters, so a weight
    changed in place is never served stale.
    """

    def __init__(self, *, min_length: int = 4, max_entries: int = 16) -> None:
        """``min_length``: shorter shared prefixes are run with the rest; ``max_entries``: cached texts."""
        self.min_length, self.max_entries = min_length, max_entries
        self._entries: OrderedDict[tuple, list[tuple[Tensor, Tensor]]] = OrderedDict()
        self.hits = self.misses = 0

    def lookup(self, llm: torch.nn.Module, input_ids: Tensor, mask: Tensor, keep: Tensor) -> tuple[int, Any]:
        """(prefix length P, a cache holding its keys and values for every row), or (0, None)."""
        length = shared_prefix_length(input_ids, mask, keep)
        version = _frozen_version(llm) if length >= self.min_length else None
        if version is None:
            return 0, None
        ids = input_ids[0, :length]
        device = ids.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        # inference mode apart: an inference tensor that an op of a training step saves for backward
        # is an error (Hugging Face's SDPA path saves the concatenated keys, not these, but others may)
        key = (tuple(ids.tolist()), str(device), dtype, torch.is_inference_mode_enabled(), version)
        layers = self._entries.get(key)
        if layers is None:
            self.misses += 1
            with torch.no_grad():
                out = llm(input_ids=ids[None], attention_mask=mask[:1, :length], use_cache=True, logits_to_keep=1)
            layers = [(layer.keys, layer.values) for layer in out.cache.layers]
            self._entries[key] = layers
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        else:
            self.hits += 1
            self._entries.move_to_end(key)
        from transformers import DynamicCache

        cache = DynamicCache(config=base_model(llm).config)
        rows = input_ids.shape[0]
        for index, (keys, values) in enumerate(layers):
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)
        return length, cache


def shared_prefix_length(input_ids: Tensor, mask: Tensor, keep: Tensor) -> int:
    """How many leading positions every row shares: the same text token (not a placeholder), not
    padding, predicting no label; at least one position is left after them.
    """
    if input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        return 0
    limit = min(input_ids.shape[1], keep.shape[1]) - 1
    same = (input_ids[:, :limit] == input_ids[:1, :limit]).all(0)
    usable = same & (input_ids[0, :limit] >= 0) & mask[:, :limit].bool().all(0) & ~keep[:, :limit].any(0)
    bad = (~usable).nonzero()
    return int(bad[0, 0]) if len(bad) else limit


def _frozen_version(llm: torch.nn.Module) -> int | None:
    """None unless the backbone's keys and values for a text are the same at every step
    (``FrozenPrefix``); then the sum of its parameters' version counters, which changes whenever a
    parameter is modified in place. One pass over the parameters: this runs every step.
    """
    base = base_model(llm)
    checkpointing = getattr(base, "is_activation_checkpointing", None)  # transformers >= 5.2's name
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    if checkpointing:
        return None
    if base.training:
        if getattr(base.config, "attention_dropout", 0.0):
            return None
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in base.modules()):
            return None
    version = 0
    for parameter in base.parameters():
        if parameter.requires_grad or hasattr(parameter, "ds_id") or type(parameter.data) is not torch.Tensor:
            return None
        version += parameter._version
    return version


def _keeps_logits(llm: torch.nn.Module) -> bool:
    """Whether the (possibly PEFT-wrapped) causal LM's forward takes a ``logits_to_keep`` mask."""
    return "logits_to_keep" in inspect.signature(base_model(llm).forward).parameters


def contrastive_loss(
    model: KibanModel, batch: FusedBatch, encoded: dict[int, ModalityTokens], *, temperature: float
) -> Tensor:
    """InfoNCE over the rows of the batch: row r's modalities vs row r's assistant text.

    encoded: slot id -> projected tokens [n_items, K, H], items in row-major order (``model.encode``).
    Rows without a modality input or without assistant text take no part; fewer than two usable
    rows give a zero loss that still touches the graph.
    """
    modality = _pooled_modalities(model, batch, encoded)  # [B, H], NaN-free; rows without input are zero
    has_modality = (batch.input_ids < 0).any(1)
    answer = batch.labels != IGNORE_INDEX
    has_text = answer.any(1)
    usable = has_modality & has_text
    if int(usable.sum()) < 2:
        return modality.sum() * 0.0
    text = _pooled_text(model, batch.input_ids, answer)
    m = F.normalize(modality[usable], dim=-1)
    t = F.normalize(text[usable], dim=-1)
    logits = m @ t.T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _llm_pool(model: KibanModel, embeds: Tensor, mask: Tensor) -> Tensor:
    hidden = model.llm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _pooled_modalities(model: KibanModel, batch: FusedBatch, encoded: dict[int, ModalityTokens]) -> Tensor:
    """[B, H]: the mean of the LLM-pooled embeddings of each row's modality inputs."""
    rows = batch.input_ids.shape[0]
    width = model.llm.get_input_embeddings().embedding_dim
    sums = batch.input_ids.new_zeros((rows, width), dtype=torch.float32)
    counts = batch.input_ids.new_zeros((rows, 1), dtype=torch.float32)
    for slot, tokens in encoded.items():
        owner = torch.nonzero(batch.input_ids == slot)[:, 0]  # row of each item, row-major like the items
        pooled = _llm_pool(model, tokens.embeddings, tokens.mask.long()).float()
        sums = sums.index_add(0, owner, pooled)
        counts = counts.index_add(0, owner, torch.ones_like(pooled[:, :1]))
    return sums / counts.clamp(min=1.0)


def _pooled_text(model: KibanModel, input_ids: Tensor, answer: Tensor) -> Tensor:
    """[B, H]: each row's assistant tokens, alone and right-padded, through the LLM, mean-pooled."""
    lengths = answer.sum(1)
    ids = input_ids.new_zeros((input_ids.shape[0], int(lengths.max())))
    mask = torch.zeros_like(ids)
    for r in range(input_ids.shape[0]):
        n = int(lengths[r])
        ids[r, :n] = input_ids[r][answer[r]]
        mask[r, :n] = 1
    return _llm_pool(model, model.llm.get_input_embeddings()(ids), mask).float()

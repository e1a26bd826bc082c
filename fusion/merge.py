"""Scatter projected modality tokens into the LLM's input embeddings (LLaVA-style early fusion).

Each slot in ``input_ids`` (a negative id, see ``prompt.py``) is replaced by the valid tokens of
the input bound to it; labels there are ``-100``. Rows then have different lengths and are
padded again, on the right for training and on the left for generation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kiban.encoders.base import ModalityTokens
from kiban.fusion.prompt import IGNORE_INDEX

__all__ = ["merge_modality_tokens"]


def merge_modality_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    text_embeds: Tensor,
    slot_tokens: dict[int, ModalityTokens],
    *,
    padding_side: str = "right",
) -> tuple[Tensor, Tensor, Tensor]:
    """Widen every slot to its tokens.

    input_ids, attention_mask, labels: [B, T]; text_embeds: [B, T, H] (slots hold garbage there);
    slot_tokens: slot id -> projected tokens [n_items, N, H], items in row-major slot order.
    Returns inputs_embeds [B, L, H], attention_mask [B, L], labels [B, L].
    """
    used = {sid: 0 for sid in slot_tokens}
    rows: list[tuple[Tensor, Tensor]] = []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids, embeds, labs = input_ids[b][keep], text_embeds[b][keep], labels[b][keep]
        pieces_e, pieces_l, start = [], [], 0
        for pos in torch.nonzero(ids < 0).flatten().tolist():
            sid = int(ids[pos])
            if sid not in slot_tokens or used[sid] >= slot_tokens[sid].embeddings.shape[0]:
                raise ValueError(f"slot {sid} in row {b} has no encoded input (the batch and its features disagree)")
            tokens, k = slot_tokens[sid], used[sid]
            used[sid] += 1
            item = tokens.embeddings[k][tokens.mask[k]]
            pieces_e += [embeds[start:pos], item]
            pieces_l += [labs[start:pos], labs.new_full((item.shape[0],), IGNORE_INDEX)]
            start = pos + 1
        pieces_e.append(embeds[start:])
        pieces_l.append(labs[start:])
        rows.append((torch.cat(pieces_e), torch.cat(pieces_l)))
    leftover = {sid: tokens.embeddings.shape[0] - used[sid] for sid, tokens in slot_tokens.items()}
    if any(leftover.values()):
        raise ValueError(f"encoded inputs left without a slot: {leftover}")
    return _pad_rows(rows, text_embeds, padding_side)


def _pad_rows(rows: list[tuple[Tensor, Tensor]], like: Tensor, padding_side: str) -> tuple[Tensor, Tensor, Tensor]:
    longest = max(e.shape[0] for e, _ in rows)
    batch, width = len(rows), like.shape[-1]
    embeds = like.new_zeros(batch, longest, width)
    mask = torch.zeros(batch, longest, dtype=torch.long, device=like.device)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long, device=like.device)
    for b, (e, lab) in enumerate(rows):
        n = e.shape[0]
        span = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        embeds[b, span], labels[b, span], mask[b, span] = e, lab, 1
    return embeds, mask, labels

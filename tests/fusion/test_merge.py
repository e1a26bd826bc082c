import pytest
import torch

from kiban.encoders import ModalityTokens
from kiban.fusion import IGNORE_INDEX, merge_modality_tokens


def test_slots_are_widened_to_their_tokens_in_order():
    # row 0: t t [slot -1] t ; row 1: [slot -2] t [slot -1] (pad)
    ids = torch.tensor([[5, 6, -1, 7], [-2, 8, -1, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    labels = torch.tensor([[IGNORE_INDEX, 6, IGNORE_INDEX, 7], [IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX]])
    text = ids.clamp(min=0).float()[..., None].expand(-1, -1, 2).clone()
    a = ModalityTokens(torch.tensor([[[100.0, 100], [101, 101], [0, 0]], [[200, 200], [0, 0], [0, 0]]]),
                       torch.tensor([[1, 1, 0], [1, 0, 0]]).bool())
    b = ModalityTokens(torch.tensor([[[300.0, 300]]]), torch.tensor([[1]]).bool())
    embeds, attn, labs = merge_modality_tokens(ids, mask, labels, text, {-1: a, -2: b})
    assert embeds[0, :, 0].tolist() == [5, 6, 100, 101, 7]
    assert attn[0].tolist() == [1, 1, 1, 1, 1]
    assert labs[0].tolist() == [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX, 7]
    assert embeds[1, :3, 0].tolist() == [300, 8, 200] and attn[1].tolist() == [1, 1, 1, 0, 0]

    left, attn_left, _ = merge_modality_tokens(ids, mask, labels, text, {-1: a, -2: b}, padding_side="left")
    assert attn_left[1].tolist() == [0, 0, 1, 1, 1] and left[1, 2:, 0].tolist() == [300, 8, 200]


def test_a_batch_whose_slots_and_features_disagree_is_refused():
    ids = torch.tensor([[1, -1, -1]])
    tokens = ModalityTokens(torch.zeros(1, 2, 2), torch.ones(1, 2).bool())
    with pytest.raises(ValueError, match="no encoded input"):
        merge_modality_tokens(ids, torch.ones_like(ids).bool(), ids, torch.zeros(1, 3, 2), {-1: tokens})

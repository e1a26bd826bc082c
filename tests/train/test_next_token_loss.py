"""The lean next-token loss equals the Hugging Face causal-LM loss, value and gradient."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiban.fusion.prompt import IGNORE_INDEX
from kiban.train.objectives import FrozenPrefix, next_token_loss, shared_prefix_length


def _tiny_llm() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def test_next_token_loss_equals_the_hugging_face_loss_and_gradient():
    torch.manual_seed(0)
    llm = _tiny_llm().eval()
    embeds = torch.randn(3, 17, 32, dtype=torch.float64).float()
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[2, 12:] = 0  # right padding
    labels = torch.full((3, 17), IGNORE_INDEX)
    labels[0, 9:] = torch.randint(0, 300, (8,))  # answers at the end, as the chat records have them
    labels[1, 3:6] = torch.randint(0, 300, (3,))
    labels[2, 8:12] = torch.randint(0, 300, (4,))

    want_embeds = embeds.clone().requires_grad_(True)
    want = llm(inputs_embeds=want_embeds, attention_mask=mask, labels=labels).loss
    want.backward()
    got_embeds = embeds.clone().requires_grad_(True)
    got = next_token_loss(llm, got_embeds, mask, labels)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_embeds.grad, want_embeds.grad, rtol=1e-5, atol=1e-7)


def _chat_like_batch(llm, rows: int = 3, length: int = 19, shared: int = 7):
    """Rows that open with the same ``shared`` text tokens (a chat template's system turn), then a
    placeholder (negative id), own text and an answer at the end; row 2 right-padded.
    """
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 300, (rows, length), generator=generator)
    input_ids[:, :shared] = torch.randint(0, 300, (shared,), generator=generator)
    input_ids[:, shared] = -1  # a modality placeholder: its embedding is the projector's
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[2, 15:] = 0
    labels = torch.full((rows, length), IGNORE_INDEX)
    labels[0, 13:] = input_ids[0, 13:]
    labels[1, 11:16] = input_ids[1, 11:16]
    labels[2, 12:15] = input_ids[2, 12:15]
    embeds = llm.get_input_embeddings()(input_ids.clamp(min=0)).detach()
    return input_ids, embeds, mask, labels


def _loss_and_gradient(llm, embeds, mask, labels, **prefix):
    projected = torch.nn.Parameter(torch.randn(embeds.shape[-1], generator=torch.Generator().manual_seed(2)))
    fused = embeds.clone()
    fused[:, 7] = projected  # the trained part: what the align stage's gradient reaches
    loss = next_token_loss(llm, fused, mask, labels, **prefix)
    loss.backward()
    return loss.detach(), projected.grad


def test_a_frozen_backbones_shared_prefix_is_computed_once_and_gives_the_full_forwards_loss_and_gradient():
    torch.manual_seed(0)
    llm = _tiny_llm().train()
    llm.requires_grad_(False)
    input_ids, embeds, mask, labels = _chat_like_batch(llm)
    want_loss, want_grad = _loss_and_gradient(llm, embeds, mask, labels)
    prefix = FrozenPrefix()
    with torch.inference_mode():  # a validation step first (Lightning validates in inference mode)
        torch.testing.assert_close(
            next_token_loss(llm, embeds, mask, labels, prefix=prefix, input_ids=input_ids),
            next_token_loss(llm, embeds, mask, labels),
            rtol=1e-5,
            atol=1e-6,
        )
    for step in range(2):  # the second batch takes the keys and values from the cache
        got_loss, got_grad = _loss_and_gradient(llm, embeds, mask, labels, prefix=prefix, input_ids=input_ids)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    assert (prefix.misses, prefix.hits) == (2, 1)  # the inference-mode entry is its own
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert shared_prefix_length(input_ids, mask, keep) == 7  # stops at the placeholder


def test_the_prefix_cache_stands_aside_when_the_backbone_trains_or_its_weights_change():
    torch.manual_seed(0)
    llm = _tiny_llm().train()
    input_ids, embeds, mask, labels = _chat_like_batch(llm)
    prefix = FrozenPrefix()
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert prefix.lookup(llm, input_ids, mask, keep) == (0, None)  # LoRA / full fine-tuning: trains
    llm.requires_grad_(False)
    llm.activation_checkpointing_enable()
    assert prefix.lookup(llm, input_ids, mask, keep) == (0, None)  # recomputation would double the cache
    llm.activation_checkpointing_disable()
    assert prefix.lookup(llm, input_ids, mask, keep)[0] == 7
    with torch.no_grad():
        llm.model.layers[0].mlp.up_proj.weight.mul_(2.0)  # weights edited in place: a new entry
    want_loss, _ = _loss_and_gradient(llm, embeds, mask, labels)
    got_loss, _ = _loss_and_gradient(llm, embeds, mask, labels, prefix=prefix, input_ids=input_ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert prefix.misses == 2
    other = input_ids.clone()
    other[1, 3] = (other[0, 3] + 1) % 300  # one row's opening differs at position 3
    assert shared_prefix_length(other, mask, keep) == 3

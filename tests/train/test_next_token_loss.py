"""The lean next-token loss equals the Hugging Face causal-LM loss, value and gradient."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiban.fusion.prompt import IGNORE_INDEX
from kiban.train.objectives import next_token_loss


def test_next_token_loss_equals_the_hugging_face_loss_and_gradient():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    llm = LlamaForCausalLM(config).eval()
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

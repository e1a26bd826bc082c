"""The one generation path (``kiban.fusion.generation``): per-row settings and hooks, in process."""

from __future__ import annotations

import pytest
import torch

from kiban.fusion.generation import (
    GenerationSettings,
    Guidance,
    PromptTooLong,
    RowHooks,
    generate_completions,
)
from kiban.tiny import tiny_model

PROTEINS = ["MKTAYIAKQR", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSF", "GSHMLEDPVDAFQ", "ACDEFGHIKLMNPQRSTVWY"]


def _record(protein: str) -> dict:
    return {"messages": [{"role": "user", "content": "Describe <protein>."}], "inputs": {"protein": [protein]}}


@pytest.fixture(scope="module")
def model():
    model = tiny_model(["protein"], seed=0).eval()
    with torch.no_grad():  # sharpen, so answers depend on the inputs (see tests/serve/conftest.py)
        for param in model.llm.parameters():
            if param.dim() == 2:
                param.mul_(20.0)
    return model


def _no_eos(model) -> dict[int, float]:
    return {model.tokenizer.eos_token_id: -100.0}


def test_each_row_keeps_its_own_budget_and_greedy_rows_equal_their_answers_alone(model):
    records = [_record(p) for p in PROTEINS]
    budgets = [3, 9, 1, 6]
    settings = [GenerationSettings(max_tokens=n, logit_bias=_no_eos(model)) for n in budgets]
    together = generate_completions(model, records, settings)
    alone = [generate_completions(model, [r], [s])[0] for r, s in zip(records, settings)]
    assert [c.completion_tokens for c in together] == budgets
    assert [c.finish_reason for c in together] == ["length"] * 4
    assert [c.text for c in together] == [c.text for c in alone]


def test_a_seed_gives_the_same_sample_whatever_the_batch_and_another_seed_another(model):
    record = _record(PROTEINS[0])
    sampled = GenerationSettings(max_tokens=24, temperature=1.0, seed=7, logit_bias=_no_eos(model))
    first = generate_completions(model, [record], [sampled])[0].text
    # the same row beside other rows, sampled with other seeds: its own answer does not change
    neighbours = [GenerationSettings(max_tokens=24, temperature=1.0, seed=s) for s in (1, 2)]
    batched = generate_completions(model, [_record(PROTEINS[1]), record, _record(PROTEINS[2])],
                                   [neighbours[0], sampled, neighbours[1]])
    assert batched[1].text == first
    other = GenerationSettings(max_tokens=24, temperature=1.0, seed=8, logit_bias=_no_eos(model))
    assert generate_completions(model, [record], [other])[0].text != first


def test_generate_is_the_same_path(model):
    record = _record(PROTEINS[0])
    settings = GenerationSettings(max_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    path = generate_completions(model, [record], [settings])[0].text
    assert model.generate([record], max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, seed=3) == [path]
    assert model.generate([record], max_new_tokens=12) == [
        generate_completions(model, [record], [GenerationSettings(max_tokens=12)])[0].text
    ]


def test_a_stop_string_ends_the_answer_before_it_and_the_stream_never_shows_it(model):
    record = _record(PROTEINS[1])
    full = generate_completions(model, [record], [GenerationSettings(max_tokens=40, logit_bias=_no_eos(model))])[0]
    assert len(full.text) > 10, "the test needs a long answer"
    stop = full.text[5:8]
    pieces: list[str] = []
    stopped = generate_completions(
        model,
        [record],
        [GenerationSettings(max_tokens=40, stop=(stop,), logit_bias=_no_eos(model))],
        [RowHooks(on_text=pieces.append)],
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    assert "".join(pieces) == stopped.text and stop not in "".join(pieces)


def test_logprobs_are_the_models_distribution_and_name_the_chosen_tokens(model):
    answer = generate_completions(
        model, [_record(PROTEINS[2])], [GenerationSettings(max_tokens=5, logprobs=3, logit_bias=_no_eos(model))]
    )[0]
    assert len(answer.logprobs) == answer.completion_tokens == 5
    assert "".join(t.token for t in answer.logprobs) == answer.text
    for token in answer.logprobs:
        assert len(token.top) == 3 and token.logprob <= 0
        assert token.top[0][1] >= token.top[1][1] >= token.top[2][1]
        assert token.logprob == pytest.approx(token.top[0][1])  # greedy: the most likely token


def test_should_stop_ends_a_row_between_steps_and_spares_the_others(model):
    steps = {"n": 0}

    def stop_after_four() -> bool:
        steps["n"] += 1
        return steps["n"] > 4

    rows = generate_completions(
        model,
        [_record(PROTEINS[0]), _record(PROTEINS[1])],
        [GenerationSettings(max_tokens=50, logit_bias=_no_eos(model))] * 2,
        [RowHooks(should_stop=stop_after_four), RowHooks()],
    )
    assert rows[0].finish_reason == "cancelled" and rows[0].completion_tokens < 5
    assert rows[1].finish_reason == "length" and rows[1].completion_tokens == 50


def test_a_row_cancelled_before_it_starts_costs_no_forward_pass(model):
    calls = []
    handle = model.llm.register_forward_hook(lambda *args: calls.append(1))
    try:
        rows = generate_completions(
            model, [_record(PROTEINS[0])], [GenerationSettings(max_tokens=5)], [RowHooks(should_stop=lambda: True)]
        )
    finally:
        handle.remove()
    assert rows[0].finish_reason == "cancelled" and rows[0].completion_tokens == 0 and not calls


def test_a_prompt_over_the_context_is_refused_before_the_prefill(model):
    context = model.llm.config.max_position_embeddings
    long = {"messages": [{"role": "user", "content": "x" * context}]}
    calls = []
    handle = model.llm.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(PromptTooLong, match=f"context_length={context}"):
            generate_completions(model, [long], [GenerationSettings(max_tokens=2)])
    finally:
        handle.remove()
    assert not calls


def test_a_logits_processor_decides_each_rows_tokens_and_sees_its_ids_so_far(model):
    """``RowHooks.process_logits``: one row may only write 'a' then 'b' alternately; the other row is free."""
    tokenizer = model.tokenizer
    a, b = (tokenizer.convert_tokens_to_ids(c) for c in "ab")
    seen: list[list[int]] = []

    def alternate(ids, logits):
        seen.append(list(ids))
        out = torch.full_like(logits, -torch.inf)
        allowed = b if ids and ids[-1] == a else a
        out[allowed] = logits[allowed]
        return out

    settings = [GenerationSettings(max_tokens=6, temperature=1.0, seed=1)] * 2
    hooks = [RowHooks(process_logits=alternate), RowHooks()]
    constrained, free = generate_completions(model, [_record("MKTAYIAKQR")] * 2, settings, hooks)
    assert constrained.text == "ababab" and free.text != "ababab"
    assert seen[0] == [] and seen[-1] == [a, b, a, b, a]  # the row's own generated ids, one more each step


def test_guidance_mixes_the_two_distributions_and_scale_0_is_the_unconditioned_answer(model):
    """``Guidance``: the row decodes from log p_u + s (log p_c - log p_u), its partner fed the row's tokens."""
    asked, plain = _record(PROTEINS[1]), _record(PROTEINS[2])
    settings = GenerationSettings(max_tokens=10, logit_bias=_no_eos(model))
    alone = generate_completions(model, [plain], [settings])[0].text
    neighbour = generate_completions(model, [_record(PROTEINS[3])], [settings])[0].text
    # scale 0 follows the unconditioned record exactly, token for token; an unguided neighbour is untouched
    guided, beside = generate_completions(
        model, [asked, _record(PROTEINS[3])], [settings, settings], guidance=[Guidance(plain, 0.0), None]
    )
    assert guided.text == alone and beside.text == neighbour
    assert guided.prompt_tokens == generate_completions(model, [asked], [settings])[0].prompt_tokens

    def capture(into):
        def hook(ids, logits):
            into.append(logits.clone())
            return logits
        return RowHooks(process_logits=hook)

    first = GenerationSettings(max_tokens=1)  # no bias: the hook sees the mix itself
    conditional, unconditional, mixed = [], [], []
    generate_completions(model, [asked], [first], [capture(conditional)])
    generate_completions(model, [plain], [first], [capture(unconditional)])
    generate_completions(model, [asked], [first], [capture(mixed)], guidance=[Guidance(plain, 3.0)])
    lp_c, lp_u = (torch.log_softmax(x[0], -1) for x in (conditional, unconditional))
    torch.testing.assert_close(mixed[0], lp_u + 3.0 * (lp_c - lp_u), atol=1e-4, rtol=1e-4)


def test_a_guidance_scale_must_be_finite_and_not_negative():
    for scale in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="guidance scale"):
            Guidance(_record(PROTEINS[0]), scale)


def test_token_bytes_join_to_text_even_where_a_token_holds_part_of_a_character():
    from kiban.fusion.backbone import byte_tokenizer
    from kiban.fusion.generation import token_bytes

    tokenizer = byte_tokenizer()
    text = "é→x ∆ 𝛼"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [token_bytes(tokenizer, i) for i in ids]
    assert len(ids) == len(text.encode("utf-8")) and all(len(p) == 1 for p in pieces)
    assert b"".join(pieces).decode("utf-8") == text
    assert tokenizer.decode(ids[:1]) == "\ufffd"  # the text of half a character says nothing
    assert token_bytes(tokenizer, tokenizer.eos_token_id) == b"<|im_end|>"

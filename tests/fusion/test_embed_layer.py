"""``KibanModel.embed(..., layer=k)``: Hugging Face's ``hidden_states[k]`` pooled, from a forward that
really stops after layer k, whatever else the batch holds, under LoRA, and in one thread only.
"""

from __future__ import annotations

import threading

import pytest
import torch

from kiban.fusion import KibanConfig, KibanModel
from kiban.fusion.prompt import IGNORE_INDEX, ProcessedRecord, slot_id
from kiban.tiny import tiny_backbone_config

LAYERS = 4
# mixed lengths, so the batch is padded: a 3-atom molecule, a longer protein, text, a 12-atom molecule
ITEMS = [
    ("molecule", "CCO"),
    ("protein", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"),
    ("text", "insulin lowers blood glucose"),
    ("molecule", "CC(=O)Oc1ccccc1C(=O)O"),
]


def _model(*, lora: bool = False) -> KibanModel:
    torch.manual_seed(0)
    config = KibanConfig(
        encoders={"molecule": {"preset": "tiny"}, "protein": {"preset": "tiny"}},
        backbone=tiny_backbone_config(layers=LAYERS, lora=lora),
    )
    model = KibanModel.from_config(config).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # LoRA's B starts at zero: give the adapters an effect to lose
            torch.nn.init.normal_(param, std=0.5)
    return model


@pytest.fixture(scope="module")
def model() -> KibanModel:
    return _model()


def _reference(model: KibanModel, modality: str, item) -> tuple[torch.Tensor, ...]:
    """One input alone (no padding) through the whole backbone: every hidden state, mean-pooled."""
    if modality == "text":
        record = ProcessedRecord(model.tokenizer(item, add_special_tokens=False)["input_ids"], [], [])
    else:
        features = model.processor.featurizers[modality](item)
        record = ProcessedRecord([slot_id(model.processor.modalities.index(modality))], [], [(modality, features)])
    record.labels = [IGNORE_INDEX] * len(record.input_ids)
    embeds, mask, _ = model.embed_inputs(model.processor.collate([record]))
    with torch.no_grad():
        states = model.llm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(states) == LAYERS + 1 and mask.all()
    return tuple(s[0].mean(0) for s in states)


@pytest.mark.parametrize("lora", [False, True])
def test_embed_at_layer_k_is_hugging_faces_hidden_states_k_of_each_row_alone(lora):
    model = _model(lora=lora)
    assert model.num_layers == LAYERS
    references = [_reference(model, m, item) for m, item in ITEMS]
    for k in [1, 2, 3, LAYERS, None]:
        batched = model.embed(ITEMS, layer=k)
        expected = torch.stack([r[LAYERS if k is None else k] for r in references])
        torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
    # the layers really differ, so matching them all means the layer asked for is the one read
    assert not torch.allclose(model.embed(ITEMS, layer=1), model.embed(ITEMS, layer=2), atol=1e-3)
    # the last layer is the final, normed states: the same as no layer at all
    torch.testing.assert_close(model.embed(ITEMS, layer=LAYERS), model.embed(ITEMS), atol=0, rtol=0)


def test_the_batch_is_padded(model):
    # guards the test above: the inputs must take different numbers of positions
    sizes = set()
    for modality, item in ITEMS:
        if modality == "text":
            sizes.add(len(model.tokenizer(item, add_special_tokens=False)["input_ids"]))
        else:
            tokens = model.encoders[modality](**model.processor.featurizers[modality].collate(
                [model.processor.featurizers[modality](item)]
            ))
            sizes.add(int(tokens.mask.sum()))
    assert len(sizes) == len(ITEMS)


def _count_calls(modules) -> tuple[list[int], list]:
    counts = [0] * len(modules)
    handles = []
    for i, module in enumerate(modules):

        def hook(_module, _args, _output, i=i):
            counts[i] += 1

        handles.append(module.register_forward_hook(hook))
    return counts, handles


def test_the_forward_stops_after_layer_k_and_leaves_no_hook(model):
    decoder = model.llm.get_decoder()
    counts, handles = _count_calls([*decoder.layers, decoder.norm, model.llm.lm_head])
    try:
        model.embed(ITEMS, layer=2)
        assert counts == [1, 1, 0, 0, 0, 0]  # layers 3 and 4, the final norm and the LM head never ran
        model.embed(ITEMS)
        assert counts == [2, 2, 1, 1, 1, 0]  # the full depth and the norm; logits are never computed
    finally:
        for handle in handles:
            handle.remove()
    assert all(not layer._forward_hooks for layer in decoder.layers)


@pytest.mark.parametrize("layer", [0, -1, LAYERS + 1, True, 2.0, "2"])
def test_a_layer_outside_the_backbone_is_refused(model, layer):
    with pytest.raises(ValueError, match=rf"1\.\.{LAYERS}, got {layer!r}"):
        model.embed(ITEMS[:1], layer=layer)


def test_the_stop_hook_is_removed_when_the_forward_fails(model):
    decoder = model.llm.get_decoder()

    def fail(*_):
        raise RuntimeError("layer 1 broke")

    handle = decoder.layers[0].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="layer 1 broke"):
            model.embed(ITEMS, layer=3)
    finally:
        handle.remove()
    assert not decoder.layers[2]._forward_hooks
    counts, handles = _count_calls(decoder.layers)
    model.embed(ITEMS)
    for h in handles:
        h.remove()
    assert counts == [1] * LAYERS  # nothing left behind stops a later full forward


def test_the_stop_acts_only_in_the_thread_that_asked_for_it(model):
    """Thread A stops after layer 1; thread B runs the full depth through layer 1 while A's stop
    hook sits on it (A is held inside layer 1's hooks until B is done); both get their own answer.
    """
    shallow, full = model.embed(ITEMS, layer=1), model.embed(ITEMS)
    a_inside, b_done = threading.Event(), threading.Event()
    a_thread = {}

    def hold_a(*_):
        if threading.get_ident() == a_thread.get("id"):
            a_inside.set()
            assert b_done.wait(timeout=60)

    holder = model.llm.get_decoder().layers[0].register_forward_hook(hold_a)  # runs before A's stop hook
    results: dict[str, torch.Tensor] = {}

    def run_a():
        a_thread["id"] = threading.get_ident()
        results["a"] = model.embed(ITEMS, layer=1)

    thread = threading.Thread(target=run_a)
    try:
        thread.start()
        assert a_inside.wait(timeout=60)
        results["b"] = model.embed(ITEMS)
    finally:
        b_done.set()
        thread.join(timeout=60)
        holder.remove()
    torch.testing.assert_close(results["b"], full, atol=0, rtol=0)
    torch.testing.assert_close(results["a"], shallow, atol=0, rtol=0)


def test_with_gradients_only_the_layers_that_ran_get_them():
    # tasks/lora.py trains adapters through embed's undecorated function: a stopped forward must
    # still carry gradients, to the adapters of layers 1..k only
    model = _model(lora=True)
    pooled = type(model).embed.__wrapped__(model, ITEMS, layer=2)
    pooled.pow(2).sum().backward()
    grads = {}
    for name, param in model.named_parameters():
        if "lora_A" in name:
            index = int(name.split(".layers.")[1].split(".")[0])
            grads[index] = grads.get(index, False) or (param.grad is not None and bool(param.grad.abs().sum() > 0))
    assert grads == {0: True, 1: True, 2: False, 3: False}

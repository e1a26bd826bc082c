"""kiban's CPU weight-only layers (``kiban.adapt.qlinear``) against the formulas, and the quantised
tiny backbone against float32.

Each layer must multiply by the weight its scheme defines (computed here by hand from the float
weight: int8 ``round(w / s) * s`` with ``s = max|w| / 127`` per row; int4 ``zero + (q - 8) * s`` with
``s = (max - min) / 15`` and ``zero = min + 8 s`` per group; scales in bfloat16, the kernels'
compute type), which checks the kernels' packing and conventions; and be close to the float layer.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from kiban.adapt.qlinear import Int4Linear, Int8Linear
from kiban.adapt.quantize import below_heads, load_model, quantize_model, save_quantized, saved_float_layers
from kiban.tiny import tiny_model


def _linear(width: int, out: int, *, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(width, out, bias=bias).eval()


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_int8_linear_multiplies_by_the_per_row_symmetric_weight(monkeypatch):
    monkeypatch.setattr("kiban.adapt.qlinear._ROWS", 16)  # quantised in blocks of rows, as the LM head is
    linear = _linear(96, 48, bias=True)
    layer = Int8Linear.from_linear(linear)
    w = linear.weight.detach()
    scale = _bf16(w.abs().amax(dim=1) / 127)
    by_hand = torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None]
    assert layer.weight.dtype == torch.int8 and layer.weight.abs().amax(dim=1).ge(126).all()
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        y = layer(x)
        assert y.shape == (2, 5, 48) and y.dtype == torch.float32
        # the kernel's output is rounded to bfloat16 (relative 2**-8)
        assert _relative(y, _bf16(x) @ by_hand.T + linear.bias) < 4e-3
        assert _relative(y, linear(x)) < 0.01


def test_int4_linear_multiplies_by_the_group_wise_asymmetric_weight(monkeypatch):
    monkeypatch.setattr("kiban.adapt.qlinear._ROWS", 16)
    linear = _linear(128, 32)
    layer = Int4Linear.from_linear(linear, group_size=64)
    groups = linear.weight.detach().reshape(32, 2, 64)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = _bf16((high - low) / 15)
    zero = _bf16(low + 8 * step)
    by_hand = (zero + (torch.round((groups - zero) / step + 8).clamp(0, 15) - 8) * step).reshape(32, 128)
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = layer(x)
        assert _relative(y, _bf16(x) @ by_hand.T) < 4e-3
        assert _relative(y, linear(x)) < 0.1


@pytest.mark.parametrize("build", [Int8Linear.from_linear, lambda lin: Int4Linear.from_linear(lin, group_size=32)])
def test_quantised_layers_take_bfloat16_activations(build):
    linear = _linear(64, 32)
    layer = build(linear)
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = layer(x.bfloat16())
        assert y.dtype == torch.bfloat16
        assert _relative(y.float(), layer(x)) < 0.02


def test_int4_linear_refuses_shapes_its_kernel_cannot_pack():
    with pytest.raises(ValueError, match="divisible by 16"):
        Int4Linear.from_linear(_linear(64, 24), group_size=32)
    with pytest.raises(ValueError, match="group size"):
        Int4Linear.from_linear(_linear(48, 32), group_size=32)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(["molecule"]).eval()


@pytest.mark.parametrize(("mode", "layer", "tolerance"), [("int8", Int8Linear, 0.01), ("int4", Int4Linear, 0.1)])
def test_quantised_tiny_backbone_is_close_to_float(tiny, mode, layer, tolerance):
    quantized = quantize_model(copy.deepcopy(tiny), mode, float_layers=())  # every layer quantised
    linears = [m for m in tiny.llm.modules() if isinstance(m, nn.Linear)]
    fits = [m for m in linears if mode == "int8" or Int4Linear.fits(m.in_features, m.out_features, 32)]
    assert sum(isinstance(m, layer) for m in quantized.llm.modules()) == len(fits) > 0
    assert quantized.quantization == mode
    ids = tiny.tokenizer("Name a small molecule, please.", return_tensors="pt").input_ids
    items = [("molecule", "CCO"), ("molecule", "c1ccccc1O")]
    with torch.no_grad():
        assert _relative(quantized.llm(input_ids=ids).logits, tiny.llm(input_ids=ids).logits) < tolerance
        assert _relative(quantized.embed(items), tiny.embed(items)) < tolerance
    text = quantized.generate([{"messages": [{"role": "user", "content": "Hi"}]}], max_new_tokens=4)
    assert isinstance(text[0], str)


def _float_linears(model) -> list[str]:
    return [name for name, m in model.llm.named_modules() if type(m) is nn.Linear]


def test_quantisation_keeps_the_first_decoder_layer_float_by_default(tiny):
    # quantised, decoder layer 0 moves the default model's pooled molecule states most (5.0% of the
    # int8 model's 6.1%, benchmarks/README.md): by default it stays float
    quantized = quantize_model(copy.deepcopy(tiny), "int8")
    kept = _float_linears(quantized)
    assert kept and all(".layers.0." in name for name in kept)
    assert len(kept) == sum(isinstance(m, nn.Linear) for m in tiny.llm.model.layers[0].modules())
    # the float layer's weights are the float model's, untouched
    assert torch.equal(
        quantized.llm.model.layers[0].self_attn.q_proj.weight, tiny.llm.model.layers[0].self_attn.q_proj.weight
    )
    everything = quantize_model(copy.deepcopy(tiny), "int8", float_layers=())
    assert _float_linears(everything) == []
    last = quantize_model(copy.deepcopy(tiny), "int4", float_layers=(-1,))
    # (the tiny LM head, 259 rows, fits no int4 packing and stays float too)
    assert {name.split(".mlp")[0].split(".self_attn")[0] for name in _float_linears(last)} == {"model.layers.1", "lm_head"}


@pytest.mark.parametrize("layers", [(2,), (-3,), (True,), ("0",)])
def test_float_layers_outside_the_backbone_are_refused(tiny, layers):
    with pytest.raises(ValueError, match="float_layers: .* is not a decoder layer of this backbone"):
        quantize_model(copy.deepcopy(tiny), "int8", float_layers=layers)


def test_saved_quantised_model_records_and_restores_its_float_layers(tiny, tmp_path):
    save_quantized(tiny, tmp_path / "q", "int8", float_layers=(-1,))
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["float_layers"] == [-1]
    assert saved_float_layers(tmp_path / "q") == (-1,)
    again = load_model(tmp_path / "q")
    assert again.quantization == "int8"
    assert _float_linears(again) and all(".layers.1." in n for n in _float_linears(again))
    # an explicit --quantize keeps the saved float layers too (and the tiny LM head fits no int4 packing)
    int4 = [n for n in _float_linears(load_model(tmp_path / "q", quantize="int4")) if n != "lm_head"]
    assert int4 and all(".layers.1." in n for n in int4)
    with pytest.raises(ValueError, match="not a decoder layer"):
        save_quantized(tiny, tmp_path / "bad", "int8", float_layers=(5,))
    assert not (tmp_path / "bad").exists()


def test_below_heads_names_the_decoder_layers_under_each_heads_states():
    assert below_heads([2], 30) == {0, 1}
    assert below_heads([None, 1, 3], 30) == {0, 1, 2}
    assert below_heads([None, 30], 30) == set()  # final states: keeping every layer would undo it
    assert below_heads([], 30) == set()


def test_quantised_model_keeps_float_the_layers_its_heads_read(tiny, tmp_path):
    # a head on hidden_states[1] reads decoder layer 0's output: loaded for serving or predicting,
    # quantised, that layer stays float even when the saved record quantises every layer, so the
    # head sees exactly float32's states and gives exactly its float predictions
    from kiban.tasks.heads import HeadConfig, create_head
    from kiban.tasks.predict import load_model_with_heads

    width = tiny.llm.get_input_embeddings().embedding_dim
    config = HeadConfig(task="size", modality="molecule", kind="regression", labels=["y"], input_dim=width, layer=1)
    torch.manual_seed(0)
    head = create_head(config).eval()
    save_quantized(tiny, tmp_path / "m", "int8", float_layers=())
    head.save(tmp_path / "m" / "heads" / "size")
    model, heads = load_model_with_heads(tmp_path / "m")
    assert model.quantization == "int8"
    assert {name.split(".", 3)[2] for name in _float_linears(model)} == {"0"}  # layer 0 only
    items = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1"]
    assert heads["size"].predict(model, items) == head.predict(tiny, items)
    # without the head, the record's every-layer quantisation applies, and the states move
    plain = load_model(tmp_path / "m")
    assert _float_linears(plain) == []
    with torch.no_grad():
        moved = plain.embed([("molecule", s) for s in items], layer=1)
        assert not torch.equal(moved, tiny.embed([("molecule", s) for s in items], layer=1))

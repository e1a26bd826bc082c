"""kiban's compiled int8 decode kernel (``kiban.adapt.int8_gemv``) against the float product, and
how ``Int8Linear`` chooses between it and ATen's kernel.

The kernel is built here once per machine (about 40 s, then cached in TORCH_EXTENSIONS_DIR); on a CPU
without AVX-512F the kernel tests skip, and the layer's ATen path is what the other tests check.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from kiban.adapt.int8_gemv import MAX_ROWS, int8_gemv, kernel_available
from kiban.adapt.qlinear import Int8Linear

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no AVX-512F CPU or no C++ toolchain")


def _exact(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.double() @ weight.double().T) * scale.double()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, MAX_ROWS])
@pytest.mark.parametrize(("width", "out"), [(96, 48), (100, 37), (576, 1536), (7, 5)])
def test_kernel_equals_the_float_product(rows, width, out):
    # widths that are not a multiple of 16 and outputs not a multiple of 4 take the tail loops
    generator = torch.Generator().manual_seed(rows * 1000 + width)
    x = torch.randn(rows, width, generator=generator)
    weight = torch.randint(-127, 128, (out, width), dtype=torch.int8, generator=generator)
    scale = torch.rand(out, generator=generator) / 100
    y = int8_gemv(x, weight, scale)
    assert y.shape == (rows, out) and y.dtype == torch.float32
    exact = _exact(x, weight, scale)
    assert float((y.double() - exact).abs().max() / exact.abs().max()) < 1e-5


@needs_kernel
def test_kernel_output_does_not_depend_on_the_thread_count():
    x = torch.randn(3, 576)
    weight = torch.randint(-127, 128, (1000, 576), dtype=torch.int8)
    scale = torch.rand(1000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int8_gemv(x, weight, scale)
        torch.set_num_threads(2)
        two = int8_gemv(x, weight, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each output row is summed by one thread, in one order


def test_kernel_declines_what_it_does_not_take():
    weight = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    scale = torch.rand(8)
    assert int8_gemv(torch.randn(MAX_ROWS + 1, 16), weight, scale) is None  # a long prefill: the float matmul
    assert int8_gemv(torch.randn(2, 16, dtype=torch.bfloat16), weight, scale) is None
    assert int8_gemv(torch.randn(2, 16, requires_grad=True), weight, scale) is None


def test_kernel_is_switched_off_by_the_environment():
    code = "from kiban.adapt.int8_gemv import kernel_available; print(kernel_available())"
    env = {**os.environ, "KIBAN_INT8_KERNEL": "off"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_kernel
def test_int8_linear_multiplies_float32_activations_at_every_batch_size():
    # decode steps and short prefills (<= MAX_ROWS rows) take the kernel; long prefills and batches
    # of inputs to embed the de-quantised weight through the float matmul, a block of rows at a time
    torch.manual_seed(0)
    linear = nn.Linear(208, 70, bias=True).eval()
    layer = Int8Linear.from_linear(linear)
    exact_weight = layer.dequantized()
    with torch.no_grad():
        for shape in [(1, 3, 208), (MAX_ROWS, 208), (2, MAX_ROWS, 208), (300, 208)]:
            x = torch.randn(shape)
            y = layer(x)
            by_hand = x @ exact_weight.T + linear.bias
            assert y.shape == (*shape[:-1], 70) and y.dtype == torch.float32
            assert float((y - by_hand).abs().max() / by_hand.abs().max()) < 1e-5, shape
        # so a row's output does not depend on how many rows came with it (to float32 rounding)
        x = torch.randn(MAX_ROWS + 36, 208)  # the kernel for 3 rows, the float matmul for 100
        assert torch.allclose(layer(x[:3]), layer(x)[:3], rtol=1e-5, atol=1e-6)


def test_int8_linear_dequantizes_large_batches_in_blocks_of_output_rows(monkeypatch):
    monkeypatch.setattr("kiban.adapt.qlinear._ROWS", 16)  # 70 rows: blocks of 16, 16, 16, 16, 6
    torch.manual_seed(1)
    linear = nn.Linear(64, 70).eval()
    layer = Int8Linear.from_linear(linear)
    with torch.no_grad():
        x = torch.randn(MAX_ROWS + 36, 64)
        assert torch.allclose(layer(x), x @ layer.dequantized().T + linear.bias, rtol=1e-5, atol=1e-6)
        wide = layer(x.bfloat16())  # bfloat16 in, bfloat16 out, through the same path
        assert wide.dtype == torch.bfloat16 and float((wide.float() - layer(x)).abs().max()) < 0.05


def test_int8_linear_refuses_widths_atens_kernel_would_crash_on():
    # torch 2.14's _weight_int8pack_mm ends the process for an input width not a multiple of 16
    with pytest.raises(ValueError, match="divisible by 16"):
        Int8Linear.from_linear(nn.Linear(100, 32))

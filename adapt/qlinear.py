"""Weight-only quantised linear layers for the CPU, calling PyTorch's packed-weight kernels directly.

torchao 0.18's int8 weight-only tensor, run eagerly on the CPU, converts the whole int8 weight to
float on every call (``torch.mm(x, qdata.t().to(float32)) * scale``), so it is slower than the float
layer it replaces; these layers call the fused ATen kernels instead, which read the packed integers
and scale inside the matmul:

    Int8Linear   int8 weights [out, in], one symmetric scale per output row (``max|w| / 127``);
                 ``aten._weight_int8pack_mm``; where it builds, kiban's AVX-512 kernel
                 ``kiban.adapt.int8_gemv`` for up to 64 float32 rows (decode steps), and a
                 de-quantised float matmul above
    Int4Linear   int4 weights, one scale and zero point per group of ``group_size`` inputs
                 (asymmetric, tinygemm's convention ``w ≈ (q - 8) * scale + zero``, ``q`` in 0..15);
                 ``aten._weight_int4pack_mm_for_cpu``

ATen's kernels run in bfloat16: in torch 2.14 both take float32 activations only on a scalar path
(50-100x slower than the float32 layer, benchmarks/quantized_kernels.py), while bfloat16 takes the
vectorised one (AVX512 / AVX2). So the input is rounded to bfloat16 for the product, the scales are
kept in bfloat16 (the integers are chosen against the rounded scales, so they absorb that rounding),
the kernel accumulates in float32, and the output is returned in the input's dtype. Both are
CPU-only kernels: ``kiban.adapt.quantize`` uses torchao on CUDA, where its kernels are the fast path.
"""

from __future__ import annotations

import torch
from torch import nn

from kiban.adapt.int8_gemv import MAX_ROWS, int8_gemv

__all__ = ["Int4Linear", "Int8Linear"]


COMPUTE_DTYPE = torch.bfloat16  # the kernels' vectorised path (see the module docstring)
_ROWS = 4096  # output rows quantised at a time


class Int8Linear(nn.Module):
    """``y = x @ (q * scale[:, None]).T + bias`` with int8 ``q`` [out, in] and ``scale`` [out] (float32
    holding bfloat16-rounded values).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False) -> None:
        """Empty int8 weights (fill them with ``from_linear`` or a state dict)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        # float32 holding bfloat16-rounded values: exact in either kernel's dtype
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @staticmethod
    def fits(in_features: int) -> bool:
        """Whether ATen's kernel takes the layer: torch 2.14's ``_weight_int8pack_mm`` crashes the
        process (a segmentation fault, no error) for an input width that is not a multiple of 16.
        """
        return in_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantise ``linear``'s weight: per output row, ``scale = max|w| / 127`` (rounded to bfloat16),
        ``q = round(w / scale)`` clamped to -127..127.
        """
        if not cls.fits(linear.in_features):
            raise ValueError(f"int8 needs in_features divisible by 16 (ATen's kernel), got {linear.in_features}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        # a block of rows at a time: the float temporaries of the LM head (49152 rows) would
        # otherwise add hundreds of MB to the process's peak memory
        for rows in torch.arange(linear.out_features).split(_ROWS):
            weight = linear.weight.detach()[rows].float()
            # an all-zero row keeps scale > 0; q is chosen against the rounded scale the kernel uses
            scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(COMPUTE_DTYPE)
            layer.weight[rows] = torch.round(weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
            layer.scale[rows] = scale.float()
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer.to(linear.weight.device)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out, in] this layer multiplies by."""
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., in] float -> [..., out] in ``x``'s dtype.

        Up to ``MAX_ROWS`` (64) rows (a decode step, a short prefill): ``kiban.adapt.int8_gemv``
        where it is built (float32 activations), else ATen's kernel (bfloat16 activations). More
        rows (a long prefill, a batch of inputs to embed): the weight de-quantised a block of rows
        at a time and multiplied in ``x``'s dtype by the float matmul, which there is nearly as fast
        as float32's and up to twice ATen's int8 kernel (benchmarks/README.md, "Quantised
        inference").
        """
        y = int8_gemv(x, self.weight, self.scale, self.bias)  # the common case, in one call
        if y is not None:
            return y
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > MAX_ROWS:
            y = self._dequantized_product(flat)
        else:
            flat = flat.to(COMPUTE_DTYPE).contiguous()
            scale = self.scale.to(COMPUTE_DTYPE)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _dequantized_product(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat @ (q * scale[:, None]).T`` in ``flat``'s dtype, de-quantising ``_ROWS`` output rows
        at a time (bounded temporaries: the LM head's float weight would be 113 MB at once).
        """
        out = flat.new_empty(flat.shape[0], self.out_features)
        for start in range(0, self.out_features, _ROWS):
            rows = slice(start, start + _ROWS)
            weight = self.weight[rows].to(flat.dtype).mul_(self.scale[rows, None].to(flat.dtype))
            torch.matmul(flat, weight.T, out=out[:, rows])
        return out

    def extra_repr(self) -> str:
        """Shape and scheme, as ``print(model)`` shows them."""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row symmetric"


class Int4Linear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` int4, group-wise asymmetric, packed for the CPU tinygemm kernel.

    Needs ``in_features % group_size == 0``, ``group_size`` in 32 / 64 / 128 and ``out_features % 16
    == 0`` (the kernel's packing; ``fits``).
    """

    def __init__(self, in_features: int, out_features: int, *, group_size: int, bias: bool = False) -> None:
        """Empty packed weights (fill them with ``from_linear``)."""
        super().__init__()
        if not self.fits(in_features, out_features, group_size):
            raise ValueError(
                f"int4 needs in_features ({in_features}) divisible by the group size (32/64/128, got "
                f"{group_size}) and out_features ({out_features}) divisible by 16"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", _pack_int4(torch.zeros(out_features, in_features, dtype=torch.int32)))
        # [in / group_size, out, 2]: (scale, zero) per group and output row, tinygemm's layout
        self.register_buffer(
            "scale_and_zero", torch.zeros(in_features // group_size, out_features, 2, dtype=COMPUTE_DTYPE)
        )
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @staticmethod
    def fits(in_features: int, out_features: int, group_size: int) -> bool:
        """Whether the kernel takes an ``in_features`` -> ``out_features`` layer in groups of ``group_size``."""
        return group_size in (32, 64, 128) and in_features % group_size == 0 and out_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int) -> Int4Linear:
        """Quantise ``linear``'s weight per group: ``scale = (max - min) / 15``, ``zero = min + 8 * scale``
        (both rounded to bfloat16), ``q = round((w - zero) / scale) + 8`` clamped to 0..15.
        """
        out_features, in_features = linear.weight.shape
        layer = cls(in_features, out_features, group_size=group_size, bias=linear.bias is not None)
        q = torch.empty(out_features, in_features, dtype=torch.int32)
        scale_and_zero = torch.empty(out_features, in_features // group_size, 2, dtype=COMPUTE_DTYPE)
        for rows in torch.arange(out_features).split(_ROWS):  # as Int8Linear: bounded temporaries
            groups = linear.weight.detach()[rows].float().reshape(len(rows), -1, group_size)
            low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
            scale = ((high - low) / 15).clamp(min=1e-6).to(COMPUTE_DTYPE).float()
            zero = (low + 8 * scale).to(COMPUTE_DTYPE).float()
            q[rows] = torch.round((groups - zero) / scale + 8).clamp(0, 15).to(torch.int32).reshape(len(rows), -1)
            scale_and_zero[rows] = torch.cat([scale, zero], dim=-1).to(COMPUTE_DTYPE)
        layer.weight = _pack_int4(q)
        layer.scale_and_zero = scale_and_zero.transpose(0, 1).contiguous()
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., in] float -> [..., out] in ``x``'s dtype."""
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.scale_and_zero)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """Shape and scheme, as ``print(model)`` shows them."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 asymmetric, group_size={self.group_size}"
        )


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int32 [out, in] values 0..15 -> the CPU kernel's packed uint8 layout (two per byte)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # inner-k tiles: unused on the CPU

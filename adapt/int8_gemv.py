"""A compiled int8-weight x float32 kernel for decoding on AVX-512 CPUs: ``Int8Linear``'s fast path.

A decode step multiplies a few rows of activations (one per sequence in the batch) by every weight
of the backbone, so its cost is reading the weights. PyTorch's ``aten._weight_int8pack_mm`` (the
layer's path without this kernel) rounds the activations to bfloat16, and for 2-16 rows used one
thread here (benchmarks/README.md, "Quantised inference"). This kernel keeps the activations in
float32: per pass it turns 4 output rows of int8 weights into float32 in AVX-512 registers, 16 at a
time, and multiplies them with up to 4 activation rows (more rows: more passes); the output rows
are split over PyTorch's intra-op threads (``at::parallel_for`` with OpenMP). It computes exactly
``x @ (q * scale[:, None]).T + bias`` in float32 (summation order aside). Up to ``MAX_ROWS`` rows
(decode steps, the prefill of a short prompt) it beats both ATen's int8 kernel and a de-quantised
float matmul on SmolLM2-135M's shapes; above, the float matmul wins (``Int8Linear`` switches).

It is built on first use with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and
``ninja``; about 40 s once, then loaded from ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) with ``-march=native``, under a name keyed by the source, the torch
version and location and the CPU's model and flags, so that a cache folder shared by a cluster's
nodes never hands one CPU's build to another, and virtualenvs do not rebuild each other's.
``int8_gemv`` returns None, and the layer uses ATen's kernel, where the CPU has no AVX-512F, the
build fails (one warning, once per process) or ``KIBAN_INT8_KERNEL=off``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["MAX_ROWS", "int8_gemv", "kernel_available"]

log = logging.getLogger(__name__)

MAX_ROWS = 64  # activation rows the kernel takes (a decode step, a short prefill): above, a float matmul is faster

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#ifndef __AVX512F__
#error "kiban's int8 kernel needs AVX-512F"
#endif

// y[m, o] = s[o] * sum_i x[m, i] * w[o, i] for the M rows of x and output rows [o0, o1)
template <int M>
static void rows(const float* x, const int8_t* w, const float* s, float* y, int64_t I, int64_t O,
                 int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {  // 4 output rows at a time: each activation load feeds 4 FMAs
    __m512 acc[4][M];
    for (int r = 0; r < 4; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    const int8_t* w0 = w + o * I;
    int64_t i = 0;
    for (; i + 16 <= I; i += 16) {
      __m512 wf[4];
      for (int r = 0; r < 4; ++r)
        wf[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w0 + r * I + i))));
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * I + i);
        for (int r = 0; r < 4; ++r) acc[r][m] = _mm512_fmadd_ps(xv, wf[r], acc[r][m]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int m = 0; m < M; ++m) {
        float t = _mm512_reduce_add_ps(acc[r][m]);
        for (int64_t j = i; j < I; ++j) t += x[m * I + j] * (float)w0[r * I + j];
        y[m * O + o + r] = t * s[o + r];
      }
  }
  for (; o < o1; ++o) {  // the last < 4 output rows
    const int8_t* wr = w + o * I;
    for (int m = 0; m < M; ++m) {
      float t = 0.f;
      for (int64_t j = 0; j < I; ++j) t += x[m * I + j] * (float)wr[j];
      y[m * O + o] = t * s[o];
    }
  }
}

template <int M>
static void pass(const float* x, const int8_t* w, const float* s, float* y, int64_t I, int64_t O) {
  const int64_t quads = (O + 3) / 4;
  at::parallel_for(0, quads, 16, [&](int64_t begin, int64_t end) {
    rows<M>(x, w, s, y, I, O, begin * 4, std::min(end * 4, O));
  });
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor s, c10::optional<torch::Tensor> bias) {
  // x [..., in] float32 -> [..., out]: the leading dimensions are flattened into rows here, and
  // the bias added here, so that a decode step costs the layer one call
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1, "x: float32 [..., in]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == x.size(-1),
              "w: contiguous int8 [out, in]");
  TORCH_CHECK(s.dim() == 1 && s.scalar_type() == at::kFloat && s.is_contiguous() && s.size(0) == w.size(0),
              "s: contiguous float32 [out]");
  const int64_t I = w.size(1), O = w.size(0);
  auto xc = x.contiguous();
  const int64_t R = I == 0 ? 0 : xc.numel() / I;
  auto shape = x.sizes().vec();
  shape.back() = O;
  auto y = torch::empty(shape, x.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) pass<4>(xp + r * I, wp, sp, yp + r * O, I, O);
  switch (R - r) {
    case 3: pass<3>(xp + r * I, wp, sp, yp + r * O, I, O); break;
    case 2: pass<2>(xp + r * I, wp, sp, yp + r * O, I, O); break;
    case 1: pass<1>(xp + r * I, wp, sp, yp + r * O, I, O); break;
  }
  if (bias.has_value()) y.add_(*bias);
  return y;
}
"""


def _cpu_identity() -> tuple[str, set[str]]:
    """The CPU's model name and flags from /proc/cpuinfo (Linux); ("", set()) elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return fields.get("model name", ""), set(fields.get("flags", "").split())


@functools.cache
def _extension() -> ModuleType | None:
    """The built kernel, or None where it cannot be used (see the module docstring)."""
    if os.environ.get("KIBAN_INT8_KERNEL", "").lower() in ("off", "0", "false"):
        return None
    model, flags = _cpu_identity()
    if "avx512f" not in flags:
        return None
    # torch's location too: its headers are the build's inputs, and two virtualenvs sharing one
    # build folder would otherwise rebuild it in turn (ninja sees the other's headers change)
    identity = [_SOURCE, torch.__version__, str(Path(torch.__file__).parent), model, " ".join(sorted(flags))]
    key = hashlib.sha256("\n".join(identity).encode())
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline(
            f"kiban_int8_gemv_{key.hexdigest()[:16]}",
            cpp_sources=[_SOURCE],
            functions=["int8_gemv"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # no compiler, no ninja, an unwritable cache: ATen's kernel still works
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        log.warning("int8 decode kernel not built (%s); using ATen's _weight_int8pack_mm", first_line)
        return None


def kernel_available() -> bool:
    """Whether the compiled kernel is in use on this machine (builds it on the first call)."""
    return _extension() is not None


def int8_gemv(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``x @ (weight * scale[:, None]).T + bias`` for float32 ``x`` [..., in] on the CPU with at most
    ``MAX_ROWS`` rows, int8 ``weight`` [out, in], float32 ``scale`` [out] and float32 ``bias``
    [out] or None; [..., out], or None where the kernel does not apply (too many rows, another
    dtype or device, a tensor that needs a gradient, or no kernel on this machine).
    """
    if (
        x.dtype != torch.float32
        or scale.dtype != torch.float32  # a layer cast after quantisation (model.to(bfloat16))
        or x.numel() > MAX_ROWS * weight.shape[1]
        or x.device.type != "cpu"
        or x.requires_grad
    ):
        return None
    extension = _extension()
    return None if extension is None else extension.int8_gemv(x, weight, scale, bias)

"""Five small C++ kernels for bf16 inference on x86 CPUs, built on first use by torch's extension loader,
an fp32 route for products of a few rows, and `install`, which attaches them to a model's layers from
outside the model, on the CPUs where they win.

Why they exist: on a CPU without bf16 instructions, ATen runs a batch-1 bf16 matmul by widening each
weight to fp32 in a loop bound by its own arithmetic, so bf16 weights, though half the bytes, decode no
faster than fp32 ones. `linear` widens 16 weights with two shuffles and streams the matrix at close to
memory bandwidth (from 32 rows on, as in a prefill, MKL's fp32 GEMM on the widened weight is faster
still, and `linear` calls that instead). At batch 1 the rest of a decode step is dozens of tiny ops per
layer whose dispatch costs more than their math: RMSNorm in fp32 is nine ATen ops, RoPE six, and SDPA
for one query is slow to set up; `rms_norm`, `rope` and `decode_attention` make each of them one call.
`int8_linear` is `linear` for llama/quant.py's int8 weights (a scale per row), which that layer calls
itself where the "linear" primitive serves, for 1 to 3 rows: ATen's int8 kernel reads a large matrix (an
LM head) at about half the bandwidth, but widens each weight once for all rows, so from 4 rows it wins.
`fp32_linear` is no kernel but a layout: for 8 to 48 rows (a batched decode step), MKL multiplies
x [rows, K] by a weight stored [N, K] about half as fast as it computes weight @ x^T with the weight as
the left operand, the same sums over the same contiguous rows (docs/benchmarks.md).
Each kernel computes what the model's PyTorch code computes, rounding to bf16 at the same places (RoPE
is bit-identical; the others sum in another order and keep more in fp32).

They replace primitives only: a bias-free nn.Linear's product, an RMSNorm (after checking on a probe
that the layer still computes what the kernel does: an edited norm keeps its own code, with a warning),
and an Attention layer's `rope` and `attend` (the functions its forward calls), never a forward of the
model's own. So a change to the model, QK-norm say, runs with the kernels as without them.

Which primitives serve depends on the CPU (`cpu_kind()`), from measurement (`benchmarks/cpu_kernels.py`,
docs/benchmarks.md): see SERVED_ON. LLAMA_CPU_KERNELS=0 (read when Python starts) turns them off, and a
comma list such as `linear,rope` chooses which serve on any CPU; `with disabled():` turns them off for a
stretch of code. They serve bf16 CPU inference only, and `fp32_linear` fp32 CPU inference (no autograd,
not under torch.compile); generation, the engine and classification install them. The first use compiles
them (about a minute; cached in $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions). Without a C++
compiler they warn once and the PyTorch code runs.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import types
import warnings
from collections.abc import Collection, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .model import Attention, RMSNorm, apply_rope, attention

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

using at::BFloat16;
using at::Tensor;

// A bf16 is the top half of an fp32. Unpacking 16 bf16 words against zeros gives two vectors of 8 fp32:
// the low one holds words {0-3, 8-11}, the high one {4-7, 12-15}. x is stored once in that order, so
// the inner loop needs no other shuffle.
static inline __m256 widen_low(__m256i w) {
  return _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), w));
}
static inline __m256 widen_high(__m256i w) {
  return _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), w));
}
static inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// y [..., N] = x [..., K] @ w [N, K]^T with fp32 sums, for the few rows of decoding. K is a multiple of 32,
// w contiguous.
Tensor linear(const Tensor& input, const Tensor& w) {
  const Tensor x = input.reshape({-1, input.size(-1)}).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), blocks = K / 16;
  std::vector<float> xs(M * K);
  const BFloat16* xp = x.data_ptr<BFloat16>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = k % 16, slot = (i & 3) + (i & 8 ? 4 : 0) + (i & 4 ? 8 : 0);
      xs[m * K + k - i + slot] = float(xp[m * K + k]);
    }
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = N;
  Tensor y = at::empty(shape, x.options());
  BFloat16* yp = y.data_ptr<BFloat16>();
  const __m256i* wp = reinterpret_cast<const __m256i*>(w.data_ptr<BFloat16>());
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const __m256i* row = wp + n * blocks;
      if (n + 16 < end)  // ask for the row 16 ahead now: one core alone cannot keep enough reads in flight
        for (int64_t b = 0; b < blocks; b += 2)
          _mm_prefetch(reinterpret_cast<const char*>(row + 16 * blocks + b), _MM_HINT_T0);
      for (int64_t m = 0; m < M; ++m) {  // the row stays in L1 while every x reuses it
        const float* xr = xs.data() + m * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  // four sums hide the FMA latency
        for (int64_t b = 0; b < blocks; b += 2, xr += 32) {
          const __m256i w0 = _mm256_loadu_si256(row + b), w1 = _mm256_loadu_si256(row + b + 1);
          a0 = _mm256_fmadd_ps(widen_low(w0), _mm256_loadu_ps(xr), a0);
          a1 = _mm256_fmadd_ps(widen_high(w0), _mm256_loadu_ps(xr + 8), a1);
          a2 = _mm256_fmadd_ps(widen_low(w1), _mm256_loadu_ps(xr + 16), a2);
          a3 = _mm256_fmadd_ps(widen_high(w1), _mm256_loadu_ps(xr + 24), a3);
        }
        yp[m * N + n] = BFloat16(horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))));
      }
    }
  });
  return y;
}

// y [M, N] = x [M, K] @ (w [N, K] * scales [N, None])^T for int8 weights with a bf16 scale per row (llama/quant.py's
// Int8Linear): each weight widened to fp32, sums in fp32, scaled and rounded to bf16 once. K is a multiple of 32,
// x and w contiguous. ATen's _weight_int8pack_mm reads a matrix larger than the caches at about half the
// bandwidth this loop reaches, as linear's does, by asking for rows ahead.
Tensor int8_linear(const Tensor& x, const Tensor& w, const Tensor& scales) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  std::vector<float> xs(M * K);
  const BFloat16* xp = x.data_ptr<BFloat16>();
  for (int64_t i = 0; i < M * K; ++i) xs[i] = float(xp[i]);
  Tensor y = at::empty({M, N}, x.options());
  BFloat16* yp = y.data_ptr<BFloat16>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const BFloat16* sp = scales.data_ptr<BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = wp + n * K;
      if (n + 16 < end)
        for (int64_t k = 0; k < K; k += 64) _mm_prefetch(reinterpret_cast<const char*>(row + 16 * K + k), _MM_HINT_T0);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xs.data() + m * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; k += 32) {
          const __m256i w0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k)));
          const __m256i w1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 8)));
          const __m256i w2 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 16)));
          const __m256i w3 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 24)));
          a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(w0), _mm256_loadu_ps(xr + k), a0);
          a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(w1), _mm256_loadu_ps(xr + k + 8), a1);
          a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(w2), _mm256_loadu_ps(xr + k + 16), a2);
          a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(w3), _mm256_loadu_ps(xr + k + 24), a3);
        }
        const float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        yp[m * N + n] = BFloat16(sum * float(sp[n]));
      }
    }
  });
  return y;
}

// The model's RMSNorm: normalize each row in fp32, round to bf16, multiply by the bf16 weight.
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  Tensor y = at::empty_like(x);
  const BFloat16 *xp = x.data_ptr<BFloat16>(), *wp = weight.data_ptr<BFloat16>();
  BFloat16* yp = y.data_ptr<BFloat16>();
  for (int64_t r = 0; r < rows; ++r) {
    const BFloat16* xr = xp + r * D;
    float squares = 0;
    for (int64_t d = 0; d < D; ++d) squares += float(xr[d]) * float(xr[d]);
    const float scale = 1.0f / std::sqrt(squares / D + float(eps));
    for (int64_t d = 0; d < D; ++d) yp[r * D + d] = BFloat16(float(wp[d]) * float(BFloat16(float(xr[d]) * scale)));
  }
  return y;
}

// The model's apply_rope, x * cos + rotate_half(x) * sin with each product and the sum rounded to bf16
// as the eager ops round them. x [B, H, T, D] with a contiguous last dim; cos, sin [T, D] contiguous.
Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  Tensor y = at::empty({B, H, T, D}, x.options());
  const BFloat16 *xp = x.data_ptr<BFloat16>(), *cp = cos.data_ptr<BFloat16>(), *sp = sin.data_ptr<BFloat16>();
  BFloat16* yp = y.data_ptr<BFloat16>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const BFloat16* xr = xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
        const BFloat16 *c = cp + t * D, *s = sp + t * D;
        BFloat16* yr = yp + ((b * H + h) * T + t) * D;
        for (int64_t d = 0; d < D; ++d) {
          const float rotated = d < half ? -float(xr[d + half]) : float(xr[d - half]);
          yr[d] = BFloat16(float(BFloat16(float(xr[d]) * float(c[d]))) + float(BFloat16(rotated * float(s[d]))));
        }
      }
  return y;
}

static inline __m256 widen8(const BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Attention of one new query per row, q [B, H, 1, D], over keys and values [B, KVH, L, D] with contiguous
// rows (views of the KV cache), each KV head shared by H / KVH query heads. mask [B, L] marks the keys
// each row may see (none: all). Scores, softmax and the weighted sum in fp32. D is a multiple of 8.
Tensor decode_attention(const Tensor& q, const Tensor& k, const Tensor& v, const c10::optional<Tensor>& mask) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), L = k.size(2), group = H / k.size(1);
  const float scale = 1.0f / std::sqrt(float(D));
  Tensor y = at::empty({B, H, 1, D}, q.options());
  const bool* visible = mask ? mask->data_ptr<bool>() : nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(L), sum(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const BFloat16* qr = q.data_ptr<BFloat16>() + b * q.stride(0) + h * q.stride(1);
      const BFloat16* keys = k.data_ptr<BFloat16>() + b * k.stride(0) + h / group * k.stride(1);
      const BFloat16* values = v.data_ptr<BFloat16>() + b * v.stride(0) + h / group * v.stride(1);
      float top = -INFINITY, total = 0;
      for (int64_t l = 0; l < L; ++l) {
        weights[l] = -INFINITY;
        if (visible && !visible[b * L + l]) continue;
        __m256 dot = _mm256_setzero_ps();
        const BFloat16* key = keys + l * k.stride(2);
        for (int64_t d = 0; d < D; d += 8) dot = _mm256_fmadd_ps(widen8(qr + d), widen8(key + d), dot);
        weights[l] = horizontal_sum(dot) * scale;
        top = std::max(top, weights[l]);
      }
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t l = 0; l < L; ++l) {
        if (weights[l] == -INFINITY) continue;
        const float w = std::exp(weights[l] - top);
        const BFloat16* value = values + l * v.stride(2);
        total += w;
        for (int64_t d = 0; d < D; d += 8)
          _mm256_storeu_ps(&sum[d], _mm256_fmadd_ps(_mm256_set1_ps(w), widen8(value + d), _mm256_loadu_ps(&sum[d])));
      }
      BFloat16* yr = y.data_ptr<BFloat16>() + bh * D;
      for (int64_t d = 0; d < D; ++d) yr[d] = BFloat16(sum[d] / total);
    }
  });
  return y;
}

TORCH_LIBRARY(llama_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor", &decode_attention);
  m.def("linear(Tensor x, Tensor w) -> Tensor", &linear);
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales) -> Tensor", &int8_linear);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", &rope);
}
"""


@functools.cache
def _build() -> bool:
    """Compile and load the kernels once per process (the build itself is cached on disk)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    from torch.utils.cpp_extension import get_default_build_root, load_inline

    key = hashlib.sha1(f"{_SOURCE}{torch.__version__}{sys.version}".encode()).hexdigest()[:10]
    build_dir = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(), f"llama_cpu_{key}")
    os.makedirs(build_dir, exist_ok=True)
    if not os.path.exists(os.path.join(build_dir, "llama_cpu.so")):
        print(f"llama: compiling the CPU bf16 kernels into {build_dir} (once, about a minute)", file=sys.stderr)
    try:
        load_inline("llama_cpu", cpp_sources=[_SOURCE], build_directory=build_dir, is_python_module=False,
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no ninja, ...: the PyTorch code still works
        warnings.warn(f"the CPU bf16 kernels could not be built, so bf16 decoding on this CPU uses slower "
                      f"PyTorch ops (set LLAMA_CPU_KERNELS=0 to skip the attempt): {error}")
        return False
    return True


# --- where they serve ------------------------------------------------------------------------------

PRIMITIVES = ("linear", "rms_norm", "rope", "attention", "fp32_linear")
BF16 = frozenset(PRIMITIVES) - {"fp32_linear"}

# The primitives the kernels take on each kind of CPU, chosen from benchmarks/cpu_kernels.py's figures
# (docs/benchmarks.md): speed and error against fp32, each kernel against ATen on that kind of CPU.
SERVED_ON: dict[str, frozenset[str]] = {
    "AVX2": BF16,  # ATen's bf16 GEMV widens in a compute-bound loop: the kernels decode ~1.6x faster;
    # fp32_linear is not measured there
    "AVX512": frozenset(PRIMITIVES),  # AVX-512 without BF16: oneDNN emulates bf16; the kernels still decode faster;
    # MKL's fp32 product of 8-48 rows runs up to 2.3x faster with the weight on the left
    "AVX512_BF16": frozenset(),  # native bf16 dot products: ATen tracks fp32 ~3x closer (0.063 vs 0.182 on SmolLM2)
}


def cpu_kind() -> str:
    """This CPU as SERVED_ON keys it: "AVX512_BF16" where bf16 arithmetic is native (AVX-512 BF16 or AMX),
    else torch's capability ("AVX2", "AVX512", or "DEFAULT" and others, where no kernel serves)."""
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "AVX512_BF16" if native else torch.backends.cpu.get_cpu_capability()


def _parse_choice(value: str) -> frozenset[str] | None:
    """LLAMA_CPU_KERNELS: "1" or unset (the CPU's own choice, None), "0" (none), or a comma list."""
    if value in ("", "1"):
        return None
    if value == "0":
        return frozenset()
    chosen = frozenset(name.strip() for name in value.split(",") if name.strip())
    unknown = sorted(chosen - set(PRIMITIVES))
    if unknown:
        raise ValueError(f"LLAMA_CPU_KERNELS names unknown kernels {unknown}: use 0, 1 or a comma list of "
                         f"{', '.join(PRIMITIVES)}")
    return chosen


_CHOICE = _parse_choice(os.environ.get("LLAMA_CPU_KERNELS", "1").strip())
ENABLED = _CHOICE != frozenset()


def chosen_primitives() -> frozenset[str]:
    """The primitives install() attaches on this CPU: LLAMA_CPU_KERNELS's list, else SERVED_ON's."""
    return SERVED_ON.get(cpu_kind(), frozenset()) if _CHOICE is None else _CHOICE


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the PyTorch code instead of the kernels inside the block (for comparisons)."""
    global ENABLED
    enabled, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = enabled


def serves(*tensors: Tensor) -> bool:
    """True for bf16 CPU inference, which the kernels serve (they are built on the first such call).

    Called several times per layer and decode step, so it is written for speed: plain loops, the
    environment read once at import.
    """
    for t in tensors:
        if t.dtype != torch.bfloat16 or not t.is_cpu:
            return False
    return ENABLED and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and _build()


def serves_linear(x: Tensor, weight: Tensor) -> bool:
    """serves() for a product whose width the kernel handles (a multiple of 32) with a contiguous weight."""
    return serves(x, weight) and x.shape[-1] % 32 == 0 and weight.is_contiguous()


# --- the kernels as functions ----------------------------------------------------------------------

def linear(x: Tensor, weight: Tensor) -> Tensor:
    if x.numel() >= 32 * x.shape[-1]:  # a prefill's many rows: MKL's fp32 GEMM wins, even widening the weight first
        return F.linear(x.float(), weight.float()).to(torch.bfloat16)
    return torch.ops.llama_cpu.linear(x, weight)


FEW_ROWS = range(8, 49)  # where fp32_linear's layout wins (benchmarks/cpu_kernels.py prints the sweep)


def serves_fp32_linear(x: Tensor, weight: Tensor) -> bool:
    """fp32 CPU inference of a product of FEW_ROWS rows (a batched decode step, not a prefill)."""
    return (x.dtype == weight.dtype == torch.float32 and x.is_cpu and x.numel() // x.shape[-1] in FEW_ROWS and ENABLED
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def fp32_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] @ weight [N, K]^T, computed as weight @ x^T: MKL's faster layout for a few rows (made
    contiguous: later ops read strided rows more slowly than the copy costs)."""
    rows = x.reshape(-1, x.shape[-1])
    return (weight @ rows.T).T.contiguous().view(*x.shape[:-1], weight.shape[0])


def serves_int8_linear(x: Tensor) -> bool:
    """Whether int8_linear takes x [rows, K] (contiguous, K a multiple of 32) in bf16 CPU inference with the
    "linear" primitive chosen: llama/quant.py's Int8Linear asks, and ATen's int8 kernel serves otherwise."""
    return serves(x) and _linear_chosen()


@functools.cache
def _linear_chosen() -> bool:
    return "linear" in chosen_primitives()


def int8_linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x [rows, K] bf16 @ (weight [N, K] int8 * scales [N] bf16)^T, in bf16."""
    return torch.ops.llama_cpu.int8_linear(x, weight, scales)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.ops.llama_cpu.rms_norm(x.contiguous(), weight.contiguous(), eps)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return torch.ops.llama_cpu.rope(x if x.stride(-1) == 1 else x.contiguous(), cos.contiguous(), sin.contiguous())


def decode_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
    """SDPA of q [B, H, 1, D] over k, v [B, KVH, L, D]; attn_mask broadcasts to [B, 1, 1, L]."""
    if attn_mask is not None:  # generation slices it from a wider mask: make its rows adjacent
        attn_mask = attn_mask.expand(q.shape[0], 1, 1, k.shape[2]).reshape(q.shape[0], -1).contiguous()
    return torch.ops.llama_cpu.decode_attention(q, k, v, attn_mask)


# --- attaching them to a model ---------------------------------------------------------------------

def install(model: nn.Module, primitives: Collection[str] | None = None) -> nn.Module:
    """Route the bf16 (or fp32) CPU inference of `model`'s primitives through the kernels; nothing changes
    for other dtypes and devices, nor on a CPU where no kernel serves.

    primitives (default: chosen_primitives()) names which: "linear" gives each bias-free nn.Linear of a
    bf16 model a forward that calls the kernel, "fp32_linear" each one of an fp32 model a forward that
    takes MKL's faster layout for a few rows, "rms_norm" each RMSNorm that still computes what the kernel
    does (an edited one keeps its forward, with a warning), "rope" and "attention" each Attention layer's
    `rope` and `attend`. Each falls back to the PyTorch code where the kernel does not serve (grad, another
    dtype, a prefill's attention). Installing twice is harmless.
    """
    chosen = chosen_primitives() if primitives is None else frozenset(primitives)
    unknown = sorted(chosen - set(PRIMITIVES))
    if unknown:
        raise ValueError(f"unknown CPU kernels {unknown}; the kernels are {', '.join(PRIMITIVES)}")
    weight = next(model.parameters(), None)
    if weight is None or not weight.is_cpu:
        return model
    if weight.dtype == torch.float32 and "fp32_linear" in chosen:  # a layout, no build needed
        for module in model.modules():
            if type(module) is nn.Linear and module.bias is None:
                module.forward = types.MethodType(_fp32_linear_forward, module)
    chosen &= BF16
    if not chosen or weight.dtype != torch.bfloat16:
        return model
    if not ENABLED or not _build():  # built now, so that a first build says so before any output, not in the middle
        return model
    for module in model.modules():
        if isinstance(module, RMSNorm) and "rms_norm" in chosen and "forward" not in vars(module):
            if _still_mirrored(module):
                module.forward = types.MethodType(_rms_norm_forward, module)
        elif type(module) is nn.Linear and module.bias is None and "linear" in chosen:
            module.forward = types.MethodType(_linear_forward, module)
        elif isinstance(module, Attention):
            if "rope" in chosen and type(module).rope is apply_rope:
                module.rope = _rope
            if "attention" in chosen and type(module).attend is attention:
                module.attend = _attend
    return model


def _still_mirrored(norm: RMSNorm) -> bool:
    """Whether this norm's own forward computes what the rms_norm kernel does, on a seeded probe: an edit
    to RMSNorm (or a subclass with its own forward) must not be replaced silently by the kernel."""
    probe = torch.randn(4, norm.weight.shape[0], generator=torch.Generator().manual_seed(0)).mul(4).to(torch.bfloat16)
    with torch.no_grad():
        own = type(norm).forward(norm, probe).float()
        ours = rms_norm(probe, norm.weight.detach().to(torch.bfloat16), norm.eps).float()
    if own.shape == ours.shape and torch.allclose(ours, own, rtol=2 ** -6, atol=1e-6):
        return True
    _warn_once(f"{type(norm).__name__}.forward no longer computes what the rms_norm CPU kernel does, so the kernel "
               f"leaves it to its own code (slower bf16 decoding, the same results)")
    return False


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message)


def _rms_norm_forward(norm: RMSNorm, x: Tensor) -> Tensor:
    if serves(x, norm.weight):
        return rms_norm(x, norm.weight, norm.eps)
    return RMSNorm.forward(norm, x)


def _linear_forward(module: nn.Linear, x: Tensor) -> Tensor:
    if serves_linear(x, module.weight):
        return linear(x, module.weight)
    return nn.Linear.forward(module, x)


def _fp32_linear_forward(module: nn.Linear, x: Tensor) -> Tensor:
    if serves_fp32_linear(x, module.weight):
        return fp32_linear(x, module.weight)
    return nn.Linear.forward(module, x)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """apply_rope, through the kernel when every row is at the same positions (cos, sin [T, D])."""
    if cos.dim() == 2 and serves(x, cos, sin):
        return rope(x, cos, sin)
    return apply_rope(x, cos, sin)


def _attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """model.attention, through the kernel for one new query per row (a decode step) over keys with
    contiguous rows; a prefill, or any other shape, runs SDPA."""
    if (q.shape[2] == 1 and not is_causal and q.shape[-1] % 8 == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and (attn_mask is None or attn_mask.dtype == torch.bool) and serves(q, k, v)):
        return decode_attention(q, k, v, attn_mask)
    return attention(q, k, v, attn_mask, is_causal)

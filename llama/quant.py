"""Weight-only int8 and int4 quantization for CPU inference: the weights stay quantized in memory, the
activations stay bf16 (or fp32), and each product runs through a CPU kernel that torch ships.

    model, tokenizer = load_pretrained("smollm2", torch.bfloat16, quantize="int4")  # the Q4_1 file as stored
    quantize(model, "int8")                                                          # any float model

- int8: one int8 code per weight and one scale per output row, w = q * scale (absmax / 127 of the row);
  `torch.ops.aten._weight_int8pack_mm`, or in bf16 decoding llama/cpu_kernels.py's `int8_linear`, which
  reads a large matrix faster; a prefill (32 rows or more) widens the weight for MKL's fp32 GEMM.
- int4: one 4-bit code per weight, and a scale and a zero per group of 32 weights along the input,
  w = (q - 8) * scale + zero (gpt-fast's convention); `torch.ops.aten._weight_int4pack_mm_for_cpu`, on
  the weight packed by `_convert_weight_to_int4pack_for_cpu`.

`quantize` swaps every bias-free nn.Linear (the q/k/v/o and MLP projections and the LM head) for one of
the layers here, from outside the model, as llama/cpu_kernels.py attaches its kernels. With tied
embeddings the LM head gets its own quantized copy of the table and the embedding lookup stays in the
float dtype (a lookup reads one row per token, so its size costs memory, not speed). RMSNorm, RoPE and
attention are untouched, so cpu_kernels.install still serves them in bf16. The layers are for inference
only (no autograd): training never builds them.

GGUF files (llama.cpp) hold quantized blocks of 32 weights, which `gguf_tensors` reads as codes and
scales (Blocks), not through gguf's float dequantizer. Under int4, Q4_0 (w = d * (q - 8)) and Q4_1
(w = d * q + m) become int4 layers with the same codes, scale = d and zero = 0 or m + 8d, exactly. Q8_0
(w = d * q, a scale per 32 weights) is requantized to one scale per row for int8 (the per-channel
kernel has no block scales; benchmarks/quant_quality.py measures what that costs: nothing visible), and
stays int8 under int4: a Q4 file that kept a tensor at 8 bits (SmolLM2's Q4_1 file keeps its embedding,
the tied LM head, in Q8_0) keeps its 8 bits, as an int4 head would cost ~5% perplexity. Q4 blocks under
int8 are multiplied out and requantized per row.
With bf16 activations the kernels take their scales in bf16, so d and m, stored as fp16, round to bf16's
8 significant bits (fp32 activations keep them exact).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from . import cpu_kernels

MODES = ("int8", "int4")
GROUP_SIZE = 32  # int4 weights per scale and zero: GGUF's block size, and the most accurate the kernel takes
_ROWS = 16  # the int4 packing wants a multiple of 16 rows: others are padded with zero rows
# From this many rows (a prefill) the int8 layer widens its weight and runs MKL's GEMM, ~10x faster there
# than the kernel, which is built for the few rows of decoding. (The int4 packing is the kernel's own,
# so int4 prefills run the kernel.)
PREFILL_ROWS = 32
# Our int8 kernel (cpu_kernels.int8_linear) widens each weight once per row of x: it beats ATen's from 1 to 3
# rows (1.9 against 3.0 ms for SmolLM2's head at one row); from 4 rows ATen's, which widens once for all,
# is faster (16 rows: 15.9 against 25.7 ms), as in a batched decode step of the server
KERNEL_ROWS = 4


def check_mode(mode: str | None, device: torch.device | str = "cpu") -> None:
    """Raise one line unless `mode` is None or a mode the layers run on `device` (the CPU only)."""
    if mode is None:
        return
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)} (or None), got {mode!r}")
    if (_INT8_MM if mode == "int8" else _INT4_MM) is None:
        raise ValueError(f"quantize={mode!r} needs torch's {mode} CPU kernel, which torch {torch.__version__} lacks; "
                         "upgrade torch (2.6 or later)")
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantize={mode!r} runs on the CPU only (torch's int8/int4 kernels are CPU kernels); "
                         f"load on the CPU, or load {torch.device(device).type} weights unquantized")


# --- the layers ------------------------------------------------------------------------------------

def _aten(name: str):
    """The op's overload itself (no lookup on each call), or None in a torch that lacks it."""
    try:
        return getattr(torch.ops.aten, name).default
    except (AttributeError, RuntimeError):
        return None


_INT8_MM = _aten("_weight_int8pack_mm")
_INT4_MM = _aten("_weight_int4pack_mm_for_cpu")


class QuantizedLinear(nn.Module):
    """A bias-free linear layer whose weight is held quantized; subclasses give the kernel call."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype, self.padded = in_features, out_features, dtype, False

    def forward(self, x: Tensor) -> Tensor:
        # Lean: in a decode step each op here costs about as much as an eighth of the kernel's own time.
        if x.dtype is not self.dtype:
            return self.forward(x.to(self.dtype)).to(x.dtype)
        y = self._matmul(x.reshape(-1, self.in_features).contiguous())
        if self.padded:  # rows added for the packing
            y = y[:, :self.out_features]
        return y.view(*x.shape[:-1], self.out_features)

    def _matmul(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def dequantize(self) -> Tensor:
        """The weight [out, in] that the kernel multiplies by, in the layer's dtype: the product with the identity."""
        return self._matmul(torch.eye(self.in_features, dtype=self.dtype))[:, :self.out_features].t().contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


class Int8Linear(QuantizedLinear):
    """y = x @ (q * scale[:, None]).T: int8 codes q [out, in] and a scale per output row."""

    def __init__(self, codes: Tensor, scales: Tensor) -> None:
        super().__init__(codes.shape[1], codes.shape[0], scales.dtype)
        self.register_buffer("weight_int8", codes.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.contiguous())
        # bf16 with a width of 32s: llama/cpu_kernels.py's int8_linear can take the decode steps
        self.kernel_fits = scales.dtype == torch.bfloat16 and self.in_features % 32 == 0

    @classmethod
    def from_float(cls, weight: Tensor, dtype: torch.dtype) -> Int8Linear:
        """Symmetric per-row quantization: scale = absmax / 127 (rounded to `dtype`), q = round(w / scale)."""
        weight = weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).to(dtype)
        codes = (weight / scales.float()[:, None]).round().clamp(-127, 127)
        return cls(codes, scales)

    def _matmul(self, x: Tensor) -> Tensor:
        codes, scales = self._buffers["weight_int8"], self._buffers["scales"]  # not nn.Module's slow __getattr__
        if x.shape[0] >= PREFILL_ROWS:  # a prefill: widening the weight for MKL's GEMM costs less than the kernel
            return torch.nn.functional.linear(x.float(), codes.float() * scales.float()[:, None]).to(x.dtype)
        if self.kernel_fits and x.shape[0] < KERNEL_ROWS and cpu_kernels.serves_int8_linear(x):  # bf16 decoding
            return cpu_kernels.int8_linear(x, codes, scales)
        return _INT8_MM(x, codes, scales)


class Int4Linear(QuantizedLinear):
    """y = x @ W.T with W = (q - 8) * scale + zero: 4-bit codes q, a scale and a zero per group of inputs."""

    def __init__(self, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int = GROUP_SIZE) -> None:
        """codes [out, in] in 0..15, scales and zeros [out, in / group_size] in the activations' dtype."""
        out_features, in_features = codes.shape
        if in_features % group_size or group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 groups of {group_size} (32, 64, 128 or 256) do not divide {in_features} inputs")
        super().__init__(in_features, out_features, scales.dtype)
        pad = -out_features % _ROWS
        self.padded = pad > 0
        if pad:
            codes = torch.cat([codes, codes.new_full((pad, in_features), 8)])
            scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, zeros))
        self.group_size = group_size
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32).contiguous(), 1))
        # the kernel's layout: [in / group_size, out, 2], (scale, zero) of each group of each row
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous())

    @classmethod
    def from_float(cls, weight: Tensor, dtype: torch.dtype, group_size: int = GROUP_SIZE) -> Int4Linear:
        """Asymmetric quantization of each group between its min and max, as gpt-fast's: scale = (max - min)
        / 15, zero = min + 8 * scale (both rounded to `dtype`), q = round((w - zero) / scale) + 8."""
        weight = weight.detach().float()
        rows, columns = weight.shape
        groups = weight.reshape(rows, columns // group_size, group_size) if columns % group_size == 0 else None
        if groups is None:
            raise ValueError(f"int4 groups of {group_size} do not divide a weight of {columns} inputs")
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=1e-6).to(dtype)
        zeros = (low + 8 * scales.float()).to(dtype)
        codes = ((groups - zeros.float()[..., None]) / scales.float()[..., None]).round().add(8).clamp(0, 15)
        return cls(codes.reshape(rows, columns), scales, zeros, group_size)

    def _matmul(self, x: Tensor) -> Tensor:
        buffers = self._buffers  # not nn.Module's slow __getattr__
        return _INT4_MM(x, buffers["weight_int4"], self.group_size, buffers["scales_and_zeros"])


# --- GGUF blocks, decoded to codes and scales --------------------------------------------------------

@dataclasses.dataclass
class Blocks:
    """A GGUF weight as its codes and per-block scales, not multiplied out.

    kind "q4": codes 0..15 and w = (q - 8) * scales + zeros (Q4_0: zeros 0; Q4_1: zeros m + 8d); kind
    "q8": int8 codes and w = q * scales. codes [out, in]; scales and zeros fp32 [out, in / 32].
    """
    kind: str
    codes: Tensor
    scales: Tensor
    zeros: Tensor | None = None

    def rows(self, permute) -> Blocks:
        """The same blocks with `permute` (a function of a row-major tensor) applied to every row's data."""
        return Blocks(self.kind, permute(self.codes), permute(self.scales),
                      None if self.zeros is None else permute(self.zeros))

    def dequantize(self) -> Tensor:
        """The fp32 weight the blocks describe (for tests and for a mode they do not fit)."""
        scales = self.scales.repeat_interleave(32, dim=1)
        if self.kind == "q8":
            return self.codes.float() * scales
        return (self.codes.float() - 8) * scales + self.zeros.repeat_interleave(32, dim=1)

    def finite(self) -> bool:
        """Whether every scale (and zero) is a number: fp16 scales can hold NaN and inf, the codes cannot."""
        return bool(self.scales.isfinite().all()) and (self.zeros is None or bool(self.zeros.isfinite().all()))

    def layer(self, mode: str, dtype: torch.dtype) -> QuantizedLinear:
        """The layer for these blocks: q4 ones under int4 keep their codes, scales and zeros; q8 ones become
        int8 in either mode, requantized per row from d * q (a file that kept a tensor at 8 bits, as Q4
        files keep the embedding and LM head, keeps it at 8 bits); q4 ones under int8 go through floats."""
        if mode == "int4" and self.kind == "q4":
            return Int4Linear(self.codes, self.scales.to(dtype), self.zeros.to(dtype), 32)
        return Int8Linear.from_float(self.dequantize(), dtype)  # q8 blocks in either mode, q4 ones under int8


# GGUF block layouts (ggml-common.h): each block of 32 weights starts with its fp16 scale d. Tensors of these
# types are read as Blocks in both modes; Blocks.layer says what becomes of each.
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
BLOCK_TYPES = tuple(_BLOCK_BYTES)


def decode_blocks(data: np.ndarray, type_name: str, columns: int) -> Blocks:
    """Blocks of a Q4_0, Q4_1 or Q8_0 tensor from its raw bytes (the gguf reader's uint8 [rows, row bytes])."""
    raw = torch.from_numpy(np.array(data, copy=True)).reshape(-1, columns // 32, _BLOCK_BYTES[type_name])
    scales = raw[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    if type_name == "Q8_0":
        return Blocks("q8", raw[..., 2:].contiguous().view(torch.int8).reshape(-1, columns), scales)
    nibbles = raw[..., 4:] if type_name == "Q4_1" else raw[..., 2:]
    # byte j of a block holds weight j in its low nibble and weight j + 16 in its high nibble
    codes = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(-1, columns)
    if type_name == "Q4_0":
        return Blocks("q4", codes, scales, torch.zeros_like(scales))
    minimums = raw[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    return Blocks("q4", codes, scales, minimums + 8 * scales)


def gguf_tensors(tensors: list[Any], config: Any, file: Path) -> Iterator[tuple[str, Tensor | Blocks]]:
    """(our name, tensor) of each weight of a llama GGUF file (`tensors`: its reader's, which
    llama/gguf.py's open_gguf(file, gguf_tensors) hands over), as open_gguf gives them, but a projection
    stored as Q4_0, Q4_1 or Q8_0 comes as its Blocks, for Blocks.layer(mode). A tied LM head stored so comes
    twice: the float table for the embedding, and as lm_head's Blocks."""
    from .gguf import ROPE_FREQS, _dequantize, _import_gguf, _our_name, _undo_llama_cpp_permute, permuted_heads

    gguf = _import_gguf()
    for tensor in tensors:
        if tensor.name == ROPE_FREQS:
            continue
        ours = _our_name(tensor.name)
        permuted = permuted_heads(ours, config)
        kept = tensor.tensor_type.name in BLOCK_TYPES and len(tensor.shape) == 2
        if kept and (ours != "embed_tokens.weight" or config.tie_word_embeddings):
            blocks = decode_blocks(tensor.data, tensor.tensor_type.name, int(tensor.shape[0]))
            if permuted is not None:
                blocks = blocks.rows(lambda t: _undo_llama_cpp_permute(t, permuted))
            yield ("lm_head.weight" if ours == "embed_tokens.weight" else ours), blocks
            if ours != "embed_tokens.weight":
                continue
        weight = _dequantize(gguf, tensor, file)
        yield ours, weight if permuted is None else _undo_llama_cpp_permute(weight, permuted)


# --- swapping the layers in ------------------------------------------------------------------------

QUANTIZERS = {"int8": Int8Linear.from_float, "int4": Int4Linear.from_float}


@torch.no_grad()
def quantize(model: nn.Module, mode: str, stored: dict[str, Blocks] | None = None,
             dtype: torch.dtype | None = None) -> nn.Module:
    """Replace each bias-free nn.Linear of `model` by its `mode` layer, in place; returns the model.

    stored: GGUF blocks by parameter name ("layers.0.mlp.up_proj.weight"), used for their layers instead
    of the float weight (which may then still be on the meta device). dtype: the activations' dtype
    (default: the embedding's). A layer whose input width is not a multiple of 32 (no Llama's) gets int8
    under "int4". The layers hold no parameters, so an optimizer would not see them.
    """
    check_mode(mode)
    if mode is None:
        return model
    stored = stored or {}
    dtype = dtype or model.embed_tokens.weight.dtype
    linears = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.bias is None]
    for name, linear in linears:
        weight_name = f"{name}.weight"
        if weight_name in stored:
            layer = stored[weight_name].layer(mode, dtype)
        elif linear.weight.is_meta:
            raise RuntimeError(f"{weight_name} has no weight to quantize")
        else:
            check_mode(mode, linear.weight.device)
            fits = mode == "int8" or linear.in_features % GROUP_SIZE == 0  # else int8: int4 groups need 32 | in
            layer = QUANTIZERS[mode if fits else "int8"](linear.weight, dtype)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, layer)
    return model

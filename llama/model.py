"""The Llama decoder, written out top-down in one file.

    tokens -> embed_tokens -> N x Block -> norm -> lm_head -> logits
    Block:  x + Attention(RMSNorm(x)) then x + MLP(RMSNorm(x))

Attention is grouped-query (num_kv_heads <= num_heads) with rotary position embeddings in the
rotate-half layout that Hugging Face Llama checkpoints use, so their q/k weights load unpermuted.
Parameter names are those of Hugging Face's LlamaForCausalLM without the leading "model.", which keeps
weight import and export a plain renaming.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import LlamaConfig
from .linear_cross_entropy import linear_cross_entropy


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the input dtype (bf16 loses too much here)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


# --- rotary position embedding ---------------------------------------------------------------------

def rope_inverse_frequencies(config: LlamaConfig) -> Tensor:
    """theta^(-2i/d) for each pair of dimensions, with Llama-3 long-context scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if config.rope_scaling is None:
        return inv_freq
    # Llama 3.1: slow frequencies (long wavelengths) are divided by `factor`, fast ones are kept, and
    # the band between is interpolated smoothly.
    s = config.rope_scaling
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_freq_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    interpolated = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s["factor"], inv_freq)
    in_between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_between, interpolated, scaled)


def rope_table(config: LlamaConfig) -> tuple[Tensor, Tensor]:
    """cos and sin for every position up to max_seq_len, shape [max_seq_len, head_dim]."""
    positions = torch.arange(config.max_seq_len, dtype=torch.float32)
    angles = torch.outer(positions, rope_inverse_frequencies(config))
    angles = torch.cat((angles, angles), dim=-1)  # rotate-half layout: first half pairs with second
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (x[i], x[i + d/2]) pair by its position's angle. x: [B, heads, T, d], cos/sin: [T, d]
    (every row at the same positions) or [B, 1, T, d] (each row at its own)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """Scaled dot-product attention of q [B, heads, T, d] over k, v [B, kv_heads, S, d]; each group of
    heads / kv_heads query heads shares one key/value head. attn_mask is True where a query may look."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


# --- the KV cache ----------------------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer, preallocated to max_len so a decode step allocates nothing.

    The model writes the new positions in place and advances `length` after each forward. Setting
    `positions` (the positions the next forward fills: [T] for every row, or [B, T], one list per row)
    switches to caller-tracked positions: writes go to those positions, attention spans the whole buffer
    under the caller's attn_mask, and `length` is the caller's to track. Compiled CUDA-graph decoding
    uses it for fixed shapes, and continuous batching (llama/engine.py) for rows at different lengths.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.max_len = max_len or config.max_seq_len
        if self.max_len > config.max_seq_len:
            raise ValueError(f"KVCache max_len={self.max_len} exceeds the model's max_seq_len={config.max_seq_len}")
        shape = (config.num_layers, batch_size, config.num_kv_heads, self.max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.positions: Tensor | None = None

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, kv_heads, T, d] after the cached positions; return all keys and values so far."""
        if self.positions is not None and self.positions.dim() == 1:
            self.keys[layer].index_copy_(2, self.positions, k)
            self.values[layer].index_copy_(2, self.positions, v)
            return self.keys[layer], self.values[layer]
        if self.positions is not None:  # row b's T new keys go to positions[b]
            index = self.positions[:, None, :, None].expand_as(k)
            self.keys[layer].scatter_(2, index, k)
            self.values[layer].scatter_(2, index, v)
            return self.keys[layer], self.values[layer]
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def reset(self) -> None:
        self.length, self.positions = 0, None

    def view(self, rows: slice = slice(None), max_len: int | None = None) -> KVCache:
        """A cache over some rows and the first max_len positions of this one, sharing its storage.

        It starts empty (length 0, no positions): a forward through it writes into this cache's buffers.
        """
        view = object.__new__(KVCache)
        view.max_len = max_len or self.max_len
        view.keys, view.values = self.keys[:, rows, :, :view.max_len], self.values[:, rows, :, :view.max_len]
        view.length, view.positions = 0, None
        return view


# --- the decoder -----------------------------------------------------------------------------------

class Attention(nn.Module):
    """Causal grouped-query self-attention: each group of query heads shares one key/value head."""

    # The two primitives forward calls, held as attributes so that a faster implementation of one of them
    # (llama/cpu_kernels.py) can be attached to a layer from outside, while forward stays this code.
    rope = staticmethod(apply_rope)
    attend = staticmethod(attention)

    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # under autocast q is bf16 while the table is not
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length if cache.positions is None else 0  # fixed shapes: the mask says what is past
            k, v = cache.update(self.layer, k, v)
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(1)  # the same mask for every head
        elif past and T > 1:  # a chunk after cached positions: query i sees keys up to past + i
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = self.attend(q, k, v, attn_mask, is_causal=attn_mask is None and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: attention, then MLP, each added back to the residual stream."""

    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """The decoder-only language model. `Llama(config)(input_ids)` gives logits [B, T, vocab_size]."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_table(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; projections into the residual stream get init_std / sqrt(2 * layers)."""
        for name, param in self.named_parameters():
            if param.dim() == 1:  # RMSNorm gains
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=self.config.residual_init_std())
            else:
                nn.init.normal_(param, mean=0.0, std=self.config.init_std)

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """Logits for every position. With a cache, input_ids continue the cached sequence.

        attn_mask, a bool [B, T, cached + T] tensor that is True where query t may see key s, replaces
        the default causal mask: left-padded batches and packed documents build theirs from it.
        """
        return self.lm_head(self.hidden_states(input_ids, cache, attn_mask))

    def loss(self, input_ids: Tensor, targets: Tensor, loss_mask: Tensor | None = None, *,
             attn_mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """Next-token cross-entropy over the positions where loss_mask is nonzero (all when None).

        "mean" divides by the number of counted positions; "sum" leaves that to the caller, so that
        gradient accumulation can divide by the whole optimizer step's count.
        """
        return self._masked_cross_entropy(self.lm_head.weight, "vocab_size", input_ids, targets, loss_mask,
                                          attn_mask, reduction)

    def _masked_cross_entropy(self, head: Tensor, head_size_name: str, input_ids: Tensor, targets: Tensor,
                              loss_mask: Tensor | None, attn_mask: Tensor | None, reduction: str) -> Tensor:
        """Cross-entropy of `head` applied to the final hidden states, where loss_mask counts.

        One implementation for the LM head here and for LlamaClassifier's label head; head_size_name
        names head's row count in the out-of-range error.
        """
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        weights = (torch.ones(targets.shape, device=targets.device) if loss_mask is None
                   else loss_mask.to(torch.float32)).flatten()
        targets = targets.flatten().masked_fill(weights == 0, 0)  # uncounted targets may hold pad or -100
        if self._checks_values() and targets.numel() and int(targets.max()) >= head.shape[0]:
            raise ValueError(f"target id {int(targets.max())} is out of range for {head_size_name} {head.shape[0]}")
        hidden = self.hidden_states(input_ids, attn_mask=attn_mask).flatten(0, 1)
        total = linear_cross_entropy(hidden, head, targets, weights)
        if reduction == "sum":
            return total
        if reduction == "mean":
            return total / weights.sum().clamp(min=1)
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")

    def hidden_states(self, input_ids: Tensor, cache: KVCache | None = None,
                      attn_mask: Tensor | None = None) -> Tensor:
        """The final normed hidden states [B, T, hidden_size], before the LM head."""
        past = cache.length if cache is not None and cache.positions is None else 0
        self._check_input(input_ids, past, cache, attn_mask)
        T = input_ids.shape[1]
        if cache is not None and cache.positions is not None:
            cos, sin = self.rope_cos[cache.positions], self.rope_sin[cache.positions]
            if cache.positions.dim() == 2:  # [B, T, d] -> [B, 1, T, d]: each row's angles, for every head
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        else:
            cos, sin = self.rope_cos[past:past + T], self.rope_sin[past:past + T]
        x = self.embed_tokens(input_ids)
        for block in self.layers:
            x = block(x, cos, sin, cache, attn_mask)
        if cache is not None and cache.positions is None:
            cache.length += T
        return self.norm(x)

    def _check_input(self, input_ids: Tensor, past: int, cache: KVCache | None, attn_mask: Tensor | None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor of shape [batch, seq_len], "
                             f"got dtype {input_ids.dtype} and shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if past + T > limit:
            raise ValueError(f"sequence length {past + T} exceeds the limit of {limit} positions "
                             f"({'KV cache max_len' if cache is not None else 'max_seq_len'})")
        static = cache is not None and cache.positions is not None
        if static and attn_mask is None:
            raise ValueError("a KVCache with fixed positions needs an attn_mask over its whole buffer")
        expected_mask = (input_ids.shape[0], T, cache.max_len if static else past + T)
        if attn_mask is not None and (attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != expected_mask):
            raise ValueError(f"attn_mask must be a bool tensor of shape [batch, seq_len, "
                             f"{'cache max_len' if static else 'cached + seq_len'}] = {list(expected_mask)}, "
                             f"got dtype {attn_mask.dtype} and shape {list(attn_mask.shape)}")
        if not self._checks_values() or input_ids.numel() == 0:
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.config.vocab_size} "
                             f"(ids must be in [0, {self.config.vocab_size - 1}])")

    def _checks_values(self) -> bool:
        """Whether to check token and target ids against the tables: each check reads a value back from
        the device, a sync that would stall training. So training (model.train()) and compiled graphs
        skip them; the training data is checked where its batches are made (llama/batch.py)."""
        return not self.training and not torch.compiler.is_compiling()

    # --- sizes and costs ---------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights once). exclude_embeddings drops the token-embedding table."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at this context length, as in PaLM appendix B.

        6 per weight that takes part in a matmul (all but the embedding lookup; the LM head counts even
        when tied), plus 12 * layers * heads * head_dim * seq_len for the attention scores and values.
        """
        c = self.config
        matmul_params = self.num_params(exclude_embeddings=True) - sum(
            p.numel() for n, p in self.named_parameters() if p.dim() == 1)
        if c.tie_word_embeddings:
            matmul_params += self.lm_head.weight.numel()
        return 6 * matmul_params + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len

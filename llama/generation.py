"""Text generation: prefill the prompt once, then decode token by token from a preallocated KV cache.

The sampling controls are temperature, top-k, top-p and a repetition penalty over the last N
generated tokens, with stop strings, seeds, batches and streaming. Each new token costs one token's
forward, never a re-run of the whole sequence.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from . import cpu_kernels
from .model import KVCache, Llama
from .tokenizer import Tokenizer


# --- sampling --------------------------------------------------------------------------------------

def apply_repetition_penalty(logits: Tensor, recent: Tensor, penalty: float) -> Tensor:
    """Divide positive logits and multiply negative ones by `penalty`, once per occurrence in `recent`.

    logits: [B, V]; recent: [B, N] token ids (the last N generated), -1 for none. The factor applies
    once per occurrence, so a token seen twice gets penalty ** 2.
    """
    counts = torch.zeros_like(logits)
    valid = recent >= 0
    counts.scatter_add_(1, recent.clamp(min=0), valid.to(logits.dtype))
    factor = penalty ** counts
    return torch.where(logits > 0, logits / factor, logits * factor)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p."""
    if p >= 1.0:
        return logits
    probs = logits.softmax(dim=-1)
    # the nucleus is most often a few dozen tokens: where the 64 most likely reach p in every row, they
    # alone need sorting (0.3 ms instead of 5 for a 49k vocabulary); else the whole row is sorted
    head = min(64, logits.shape[-1])
    ranked, order = probs.topk(head, dim=-1)
    if head < logits.shape[-1] and not bool((ranked.sum(dim=-1) >= p).all()):
        ranked, order = probs.sort(dim=-1, descending=True)
    keep_ranked = ranked.cumsum(dim=-1) - ranked < p  # the more likely tokens do not reach p yet
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, keep_ranked)
    return logits.masked_fill(~keep, float("-inf"))


def sample_next(logits: Tensor, recent: Tensor | None = None, *, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, repetition_penalty: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """One token per row from last-position logits [B, V]. Temperature 0 is greedy (argmax)."""
    logits = logits.float()
    if repetition_penalty != 1.0 and recent is not None and recent.numel():
        big = torch.finfo(torch.float32).max  # an extreme penalty must not make a logit infinite
        logits = apply_repetition_penalty(logits, recent, repetition_penalty).clamp(-big, big)
    if temperature == 0:
        return logits.argmax(dim=-1)
    # shifted so that the largest is 0 (softmax and the filters do not change): however small the
    # temperature, no logit overflows to +inf (whose softmax is NaN), and the top token keeps its lead
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    probs = top_p_filter(top_k_filter(logits, top_k), top_p).softmax(dim=-1)
    uniform = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    return draw(probs, uniform)


def draw(probs: Tensor, uniform: Tensor) -> Tensor:
    """One index per row of probs [B, V] (>= 0, any positive total), each drawn with its share of the row's
    total, given uniform [B, 1] in [0, 1): the first index whose running sum exceeds uniform x total.

    One random number a row, where torch.multinomial draws one per entry (1.3 ms a row for SmolLM2's
    49,152 tokens on a CPU core, a tenth of a decode step). A zero entry is never drawn: its running sum
    equals its predecessor's. The sums are float64, so the rounding is far below any probability.
    """
    sums = probs.double().cumsum(dim=-1)
    index = torch.searchsorted(sums, uniform * sums[:, -1:], right=True)
    # uniform x total may round up to the total, past every index: the last positive entry then
    last = probs.shape[1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1, keepdim=True)
    return torch.minimum(index, last).squeeze(1)


FLOAT32_ZERO = 2.0 ** -150  # the largest positive number that rounds to 0 in float32 (half the smallest subnormal)


def check_sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float, max_tokens: int) -> None:
    """Reject settings that have no meaning, before any compute."""
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if 0 < temperature <= FLOAT32_ZERO:  # the logits are divided in float32: by 0, into NaN
        raise ValueError(f"temperature must be 0 (greedy) or above {FLOAT32_ZERO:.0e}, which rounds to 0 in float32; "
                         f"got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {repetition_penalty}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")


# --- decoding --------------------------------------------------------------------------------------

@torch.no_grad()
def generate_tokens(model: Llama, prompts: Sequence[Sequence[int]], *, max_tokens: int = 256,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0, repetition_penalty_range: int = 10,
                    stop_ids: Sequence[int] = (), seed: int | None = None, compile: bool = False) -> Iterator[Tensor]:
    """Yield the next token of every prompt, [B], one step at a time, until all stopped or max_tokens.

    Prompts of different lengths are left-padded; padding is masked out of attention. A row that
    produced a stop id keeps being fed (its later tokens are meaningless) until every row has stopped:
    callers cut each row at its first stop id. compile=True decodes with fixed shapes through
    torch.compile (CUDA graphs on a GPU), as gpt-fast does; the first call pays for compilation.
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty, max_tokens)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.embed_tokens.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    max_len = longest + max_tokens
    if max_len > model.config.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + max_tokens {max_tokens} exceeds the model's context of "
                         f"{model.config.max_seq_len}; shorten the prompt or lower max_tokens")
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    cpu_kernels.install(model)  # bf16 on a CPU decodes through llama/cpu_kernels.py; a no-op otherwise

    cache = (_static_cache(model, batch, max_len) if compile else
             KVCache(model.config, batch, max_len, dtype=model.embed_tokens.weight.dtype, device=device))
    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    real = torch.zeros(batch, cache.max_len, dtype=torch.bool, device=device)  # cache positions holding tokens
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        real[row, longest - len(prompt):] = True
    real[:, longest:] = True
    padded = not bool(real[:, :longest].all())

    mask = None
    if padded:  # causal, no padding keys; a padding query sees itself so its softmax stays finite
        causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        mask = (causal & real[:, None, :longest]) | torch.eye(longest, dtype=torch.bool, device=device)
    logits = model.lm_head(model.hidden_states(ids, cache, mask)[:, -1])
    recent = torch.full((batch, 0), -1, dtype=torch.long, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    if compile:
        cache.positions = torch.full((1,), longest, device=device)
        decode = _compiled_decode()
    for step in range(max_tokens):
        token = sample_next(logits, recent[:, -repetition_penalty_range:] if repetition_penalty_range > 0 else None,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, generator=generator)
        yield token
        stopped |= torch.isin(token, stop)
        if bool(stopped.all()) or step == max_tokens - 1:
            return
        recent = torch.cat([recent, token[:, None]], dim=1)
        if compile:
            logits = decode(model, token[:, None], cache, real).clone()  # the graph reuses its output buffer
            cache.positions += 1
        else:
            logits = model(token[:, None], cache, real[:, None, :cache.length + 1] if padded else None)[:, -1]


def _static_cache(model: Llama, batch: int, max_len: int) -> KVCache:
    """One KV cache per model and batch size, reused by every compiled decode.

    CUDA graphs replay on fixed addresses, so compiled decoding keeps its cache between calls (as
    gpt-fast does) and sizes it in blocks of 256 positions, so that prompts of similar length share
    one graph. The prefill starts it afresh each time: stale positions are never visible.
    """
    weight = model.embed_tokens.weight
    size = min(model.config.max_seq_len, -(-max_len // 256) * 256)
    cache = getattr(model, "_static_cache", None)
    if (cache is None or cache.keys.shape[1] != batch or cache.max_len != size or cache.keys.dtype != weight.dtype
            or cache.keys.device != weight.device):
        cache = KVCache(model.config, batch, size, dtype=weight.dtype, device=weight.device)
        torch._dynamo.mark_static_address(cache.keys)  # updated in place inside the CUDA graph
        torch._dynamo.mark_static_address(cache.values)
        model._static_cache = cache
    cache.reset()
    return cache


@functools.cache
def _compiled_decode():
    """The fixed-shape decode step, compiled once per process (torch.compile caches per input shapes)."""
    return torch.compile(_decode_with_fixed_shapes, mode="reduce-overhead", fullgraph=True)


def _decode_with_fixed_shapes(model: Llama, token: Tensor, cache: KVCache, real: Tensor) -> Tensor:
    """One decode step whose shapes never change: attention spans the whole cache, masked to the past."""
    visible = real & (torch.arange(real.shape[1], device=real.device) <= cache.positions)
    return model(token, cache, visible[:, None, :])[:, -1]


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """The prompt's ids, special tokens parsed: BOT first when the model expects one (tokenizer.add_bot)."""
    if not text:
        raise ValueError("the prompt is empty; give some text to continue")
    ids = tokenizer.encode(text, allow_special=True)
    if tokenizer.add_bot and tokenizer.bot_id is not None and ids[:1] != [tokenizer.bot_id]:
        ids = [tokenizer.bot_id] + ids
    return ids


def prompt_room(context: int, max_tokens: int) -> int:
    """How many prompt tokens fit a context of `context` positions: the answer keeps up to half of it."""
    return context - min(max_tokens, context // 2)


def fit_context(ids: list[int], max_tokens: int, context: int, truncate: bool = True) -> tuple[list[int], int]:
    """(prompt, max_tokens) that fit the context: the answer gets up to half of it, the prompt the rest.

    A prompt too long for its share loses its oldest tokens, with a warning (or an error when
    truncate is False); max_tokens shrinks to whatever room the prompt leaves.
    """
    room = prompt_room(context, max_tokens)
    if len(ids) > room:
        if not truncate:
            raise ValueError(f"the prompt has {len(ids)} tokens but only {room} fit in the context of "
                             f"{context} with max_tokens={max_tokens}")
        warnings.warn(f"prompt of {len(ids)} tokens left-truncated to {room} to fit the context of {context}")
        ids = ids[-room:]
    return ids, min(max_tokens, context - len(ids))


@dataclasses.dataclass
class GenerationStats:
    """What one `stream` call did: filled in as it runs, complete when the stream ends.

    prefill_seconds is the time to the first token (the prompt's forward and one sampling step);
    decode_seconds the time of every token after it. finish_reason is "stop" (EOT or a stop string)
    or "length" (max_tokens, or the context, ran out first).
    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def __str__(self) -> str:
        prefill = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0
        return (f"prompt {self.prompt_tokens} tokens in {self.prefill_seconds:.2f} s ({prefill:,.0f} tokens/s); "
                f"generated {self.generated_tokens} tokens at {self.decode_tokens_per_s:.1f} tokens/s")


def stream(model: Llama, tokenizer: Tokenizer, prompt: str | Sequence[int], *, max_tokens: int = 256,
           stop: Sequence[str] = (), truncate: bool = True, stats: GenerationStats | None = None,
           **sampling) -> Iterator[str]:
    """Yield the continuation of one prompt as text, as soon as whole characters are decoded.

    Generation ends at EOT/EOS or at a stop string (not included). Text that might be the start of a
    stop string is held back until it is clearly not one. `stats`, when given, receives the token
    counts, timings and finish reason.
    """
    stats = GenerationStats() if stats is None else stats
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    ids, max_tokens = fit_context(ids, max_tokens, model.config.max_seq_len, truncate)
    stop_ids = tokenizer.stop_ids
    decoder, pending = tokenizer.stream_decoder(), ""
    stats.prompt_tokens, stats.finish_reason = len(ids), "length"
    start = first = time.perf_counter()
    for token in generate_tokens(model, [ids], max_tokens=max_tokens, stop_ids=stop_ids, **sampling):
        now = time.perf_counter()
        if stats.generated_tokens == 0:
            first = now
            stats.prefill_seconds = now - start
        stats.generated_tokens += 1
        stats.decode_seconds = now - first
        if int(token[0]) in stop_ids:
            stats.finish_reason = "stop"
            break
        pending += decoder.push(int(token[0]))
        text, pending, stopped = split_at_stop(pending, stop)
        yield from filter(None, [text])
        if stopped:
            stats.finish_reason = "stop"
            return
    text, _, stopped = split_at_stop(pending + decoder.flush(), stop, final=True)
    stats.finish_reason = "stop" if stopped else stats.finish_reason
    yield from filter(None, [text])


def split_at_stop(text: str, stop: Sequence[str], final: bool = False) -> tuple[str, str, bool]:
    """(safe to emit, held back, a stop string was found) for the text decoded so far.

    Held back is the longest end of text that begins some stop string. Called once per token for each
    request, so it costs about one search per stop string, not one per prefix of each.
    """
    found = [text.index(s) for s in stop if s in text]
    if found:
        return text[:min(found)], "", True
    if final or not text:
        return text, "", False
    hold = max((_overlap(text, s) for s in stop), default=0)
    return text[:len(text) - hold], text[len(text) - hold:], False


def _overlap(text: str, stop: str) -> int:
    """The longest n < len(stop) such that text ends with stop[:n]: such an n ends where stop holds
    text's last character, so only those places are tried, from the last."""
    end = min(len(stop) - 1, len(text))
    while end > 0:
        end = stop.rfind(text[-1], 0, end) + 1  # stop[:end] ends with that character (0: none left)
        if end and text.endswith(stop[:end]):
            return end
        end -= 1
    return 0


def generate(model: Llama, tokenizer: Tokenizer, prompt: str | list[str], *, max_tokens: int = 256,
             stop: Sequence[str] = (), truncate: bool = True, **sampling) -> str | list[str]:
    """The continuation of a prompt, or of each prompt in a list (decoded together as one batch).

    Sampling keywords: temperature (0 = greedy), top_k, top_p, repetition_penalty,
    repetition_penalty_range, seed.
    """
    if isinstance(prompt, str):
        return "".join(stream(model, tokenizer, prompt, max_tokens=max_tokens, stop=stop, truncate=truncate,
                              **sampling))
    fitted = [fit_context(encode_prompt(tokenizer, p), max_tokens, model.config.max_seq_len, truncate) for p in prompt]
    prompts, max_tokens = [ids for ids, _ in fitted], min(room for _, room in fitted)
    stop_ids = tokenizer.stop_ids
    rows: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for token in generate_tokens(model, prompts, max_tokens=max_tokens, stop_ids=stop_ids, **sampling):
        for row, t in enumerate(token.tolist()):
            finished[row] = finished[row] or t in stop_ids
            if not finished[row]:
                rows[row].append(t)
    return [split_at_stop(tokenizer.decode(r), stop, final=True)[0] for r in rows]

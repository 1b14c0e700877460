"""Continuous batching: many generation requests decoded together, each joining and leaving at any step.

A server gets requests at any time. Batching them statically (wait for a batch, decode it to the end)
makes a new request wait for the whole batch, and leaves rows idle as short answers finish. Here each
request has its own row, a "slot", of one preallocated KV cache, at its own length: it joins between two
decode steps, then decodes with all the others, one token each per step, with its own sampling settings,
seed and stop conditions; it leaves its slot the step it ends or is cancelled, and the next waiting
request takes it. This is the scheduling of vLLM and text-generation-inference, without their paged
memory: each slot reserves `context` positions.

Each step runs at most two forwards: one prefill of the admitted prompts, then one decode of every slot
that has its first token.

- Prefill in chunks. The prompts still to prefill share one forward of at most `prefill_chunk` tokens,
  packed into a single sequence (each token attends only to its own row's keys), so a long prompt holds
  the running decodes up for one chunk per step, never for its whole length. The budget goes first to
  the oldest prompt (up to half), then to the others, shortest first, then to the oldest again: short
  prompts get their first token at once, and a long one still advances every step.
- Prefix reuse. A row keeps the keys and values of every token it has held, also after its request
  ended (while the row is free). A new prompt copies the longest prefix that any row holds (a shared
  system prompt, an earlier turn of the conversation, the same prompt sampled n times) and prefills only
  the rest; a prompt whose prefix another prompt is prefilling in the same step waits for it, and one
  identical to a prompt completed that step also shares its last logits. A new request takes the free
  row that holds its prefix, else the one least recently used.
- Fair admission. Waiting requests are queued by group (an API request's prompts are one group) and
  admitted round-robin across groups, so a request of many prompts does not make another client wait
  for all of them.

The decode step feeds every slot's last token at that slot's own position (`KVCache.positions`, one
per row) and attends over the first max(length) + 1 positions of the cache under a mask that hides
each row's unused tail. Decoding slots are kept in rows 0..d-1, prefilling ones after them and free
rows last (rows are swapped, cache and all, as slots start decoding or leave), so a step computes d
rows, never max_batch; a single decoding slot runs the cache's own path, as generate() does.

Usage, with no server:

    engine = Engine(model, tokenizer, max_batch=8).start()
    requests = [engine.submit(encode_prompt(tokenizer, p), SamplingParams(max_tokens=50)) for p in prompts]
    texts = [r.text() for r in requests]     # or iterate a request for its Events as they are decoded
    engine.close()

Without start(), call step() until it returns False (nothing left to do).

Log-probabilities: a request whose SamplingParams.logprobs is k gets, for each token it generates, that
token's log-probability and the k most likely tokens there (TokenLogprob), computed from the logits
the step sampled from, for its row alone, so that the other requests pay nothing. They are the model's
own distribution: log_softmax of the raw logits, before the repetition penalty, temperature, top-k and
top-p. score() gives the same for each token of a prompt, in one forward pass of the model.
"""
from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from . import cpu_kernels
from .generation import check_sampling, sample_next, split_at_stop
from .model import KVCache, Llama
from .tokenizer import StreamDecoder, Tokenizer

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class ContextLengthError(ValueError):
    """A request that does not fit a slot's context; `field` names what to reduce: 'prompt' or 'max_tokens'."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings and stop conditions (llama.generation's, per request)."""
    max_tokens: int | None = None  # None: up to the end of the slot's context
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    repetition_penalty_range: int = 10
    stop: tuple[str, ...] = ()  # stop strings, not included in the text
    seed: int | None = None
    ignore_eos: bool = False  # go on past the end-of-turn token, to max_tokens (benchmarks)
    logprobs: int | None = None  # k: each generated token's log-probability and the k most likely there

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty,
                       1 if self.max_tokens is None else self.max_tokens)
        if self.repetition_penalty_range < 0:
            raise ValueError(f"repetition_penalty_range must be >= 0, got {self.repetition_penalty_range}")
        if "" in self.stop:
            raise ValueError("a stop string needs some text; an empty one would end every answer at once")
        if self.seed is not None and not -2**63 <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 (the number of most likely tokens to give), got {self.logprobs}")


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the `top` most likely tokens at its position as
    (id, log-probability) pairs, the most likely first (as many as asked for)."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: Tensor, tokens: Tensor, top: int) -> list[TokenLogprob]:
    """The TokenLogprob of each row of logits [N, V] for its token tokens[N]: log_softmax in fp32."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    ids = tokens.tolist()
    if top <= 0:
        return [TokenLogprob(token, logprob) for token, logprob in zip(ids, chosen)]
    values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    return [TokenLogprob(token, logprob, tuple(zip(i, v)))
            for token, logprob, i, v in zip(ids, chosen, indices.tolist(), values.tolist())]


@dataclasses.dataclass(frozen=True)
class Event:
    """New text of a request; the last event of a request has its finish_reason (and error, if any).

    For a request that asked for logprobs, `logprobs` holds the entries of the tokens generated since
    the previous event: a token whose text is held back (half a character, a possible stop string)
    comes with the event that emits it. The end-of-turn token that ends a request has none (it has no
    text); the tokens of a stop string do (with the last event), though their text is cut.
    """
    text: str = ""
    finish_reason: str | None = None  # one of FINISH_REASONS, on the last event only
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


class Request:
    """A submitted generation: its prompt, settings, progress and, once finished, why it ended.

    Events go to the listener given to Engine.submit (called on the engine's thread, so it must be
    quick: a server hands them to its event loop), or, with none, to a queue that iterating the request
    reads from.
    """

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, max_tokens: int,
                 listener: Callable[[Event], None] | None) -> None:
        self.engine, self.prompt, self.params = engine, prompt, params
        self.prompt_tokens = len(prompt)
        self.max_tokens = max_tokens  # params.max_tokens, or the rest of the context
        self.tokens: list[int] = []  # the ids the model generated, the end-of-turn token included
        self.logprobs: list[TokenLogprob] = []  # with params.logprobs: those of `tokens`, bar an ending end-of-turn
        self._unsent: list[TokenLogprob] = []  # entries not yet sent with an event
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancelled = False
        self._queue: queue.Queue[Event] | None = None if listener is not None else queue.Queue()
        self._listener = listener if listener is not None else self._queue.put

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop this request at the next step (it ends with finish_reason 'cancelled'); its slot is freed."""
        self.cancelled = True
        self.engine._wake()

    def __iter__(self) -> Iterator[Event]:
        """The request's events until its last one (for a request submitted without a listener)."""
        if self._queue is None:
            raise RuntimeError("this request reports to its listener; it has no events to iterate")
        while True:
            event = self._queue.get()
            yield event
            if event.finish_reason is not None:
                return

    def text(self) -> str:
        """Wait for the end and return the whole generated text; raises RuntimeError if it failed."""
        text = "".join(event.text for event in self)
        if self.finish_reason == "error":
            raise RuntimeError(self.error)
        return text

    def _emit(self, text: str, finish_reason: str | None = None, error: str | None = None) -> None:
        if finish_reason is not None:
            self.finish_reason, self.error = finish_reason, error
        if text or finish_reason is not None:
            entries, self._unsent = tuple(self._unsent), []
            self._listener(Event(text, finish_reason, error, entries))


class _Slot:
    """An admitted request's prefill and decoding state; its KV cache row is its index in Engine.slots."""

    def __init__(self, request: Request, tokenizer: Tokenizer, device: torch.device, order: int) -> None:
        self.request = request
        self.order = order  # when it was admitted: the oldest prefilling slot goes first
        self.length = 0  # cache positions filled
        self.token = -1  # the last sampled token, fed at position `length` by the next step
        self.recent: list[int] = []  # generated tokens, for the repetition penalty
        self.decoder: StreamDecoder = tokenizer.stream_decoder()
        self.pending = ""  # decoded text held back: it may be the start of a stop string
        seed = request.params.seed
        self.generator = torch.Generator(device).manual_seed(seed) if seed is not None else None

    def held(self) -> list[int]:
        """The tokens whose keys and values fill the row's first `length` positions."""
        request = self.request
        return (request.prompt + request.tokens)[:self.length]


class _Rows(KVCache):
    """The engine's cache as one forward sees it: the forward's tokens, in order, are written at rows[i],
    positions at[i] of every layer, and attention reads `read(layer's keys)` (and values) under the
    caller's mask. `positions` are the tokens' RoPE positions, as KVCache.positions."""

    def __init__(self, cache: KVCache, rows: Tensor, at: Tensor, read: Callable[[Tensor], Tensor], width: int,
                 positions: Tensor) -> None:
        self.keys, self.values, self.rows, self.at, self.read = cache.keys, cache.values, rows, at, read
        self.max_len, self.length, self.positions = width, 0, positions

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # an indexed write: a scatter into a strided view of the cache costs time in proportion to the view
        self.keys[layer][self.rows, :, self.at] = k.transpose(1, 2).flatten(0, 1)
        self.values[layer][self.rows, :, self.at] = v.transpose(1, 2).flatten(0, 1)
        return self.read(self.keys[layer]), self.read(self.values[layer])


class Engine:
    """Schedules generation requests onto the slots of one KV cache and decodes them together.

    max_batch is the number of slots (requests decoded at once; more wait in a queue, admitted
    round-robin across groups); context is the positions each slot holds (prompt + answer), the model's
    max_seq_len at most; prefill_chunk is the most prompt tokens one step prefills. submit() may be
    called from any thread; the decoding runs on the thread of start(), or on the caller's through step().
    """

    def __init__(self, model: Llama, tokenizer: Tokenizer, *, max_batch: int = 8, context: int | None = None,
                 prefill_chunk: int = 256) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        limit = model.config.max_seq_len
        self.context = context or limit
        if not 2 <= self.context <= limit:
            raise ValueError(f"context must be in [2, {limit}] (the model's max_seq_len), got {self.context}")
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.prefill_chunk = prefill_chunk
        cpu_kernels.install(model)  # bf16 on a CPU runs through llama/cpu_kernels.py, as in generate()
        weight = model.embed_tokens.weight
        self.device = weight.device
        self.cache = KVCache(model.config, max_batch, self.context, dtype=weight.dtype, device=self.device)
        self.stop_ids = set(tokenizer.stop_ids)
        self.slots: list[_Slot] = []  # rows 0..decoding-1 decode, the rest prefill
        self.decoding = 0
        self.stored: list[list[int]] = [[] for _ in range(max_batch)]  # a free row: the tokens it still holds
        self.stored_at = [0] * max_batch  # when a free row's tokens were stored or last reused (LRU)
        self.waiting: dict[Any, deque[Request]] = {}  # by group, in round-robin order
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed: str | None = None  # why, once closed
        self._admitted = 0
        self.decode_steps = 0
        self.batch_sizes: Counter[int] = Counter()  # decode steps by the number of requests they decoded
        self.prefills = 0  # prompts prefilled (to their first token)
        self.prefill_steps = 0
        self.prefill_tokens = 0  # prompt tokens run through the model
        self.reused_tokens = 0  # prompt tokens copied from a row that held them
        self.generated_tokens = 0
        self.finished: Counter[str] = Counter()

    # --- the interface -------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
               listener: Callable[[Event], None] | None = None, group: Any = None) -> Request:
        """Queue a prompt (token ids) for generation; it starts at a step with a free slot.

        Requests of one `group` (any hashable: a server gives an API request's prompts one) are admitted
        in order, and the groups in turn, one request each; without a group a request is its own.

        Raises ValueError when the prompt is empty or has ids outside the vocabulary, ContextLengthError
        (a ValueError) when it does not leave room for max_tokens in the context, and RuntimeError once
        the engine is closed.
        """
        prompt = self._checked(prompt)
        if len(prompt) >= self.context:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens, but the context holds {self.context} "
                                     "(prompt and answer together); shorten the prompt", "prompt")
        if params.max_tokens is not None and len(prompt) + params.max_tokens > self.context:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}, "
                                     f"{len(prompt) + params.max_tokens} in all, but the context holds "
                                     f"{self.context}; lower max_tokens to {self.context - len(prompt)} or less",
                                     "max_tokens")
        request = Request(self, prompt, params, params.max_tokens or self.context - len(prompt), listener)
        with self._lock:
            if self._closed is not None:
                raise RuntimeError(f"the engine is closed: {self._closed}")
            self.waiting.setdefault(request if group is None else (group,), deque()).append(request)
            self._lock.notify()
        return request

    @torch.inference_mode()
    def score(self, prompt: Sequence[int], top: int = 0, *, chunk: int = 512) -> list[TokenLogprob]:
        """The log-probability of each prompt token after the first given the tokens before it, with the
        `top` most likely tokens at its position: len(prompt) - 1 entries, from one forward pass of the
        model over the prompt (log_softmax of its logits in fp32; the LM head runs `chunk` positions at a
        time, so that a long prompt never holds all its logits at once).

        It may be called from any thread while the engine decodes (a server calls it on a worker thread,
        so that it stalls neither its event loop nor the streams): it runs the model without a KV cache,
        and a forward pass in inference only reads the model's weights, so it shares no state with the
        slots. Raises ValueError for an empty prompt or an id outside the vocabulary, ContextLengthError
        for a prompt longer than the context.
        """
        prompt = self._checked(prompt)
        if len(prompt) > self.context:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens, but the context holds {self.context}; "
                                     "shorten the prompt", "prompt")
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(ids)[0, :-1]  # position i predicts token i + 1
        entries = []
        for start in range(0, len(prompt) - 1, chunk):
            logits = self.model.lm_head(hidden[start:start + chunk])
            entries += token_logprobs(logits, ids[0, start + 1:start + 1 + chunk], top)
        return entries

    def _checked(self, prompt: Sequence[int]) -> list[int]:
        """The prompt's ids as ints, checked to be some and in the vocabulary."""
        prompt = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            bad = min(prompt) if min(prompt) < 0 else max(prompt)
            raise ValueError(f"token id {bad} is out of range for vocab_size {vocab}")
        return prompt

    def start(self, threads: int | None = None) -> Engine:
        """Decode on a background thread from now on, with `threads` intra-op threads (default: the
        caller's torch.get_num_threads()); returns self.

        PyTorch's OpenMP runtime (libgomp) keeps a pool of worker threads per thread that runs parallel
        ops, and lets its workers spin between ops only while all of them fit the CPUs; beyond, each
        parallel op waits for sleeping workers to wake. A process whose main thread ran parallel ops
        (loading the model, say) and then decodes here has two pools: on 2 cores that halves the decoding
        speed (17 against 35 tokens/s for SmolLM2 in bf16). serve.py therefore keeps its other threads
        at one intra-op thread (torch.set_num_threads(1) before it loads), so that this one is the only
        thread with a pool.
        """
        if self._thread is None:
            threads = torch.get_num_threads() if threads is None else threads
            self._thread = threading.Thread(target=self._run, args=(threads,), name="llama-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, reason: str = "the engine was closed", wait: bool = True) -> None:
        """End every waiting and running request with an error event naming `reason`, and stop.

        With a background thread, that happens after its current step; wait=False returns at once
        (a signal handler's need) instead of waiting for it.
        """
        with self._lock:
            if self._closed is None:
                self._closed = reason
            self._lock.notify()
        if self._thread is None:
            self._abort_all(self._closed)
        elif wait and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


    def metrics(self) -> dict[str, Any]:
        """Counters for monitoring and tests: slots in use, queue, decode steps by batch size, prompt tokens
        prefilled and reused, outcomes."""
        with self._lock:
            return {"max_batch": self.max_batch, "context": self.context, "running": len(self.slots),
                    "prefilling": len(self.slots) - self.decoding,
                    "waiting": sum(len(queue) for queue in self.waiting.values()), "decode_steps": self.decode_steps,
                    "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
                    "prefills": self.prefills, "prefill_steps": self.prefill_steps,
                    "prefill_tokens": self.prefill_tokens, "reused_tokens": self.reused_tokens,
                    "generated_tokens": self.generated_tokens,
                    "finished": {reason: self.finished[reason] for reason in FINISH_REASONS}}

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting requests into free slots, prefill one chunk of the admitted prompts, then decode one
        token for every slot past its prompt.

        Returns False when there was nothing to do.
        """
        for row in reversed(range(len(self.slots))):
            if self.slots[row].request.cancelled:
                self._release(row, "cancelled")
        with self._lock:
            admitted, cancelled = [], []
            while self.waiting and len(self.slots) + len(admitted) < self.max_batch:
                group = next(iter(self.waiting))
                queue = self.waiting.pop(group)
                request = queue.popleft()
                if queue:
                    self.waiting[group] = queue  # to the back: each group in turn
                (cancelled if request.cancelled else admitted).append(request)
            for group, queue in list(self.waiting.items()):
                if any(r.cancelled for r in queue):  # cancelled while waiting: it never takes a slot
                    cancelled += [r for r in queue if r.cancelled]
                    self.waiting[group] = deque(r for r in queue if not r.cancelled)
                    if not self.waiting[group]:
                        del self.waiting[group]
        for request in cancelled:
            self._finish(request, "cancelled")
        for request in admitted:
            self._place(request)
        if not self.slots:
            return bool(admitted or cancelled)
        if self.decoding < len(self.slots):
            self._prefill()
        if self.decoding:
            try:
                self._decode()
            except Exception as error:  # the shared forward pass failed: every decoding request with it
                self._fail([slot.request for slot in self.slots[:self.decoding]], error)
        return True

    def _fail(self, requests: list[Request], error: Exception) -> None:
        """End `requests` with an error event (freeing their slots); the engine goes on with the others."""
        traceback.print_exc(file=sys.stderr)
        message = f"generation failed: {type(error).__name__}: {error}"
        for request in requests:
            row = self._row(request)
            if row is not None:
                self._release(row, "error", message)
            elif not request.done:
                self._finish(request, "error", message)

    def _row(self, request: Request) -> int | None:
        return next((row for row, slot in enumerate(self.slots) if slot.request is request), None)

    # --- scheduling ----------------------------------------------------------------------------

    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)  # this thread's OpenMP setting (each thread has its own)
        while True:
            with self._lock:
                while self._closed is None and not self.waiting and not self.slots:
                    self._lock.wait()
                if self._closed is not None:
                    break
            try:
                self.step()
            except Exception as error:  # a bug in the scheduling itself: stop taking requests, end them all
                traceback.print_exc(file=sys.stderr)
                with self._lock:
                    self._closed = self._closed or f"the engine failed: {type(error).__name__}: {error}"
        self._abort_all(self._closed)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def _abort_all(self, reason: str) -> None:
        with self._lock:
            waiting, self.waiting = [r for queue in self.waiting.values() for r in queue], {}
        for request in waiting:
            self._finish(request, "error", reason)
        for row in reversed(range(len(self.slots))):
            self._release(row, "error", reason)

    # --- rows and the prefixes they hold -------------------------------------------------------

    def _held(self, row: int) -> list[int]:
        """The tokens whose keys and values fill the row's first positions (a free row's: its last request's)."""
        return self.slots[row].held() if row < len(self.slots) else self.stored[row]

    def _longest_prefix(self, tokens: list[int], limit: int, exclude: int = -1) -> tuple[int, int]:
        """(row, n): the row other than `exclude` that holds the longest prefix of tokens, n of them (at
        most limit); free rows first, so that a tie costs no eviction."""
        best, most = -1, 0
        for row in [*range(len(self.slots), self.max_batch), *range(len(self.slots))]:
            if row != exclude:
                n = _common_prefix(self._held(row), tokens, limit)
                if n > most:
                    best, most = row, n
        return best, most

    def _copy(self, source: int, target: int, start: int, end: int) -> None:
        """Positions start..end-1 of row source's keys and values into row target."""
        for tensor in (self.cache.keys, self.cache.values):
            tensor[:, target, :, start:end] = tensor[:, source, :, start:end]

    def _swap(self, a: int, b: int) -> None:
        """Exchange rows a and b, both running or both free: the keys and values they hold, and their slots
        or stored tokens."""
        if a == b:
            return
        held_a, held_b = self._held(a), self._held(b)
        for tensor in (self.cache.keys, self.cache.values):
            kept = tensor[:, a, :, :len(held_a)].clone()
            tensor[:, a, :, :len(held_b)] = tensor[:, b, :, :len(held_b)]
            tensor[:, b, :, :len(held_a)] = kept
        entries = self.slots if a < len(self.slots) else self.stored
        entries[a], entries[b] = entries[b], entries[a]
        if entries is self.stored:
            self.stored_at[a], self.stored_at[b] = self.stored_at[b], self.stored_at[a]

    def _place(self, request: Request) -> None:
        """Give an admitted request the next row, holding the longest prefix of its prompt that a row holds.

        The row's old tokens are lost: those of the least recently used free row are moved there first,
        unless the prefix is all that the free row holding it holds (then that row is the slot's, and no
        copy is needed).
        """
        row = len(self.slots)
        source, n = self._longest_prefix(request.prompt, len(request.prompt) - 1)
        if source >= row and n == len(self.stored[source]):
            victim = source
        else:
            victim = min((r for r in range(row, self.max_batch) if r != source), key=self.stored_at.__getitem__,
                         default=row)
        self._swap(victim, row)
        source = {victim: row, row: victim}.get(source, source)
        if n and source != row:
            self._copy(source, row, 0, n)
        self.stored[row] = []
        self._admitted += 1
        slot = _Slot(request, self.tokenizer, self.device, self._admitted)
        slot.length = n
        self.slots.append(slot)
        with self._lock:
            self.reused_tokens += n

    def _catch_up(self, row: int, completed: dict[tuple[int, ...], Tensor]) -> Tensor | None:
        """Copy into a prefilling row the part of its prompt that another row now holds beyond its own.

        Returns the logits of the prompt's last position when a prompt completed this step (`completed`)
        is this one: then the whole prompt is copied, and the slot needs no forward of its own.
        """
        slot = self.slots[row]
        prompt = slot.request.prompt
        logits = completed.get(tuple(prompt))
        source, n = self._longest_prefix(prompt, len(prompt) - (logits is None), exclude=row)
        if n > slot.length:
            self._copy(source, row, slot.length, n)
            with self._lock:
                self.reused_tokens += n - slot.length
            slot.length = n
            if source >= len(self.slots):
                self.stored_at[source] = self._admitted
        return logits if slot.length == len(prompt) else None

    # --- prefill ---------------------------------------------------------------------------------

    def _plan(self) -> dict[_Slot, int]:
        """The prompt tokens each prefilling slot runs this step: at most prefill_chunk in all, the oldest
        first (up to half), then the others, fewest left first, then the oldest again with what is left.

        A slot waits instead when the slots before it will compute at least half of what it still needs
        of a shared prefix: it copies that next step.
        """
        plan: dict[_Slot, int] = {}
        left = self.prefill_chunk

        def take(slot: _Slot, most: int) -> None:
            nonlocal left
            need = len(slot.request.prompt) - slot.length - plan.get(slot, 0)
            if slot not in plan:
                shared = max((_common_prefix(p.request.prompt[:p.length + count], slot.request.prompt,
                                             len(slot.request.prompt) - 1) for p, count in plan.items()), default=0)
                if shared - slot.length >= max(1, need // 2):
                    return
            count = min(need, most, left)
            if count > 0:
                plan[slot] = plan.get(slot, 0) + count
                left -= count

        prefilling = sorted(self.slots[self.decoding:], key=lambda slot: slot.order)
        take(prefilling[0], max(1, self.prefill_chunk // 2))
        for slot in sorted(prefilling[1:], key=lambda slot: (len(slot.request.prompt) - slot.length, slot.order)):
            take(slot, left)
        take(prefilling[0], left)
        return plan

    def _prefill(self) -> None:
        """One chunk of the prompts still to prefill, packed into one forward; the prompts it completes
        sample their first token and join the decoding rows."""
        completed: dict[tuple[int, ...], Tensor] = {}
        for row in range(self.decoding, len(self.slots)):
            self._catch_up(row, completed)
        plan = self._plan()
        try:
            logits = self._prefill_forward(plan)
        except Exception as error:  # the shared forward pass failed: every request in it with it
            return self._fail([slot.request for slot in plan], error)
        ready = []
        for (slot, count), last in zip(plan.items(), logits):
            slot.length += count
            if slot.length == len(slot.request.prompt):
                completed.setdefault(tuple(slot.request.prompt), last)
                ready.append((slot, last))
        for row in range(self.decoding, len(self.slots)):  # those that waited, on what was prefilled
            if self.slots[row] not in plan:
                last = self._catch_up(row, completed)
                if last is not None:
                    ready.append((self.slots[row], last))
        with self._lock:
            self.prefill_steps += 1
            self.prefill_tokens += sum(plan.values())
            self.prefills += len(ready)
        for slot, last in ready:
            row = self.slots.index(slot)
            self._swap(row, self.decoding)
            self.decoding += 1
            try:
                self._advance(self.decoding - 1, last)
            except Exception as error:  # one request's sampling failed: that request alone ends
                self._fail([slot.request], error)

    def _prefill_forward(self, plan: dict[_Slot, int]) -> Tensor:
        """Run the planned tokens as one sequence; returns the logits at each slot's last planned token.

        Token t of slot s is written at s's row and position, and attends to the keys of that row up to
        its position alone (the mask is block-diagonal by slot).
        """
        device, ids, rows, starts, counts = self.device, [], [], [], []
        for slot, count in plan.items():
            ids += slot.request.prompt[slot.length:slot.length + count]
            rows.append(self.slots.index(slot))
            starts.append(slot.length)
            counts.append(count)
        ends = [start + count for start, count in zip(starts, counts)]
        segment = torch.arange(len(plan), device=device)
        at = torch.cat([torch.arange(start, end, device=device) for start, end in zip(starts, ends)])
        seen = torch.cat([torch.arange(end, device=device) for end in ends])  # the keys each slot attends to
        token_segment = segment.repeat_interleave(torch.tensor(counts, device=device))
        key_segment = segment.repeat_interleave(torch.tensor(ends, device=device))
        key_rows = torch.tensor(rows, device=device)[key_segment]
        mask = (token_segment[:, None] == key_segment[None]) & (seen[None] <= at[:, None])
        view = _Rows(self.cache, torch.tensor(rows, device=device)[token_segment], at,
                     lambda x: x[key_rows, :, seen].transpose(0, 1)[None], len(seen), at)
        hidden = self.model.hidden_states(torch.tensor([ids], dtype=torch.long, device=device), view, mask[None])[0]
        last = torch.tensor(counts, device=device).cumsum(0) - 1
        return self.model.lm_head(hidden[last])

    # --- decode ----------------------------------------------------------------------------------

    def _decode(self) -> None:
        """One decode step for every decoding slot: each feeds its last token at its own position."""
        n, slots = self.decoding, self.slots[:self.decoding]
        tokens = torch.tensor([[slot.token] for slot in slots], dtype=torch.long, device=self.device)
        if n == 1:  # no mask, the cache's own positions: the path (and CPU kernels) of generate()
            view = self.cache.view(slice(0, 1))
            view.length, mask = slots[0].length, None
        else:
            lengths = torch.tensor([slot.length for slot in slots], dtype=torch.long, device=self.device)
            span = max(slot.length for slot in slots) + 1
            view = _Rows(self.cache, torch.arange(n, device=self.device), lengths, lambda x: x[:n, :, :span], span,
                         lengths[:, None])
            mask = torch.arange(span, device=self.device)[None, None, :] <= lengths[:, None, None]  # [n, 1, span]
        logits = self.model(tokens, view, mask)[:, -1]
        with self._lock:
            self.decode_steps += 1
            self.batch_sizes[n] += 1
        for slot in slots:
            slot.length += 1
        greedy = None
        if any(_is_greedy(slot.request.params) for slot in slots):  # one argmax for all the greedy rows
            greedy = logits.argmax(dim=-1).tolist()
        for row in reversed(range(n)):  # reversed: releasing a row moves a later one into it
            try:
                self._advance(row, logits[row], greedy[row] if greedy and _is_greedy(slots[row].request.params)
                              else None)
            except Exception as error:  # one request's sampling failed: that request alone ends
                self._fail([self.slots[row].request], error)

    def _advance(self, row: int, logits: Tensor, token: int | None = None) -> None:
        """Sample the slot's next token from its logits [vocab] (unless given: a greedy row's argmax), emit
        its text, release the slot if it ended."""
        slot = self.slots[row]
        request, params = slot.request, slot.request.params
        if token is None:
            window = params.repetition_penalty_range if params.repetition_penalty != 1.0 else 0
            recent = torch.tensor([slot.recent[-window:]], dtype=torch.long, device=self.device) if window else None
            token = int(sample_next(logits[None], recent,
                                    temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                    repetition_penalty=params.repetition_penalty, generator=slot.generator)[0])
        request.tokens.append(token)
        ends = token in self.stop_ids and not params.ignore_eos
        if params.logprobs is not None and not ends:  # this row alone, from the logits it sampled from
            [entry] = token_logprobs(logits[None], torch.tensor([token], device=logits.device), params.logprobs)
            request.logprobs.append(entry)
            request._unsent.append(entry)
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        with self._lock:
            self.generated_tokens += 1
        slot.token = token
        slot.recent.append(token)
        if ends:
            return self._release(row, "stop", final=True)
        text, slot.pending, stopped = split_at_stop(slot.pending + slot.decoder.push(token), params.stop)
        if stopped:
            return self._release(row, "stop", text=text)
        if request.completion_tokens == request.max_tokens:
            return self._release(row, "length", text=text, final=True)
        request._emit(text)

    def _release(self, row: int, reason: str, error: str | None = None, *, text: str = "", final: bool = False) -> None:
        """End the request of slot `row` and free the slot: its row becomes the first free one, and keeps
        what it holds for a later prompt with the same prefix.

        final=True first emits the text still held back (an incomplete character, a possible stop string).
        """
        slot = self.slots[row]
        if final:
            rest, _, stopped = split_at_stop(slot.pending + slot.decoder.flush(), slot.request.params.stop, final=True)
            text += rest
            reason = "stop" if stopped else reason
        if row < self.decoding:  # the last decoding row takes its place, and it the last prefilling row's
            self._swap(row, self.decoding - 1)
            row = self.decoding = self.decoding - 1
        self._swap(row, len(self.slots) - 1)
        free = len(self.slots) - 1
        self.stored[free], self.stored_at[free] = self.slots.pop().held(), self._admitted
        self._finish(slot.request, reason, error, text)

    def _finish(self, request: Request, reason: str, error: str | None = None, text: str = "") -> None:
        with self._lock:
            self.finished[reason] += 1
        request._emit(text, reason, error)


def _is_greedy(params: SamplingParams) -> bool:
    """Whether a row's next token is the argmax of its raw logits."""
    return params.temperature == 0 and params.repetition_penalty == 1.0


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens a and b share, at most limit (list comparisons, by halves: C speed)."""
    low, high = 0, min(len(a), len(b), limit)
    if a[:high] == b[:high]:
        return high
    while high - low > 1:  # a[:low] == b[:low] and a[:high] != b[:high]
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low

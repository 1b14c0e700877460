"""Continuous batching: many generation requests decoded together, each joining and leaving at any step.

A server gets requests at any time. Batching them statically (wait for a batch, decode it to the end)
makes a new request wait for the whole batch, and leaves rows idle as short answers finish. Here each
request has its own row, a "slot", of one preallocated KV cache, at its own length: a new request is
prefilled alone into a free slot between two decode steps, then decodes with all the others, one token
each per step, with its own sampling settings, seed and stop conditions; it leaves its slot the step it
ends or is cancelled, and the next waiting request takes it. This is the scheduling of vLLM and
text-generation-inference, without their paged memory: each slot reserves `context` positions.

The decode step feeds every slot's last token at that slot's own position (`KVCache.positions`, one
per row) and attends over the first max(length) + 1 positions of the cache under a mask that hides
each row's unused tail. Active slots are kept in rows 0..n-1 (a leaving slot's row is filled with the
last one), so a step computes n rows, never max_batch.

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
    """A running request's decoding state; its KV cache row is its index in Engine.slots."""

    def __init__(self, request: Request, tokenizer: Tokenizer, device: torch.device) -> None:
        self.request = request
        self.length = 0  # cache positions filled
        self.token = -1  # the last sampled token, fed at position `length` by the next step
        self.recent: list[int] = []  # generated tokens, for the repetition penalty
        self.decoder: StreamDecoder = tokenizer.stream_decoder()
        self.pending = ""  # decoded text held back: it may be the start of a stop string
        seed = request.params.seed
        self.generator = torch.Generator(device).manual_seed(seed) if seed is not None else None


class Engine:
    """Schedules generation requests onto the slots of one KV cache and decodes them together.

    max_batch is the number of slots (requests decoded at once; more wait in a queue, first come first
    served); context is the positions each slot holds (prompt + answer), the model's max_seq_len at
    most. submit() may be called from any thread; the decoding runs on the thread of start(), or on the
    caller's through step().
    """

    def __init__(self, model: Llama, tokenizer: Tokenizer, *, max_batch: int = 8, context: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        limit = model.config.max_seq_len
        self.context = context or limit
        if not 2 <= self.context <= limit:
            raise ValueError(f"context must be in [2, {limit}] (the model's max_seq_len), got {self.context}")
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        cpu_kernels.install(model)  # bf16 on a CPU runs through llama/cpu_kernels.py, as in generate()
        weight = model.embed_tokens.weight
        self.device = weight.device
        self.cache = KVCache(model.config, max_batch, self.context, dtype=weight.dtype, device=self.device)
        self.stop_ids = set(tokenizer.stop_ids)
        self.slots: list[_Slot] = []
        self.waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed: str | None = None  # why, once closed
        self.decode_steps = 0
        self.batch_sizes: Counter[int] = Counter()  # decode steps by the number of requests they decoded
        self.prefills = 0
        self.generated_tokens = 0
        self.finished: Counter[str] = Counter()
        self._prefilled: dict[tuple[int, ...], tuple[int, Tensor]] = {}  # this step's prompts: row, last logits

    # --- the interface -------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
               listener: Callable[[Event], None] | None = None) -> Request:
        """Queue a prompt (token ids) for generation; it starts at the next step with a free slot.

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
            self.waiting.append(request)
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

    def start(self) -> Engine:
        """Decode on a background thread from now on; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
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
        """Counters for monitoring and tests: slots in use, queue, decode steps by batch size, outcomes."""
        with self._lock:
            return {"max_batch": self.max_batch, "context": self.context, "running": len(self.slots),
                    "waiting": len(self.waiting), "decode_steps": self.decode_steps,
                    "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
                    "prefills": self.prefills, "generated_tokens": self.generated_tokens,
                    "finished": {reason: self.finished[reason] for reason in FINISH_REASONS}}

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting requests into free slots (prefilling each), then decode one token for every slot.

        Returns False when there was nothing to do.
        """
        for row in reversed(range(len(self.slots))):
            if self.slots[row].request.cancelled:
                self._release(row, "cancelled")
        with self._lock:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                self._finish(request, "cancelled")
            admitted = []
            while self.waiting and len(self.slots) + len(admitted) < self.max_batch:
                admitted.append(self.waiting.popleft())
        if not admitted and not self.slots:
            return False
        for request in admitted:
            try:
                self._prefill(request)
            except Exception as error:  # a prompt that fails fails its own request, not the batch
                self._fail([request], error)
                self._prefilled.pop(tuple(request.prompt), None)
        self._prefilled.clear()
        try:
            if self.slots:
                self._decode()
        except Exception as error:  # the shared forward pass failed: every running request with it
            self._fail([slot.request for slot in self.slots], error)
        return True

    def _fail(self, requests: list[Request], error: Exception) -> None:
        """End `requests` with an error event (freeing their slots); the engine goes on with the others."""
        traceback.print_exc(file=sys.stderr)
        message = f"generation failed: {type(error).__name__}: {error}"
        for request in requests:
            row = next((row for row, slot in enumerate(self.slots) if slot.request is request), None)
            if row is not None:
                self._release(row, "error", message)
            elif not request.done:
                self._finish(request, "error", message)

    # --- scheduling ----------------------------------------------------------------------------

    def _run(self) -> None:
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
            waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            self._finish(request, "error", reason)
        for row in reversed(range(len(self.slots))):
            self._release(row, "error", reason)

    def _prefill(self, request: Request) -> None:
        """Run the prompt alone through a new slot's cache row and sample the request's first token.

        A request admitted in the same step as another with the same prompt (n samples of one prompt,
        GRPO's group) copies that one's cache row and last logits instead of running the prompt again.
        """
        row = len(self.slots)
        slot = _Slot(request, self.tokenizer, self.device)
        self.slots.append(slot)
        same = self._prefilled.get(tuple(request.prompt))
        if same is not None and same[0] < row and self.slots[same[0]].request.prompt == request.prompt:
            source, logits = same
            n = len(request.prompt)
            self.cache.keys[:, row, :, :n] = self.cache.keys[:, source, :, :n]
            self.cache.values[:, row, :, :n] = self.cache.values[:, source, :, :n]
        else:
            ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
            logits = self.model.lm_head(self.model.hidden_states(ids, self.cache.view(slice(row, row + 1)))[:, -1])
            self._prefilled[tuple(request.prompt)] = (row, logits)
        slot.length = len(request.prompt)
        with self._lock:
            self.prefills += 1
        self._advance(row, logits[0])

    def _decode(self) -> None:
        """One decode step for every slot: each feeds its last token at its own position."""
        n = len(self.slots)
        tokens = torch.tensor([[slot.token] for slot in self.slots], dtype=torch.long, device=self.device)
        lengths = torch.tensor([slot.length for slot in self.slots], dtype=torch.long, device=self.device)
        span = int(lengths.max()) + 1
        view = self.cache.view(slice(0, n), span)
        view.positions = lengths[:, None]
        mask = torch.arange(span, device=self.device)[None, None, :] <= lengths[:, None, None]  # [n, 1, span]
        logits = self.model(tokens, view, mask)[:, -1]
        with self._lock:
            self.decode_steps += 1
            self.batch_sizes[n] += 1
        for slot in self.slots:
            slot.length += 1
        for row in reversed(range(n)):  # reversed: releasing a row moves the last one into it
            try:
                self._advance(row, logits[row])
            except Exception as error:  # one request's sampling failed: that request alone ends
                self._fail([self.slots[row].request], error)

    def _advance(self, row: int, logits: Tensor) -> None:
        """Sample the slot's next token from its logits [vocab], emit its text, release it if it ended."""
        slot = self.slots[row]
        request, params = slot.request, slot.request.params
        window = params.repetition_penalty_range
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
        """End the request of slot `row` and free the slot: the last active slot moves into its row.

        final=True first emits the text still held back (an incomplete character, a possible stop string).
        """
        slot = self.slots[row]
        if final:
            rest, _, stopped = split_at_stop(slot.pending + slot.decoder.flush(), slot.request.params.stop, final=True)
            text += rest
            reason = "stop" if stopped else reason
        last = len(self.slots) - 1
        if row != last:
            moved = self.slots[last]
            self.cache.keys[:, row, :, :moved.length] = self.cache.keys[:, last, :, :moved.length]
            self.cache.values[:, row, :, :moved.length] = self.cache.values[:, last, :, :moved.length]
            self.slots[row] = moved
        self.slots.pop()
        self._finish(slot.request, reason, error, text)

    def _finish(self, request: Request, reason: str, error: str | None = None, text: str = "") -> None:
        with self._lock:
            self.finished[reason] += 1
        request._emit(text, reason, error)

"""An OpenAI-compatible HTTP API over the continuous-batching engine, and the web chat page.

    POST /v1/chat/completions   messages in the model's chat template (or ours), streamed or not
    POST /v1/completions        raw text prompts (one or several), streamed or not; echo and logprobs score them
    POST /tokenize              text -> token ids, and POST /detokenize: ids -> text (llama.cpp's server's shapes)
    GET  /v1/models             the one model served
    GET  /metrics               the engine's counters: slots in use, queue, decode steps by batch size
    GET  /                      the chat page (llama/web/chat.html)

The request and response bodies are OpenAI's, so its client, evaluation harnesses and chat front ends
work unchanged. Sampling fields map to llama.engine.SamplingParams: temperature, top_p, max_tokens
(or max_completion_tokens; default: the rest of the context), stop, seed, plus our top_k,
repetition_penalty, repetition_penalty_range and ignore_eos (as vLLM's: decode to max_tokens). `n` must
be 1; what is not implemented is refused with a 400 naming it when it asks for something: the frequency
and presence penalties, tools, functions, tool_choice, function_call, logit_bias, response_format (other
than text), suffix and best_of. `model`, when given, must be the served model's id (GET /v1/models), as
OpenAI's 404 model_not_found says otherwise. A completion's prompt is a string, an array of token ids, or
an array of either (one choice each, in order). usage counts are exact: prompt_tokens are the prompt's
ids, completion_tokens every token the model generated, the end-of-turn token included. Errors are
OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 401 for a missing or wrong API key,
400 naming the field for a malformed body, a token id outside the vocabulary or a prompt that does not
fit the context, 413 for a body over the size limit. A stream that fails (the server shutting down)
ends with such an error event instead of [DONE].

One request must not hold up the others. The body is read up to Limits.max_body_bytes, then parsed,
checked and tokenized on a worker thread, so that a huge body does not stall the event loop (and the
streams it serves). A request carries at most Limits.max_prompts prompts and Limits.max_stops stop
strings of at most Limits.max_stop_chars characters each (more is a 400 naming the limit), and the
engine admits the prompts of concurrent requests in turn (an API request's prompts are one group).

Log-probabilities, so that evaluation harnesses can score a served model: a completion's `logprobs: k`
(OpenAI's legacy format: tokens, token_logprobs, top_logprobs of the k most likely, text_offset) and a
chat's `logprobs: true` with `top_logprobs: k` (choices[].logprobs.content, in each streamed chunk for
its tokens) describe the generated tokens, bar the end-of-turn token that ends an answer. `echo: true`
puts the prompt before a completion's text and, with logprobs, its tokens before the generated ones
(the first with null, each other given those before it); with `max_tokens: 0` it scores the prompt
without generating. They are the model's own distribution, log_softmax of the raw logits in fp32,
before repetition penalty, temperature, top-k and top-p; k is at most the server's max_logprobs (a
larger one is a 400). A prompt is scored in one forward pass on a worker thread (Engine.score), so that
the event loop and the other requests' decoding carry on meanwhile.

With an API key, every request needs `Authorization: Bearer KEY`, except the page itself, which asks
for the key and sends it with its own requests.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import tokenizers
import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import ContextLengthError, Engine, Event, SamplingParams, TokenLogprob
from .generation import encode_prompt
from .templates import ROLES, conversation_ids
from .tokenizer import Tokenizer

# numeric fields: (name, type, the SamplingParams field it sets)
SAMPLING_FIELDS = (("temperature", float, "temperature"), ("top_p", float, "top_p"), ("top_k", int, "top_k"),
                   ("repetition_penalty", float, "repetition_penalty"),
                   ("repetition_penalty_range", int, "repetition_penalty_range"), ("seed", int, "seed"))


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may carry: bounds on the work a single client can make the server do for it."""
    max_body_bytes: int = 8 * 2**20  # a larger body is a 413
    max_prompts: int = 128  # prompts of one completions request
    max_stops: int = 16  # stop strings of one request (OpenAI allows 4)
    max_stop_chars: int = 256  # characters of one stop string


# what is refused when a request asks for it (any value but these)
UNSUPPORTED = {"suffix": (None, ""), "best_of": (None, 1), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
               "logit_bias": (None, {}), "response_format": (None, {"type": "text"})}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def create_app(engine: Engine, tokenizer: Tokenizer, *, model_id: str, template: str = "model",
               api_key: str | None = None, max_logprobs: int = 20, limits: Limits = Limits()) -> Starlette:
    """The Starlette app serving `engine` (already started) under OpenAI's API; template is 'chat' or 'model';
    max_logprobs caps the k of logprobs and top_logprobs; limits bound what one request may carry."""
    api = _API(engine, tokenizer, model_id, template, api_key, max_logprobs, limits)
    routes = [Route("/", api.page, methods=["GET"]),
              Route("/v1/models", api.guarded(api.models), methods=["GET"]),
              Route("/metrics", api.guarded(api.metrics), methods=["GET"]),
              Route("/v1/chat/completions", api.guarded(api.chat), methods=["POST"]),
              Route("/v1/completions", api.guarded(api.completions), methods=["POST"]),
              Route("/tokenize", api.guarded(api.tokenize), methods=["POST"]),
              Route("/detokenize", api.guarded(api.detokenize), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error})


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    message = f"{request.method} {request.url.path}: {error.detail}"
    return APIError(error.status_code, message, code=code).response()


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").response()


class _API:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_id: str, template: str,
                 api_key: str | None, max_logprobs: int, limits: Limits) -> None:
        if template not in ("chat", "model"):
            raise ValueError(f"template must be 'chat' or 'model' to hold a conversation, got {template!r}")
        if max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {max_logprobs}")
        self.engine, self.tokenizer, self.model_id, self.template = engine, tokenizer, model_id, template
        self.api_key, self.max_logprobs, self.limits = api_key, max_logprobs, limits
        self.pieces = _Pieces(tokenizer)
        # bodies are parsed and tokenized one at a time, off the event loop (the tokenizer's special-token
        # switch is not safe for concurrent calls)
        self.parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-parse")
        # prompts are scored one at a time, off the event loop (one forward pass's memory at most), on one
        # intra-op thread: a second OpenMP pool would slow the engine's every parallel op (Engine.start)
        self.scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-score",
                                         initializer=torch.set_num_threads, initargs=(1,))
        self.created = int(time.time())
        self.html = resources.files("llama").joinpath("web", "chat.html").read_text(encoding="utf-8")

    # --- plumbing ------------------------------------------------------------------------------

    def guarded(self, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """handler behind the API key check, with APIError answered in OpenAI's shape."""
        async def endpoint(request: Request) -> Response:
            try:
                self.check_key(request)
                return await handler(request)
            except APIError as error:
                return error.response()
        return endpoint

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise APIError(401, "You didn't provide an API key: send the header 'Authorization: Bearer KEY' with "
                                "the key the server was started with (--api-key)", code="invalid_api_key")
        given = header.removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided: it is not the key the server was started with "
                                "(--api-key)", code="invalid_api_key")

    async def parsed(self, request: Request, prepare: Callable[[dict[str, Any]], Any]) -> Any:
        """prepare(body) of the request's JSON object, parsed and prepared on the parser thread."""
        raw = await self.read(request)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.parser, lambda: prepare(_parse_body(raw)))

    async def read(self, request: Request) -> bytes:
        """The request's body; over the limit, a 413. An oversized body is still read (and dropped) up to 4
        times the limit: a client still sending when the connection closes would never see the answer."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        declared = int(declared) if declared.isdigit() else None
        chunks, size = [], 0
        if declared is None or declared <= 4 * limit:
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    chunks.append(chunk)
                elif size > 4 * limit:
                    break
        if size > limit or (declared or 0) > limit:
            raise _too_large(limit, declared)
        return b"".join(chunks)

    def check(self, body: dict[str, Any]) -> None:
        """What every generation request is checked for first: the model's name, and nothing unsupported."""
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, f"model must be a string, got {_shown(model)}", param="model")
        if model is not None and model != self.model_id:
            raise APIError(404, f"The model `{_cut(model)}` does not exist or you do not have access to it. This "
                                f"server serves `{self.model_id}` (GET /v1/models).", code="model_not_found")
        for name, off in UNSUPPORTED.items():
            if body.get(name) not in off:
                raise APIError(400, f"{name} is not supported by this server", param=name)

    # --- endpoints -----------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return HTMLResponse(self.html)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "llama-from-scratch",
             "context": self.engine.context}]})

    async def metrics(self, request: Request) -> Response:
        return JSONResponse(self.engine.metrics())

    async def chat(self, request: Request) -> Response:
        return await self.generate(request, await self.parsed(request, self.chat_job))

    def chat_job(self, body: dict[str, Any]) -> _Job:
        self.check(body)
        messages = _messages(body)
        try:
            prompt = conversation_ids(self.tokenizer, messages, self.template)
        except ValueError as error:  # no chat template, or the template rejected the conversation
            raise APIError(400, f"{error}", param="messages") from None
        top = None
        if _typed(body, "logprobs", bool, False):
            top = self.logprobs_k(body, "top_logprobs", 0)
        elif _typed(body, "top_logprobs", int, 0) != 0:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return self.job(body, [prompt], "chat.completion", "messages", top=top)

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, await self.parsed(request, self.completions_job))

    def completions_job(self, body: dict[str, Any]) -> _Job:
        self.check(body)
        echo = _typed(body, "echo", bool, False)
        top = self.logprobs_k(body, "logprobs", None)
        given = _prompts(body, self.limits.max_prompts)
        vocab = self.engine.model.config.vocab_size
        batch = isinstance(body["prompt"][0], (str, list))  # else one prompt of ids (a text one has none)
        for i, prompt in enumerate(given):
            if isinstance(prompt, list):
                _check_ids(prompt, vocab, f"prompt[{i}]" if batch else "prompt", "prompt")
        prompts = [ids if isinstance(ids, list) else encode_prompt(self.tokenizer, ids) for ids in given]
        echoes = None
        if echo:  # the prompt as given, or the text of its ids
            echoes = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in given]
        score_only = echo and _typed(body, "max_tokens", int, None) == 0
        if score_only:
            body = {name: value for name, value in body.items() if name != "max_tokens"}
        return self.job(body, prompts, "text_completion", "prompt", top=top, echoes=echoes, score_only=score_only)

    async def tokenize(self, request: Request) -> Response:
        """llama.cpp's /tokenize: {"content", "add_special" (BOT where the model expects one), "parse_special"
        (special tokens' spellings are those tokens; default true)} -> {"tokens"}."""
        return JSONResponse(await self.parsed(request, self.tokenize_job))

    def tokenize_job(self, body: dict[str, Any]) -> dict[str, Any]:
        content = body.get("content")
        if not isinstance(content, str):
            raise APIError(400, f"content must be a string, got {_shown(content)}", param="content")
        add_special = _typed(body, "add_special", bool, False)
        ids = self.tokenizer.encode(content, allow_special=_typed(body, "parse_special", bool, True))
        bot = self.tokenizer.bot_id
        if add_special and self.tokenizer.add_bot and bot is not None and ids[:1] != [bot]:
            ids = [bot] + ids
        return {"tokens": ids}

    async def detokenize(self, request: Request) -> Response:
        """llama.cpp's /detokenize: {"tokens": [ids]} -> {"content"}, special tokens spelled out."""
        return JSONResponse(await self.parsed(request, self.detokenize_job))

    def detokenize_job(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(_is_id(t) for t in ids):
            raise APIError(400, f"tokens must be an array of token ids, got {_shown(ids)}", param="tokens")
        _check_ids(ids, self.engine.model.config.vocab_size, "tokens", "tokens")
        return {"content": self.tokenizer.decode(ids, skip_special=False)}

    def logprobs_k(self, body: dict[str, Any], name: str, default: int | None) -> int | None:
        """The k of body[name], checked against the cap."""
        k = _typed(body, name, int, default)
        if k is not None and k < 0:
            raise APIError(400, f"{name} must be >= 0 (the number of most likely tokens to give), got {k}",
                           param=name)
        if k is not None and k > self.max_logprobs:
            raise APIError(400, f"{name} must be at most {self.max_logprobs} (this server's --max-logprobs)",
                           param=name)
        return k

    # --- generation ----------------------------------------------------------------------------

    def job(self, body: dict[str, Any], prompts: list[list[int]], kind: str, prompt_field: str, *,
            top: int | None = None, echoes: list[str] | None = None, score_only: bool = False) -> _Job:
        """The _Job of a chat or completions body, its shared fields checked."""
        stream = _typed(body, "stream", bool, False)
        options = _typed(body, "stream_options", dict, None) or {}
        include_usage = _typed(options, "include_usage", bool, False, "stream_options.include_usage")
        params = _params(body, self.limits, top)
        return _Job(prompts, params, kind, prompt_field, stream, include_usage, top, echoes, score_only)

    async def generate(self, request: Request, job: _Job) -> Response:
        """Submit one engine request per prompt, as one group; answer with the whole completion or an event
        stream."""
        prompts, top, echoes = job.prompts, job.top, job.echoes
        group = object()  # the engine admits this request's prompts in turn with other requests'
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        handles: list[Any] = []
        try:
            for index, prompt in enumerate(prompts):
                if job.score_only:
                    handles.append(_Scored(prompt))
                    events.put_nowait((index, Event(finish_reason="length")))
                else:
                    handles.append(self.engine.submit(prompt, job.params, listener=_listener(loop, events, index),
                                                      group=group))
            scores = None
            if echoes is not None and top is not None:  # the decoding goes on meanwhile
                scores = [await loop.run_in_executor(self.scorer, self.engine.score, prompt, top)
                          for prompt in prompts]
        except ValueError as error:  # the prompt does not fit the context, or an id is out of range
            for handle in handles:
                handle.cancel()
            too_long = isinstance(error, ContextLengthError)
            raise APIError(400, str(error), param="max_tokens" if too_long and error.field == "max_tokens" else
                           job.prompt_field, code="context_length_exceeded" if too_long else None) from None
        except RuntimeError as error:  # the engine is closed (the server is shutting down), or scoring failed
            for handle in handles:
                handle.cancel()
            raise APIError(503, str(error), type="server_error") from None
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        choices = [_Choice(self.pieces, prompt, top, None if echoes is None else echoes[i],
                           None if scores is None else scores[i]) for i, prompt in enumerate(prompts)]
        reply = _Reply(job.kind, self.model_id, handles, choices)
        if job.stream:
            return StreamingResponse(reply.stream(events, job.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.whole(events, request)


@dataclasses.dataclass(frozen=True)
class _Job:
    """A generation request parsed, checked and tokenized (on the parser thread): what the event loop submits."""
    prompts: list[list[int]]
    params: SamplingParams
    kind: str  # chat.completion or text_completion
    prompt_field: str  # what names the prompt in an error: messages or prompt
    stream: bool
    include_usage: bool
    top: int | None = None  # the k of logprobs (None: none asked for)
    echoes: list[str] | None = None  # the prompts' texts, to put first (with their scores when top is given)
    score_only: bool = False  # generate nothing (echo with max_tokens 0)


class _Reply:
    """The OpenAI response objects of one API request, made from its engine requests' events."""

    def __init__(self, kind: str, model_id: str, handles: list, choices: list[_Choice]) -> None:
        self.kind, self.model, self.handles, self.choices = kind, model_id, handles, choices
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def usage(self) -> dict[str, int]:
        prompt = sum(h.prompt_tokens for h in self.handles)
        completion = sum(h.completion_tokens for h in self.handles)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(self, object: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices}

    def choice(self, index: int, text: str | None, finish_reason: str | None, first: bool = False,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.kind == "text_completion":
            return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
        delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}

    def logprobs(self, index: int, entries: list[Any], prompt: bool = False) -> dict[str, Any] | None:
        """The logprobs object of choice `index` for these entries (None when not asked for)."""
        choice = self.choices[index]
        if choice.top is None:
            return None
        if self.kind == "text_completion":
            return choice.legacy(entries, prompt)
        return {"content": choice.content(entries)}

    async def whole(self, events: asyncio.Queue, request: Request) -> Response:
        """Wait for every engine request to end (cancelling them if the client goes away)."""
        texts = [""] * len(self.handles)
        entries: list[list[TokenLogprob]] = [[] for _ in self.handles]
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            for index, event in await _race(_collect(events, texts, entries, len(self.handles)), gone):
                if event.finish_reason == "error":
                    raise APIError(503, event.error or "generation failed", type="server_error")
        except _ClientGone:
            return Response(status_code=499)
        finally:
            gone.cancel()
            for handle in self.handles:
                handle.cancel()
        if self.kind == "text_completion":
            choices = []
            for i, (choice, handle) in enumerate(zip(self.choices, self.handles)):
                logprobs = None
                if choice.top is not None:
                    parts = [choice.legacy(choice.prompt_entries(), prompt=True)] if choice.echo is not None else []
                    logprobs = _merge_legacy(parts + [choice.legacy(entries[i])])
                choices.append({"index": i, "text": (choice.echo or "") + texts[i],
                                "finish_reason": handle.finish_reason, "logprobs": logprobs})
        else:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "finish_reason": h.finish_reason, "logprobs": self.logprobs(i, entries[i])}
                       for i, h in enumerate(self.handles)]
        return JSONResponse({**self.envelope(self.kind, choices), "usage": self.usage()})

    async def stream(self, events: asyncio.Queue, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, a finish chunk per choice, usage, then [DONE].

        If the client disconnects, Starlette cancels this generator and the finally clause frees the
        engine's slots.
        """
        chunk = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        try:
            if self.kind == "chat.completion":
                yield _sse(self.envelope(chunk, [self.choice(0, None, None, first=True)]))
            for index, choice in enumerate(self.choices):  # echo: each prompt first, with its scores
                if choice.echo is not None:
                    logprobs = self.logprobs(index, choice.prompt_entries(), prompt=True)
                    yield _sse(self.envelope(chunk, [self.choice(index, choice.echo, None, logprobs=logprobs)]))
            left = len(self.handles)
            while left:
                index, event = await events.get()
                if event.finish_reason == "error":
                    yield _sse(APIError(503, event.error or "generation failed", type="server_error").body())
                    return
                if event.text or event.logprobs:
                    logprobs = self.logprobs(index, list(event.logprobs))
                    yield _sse(self.envelope(chunk, [self.choice(index, event.text, None, logprobs=logprobs)]))
                if event.finish_reason is not None:
                    left -= 1
                    yield _sse(self.envelope(chunk, [self.choice(index, None, event.finish_reason)]))
            if include_usage:
                yield _sse({**self.envelope(chunk, []), "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            for handle in self.handles:
                handle.cancel()


class _Scored:
    """What stands for an engine request where nothing is generated (echo with max_tokens 0)."""

    def __init__(self, prompt: list[int]) -> None:
        self.prompt_tokens, self.completion_tokens, self.finish_reason = len(prompt), 0, "length"

    def cancel(self) -> None:
        pass


class _Choice:
    """One choice's logprobs in OpenAI's shapes: its prompt (ids, text to echo, scores) and the running text
    offset of its generated tokens."""

    def __init__(self, pieces: _Pieces, prompt: list[int], top: int | None, echo: str | None,
                 scores: list[TokenLogprob] | None) -> None:
        self.pieces, self.prompt, self.top, self.echo, self.scores = pieces, prompt, top, echo, scores
        self.decoder = pieces.tokenizer.stream_decoder()  # the generated text, for text_offset
        self.offset = len(echo or "")

    def prompt_entries(self) -> list[TokenLogprob | None]:
        """The prompt's tokens: the first without a score (None), then its scores (when asked for)."""
        if self.scores is None:
            return []
        return [None] + self.scores

    def legacy(self, entries: list[TokenLogprob | None], prompt: bool = False) -> dict[str, Any]:
        """OpenAI's completions logprobs: token strings, their log-probabilities, the top k as
        {token: logprob} (the more likely first where two spell the same), and where each starts in the text."""
        tokens, logprobs, tops, offsets = [], [], [], []
        if prompt:
            decoder, offset = self.pieces.tokenizer.stream_decoder(), 0
            ids = self.prompt
        else:
            decoder, offset = self.decoder, self.offset
            ids = [entry.token for entry in entries]
        for token, entry in zip(ids, entries):
            tokens.append(self.pieces.text(token))
            offsets.append(offset)
            offset += len(decoder.push(token))
            logprobs.append(None if entry is None else entry.logprob)
            top = None
            if entry is not None:
                top = {}
                for alternative, logprob in entry.top:
                    top.setdefault(self.pieces.text(alternative), logprob)
            tops.append(top)
        if not prompt:
            self.offset = offset
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def content(self, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        """OpenAI's chat logprobs: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]} each."""
        return [{**self.pieces.entry(entry.token, entry.logprob),
                 "top_logprobs": [self.pieces.entry(t, logprob) for t, logprob in entry.top]} for entry in entries]


def _merge_legacy(parts: list[dict[str, list]]) -> dict[str, list]:
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for name in merged:
            merged[name] += part[name]
    return merged


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class _Pieces:
    """Each token id as OpenAI's logprobs spell it: its text alone (special tokens by name), its UTF-8 bytes,
    and where those bytes are not whole characters (a byte-level token holding part of one), "bytes:\\xNN..."."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = tokenizer.backend.decoder
        self.byte_level = _byte_decoder() if isinstance(decoder, tokenizers.decoders.ByteLevel) else None
        self.cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        if token not in self.cache:
            self.cache[token] = self._piece(token)
        return self.cache[token]

    def text(self, token: int) -> str:
        return self(token)[0]

    def entry(self, token: int, logprob: float) -> dict[str, Any]:
        text, raw = self(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def _piece(self, token: int) -> tuple[str, bytes]:
        text = self.tokenizer.decode([token], skip_special=False)
        if "\ufffd" not in text:
            return text, text.encode()
        raw = None
        name = self.tokenizer.backend.id_to_token(token) or ""
        if self.byte_level is not None and name and all(c in self.byte_level for c in name):
            raw = bytes(self.byte_level[c] for c in name)
        elif len(name) == 6 and name.startswith("<0x") and name.endswith(">"):  # sentencepiece's byte fallback
            raw = bytes([int(name[3:5], 16)])
        if raw is None:
            return text, text.encode()
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


class _ClientGone(Exception):
    pass


async def _race(work, gone: asyncio.Future):
    """work's result, or _ClientGone if the `gone` future finishes first."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if task not in done:
        task.cancel()
        raise _ClientGone()
    return task.result()


async def _collect(events: asyncio.Queue, texts: list[str], entries: list[list[TokenLogprob]],
                   count: int) -> list[tuple[int, Event]]:
    """Gather events into texts and logprob entries until `count` requests have finished; returns the final events."""
    finals = []
    while len(finals) < count:
        index, event = await events.get()
        texts[index] += event.text
        entries[index] += event.logprobs
        if event.finish_reason is not None:
            finals.append((index, event))
    return finals


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (after the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _listener(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int) -> Callable[[Event], None]:
    """Hand an engine event (on the engine's thread) to the request's queue on the event loop."""
    def listen(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass
    return listen


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


# --- request parsing ---------------------------------------------------------------------------

def _parse_body(raw: bytes) -> dict[str, Any]:
    """The body's JSON object; a 400 for anything else, a hostile body included (deep nesting, a number of
    thousands of digits, a lone UTF-16 surrogate, which no text encoding can hold)."""
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise APIError(400, f"the request body is not valid JSON: it is not UTF-8 text: {error}") from None
    except RecursionError:
        raise APIError(400, "the request body nests arrays or objects too deeply to be read") from None
    except ValueError as error:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise APIError(400, f"the request body cannot be read: {error}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if _ESCAPED_SURROGATE.search(raw):  # only an escape can make one
        _check_text(body)
    return body


_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_text(body: dict[str, Any]) -> None:
    """A 400 naming the first field whose text (or key) holds a lone surrogate."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            items = [(f"{path}.{key}" if path else str(key), item) for key, item in value.items()]
            texts = list(value)
        elif isinstance(value, list):
            items, texts = [(f"{path}[{i}]", item) for i, item in enumerate(value)], []
        else:
            items, texts = [], [value] if isinstance(value, str) else []
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                bad = f"\\u{ord(text[error.start]):04x}"
                raise APIError(400, f"{path or 'the request body'} holds a lone UTF-16 surrogate ({bad}), which is "
                                    "not a Unicode character", param=path or None) from None
        stack.extend(reversed(items))


def _too_large(limit: int, size: int | None = None) -> APIError:
    given = "" if size is None else f"{size} bytes, "
    return APIError(413, f"the request body is {given}more than this server's limit of {limit} bytes",
                    code="request_too_large")


def _shown(value: Any, limit: int = 200) -> str:
    """value as JSON, for an error message: cut after `limit` characters (a body may be megabytes)."""
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):
        text = f"a {type(value).__name__} nested too deeply to show"
    return _cut(text, limit)


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _typed(body: dict[str, Any], name: str, kind: type, default: Any, label: str | None = None) -> Any:
    """body[name] checked to be of `kind` (None or absent gives default); bools are not numbers."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        expected = {float: "a number", int: "an integer", bool: "true or false", str: "a string",
                    dict: "an object", list: "an array"}[kind]
        raise APIError(400, f"{label or name} must be {expected}, got {_shown(value)}", param=label or name)
    if kind is float:
        try:
            return float(value)
        except OverflowError:  # an integer beyond float's range
            raise APIError(400, f"{label or name} must be a finite number, got {_shown(value)}",
                           param=label or name) from None
    return value


def _params(body: dict[str, Any], limits: Limits, logprobs: int | None) -> SamplingParams:
    """The SamplingParams that the body sets, checked (stop strings against the limits)."""
    settings = {field: _typed(body, name, kind, None) for name, kind, field in SAMPLING_FIELDS}
    settings = {field: value for field, value in settings.items() if value is not None}
    if _typed(body, "ignore_eos", bool, False):
        settings["ignore_eos"] = True
    for name in ("max_tokens", "max_completion_tokens"):
        value = _typed(body, name, int, None)
        if value is not None:
            settings["max_tokens"] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise APIError(400, f"stop must be a non-empty string or an array of them, got {_shown(stop)}",
                           param="stop")
        if len(stops) > limits.max_stops:
            raise APIError(400, f"stop holds {len(stops)} strings, more than this server's limit of "
                                f"{limits.max_stops}", param="stop")
        for i, text in enumerate(stops):
            if len(text) > limits.max_stop_chars:
                label = "stop" if isinstance(stop, str) else f"stop[{i}]"
                raise APIError(400, f"{label} is {len(text)} characters long, more than this server's limit of "
                                    f"{limits.max_stop_chars}", param="stop")
        settings["stop"] = tuple(stops)
    if _typed(body, "n", int, 1) != 1:
        raise APIError(400, f"n must be 1 (one answer per request), got {body['n']}", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if _typed(body, name, float, 0.0) != 0:
            raise APIError(400, f"{name} is not supported; use repetition_penalty (e.g. 1.1) instead", param=name)
    try:
        return SamplingParams(**settings, logprobs=logprobs)
    except ValueError as error:  # check_sampling's messages start with the field's name
        field = str(error).split()[0]
        raise APIError(400, str(error), param="max_tokens" if field == "max_tokens" else field) from None


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages as {"role", "content"} with text content (OpenAI's text parts are joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty array of {\"role\", \"content\"} objects, got "
                            f"{_shown(messages)}", param="messages")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role = "system" if message.get("role") == "developer" else message.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                                f"{_shown(message.get('role'))}", param=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content parts must all be {{\"type\": \"text\", \"text\": ...}}; "
                                    "this model reads text only", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string, got {_shown(content)}",
                           param=f"messages[{i}].content")
        result.append({"role": role, "content": content})
    return result


def _prompts(body: dict[str, Any], most: int) -> list[str | list[int]]:
    """The completion prompts: a string, an array of strings, an array of token ids, or an array of those
    (at most `most`)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > most and not all(_is_id(t) for t in prompt):
        raise APIError(400, f"prompt holds {len(prompt)} prompts, more than this server's limit of {most} per "
                            "request; send them in several requests", param="prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_id(t) for t in p)) for p in prompt):
        prompts = prompt
    else:
        raise APIError(400, "prompt must be a string, an array of strings, an array of token ids or an array of "
                            f"those, got {_shown(prompt)}", param="prompt")
    if any(len(p) == 0 for p in prompts):
        raise APIError(400, "prompt is empty; give some text to continue", param="prompt")
    return prompts


def _check_ids(ids: list[int], vocab: int, label: str, param: str) -> None:
    """Every id in the vocabulary, or a 400 naming the field."""
    for at, token in enumerate(ids):
        if not 0 <= token < vocab:
            raise APIError(400, f"{label}[{at}] is {token}, not a token id of this model's vocabulary "
                                f"(0 to {vocab - 1})", param=param)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

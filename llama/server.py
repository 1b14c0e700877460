"""An OpenAI-compatible HTTP API over the continuous-batching engine, and the web chat page.

    POST /v1/chat/completions   messages in the model's chat template (or ours), streamed or not
    POST /v1/completions        raw text prompts (one or several), streamed or not
    GET  /v1/models             the one model served
    GET  /metrics               the engine's counters: slots in use, queue, decode steps by batch size
    GET  /                      the chat page (llama/web/chat.html)

The request and response bodies are OpenAI's, so its client, evaluation harnesses and chat front ends
work unchanged. Sampling fields map to llama.engine.SamplingParams: temperature, top_p, max_tokens
(or max_completion_tokens; default: the rest of the context), stop, seed, plus our top_k,
repetition_penalty, repetition_penalty_range and ignore_eos (as vLLM's: decode to max_tokens). `n` must be 1; logprobs and the frequency and
presence penalties are not implemented and are rejected when asked for. `model` is not checked: one
model is served. usage counts are exact: prompt_tokens are the prompt's ids, completion_tokens every
token the model generated, the end-of-turn token included. Errors are OpenAI's shape,
{"error": {"message", "type", "param", "code"}}: 401 for a missing or wrong API key, 400 naming the
field for a malformed body or a prompt that does not fit the context. A stream that fails (the server
shutting down) ends with such an error event instead of [DONE].

With an API key, every request needs `Authorization: Bearer KEY`, except the page itself, which asks
for the key and sends it with its own requests.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import ContextLengthError, Engine, Event, SamplingParams
from .generation import encode_prompt
from .templates import ROLES, conversation_ids
from .tokenizer import Tokenizer

# numeric fields: (name, type, the SamplingParams field it sets)
SAMPLING_FIELDS = (("temperature", float, "temperature"), ("top_p", float, "top_p"), ("top_k", int, "top_k"),
                   ("repetition_penalty", float, "repetition_penalty"),
                   ("repetition_penalty_range", int, "repetition_penalty_range"), ("seed", int, "seed"))


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
               api_key: str | None = None) -> Starlette:
    """The Starlette app serving `engine` (already started) under OpenAI's API; template is 'chat' or 'model'."""
    api = _API(engine, tokenizer, model_id, template, api_key)
    routes = [Route("/", api.page, methods=["GET"]),
              Route("/v1/models", api.guarded(api.models), methods=["GET"]),
              Route("/metrics", api.guarded(api.metrics), methods=["GET"]),
              Route("/v1/chat/completions", api.guarded(api.chat), methods=["POST"]),
              Route("/v1/completions", api.guarded(api.completions), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error})


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    message = f"{request.method} {request.url.path}: {error.detail}"
    return APIError(error.status_code, message, code=code).response()


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").response()


class _API:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_id: str, template: str,
                 api_key: str | None) -> None:
        if template not in ("chat", "model"):
            raise ValueError(f"template must be 'chat' or 'model' to hold a conversation, got {template!r}")
        self.engine, self.tokenizer, self.model_id, self.template = engine, tokenizer, model_id, template
        self.api_key = api_key
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

    async def body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

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
        body = await self.body(request)
        messages = _messages(body)
        try:
            prompt = conversation_ids(self.tokenizer, messages, self.template)
        except ValueError as error:  # no chat template, or the template rejected the conversation
            raise APIError(400, f"{error}", param="messages") from None
        return await self.generate(request, body, [prompt], "chat.completion", "messages")

    async def completions(self, request: Request) -> Response:
        body = await self.body(request)
        for name, off in (("echo", (None, False)), ("suffix", (None, "")), ("best_of", (None, 1))):
            if body.get(name) not in off:
                raise APIError(400, f"{name} is not supported by this server", param=name)
        prompts = [ids if isinstance(ids, list) else encode_prompt(self.tokenizer, ids) for ids in _prompts(body)]
        return await self.generate(request, body, prompts, "text_completion", "prompt")

    # --- generation ----------------------------------------------------------------------------

    async def generate(self, request: Request, body: dict[str, Any], prompts: list[list[int]], kind: str,
                       prompt_field: str) -> Response:
        """Submit one engine request per prompt; answer with the whole completion or an event stream."""
        stream = _typed(body, "stream", bool, False)
        options = _typed(body, "stream_options", dict, None) or {}
        include_usage = _typed(options, "include_usage", bool, False, "stream_options.include_usage")
        settings = _settings(body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        handles = []
        try:
            for index, prompt in enumerate(prompts):
                handles.append(self.engine.submit(prompt, SamplingParams(**settings),
                                                  listener=_listener(loop, events, index)))
        except ValueError as error:  # the prompt does not fit the context, or an id is out of range
            for handle in handles:
                handle.cancel()
            too_long = isinstance(error, ContextLengthError)
            raise APIError(400, str(error), param="max_tokens" if too_long and error.field == "max_tokens" else
                           prompt_field, code="context_length_exceeded" if too_long else None) from None
        except RuntimeError as error:  # the engine is closed: the server is shutting down
            raise APIError(503, str(error), type="server_error") from None
        reply = _Reply(kind, self.model_id, handles)
        if stream:
            return StreamingResponse(reply.stream(events, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.whole(events, request)


class _Reply:
    """The OpenAI response objects of one API request, made from its engine requests' events."""

    def __init__(self, kind: str, model_id: str, handles: list) -> None:
        self.kind, self.model, self.handles = kind, model_id, handles
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def usage(self) -> dict[str, int]:
        prompt = sum(h.prompt_tokens for h in self.handles)
        completion = sum(h.completion_tokens for h in self.handles)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(self, object: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices}

    def choice(self, index: int, text: str | None, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        if self.kind == "text_completion":
            return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}

    async def whole(self, events: asyncio.Queue, request: Request) -> Response:
        """Wait for every engine request to end (cancelling them if the client goes away)."""
        texts = [""] * len(self.handles)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            for index, event in await _race(_collect(events, texts, len(self.handles)), gone):
                if event.finish_reason == "error":
                    raise APIError(503, event.error or "generation failed", type="server_error")
        except _ClientGone:
            return Response(status_code=499)
        finally:
            gone.cancel()
            for handle in self.handles:
                handle.cancel()
        if self.kind == "text_completion":
            choices = [{"index": i, "text": texts[i], "finish_reason": h.finish_reason, "logprobs": None}
                       for i, h in enumerate(self.handles)]
        else:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "finish_reason": h.finish_reason, "logprobs": None} for i, h in enumerate(self.handles)]
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
            left = len(self.handles)
            while left:
                index, event = await events.get()
                if event.finish_reason == "error":
                    yield _sse(APIError(503, event.error or "generation failed", type="server_error").body())
                    return
                if event.text:
                    yield _sse(self.envelope(chunk, [self.choice(index, event.text, None)]))
                if event.finish_reason is not None:
                    left -= 1
                    yield _sse(self.envelope(chunk, [self.choice(index, None, event.finish_reason)]))
            if include_usage:
                yield _sse({**self.envelope(chunk, []), "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            for handle in self.handles:
                handle.cancel()


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


async def _collect(events: asyncio.Queue, texts: list[str], count: int) -> list[tuple[int, Event]]:
    """Gather events into texts until `count` requests have finished; returns the final events."""
    finals = []
    while len(finals) < count:
        index, event = await events.get()
        texts[index] += event.text
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
        raise APIError(400, f"{label or name} must be {expected}, got {json.dumps(value)}", param=label or name)
    return float(value) if kind is float else value


def _settings(body: dict[str, Any]) -> dict[str, Any]:
    """The SamplingParams fields that the body sets, checked."""
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
            raise APIError(400, f"stop must be a non-empty string or an array of them, got {json.dumps(stop)}",
                           param="stop")
        settings["stop"] = tuple(stops)
    if _typed(body, "n", int, 1) != 1:
        raise APIError(400, f"n must be 1 (one answer per request), got {body['n']}", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if _typed(body, name, float, 0.0) != 0:
            raise APIError(400, f"{name} is not supported; use repetition_penalty (e.g. 1.1) instead", param=name)
    for name in ("logprobs", "top_logprobs"):
        if body.get(name) not in (None, False, 0):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    try:
        SamplingParams(**settings)
    except ValueError as error:  # check_sampling's messages start with the field's name
        field = str(error).split()[0]
        raise APIError(400, str(error), param="max_tokens" if field == "max_tokens" else field) from None
    return settings


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages as {"role", "content"} with text content (OpenAI's text parts are joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty array of {\"role\", \"content\"} objects, got "
                            f"{json.dumps(messages)}", param="messages")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role = "system" if message.get("role") == "developer" else message.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                                f"{json.dumps(message.get('role'))}", param=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content parts must all be {{\"type\": \"text\", \"text\": ...}}; "
                                    "this model reads text only", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string, got {json.dumps(content)}",
                           param=f"messages[{i}].content")
        result.append({"role": role, "content": content})
    return result


def _prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """The completion prompts: a string, an array of strings, an array of token ids, or an array of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_id(t) for t in p)) for p in prompt):
        prompts = prompt
    else:
        raise APIError(400, "prompt must be a string, an array of strings, an array of token ids or an array of "
                            f"those, got {json.dumps(prompt)}", param="prompt")
    if any(len(p) == 0 for p in prompts):
        raise APIError(400, "prompt is empty; give some text to continue", param="prompt")
    return prompts


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

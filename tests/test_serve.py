"""serve.py's OpenAI-compatible API, tested with the real `openai` client against servers on free loopback
ports: answers streamed or not, stop and max_tokens, exact usage, errors in OpenAI's shape, continuous
batching across concurrent clients, and faults (a client killed mid-stream, 100 requests at once,
Ctrl-C on the server). Greedy equality with generate() is checked on the real SmolLM2, whose top
logits are decisive, and so are scores (echo and logprobs) against llama.evaluation's and a local
forward's, and /tokenize against the local tokenizer; the rest runs on a tiny chat model trained in
seconds (tests/conftest.py)."""
import contextlib
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install -e '.[test]'")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")

from llama.cli.serve import listen  # noqa: E402
from llama.engine import Engine  # noqa: E402
from llama.evaluation import encode_pair, loglikelihoods  # noqa: E402
from llama.generation import encode_prompt, generate, stream  # noqa: E402
from llama.server import create_app  # noqa: E402
from llama.templates import conversation_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
GREEDY = dict(temperature=0)


@contextlib.contextmanager
def serving(engine, tokenizer, **options):
    """The app on a free loopback port, served by uvicorn on a thread; yields the base URL."""
    sock = listen("127.0.0.1", 0)
    app = create_app(engine, tokenizer, **{"model_id": "tiny-chat", **options})
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


def request(url, body=None, key=KEY, method=None, raw=None):
    """(status, parsed JSON body) of one HTTP request, with urllib: errors are answers too."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def ask(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tiny(tiny_chat):
    """The tiny chat model behind an API key: 8 slots of 128 positions."""
    model, tokenizer = tiny_chat
    engine = Engine(model, tokenizer, max_batch=8, context=128).start()
    with serving(engine, tokenizer, template="chat", api_key=KEY) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield types.SimpleNamespace(url=url, engine=engine, model=model, tokenizer=tokenizer, client=client)
    engine.close()


@pytest.fixture
def slow_steps(tiny, monkeypatch):
    """Decode steps that take 40 ms more, so that a stream is surely still running when a test acts on it."""
    decode = tiny.engine._decode

    def slow():
        time.sleep(0.04)
        decode()

    monkeypatch.setattr(tiny.engine, "_decode", slow)


def answer_ids(tokenizer, answer):
    return tokenizer.encode(answer + "\n") + [tokenizer.eot_id]  # the chat template's answer and its EOT


# --- answers -----------------------------------------------------------------------------------

def test_models_lists_the_served_model(tiny):
    [model] = tiny.client.models.list().data
    assert model.id == "tiny-chat" and model.object == "model"


def test_chat_streamed_or_not_gives_the_answer_with_exact_usage(tiny, chat_answers):
    for question in ("What color is the sky?", "Count to ten."):
        answer, prompt = chat_answers[question], conversation_ids(tiny.tokenizer, ask(question), "chat")
        whole = tiny.client.chat.completions.create(model="tiny-chat", messages=ask(question), **GREEDY)
        [choice] = whole.choices
        assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", answer + "\n", "stop")
        assert whole.object == "chat.completion" and whole.model == "tiny-chat"
        n, m = len(prompt), len(answer_ids(tiny.tokenizer, answer))
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (n, m, n + m)
        chunks = list(tiny.client.chat.completions.create(model="tiny-chat", messages=ask(question), stream=True,
                                                          stream_options={"include_usage": True}, **GREEDY))
        assert chunks[0].choices[0].delta.role == "assistant"
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == answer + "\n" and len(pieces) > 5  # token by token
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_completions_of_text_and_of_token_ids_streamed_or_not(tiny, chat_answers):
    question = "Where do foxes live?"
    prompt = conversation_ids(tiny.tokenizer, ask(question), "chat")
    whole = tiny.client.completions.create(model="tiny-chat", prompt=prompt, **GREEDY)  # ids: the chat prompt
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (chat_answers[question] + "\n", "stop")
    assert whole.usage.prompt_tokens == len(prompt) and whole.object == "text_completion"

    text = "The whale is the"
    whole = tiny.client.completions.create(model="tiny-chat", prompt=text, max_tokens=10, **GREEDY)
    streamed = list(tiny.client.completions.create(model="tiny-chat", prompt=text, max_tokens=10, stream=True,
                                                   **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert whole.choices[0].text == "".join(stream(tiny.model, tiny.tokenizer, text, max_tokens=10, **GREEDY))
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    several = tiny.client.completions.create(model="tiny-chat", prompt=[text, prompt], max_tokens=10, **GREEDY)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == whole.choices[0].text
    assert several.usage.prompt_tokens == len(encode_prompt(tiny.tokenizer, text)) + len(prompt)  # BOT + text


def test_stop_and_max_tokens_are_honoured(tiny):
    question = ask("What color is the sky?")
    ids = answer_ids(tiny.tokenizer, "The sky is blue on a clear day.")
    for stop, text in (("blue", "The sky is "), (["zebra", " is"], "The sky")):
        whole = tiny.client.chat.completions.create(model="tiny-chat", messages=question, stop=stop, **GREEDY)
        assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (text, "stop")
        chunks = tiny.client.chat.completions.create(model="tiny-chat", messages=question, stop=stop, stream=True,
                                                     **GREEDY)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    short = tiny.client.chat.completions.create(model="tiny-chat", messages=question, max_tokens=4, **GREEDY)
    assert short.choices[0].message.content == tiny.tokenizer.decode(ids[:4])
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4


# --- errors ------------------------------------------------------------------------------------

def test_a_wrong_or_missing_api_key_gets_401_in_openais_shape(tiny):
    wrong = openai.OpenAI(base_url=tiny.url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        wrong.chat.completions.create(model="tiny-chat", messages=ask("Say hello."))
    assert error.value.status_code == 401
    assert error.value.body == {"message": "Incorrect API key provided: it is not the key the server was started "
                                           "with (--api-key)", "type": "invalid_request_error", "param": None,
                                "code": "invalid_api_key"}
    status, body = request(tiny.url + "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert body["error"]["message"].startswith("You didn't provide an API key")
    assert request(tiny.url + "/metrics", key="nope")[0] == 401
    with urllib.request.urlopen(tiny.url + "/", timeout=30) as page:  # the page asks for the key itself
        assert page.status == 200 and b"<title>llama-from-scratch chat</title>" in page.read()


@pytest.mark.parametrize("change, param, message", [
    ({"temperature": "hot"}, "temperature", 'temperature must be a number, got "hot"'),
    ({"temperature": -1}, "temperature", "temperature must be >= 0 (0 means greedy), got -1.0"),
    ({"top_k": 2.5}, "top_k", "top_k must be an integer, got 2.5"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0"),
    ({"stream": "yes"}, "stream", 'stream must be true or false, got "yes"'),
    ({"stop": [""]}, "stop", 'stop must be a non-empty string or an array of them, got [""]'),
    ({"n": 2}, "n", "n must be 1 (one answer per request), got 2"),
    ({"presence_penalty": 0.5}, "presence_penalty",
     "presence_penalty is not supported; use repetition_penalty (e.g. 1.1) instead"),
    ({"messages": []}, "messages", 'messages must be a non-empty array of {"role", "content"} objects, got []'),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role",
     'messages[0].role must be one of system, user, assistant, got "robot"'),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "messages[0].content must be a string, got 5"),
])
def test_a_malformed_body_gets_400_naming_the_field(tiny, change, param, message):
    status, body = request(tiny.url + "/v1/chat/completions", {"messages": ask("Say hello."), **change})
    assert status == 400
    assert body == {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


@pytest.mark.parametrize("path, change, param, message", [
    ("completions", {"logprobs": 21}, "logprobs", "logprobs must be at most 20 (this server's --max-logprobs)"),
    ("completions", {"logprobs": -1}, "logprobs",
     "logprobs must be >= 0 (the number of most likely tokens to give), got -1"),
    ("completions", {"logprobs": True}, "logprobs", "logprobs must be an integer, got true"),
    ("completions", {"prompt": [5, 300]}, "prompt",
     "prompt[1] is 300, not a token id of this model's vocabulary (0 to 299)"),
    ("completions", {"prompt": ["a", [5, -2]], "echo": True, "max_tokens": 0}, "prompt",
     "prompt[1][1] is -2, not a token id of this model's vocabulary (0 to 299)"),
    ("completions", {"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0"),  # 0 only with echo
    ("completions", {"echo": "yes"}, "echo", 'echo must be true or false, got "yes"'),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "top_logprobs must be at most 20 (this server's --max-logprobs)"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs: true"),
    ("chat/completions", {"logprobs": 2}, "logprobs", "logprobs must be true or false, got 2"),
])
def test_bad_logprobs_and_token_ids_get_400_naming_the_field(tiny, path, change, param, message):
    body = {"messages": ask("Say hello.")} if path.startswith("chat") else {"prompt": "The sky", "max_tokens": 2}
    status, answer = request(f"{tiny.url}/v1/{path}", {**body, **change})
    assert (status, answer) == (400, {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                                "code": None}})


def test_bad_bodies_and_paths_through_the_openai_client_and_raw(tiny):
    with pytest.raises(openai.BadRequestError) as error:
        tiny.client.completions.create(model="tiny-chat", prompt="", max_tokens=3)
    assert error.value.param == "prompt" and error.value.message.endswith("prompt is empty; give some text to continue")
    status, body = request(tiny.url + "/v1/chat/completions", raw=b'{"messages": [')
    assert status == 400 and body["error"]["message"].startswith("the request body is not valid JSON: ")
    status, body = request(tiny.url + "/v1/chat/completions", raw=b"[1, 2]")
    assert (status, body["error"]["message"]) == (400, "the request body must be a JSON object, got list")
    status, body = request(tiny.url + "/v1/embeddings", {"input": "x"})
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = request(tiny.url + "/v1/chat/completions", method="GET")
    assert (status, body["error"]["code"]) == (405, "method_not_allowed")


def test_a_prompt_over_the_context_gets_a_clear_400(tiny):
    long = ask("sky " * 150)
    n = len(conversation_ids(tiny.tokenizer, long, "chat"))
    with pytest.raises(openai.BadRequestError) as error:
        tiny.client.chat.completions.create(model="tiny-chat", messages=long)
    assert (error.value.param, error.value.code) == ("messages", "context_length_exceeded")
    assert error.value.body["message"] == (f"the prompt has {n} tokens, but the context holds 128 (prompt and answer "
                                           "together); shorten the prompt")
    short = ask("Say hello.")
    m = len(conversation_ids(tiny.tokenizer, short, "chat"))
    with pytest.raises(openai.BadRequestError) as error:
        tiny.client.chat.completions.create(model="tiny-chat", messages=short, max_tokens=120)
    assert (error.value.param, error.value.code) == ("max_tokens", "context_length_exceeded")
    assert error.value.body["message"] == (f"the prompt has {m} tokens and max_tokens is 120, {m + 120} in all, but "
                                           f"the context holds 128; lower max_tokens to {128 - m} or less")


ERROR = dict(type="invalid_request_error", code=None)


@pytest.mark.parametrize("change, param, message", [
    ({"temperature": 1e-46}, "temperature",
     "temperature must be 0 (greedy) or above 7e-46, which rounds to 0 in float32; got 1e-46"),
    ({"temperature": 10**400}, "temperature", "temperature must be a finite number, got 1" + "0" * 199 + "..."),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools is not supported by this server"),
    ({"functions": [{"name": "f"}]}, "functions", "functions is not supported by this server"),
    ({"response_format": {"type": "json_object"}}, "response_format",
     "response_format is not supported by this server"),
    ({"logit_bias": {"50": 10}}, "logit_bias", "logit_bias is not supported by this server"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop", "stop holds 17 strings, more than this server's limit of 16"),
    ({"stop": ["ok", "x" * 257]}, "stop", "stop[1] is 257 characters long, more than this server's limit of 256"),
    ({"messages": [{"role": "user", "content": "x" * 500}, 5]}, "messages[1]",
     "messages[1] must be an object with role and content"),
    ({"messages": [[[[[[["deep"]]]]]]]}, "messages[0]", "messages[0] must be an object with role and content"),
    ({"messages": {"role": "user", "content": "y" * 1000}}, "messages",
     'messages must be a non-empty array of {"role", "content"} objects, got {"role": "user", "content": "'
     + "y" * 171 + "..."),  # a value is shown cut to 200 characters, however large
])
def test_what_is_not_supported_or_over_a_limit_gets_400_naming_it(tiny, change, param, message):
    status, body = request(tiny.url + "/v1/chat/completions", {"messages": ask("Say hello."), **change})
    assert (status, body) == (400, {"error": {"message": message, "param": param, **ERROR}})


def test_what_asks_for_nothing_unsupported_is_accepted(tiny):
    harmless = {"tools": [], "functions": None, "tool_choice": "none", "logit_bias": {}, "response_format":
                {"type": "text"}, "user": "someone", "model": "tiny-chat", "stop": [f"z{i}" for i in range(16)]}
    status, body = request(tiny.url + "/v1/chat/completions", {"messages": ask("Say hello."), **harmless, **GREEDY})
    assert status == 200 and body["choices"][0]["message"]["content"] == "Hello! How can I help you today?\n"


def test_an_unknown_model_gets_openais_404_and_too_many_prompts_a_400(tiny):
    with pytest.raises(openai.NotFoundError) as error:
        tiny.client.chat.completions.create(model="gpt-4o", messages=ask("Say hello."))
    assert error.value.body == {"message": "The model `gpt-4o` does not exist or you do not have access to it. This "
                                           "server serves `tiny-chat` (GET /v1/models).",
                                "type": "invalid_request_error", "param": None, "code": "model_not_found"}
    status, body = request(tiny.url + "/v1/completions", {"prompt": ["a"] * 129, "max_tokens": 1, "model": "x"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = request(tiny.url + "/v1/completions", {"prompt": ["a"] * 129, "max_tokens": 1})
    assert (status, body) == (400, {"error": {"message": "prompt holds 129 prompts, more than this server's limit of "
                                                         "128 per request; send them in several requests",
                                              "param": "prompt", **ERROR}})
    status, body = request(tiny.url + "/v1/completions", {"prompt": [5] * 129, "max_tokens": 1})
    assert (status, body["error"]["code"]) == (400, "context_length_exceeded")  # one prompt of 129 ids, not 129


def test_hostile_but_valid_json_gets_400_not_a_traceback(tiny):
    def send(raw):
        return request(tiny.url + "/v1/chat/completions", raw=raw)

    lone = b'{"messages": [{"role": "user", "content": "Say hello.\\ud800"}]}'
    assert send(lone) == (400, {"error": {"message": "messages[0].content holds a lone UTF-16 surrogate (\\ud800), "
                                                     "which is not a Unicode character",
                                          "param": "messages[0].content", **ERROR}})
    key = b'{"messages": [{"role": "user", "content": "Say hello."}], "\\udfff": 1}'
    assert send(key)[1]["error"]["message"] == ("the request body holds a lone UTF-16 surrogate (\\udfff), which is "
                                                "not a Unicode character")
    pair = b'{"messages": [{"role": "user", "content": "Say hello. \\ud83e\\udd99"}], "max_tokens": 2}'
    assert send(pair)[0] == 200  # a surrogate pair is one character
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert send(deep) == (400, {"error": {"message": "the request body nests arrays or objects too deeply to be "
                                                     "read", "param": None, **ERROR}})
    status, body = send(b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}")
    assert status == 400 and body["error"]["message"].startswith("the request body cannot be read: Exceeds the limit")
    status, body = send(b'{"messages": ' + b"[" * 800 + b"]" * 800 + b"}")
    assert (status, body["error"]["param"]) == (400, "messages[0]")


def test_a_body_over_the_size_limit_gets_413_before_it_is_read(tiny):
    limit = 8 * 2**20
    big = json.dumps({"messages": ask("x" * (limit + 1))}).encode()
    assert request(tiny.url + "/v1/chat/completions", raw=big) == (
        413, {"error": {"message": f"the request body is {len(big)} bytes, more than this server's limit of {limit} "
                                   "bytes", "type": "invalid_request_error", "param": None,
                        "code": "request_too_large"}})
    port = int(tiny.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # chunked: no length given
    connection.request("POST", "/v1/chat/completions", iter([big[:limit // 2], big[limit // 2:]]),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}, encode_chunked=True)
    answer = connection.getresponse()
    assert (answer.status, json.loads(answer.read())["error"]["message"]) == (
        413, f"the request body is more than this server's limit of {limit} bytes")
    connection.close()
    assert tiny.client.chat.completions.create(model="tiny-chat", messages=ask("Say hello."), max_tokens=2,
                                               **GREEDY).usage.completion_tokens == 2  # the server carries on


# --- concurrency and faults --------------------------------------------------------------------

KILLED_CLIENT = """
import http.client, json, sys
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 80, "ignore_eos": True,
        "stream": True, "temperature": 0}
connection.request("POST", "/v1/chat/completions", json.dumps(body),
                   {"Content-Type": "application/json", "Authorization": "Bearer %s"})
response = connection.getresponse()
while True:
    print(response.fp.readline().decode().strip(), flush=True)
"""


def test_a_client_killed_mid_stream_frees_its_slot(tiny, slow_steps):
    before = tiny.engine.metrics()["finished"]["cancelled"]
    port = tiny.url.rsplit(":", 1)[1]
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT % KEY, port], stdout=subprocess.PIPE, text=True)
    try:
        events = 0
        while events < 3:
            events += client.stdout.readline().startswith("data: ")
        assert tiny.engine.metrics()["running"] == 1
    finally:
        client.kill()
        client.wait()
    wait_for(lambda: tiny.engine.metrics()["finished"]["cancelled"] == before + 1)
    assert tiny.engine.metrics()["running"] == 0
    answer = tiny.client.chat.completions.create(model="tiny-chat", messages=ask("Say hello."), **GREEDY)
    assert answer.choices[0].message.content == "Hello! How can I help you today?\n"  # the server carries on


def test_100_requests_at_once_on_8_slots_all_complete(tiny, chat_answers):
    questions = list(chat_answers)
    before = tiny.engine.metrics()

    def one(i):
        messages = ask(questions[i % len(questions)])
        if i % 2:
            chunks = tiny.client.chat.completions.create(model="tiny-chat", messages=messages, stream=True, **GREEDY)
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        return tiny.client.chat.completions.create(model="tiny-chat", messages=messages, **GREEDY).choices[0].message.content

    with ThreadPoolExecutor(max_workers=100) as pool:
        answers = list(pool.map(one, range(100)))
    assert answers == [chat_answers[questions[i % len(questions)]] + "\n" for i in range(100)]
    after = tiny.engine.metrics()
    assert after["prefills"] - before["prefills"] == 100 and after["running"] == after["waiting"] == 0
    sizes = {int(size) for size, count in after["batch_sizes"].items() if count > before["batch_sizes"].get(size, 0)}
    assert max(sizes) == 8  # all slots busy while the rest queued


def test_chat_logprobs_streamed_or_not_spell_the_answer(tiny, chat_answers):
    question = ask("What color is the sky?")
    whole = tiny.client.chat.completions.create(model="tiny-chat", messages=question, logprobs=True, top_logprobs=2,
                                                **GREEDY)
    content, text = whole.choices[0].logprobs.content, whole.choices[0].message.content
    assert text == chat_answers["What color is the sky?"] + "\n"
    assert "".join(entry.token for entry in content) == text
    assert len(content) == whole.usage.completion_tokens - 1  # all but the end-of-turn token
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        first, second = entry.top_logprobs
        assert (first.token, first.logprob) == (entry.token, entry.logprob)  # greedy: the chosen is the top one
        assert first.logprob >= second.logprob and second.bytes == list(second.token.encode())
    chunks = list(tiny.client.chat.completions.create(model="tiny-chat", messages=question, logprobs=True,
                                                      top_logprobs=2, stream=True, **GREEDY))
    streamed = []
    for chunk in chunks[1:]:
        if chunk.choices[0].delta.content:  # each chunk carries the entries of its own text
            entries = chunk.choices[0].logprobs.content
            assert "".join(entry.token for entry in entries) == chunk.choices[0].delta.content
            streamed += entries
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert len(chunks) > 5 and chunks[0].choices[0].logprobs is None
    plain = tiny.client.chat.completions.create(model="tiny-chat", messages=question, logprobs=True, max_tokens=3,
                                                **GREEDY)
    assert [e.top_logprobs for e in plain.choices[0].logprobs.content] == [[], [], []]
    assert tiny.client.chat.completions.create(model="tiny-chat", messages=question, max_tokens=3,
                                               **GREEDY).choices[0].logprobs is None


def test_scoring_a_prompt_does_not_stall_a_stream(tiny, slow_steps, monkeypatch):
    """A scoring request whose forward pass is made to take a second more: a stream decoding beside it
    keeps receiving tokens all that while (the scoring runs on a worker thread, the decoding on the
    engine's, and the event loop waits for neither)."""
    score, spans = tiny.engine.score, []

    def slow_score(prompt, top):
        start = time.monotonic()
        time.sleep(1.0)
        result = score(prompt, top)
        spans.append((start, time.monotonic()))
        return result

    monkeypatch.setattr(tiny.engine, "score", slow_score)
    arrivals = []
    chunks = tiny.client.chat.completions.create(model="tiny-chat", messages=ask("Tell me a story."), max_tokens=60,
                                                 extra_body={"ignore_eos": True}, stream=True, **GREEDY)
    reader = threading.Thread(target=lambda: arrivals.extend(time.monotonic() for _ in chunks))
    reader.start()
    wait_for(lambda: len(arrivals) >= 3)
    prompt = torch.randint(0, tiny.model.config.vocab_size, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    scored = tiny.client.completions.create(model="tiny-chat", prompt=prompt, echo=True, max_tokens=0, logprobs=1)
    reader.join(60)
    [(start, end)] = spans
    assert len(scored.choices[0].logprobs.token_logprobs) == 120
    assert sum(start < t < end for t in arrivals) >= 10, (start, end, arrivals)


def test_prompts_are_scored_on_one_intra_op_thread(tiny, monkeypatch):
    """The scorer's thread runs with one intra-op thread, so it never starts a second OpenMP pool beside the
    engine's (which would slow every parallel op of the engine: see Engine.start)."""
    seen, score = [], tiny.engine.score
    monkeypatch.setattr(tiny.engine, "score", lambda *args: seen.append(torch.get_num_threads()) or score(*args))
    scored = tiny.client.completions.create(model="tiny-chat", prompt=[5, 6, 7], echo=True, max_tokens=0, logprobs=1)
    assert len(scored.choices[0].logprobs.token_logprobs) == 3 and seen == [1]


def test_serve_py_gives_the_callers_thread_count_back(tmp_path, capsys):
    """serve.py's main() loads on one intra-op thread (the engine's thread gets the caller's count); called
    from Python and failing once that is set, it leaves the caller's count as it was."""
    from llama.cli import serve

    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        assert serve.main(["--model", str(tmp_path / "nope"), "--port", "0"]) == 2
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
    assert "nope" in capsys.readouterr().err


def stream_arrivals(tiny, arrivals):
    """A long stream on a thread, appending each chunk's arrival time; returns the thread once it has begun."""
    chunks = tiny.client.chat.completions.create(model="tiny-chat", messages=ask("Tell me a story."), max_tokens=60,
                                                 extra_body={"ignore_eos": True}, stream=True, **GREEDY)
    reader = threading.Thread(target=lambda: arrivals.extend(time.monotonic() for _ in chunks))
    reader.start()
    wait_for(lambda: len(arrivals) >= 3)
    return reader


def test_parsing_and_tokenizing_a_body_does_not_stall_a_stream(tiny, slow_steps, monkeypatch):
    """A body whose parsing is made to take a second more (as a many-megabyte one would): the stream
    decoding beside it keeps receiving tokens all that while, as the parsing runs on a worker thread."""
    import llama.server as server

    parse, spans = server._parse_body, []

    def slow_parse(raw):
        start = time.monotonic()
        time.sleep(1.0)
        body = parse(raw)
        spans.append((start, time.monotonic()))
        return body

    arrivals = []
    reader = stream_arrivals(tiny, arrivals)
    monkeypatch.setattr(server, "_parse_body", slow_parse)
    answer = tiny.client.completions.create(model="tiny-chat", prompt="The sky", max_tokens=3, **GREEDY)
    reader.join(60)
    start, end = spans[-1]
    assert answer.usage.completion_tokens == 3
    assert sum(start < t < end for t in arrivals) >= 10, (start, end, arrivals)


def test_a_request_of_many_prompts_does_not_make_another_wait_for_all_of_them(tiny, slow_steps):
    """100 prompts in one request, then one prompt from another client: the engine admits the two requests
    in turn, so the second ends while most of the first's prompts still wait (first come, first served, it
    would wait for all 100)."""
    big = threading.Thread(target=lambda: tiny.client.completions.create(
        model="tiny-chat", prompt=["The sky is"] * 100, max_tokens=4, extra_body={"ignore_eos": True}, **GREEDY))
    big.start()
    wait_for(lambda: tiny.engine.metrics()["waiting"] >= 90)
    small = tiny.client.completions.create(model="tiny-chat", prompt="Say hello.", max_tokens=3, **GREEDY)
    left = tiny.engine.metrics()["waiting"]
    big.join(120)
    assert small.usage.completion_tokens == 3 and left >= 80, left


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct behind a server with 8 slots of 256 positions (no API key)."""
    from llama.hub import bundled_smollm2, load_pretrained

    try:
        path = bundled_smollm2()
    except FileNotFoundError as error:
        pytest.skip(f"{error}: the greedy-equality tests need a real model")
    model, tokenizer = load_pretrained(path)
    model.eval()
    engine = Engine(model, tokenizer, max_batch=8, context=256).start()
    with serving(engine, tokenizer, model_id="smollm2") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield types.SimpleNamespace(url=url, engine=engine, model=model, tokenizer=tokenizer, client=client)
    engine.close()


CHATS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?", "Say something kind."]
TEXTS = ["The capital of Germany is", "Once upon a time, there was a", "def fibonacci(n):", "The sun rises in the"]
TOKENS = 10


@pytest.fixture(scope="module")
def alone(smollm2):
    """What generate() answers to each of CHATS (in the model's template) and TEXTS, alone and greedy."""
    model, tokenizer = smollm2.model, smollm2.tokenizer
    chats = ["".join(stream(model, tokenizer, conversation_ids(tokenizer, ask(q), "model"), max_tokens=TOKENS,
                            **GREEDY)) for q in CHATS]
    return chats + [generate(model, tokenizer, text, max_tokens=TOKENS, **GREEDY) for text in TEXTS]


def test_greedy_answers_equal_generate(smollm2, alone):
    chat = smollm2.client.chat.completions.create(model="smollm2", messages=ask(CHATS[0]), max_tokens=TOKENS, **GREEDY)
    assert chat.choices[0].message.content == alone[0]
    text = smollm2.client.completions.create(model="smollm2", prompt=TEXTS[0], max_tokens=TOKENS, **GREEDY)
    assert text.choices[0].text == alone[4]


def test_eight_concurrent_streaming_clients_each_get_what_they_would_alone(smollm2, alone):
    before = smollm2.engine.metrics()
    start = threading.Barrier(8)

    def client(i):
        start.wait()
        if i < 4:
            chunks = smollm2.client.chat.completions.create(model="smollm2", messages=ask(CHATS[i]), max_tokens=TOKENS,
                                                            stream=True, stream_options={"include_usage": True},
                                                            **GREEDY)
            chunks = list(chunks)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
        chunks = list(smollm2.client.completions.create(model="smollm2", prompt=TEXTS[i - 4], max_tokens=TOKENS,
                                                        stream=True, stream_options={"include_usage": True},
                                                        **GREEDY))
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(client, range(8)))
    assert [text for text, _ in results] == alone
    after = smollm2.engine.metrics()
    tokens = sum(usage.completion_tokens for _, usage in results)
    assert tokens == after["generated_tokens"] - before["generated_tokens"]
    steps = after["decode_steps"] - before["decode_steps"]
    shared = {int(size) for size, count in after["batch_sizes"].items() if count > before["batch_sizes"].get(size, 0)}
    # alone, every token after the first of each request would take its own decode step
    assert steps < (tokens - 8) / 2 and max(shared) >= 4, (steps, tokens, after["batch_sizes"])


# --- scores: echo, logprobs, tokenize ----------------------------------------------------------

def scores(client, prompt, k=5, **options):
    """The choices of a completion that echoes the prompt with its scores, and (by default) generates nothing."""
    return client.completions.create(model="smollm2", prompt=prompt, echo=True, logprobs=k,
                                     **{"max_tokens": 0, **options}).choices


@torch.no_grad()
def local_logprobs(model, ids):
    """log_softmax of a local forward over ids: row i is the distribution of token i + 1."""
    return torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]


def test_served_scores_equal_local_ones(smollm2):
    context, continuation = "The capital of France is", " Paris, a city on the Seine."
    head, tail = encode_pair(smollm2.tokenizer, context, continuation)
    whole = request(smollm2.url + "/tokenize", {"content": context + continuation})[1]["tokens"]
    assert request(smollm2.url + "/tokenize", {"content": context})[1]["tokens"] == head and whole == head + tail
    [choice] = scores(smollm2.client, whole)
    assert (choice.text, choice.finish_reason) == (context + continuation, "length")
    served = choice.logprobs
    assert served.tokens == [smollm2.tokenizer.decode([t]) for t in whole]
    assert served.text_offset == [len("".join(served.tokens[:i])) for i in range(len(whole))]
    [score] = loglikelihoods(smollm2.model, smollm2.tokenizer, [(context, continuation)])
    assert abs(sum(served.token_logprobs[len(head):]) - score.loglikelihood) < 1e-4
    local = local_logprobs(smollm2.model, whole)
    assert served.token_logprobs[0] is None and served.top_logprobs[0] is None  # nothing before the first token
    for i in range(1, len(whole)):
        assert abs(served.token_logprobs[i] - float(local[i - 1, whole[i]])) < 1e-4
        values, ids = local[i - 1].topk(5)
        top = served.top_logprobs[i]
        assert list(top) == [smollm2.tokenizer.decode([t]) for t in ids.tolist()]  # the 5 most likely, in order
        assert torch.allclose(torch.tensor(list(top.values())), values, atol=1e-4)


def test_a_prompt_as_text_ids_or_in_a_batch_scores_the_same(smollm2):
    texts = ["The sun rises in the east.", "Water boils at 100 degrees."]
    ids = [request(smollm2.url + "/tokenize", {"content": t, "add_special": True})[1]["tokens"] for t in texts]
    assert ids == [encode_prompt(smollm2.tokenizer, t) for t in texts]  # what a text prompt becomes
    alone = [scores(smollm2.client, t)[0] for t in texts]
    for prompt in (ids[0], texts, ids):
        choices = scores(smollm2.client, prompt)
        assert [c.index for c in choices] == list(range(len(choices)))
        for choice, expected in zip(choices, alone):
            assert (choice.text, choice.logprobs.tokens) == (expected.text, expected.logprobs.tokens)
            assert choice.logprobs.top_logprobs[1:] == pytest.approx(expected.logprobs.top_logprobs[1:], abs=1e-5)
            assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected.logprobs.token_logprobs[1:], abs=1e-5)


def test_echo_with_0_or_1_tokens_and_the_generated_tokens_logprobs(smollm2, alone):
    text = TEXTS[0]
    n = len(encode_prompt(smollm2.tokenizer, text))
    whole = smollm2.client.completions.create(model="smollm2", prompt=text, echo=True, max_tokens=0, logprobs=2)
    [zero] = whole.choices
    assert (zero.text, zero.finish_reason, len(zero.logprobs.tokens)) == (text, "length", n)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (n, 0)
    [one] = scores(smollm2.client, text, k=2, max_tokens=1, **GREEDY)
    assert one.text == text + generate(smollm2.model, smollm2.tokenizer, text, max_tokens=1, **GREEDY)
    assert one.logprobs.tokens[:n] == zero.logprobs.tokens and len(one.logprobs.tokens) == n + 1
    assert one.logprobs.token_logprobs[1:n] == pytest.approx(zero.logprobs.token_logprobs[1:], abs=1e-5)
    echoed = smollm2.client.completions.create(model="smollm2", prompt=text, echo=True, max_tokens=TOKENS, **GREEDY)
    assert echoed.choices[0].text == text + alone[4] and echoed.choices[0].logprobs is None

    # the generated tokens alone: the top 5 sorted, the greedy choice the top one, equal to a local forward
    [gen] = smollm2.client.completions.create(model="smollm2", prompt=text, max_tokens=TOKENS, logprobs=5,
                                              **GREEDY).choices
    assert gen.text == alone[4] == "".join(gen.logprobs.tokens)
    assert gen.logprobs.text_offset == [len("".join(gen.logprobs.tokens[:i])) for i in range(TOKENS)]
    ids = encode_prompt(smollm2.tokenizer, text) + smollm2.tokenizer.encode(gen.text)
    local = local_logprobs(smollm2.model, ids)[n - 1:]
    for at, (token, logprob, top) in enumerate(zip(gen.logprobs.tokens, gen.logprobs.token_logprobs,
                                                   gen.logprobs.top_logprobs)):
        assert len(top) == 5 and list(top.values()) == sorted(top.values(), reverse=True)
        assert next(iter(top.items())) == (token, logprob)
        assert abs(logprob - float(local[at].max())) < 1e-4
    streamed = list(smollm2.client.completions.create(model="smollm2", prompt=text, max_tokens=TOKENS, logprobs=5,
                                                      stream=True, **GREEDY))
    pieces = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs]
    assert sum((p.tokens for p in pieces), []) == gen.logprobs.tokens
    assert sum((p.text_offset for p in pieces), []) == gen.logprobs.text_offset
    assert sum((p.token_logprobs for p in pieces), []) == pytest.approx(gen.logprobs.token_logprobs, abs=1e-6)


def test_tokenize_and_detokenize_round_trip_as_the_local_tokenizer(smollm2):
    text = "Ünïcödé — 日本語のテキスト, Ελληνικά, עברית, emoji 🦙🔥👩‍💻, math ∑∫√∞ ≠ ≤; café naïve."
    status, tokenized = request(smollm2.url + "/tokenize", {"content": text})
    assert status == 200 and tokenized["tokens"] == smollm2.tokenizer.encode(text)
    assert request(smollm2.url + "/detokenize", tokenized) == (200, {"content": text})
    chat = "<|im_start|>user\nHi<|im_end|>"  # special tokens are parsed, and spelled out again
    ids = request(smollm2.url + "/tokenize", {"content": chat, "add_special": True})[1]["tokens"]
    assert ids == encode_prompt(smollm2.tokenizer, chat) and request(smollm2.url + "/detokenize",
                                                                     {"tokens": ids})[1] == {"content": chat}
    status, body = request(smollm2.url + "/tokenize", {"text": text})
    assert (status, body["error"]["param"], body["error"]["message"]) == (400, "content",
                                                                          "content must be a string, got null")
    status, body = request(smollm2.url + "/detokenize", {"tokens": [1, 49152]})
    assert (status, body["error"]["message"]) == (
        400, "tokens[1] is 49152, not a token id of this model's vocabulary (0 to 49151)")
    status, body = request(smollm2.url + "/detokenize", {"tokens": "1 2"})
    assert (status, body["error"]["message"]) == (400, 'tokens must be an array of token ids, got "1 2"')


# --- the command line --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tiny_chat, tmp_path_factory):
    from llama.hub import save_pretrained

    folder = tmp_path_factory.mktemp("serve") / "tiny-chat"
    save_pretrained(*tiny_chat, folder, format="ours")
    return folder


def start_server(*flags):
    """serve.py in a subprocess; returns (process, port) once it is listening."""
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", "0", *flags], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    assert line.startswith("serving "), line + process.stderr.read()
    return process, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def test_ctrl_c_ends_the_streams_in_flight_with_an_error_event_and_exits_0(tiny_folder):
    process, port = start_server("--model", str(tiny_folder), "--template", "chat")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        streams = [client.chat.completions.create(model="tiny-chat", messages=ask("Tell me a story."), max_tokens=200,
                                                  extra_body={"ignore_eos": True}, stream=True, **GREEDY)
                   for _ in range(2)]
        firsts = [next(iter(s)) for s in streams]
        assert all(first.choices[0].delta.role == "assistant" for first in firsts)
        process.send_signal(signal.SIGINT)
        for s in streams:
            with pytest.raises(openai.APIError, match="^the server is shutting down$"):
                for _ in s:
                    pass
        assert process.wait(timeout=60) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        process.kill()
        process.wait()


def test_bad_flags_and_a_busy_port_get_one_line_and_exit_2():
    run = [sys.executable, str(ROOT / "serve.py")]
    result = subprocess.run(run + ["--max-batch", "0"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (2, "error: --max-batch must be >= 1, got 0\n")
    result = subprocess.run(run + ["--max-logprobs", "-1"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (2, "error: --max-logprobs must be >= 0, got -1\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(run + ["--port", str(port)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (2, f"error: cannot listen on 127.0.0.1:{port}: Address already in "
                                                     "use\n")
    code = "import sys, llama.cli.serve; sys.exit('torch' in sys.modules)"  # flags are checked before torch loads
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


# --- the web page in a real browser ------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_the_chat_page_streams_keeps_the_conversation_and_stops(tiny, chat_answers, slow_steps, tmp_path):
    """Headless Chromium through Playwright: the key, two messages, a stopped answer; screenshots saved
    under the test's tmp folder and, when $TEST_ARTIFACTS is set, copied there."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency")
    import os

    sent = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"], viewport={"width": 900, "height": 700})
        try:
            page = browser.new_page()
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
            page.goto(tiny.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('API key')")
            page.fill("#api_key", KEY)
            page.dispatch_event("#api_key", "change")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny-chat')")
            page.click("#settings summary")
            page.fill("#temperature", "0")
            page.fill("#repetition_penalty", "1")  # greedy, as chat_answers were decoded
            page.click("#settings summary")

            for i, question in enumerate(["What color is the sky?", "What do cows drink?"]):
                page.fill("#input", question)
                page.press("#input", "Enter")
                page.wait_for_function("(i) => document.querySelectorAll('.message.assistant')[i]?.dataset.done",
                                       arg=i, timeout=30000)
                if i == 0:
                    first = page.locator(".message.assistant").nth(0)
                    assert first.text_content() == chat_answers[question] + "\n"
                    assert int(first.get_attribute("data-chunks")) > 5  # it grew chunk by chunk
                    assert "tokens/s" in page.inner_text("#stats")
            assert (sent[0]["temperature"], sent[0]["repetition_penalty"], sent[0]["repetition_penalty_range"]) == (
                0, 1, 64)  # the settings as the page shows them
            assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]  # the conversation
            assert sent[1]["messages"][1]["content"] == chat_answers["What color is the sky?"]
            assert page.locator(".message.assistant").nth(1).text_content() == chat_answers["What do cows drink?"] + "\n"
            page.screenshot(path=str(tmp_path / "chat.png"))

            page.click("#new")
            assert page.locator(".message").count() == 0
            cancelled = tiny.engine.metrics()["finished"]["cancelled"]
            page.click("#settings summary")
            page.fill("#max_tokens", "90")
            page.click("#settings summary")
            page.fill("#input", "Tell me a story.")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelector('.message.assistant')?.dataset.chunks >= 3")
            page.click("#stop")
            page.wait_for_function("document.querySelector('.message.assistant')?.dataset.stopped")
            assert len(sent[2]["messages"]) == 1  # a new chat forgot the old one
            wait_for(lambda: tiny.engine.metrics()["finished"]["cancelled"] == cancelled + 1)
            assert tiny.engine.metrics()["running"] == 0
            assert "stopped" in page.inner_text("#stats") and not page.is_disabled("#send")
            page.screenshot(path=str(tmp_path / "chat-stopped.png"))
        finally:
            browser.close()
    if os.environ.get("TEST_ARTIFACTS"):
        target = Path(os.environ["TEST_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        for name in ("chat.png", "chat-stopped.png"):
            shutil.copy(tmp_path / name, target / name)

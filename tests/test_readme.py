"""Every command in README.md's code blocks, run as a new user would run them, so that the README cannot
drift from the code.

The commands run in their order, in a copy of the repository's files (a fresh clone, as far as the
commands can tell), offline, with the lengths cut as the README says: `--max-steps 2` for `--max-steps N`
and `--epochs N`; `--max-rows 16` and `--max-val-rows 8` for fine-tuning; `--eval-tokens 4096` for
pretraining; `--max-tokens 8` for generation; `--limit 2` for evaluation; no step-0 evaluation and no sample answers in training. Left out, by the README's own comments: what `needs the
network` or `needs several GPUs`; and the setup and test commands themselves. The datasets the README
downloads are seeded from ../shared/data, whose files are the ones data/download.py fetches, so its
download line runs, offline; without ../shared/data the test skips. The experiments' commands
(`--size cpu`) are checked to be the ones tests/test_experiments_data.py and tests/test_experiments_dpo.py
run in their --smoke size, not run a second time here. The Python blocks run as scripts. A `serve.py`
command starts the server on a free port and waits until it answers; it keeps serving the commands and
blocks that follow (their 127.0.0.1:8000 pointed at its port) until the next `serve.py` or the end, when
Ctrl-C must stop it with exit code 0.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.DOTALL | re.MULTILINE)
LEFT_OUT = ("needs the network", "needs several GPUs")
CUT = {"--max-steps": "2", "--epochs": None, "--max-rows": "16", "--max-val-rows": "8", "--max-tokens": "8",
       "--limit": "2"}
CHAT_INPUT = "Hello!\nquit\n"


def blocks(page: Path = ROOT / "README.md") -> list[tuple[str, str]]:
    """(language, text) of each fenced bash or python block of README.md (or another page), in order."""
    return FENCE.findall(page.read_text(encoding="utf-8"))


def split_comment(line: str) -> tuple[str, str]:
    """The code and the trailing comment of a shell line; a # inside quotes is code."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def shell_commands(text: str) -> list[tuple[list[str], str]]:
    """(words, comment) of each command of a bash block: continuation lines joined, `&&` chains split."""
    commands, pending, comments = [], "", []
    for line in text.splitlines():
        code, comment = split_comment(line)
        comments.append(comment)
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        code, pending = pending + code, ""
        words = shlex.split(code)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            commands.append((words[:end], " ".join(filter(None, comments))))
            words = words[end + 1:]
        comments = []
    return commands


def cut(words: list[str]) -> list[str]:
    """The command with the README's lengths cut (see the module docstring)."""
    out, i = [], 0
    script = words[1] if len(words) > 1 else ""
    while i < len(words):
        word = words[i]
        if word in CUT and i + 1 < len(words):
            out += ["--max-steps", "2"] if word == "--epochs" else [word, CUT[word]]
            i += 2
            continue
        out.append(word)
        i += 1
    if script == "finetune.py":
        out += [] if "--max-rows" in out else ["--max-rows", "16"]
        out += ["--max-val-rows", "8"] if "--max-val-rows" not in out else []
    if script == "train.py":
        out += ["--eval-tokens", "4096"]
    if script in ("finetune.py", "train.py"):
        out += ["--no-initial-eval", "--sample-prompt", ""]
    if script == "generate.py" and "--max-tokens" not in out and "--classify" not in out:
        out += ["--max-tokens", "8"]
    if script == "evaluate.py" and "--limit" not in out:
        out += ["--limit", "2"]
    return out


def clone(tmp_path: Path) -> Path:
    """The repository's files (git's tracked and untracked-but-not-ignored ones) copied to tmp_path/repo, with
    ../shared beside it as in our checkouts; data/ seeded from ../shared/data."""
    from conftest import copy_of_checkout

    repo = copy_of_checkout(tmp_path / "repo")
    (tmp_path / "shared").symlink_to(SHARED)
    return repo


def seed(repo: Path, names: list[str]) -> None:
    """data/NAME as data/download.py leaves it, from the project's copy of NAME (the same files; Alpaca's 18
    parts joined into the one alpaca_data.json that the hub's rows become)."""
    for name in names:
        source, target = SHARED / "data" / name, repo / "data" / name
        if target.exists():  # seeded by an earlier command
            continue
        if name == "alpaca":
            target.mkdir(parents=True)
            rows = [row for part in sorted(source.glob("alpaca_data_part*.json"))
                    for row in json.loads(part.read_text(encoding="utf-8"))]
            (target / "alpaca_data.json").write_text(json.dumps(rows, indent=4), encoding="utf-8")
            shutil.copy2(source / "PROVENANCE.md", target / "PROVENANCE.md")
        else:
            target.symlink_to(source, target_is_directory=True)


class Server:
    """A README `serve.py` command, serving on a free port of this machine until stop()."""

    def __init__(self, words: list[str], repo: Path, env: dict[str, str], log: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        if "--port" in words:
            at = words.index("--port")
            words = words[:at] + words[at + 2:]
        self.line, self.log, self.stopped = shlex.join(words), log, False
        with open(log, "wb") as out:
            self.process = subprocess.Popen(words + ["--port", str(self.port)], cwd=repo, env=env,
                                            stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not self.answers():
            assert self.process.poll() is None, f"README's {self.line} exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"README's {self.line} never answered:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)

    def answers(self) -> bool:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/models",
                                         headers={"Authorization": "Bearer secret"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def point(self, text: str) -> str:
        """`text` with the README's address of the server replaced by this one's."""
        return text.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"README's {self.line} did not stop on Ctrl-C") from None
        log = self.log.read_text()
        assert code == 0 and "Traceback" not in log, f"README's {self.line} exited {code}:\n{log[-3000:]}"


def experiments_run_elsewhere() -> set[str]:
    from test_experiments_data import FIRST_DATASET

    return {module.__name__.split(".")[-1] for module in FIRST_DATASET} | {"dpo"}


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason=f"no {SHARED / 'data'} here to seed the downloads from")
def test_every_readme_command_runs_as_written(tmp_path):
    repo = clone(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    ran, left_out, experiments = [], [], []
    server = None
    try:
        for language, text in blocks():
            server = run_block(language, server.point(text) if server else text, repo, env, tmp_path, server,
                               ran, left_out, experiments)
    finally:
        if server is not None:
            server.stop()
    assert len(ran) >= 15 and left_out, (ran, left_out)
    assert any("serve.py" in line for line in ran) and any(line.startswith("curl") for line in ran), ran
    for words in experiments:
        name = Path(words[1]).stem
        assert words == ["python3", f"experiments/{name}.py", "--size", "cpu"], shlex.join(words)
        assert name in experiments_run_elsewhere(), f"experiments/{name}.py's --smoke is not run by any test"


def run_block(language: str, text: str, repo: Path, env: dict[str, str], tmp_path: Path, server: Server | None,
              ran: list[str], left_out: list[str], experiments: list[list[str]]) -> Server | None:
    """Run one README block's commands; returns the server left serving (the one given, or a newer one)."""
    if language == "python":
        result = subprocess.run([sys.executable, "-c", text], cwd=repo, env=env, capture_output=True, text=True,
                                timeout=600, check=False)
        assert result.returncode == 0, f"README's Python block failed:\n{text}\n{result.stderr}"
        ran.append("python block")
        return server
    for words, comment in shell_commands(text):
        line = shlex.join(words)
        if any(reason in comment for reason in LEFT_OUT) or words[:3] == ["python3", "-m", "pip"] \
                or words[:3] == ["python3", "-m", "pytest"]:
            left_out.append(line)
            continue
        if len(words) > 1 and words[1].startswith("experiments/"):
            experiments.append(words)
            continue
        start = time.perf_counter()
        if words[:2] == ["python3", "serve.py"]:
            if server is not None:
                server.stop()
            server = None  # so that a server that fails to start is not stopped twice
            server = Server(words, repo, env, tmp_path / f"serve-{len(ran)}.log")
            ran.append(line)
            print(f"{time.perf_counter() - start:6.1f} s  {line} (until it answers)")
            continue
        run_command(words, repo, env)
        ran.append(line)
        print(f"{time.perf_counter() - start:6.1f} s  {line}")
    return server


def run_command(words: list[str], repo: Path, env: dict[str, str], page: str = "README") -> None:
    """Run one python3 or curl command of a page in the clone `repo`, cut short (cut), and check that it
    succeeds without a traceback; a data/download.py command first gets its datasets seeded (seed)."""
    line = shlex.join(words)
    assert words[0] in ("python3", "curl"), f"{page} command that is neither python3 nor curl: {line}"
    if words[1] == "data/download.py":
        seed(repo, [word for word in words[2:] if not word.startswith("-")])
    chat = "--chat" in words
    result = subprocess.run(cut(words) if words[0] == "python3" else words + ["--fail-with-body", "-sS"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=900,
                            input=CHAT_INPUT if chat else None, check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr, (
        f"{page} command failed: {line}\nexit code {result.returncode}\n{result.stderr[-3000:]}"
        f"{result.stdout[-1000:]}")


def test_the_command_parser_reads_the_readme_forms():
    text = ("python3 a.py --x '{text}' --y \\\n    --z 3  # a comment\n"
            "python3 -m llama.convert smollm2 runs/a && python3 -m llama.convert runs/a runs/b\n"
            "python3 data/download.py all      # ~92 MB: every dataset  # needs the network\n")
    assert shell_commands(text) == [
        (["python3", "a.py", "--x", "{text}", "--y", "--z", "3"], "a comment"),
        (["python3", "-m", "llama.convert", "smollm2", "runs/a"], ""),
        (["python3", "-m", "llama.convert", "runs/a", "runs/b"], ""),
        (["python3", "data/download.py", "all"], "~92 MB: every dataset  # needs the network")]
    assert cut(["python3", "finetune.py", "--epochs", "1", "--out", "r"]) == [
        "python3", "finetune.py", "--max-steps", "2", "--out", "r", "--max-rows", "16", "--max-val-rows", "8",
        "--no-initial-eval", "--sample-prompt", ""]

"""The commands of docs/*.md, held to what tests/test_readme.py holds the README's to: each runs on a clone after
`data/download.py`.

Fast, everywhere: every command's script exists and takes its flags; it names no folder outside the clone (no ../shared/data) and
no model file a clone lacks (a model is `smollm2`, a hub id, or a run folder an earlier command of the page
wrote); every data/NAME/FILE it reads is a file `data/download.py NAME` writes, downloaded by an earlier
command of the page; every runs/ folder it reads was written by an earlier command of the page; and every
link between the pages lands on a heading. The README's setup and test commands are the ones .ci/run runs.

Slow (`-m slow`), where ../shared/data is: every command of each page runs in a copy of the repository, offline,
cut short as test_readme.py cuts the README's (its `cut`), the downloads seeded from ../shared/data. Left out:
pytest commands (their test files must exist), `benchmarks/gpu_suite.sh` (tests/test_gpu_suite.py runs it on
a CPU), and the experiments, which their --smoke tests run; an experiment whose run folder a later command
reads runs in its --smoke size into that folder.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import shlex
import time
from pathlib import Path

import pytest
from test_readme import FENCE, SHARED, clone, experiments_run_elsewhere, run_command, shell_commands

from data import sources

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PARSERS = {"finetune.py": "llama.cli.finetune", "train.py": "llama.cli.train", "evaluate.py": "llama.cli.evaluate",
           "generate.py": "llama.cli.generate", "serve.py": "llama.cli.serve", "data/prepare.py": "llama.cli.prepare",
           "data/download.py": "data.download"}  # what parses each command's flags, without running it
DATA_FLAGS = ("--dataset", "--val-dataset", "--input", "--data", "--data-dir", "--tokenizer")


def commands(page: Path) -> list[list[str]]:
    """The words of each command in the page's bash blocks, in order."""
    return [words for language, text in FENCE.findall(page.read_text(encoding="utf-8")) if language == "bash"
            for words, _ in shell_commands(text)]


def files_written(name: str) -> set[str]:
    """The files `data/download.py NAME` writes into data/NAME/ (but PROVENANCE.md): the fetched ones, those
    data/sources.sha256 lists, and those its writer makes of no rows."""
    data = sources.DATASETS[name]
    files = {key.split("/", 1)[1] for key in sources.checksums() if key.split("/", 1)[0] == name}
    if isinstance(data.origin, sources.Remote):
        files |= {path for path, _ in data.origin.files}
    elif data.write is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as folder, contextlib.suppress(Exception):
            files |= set(data.write(Path(folder), {split: [] for split in data.origin.splits}))
    if name == "cola":
        files |= set(sources.COLA_FILES)  # its writer refuses no rows
    return files


def experiment_folder(words: list[str]) -> str | None:
    """runs/experiments/NAME-SIZE, the run folder of an experiments/NAME.py command (None with --smoke)."""
    if "--smoke" in words:
        return None
    size = words[words.index("--size") + 1] if "--size" in words else "cpu"
    return f"runs/experiments/{Path(words[1]).stem}-{size}"


def problems(page: Path) -> list[str]:
    """What keeps the page's commands from running on a clone after data/download.py, one line each."""
    found, downloaded, written = [], set(), set()
    for words in commands(page):
        line = shlex.join(words)
        if words[:3] == ["python3", "-m", "pytest"]:
            found += [f"{line}: no {word}" for word in words[3:] if word.startswith("tests/")
                      and not (ROOT / word).exists()]
            continue
        if words[0] == "python3":
            if words[1] == "-m":
                if importlib.util.find_spec(words[2]) is None:
                    found.append(f"{line}: no module {words[2]}")
            elif not (ROOT / words[1]).is_file():
                found.append(f"{line}: no script {words[1]}")
        elif not (words[0].endswith(".sh") and (ROOT / words[0]).is_file()):
            found.append(f"{line}: neither python3 nor a script of the repository")
        if words[0] == "python3" and words[1] in PARSERS:
            try:
                importlib.import_module(PARSERS[words[1]]).parse_args(words[2:])
            except (ValueError, SystemExit) as error:  # UsageError, a setting's own check
                found.append(f"{line}: {words[1]} refuses its flags: {error}")
        if words[:2] == ["python3", "data/download.py"]:
            names = [word for word in words[2:] if not word.startswith("-")]
            found += [f"{line}: data/download.py knows no {name}" for name in names
                      if name not in sources.DATASETS and name != "all"]
            downloaded |= set(names)
        for at, word in enumerate(words):
            flag = words[at - 1] if at else ""
            if "../" in word or "shared/data" in word:
                found.append(f"{line}: {word} is outside a clone")
            elif word.endswith(".gguf") and not (ROOT / word).is_file():
                found.append(f"{line}: {word} is a file a clone does not have (name the model: smollm2)")
            elif flag == "--model" and not (word == "smollm2" or word in written or HUB_ID.fullmatch(word)
                                            and not word.startswith(("runs/", "data/"))):
                found.append(f"{line}: --model {word} is neither smollm2, a hub id, nor a run of this page")
            elif flag in DATA_FLAGS and not word.startswith(("data/", "runs/")) and not (ROOT / word).exists() \
                    and not (HUB_ID.fullmatch(word) and not Path(word).suffix):
                found.append(f"{line}: {flag} {word} is not a file of a clone (data/NAME/... after data/download.py)")
            elif word.startswith("data/") and at > 1 and words[1] != "data/download.py":
                parts = Path(word).parts
                if parts[1] not in sources.DATASETS:
                    found.append(f"{line}: {word} is no dataset of data/download.py")
                elif parts[1] not in downloaded and "all" not in downloaded:
                    found.append(f"{line}: {word} is read before a data/download.py {parts[1]} on the page")
                elif len(parts) > 2 and "/".join(parts[2:]) not in files_written(parts[1]):
                    found.append(f"{line}: data/download.py {parts[1]} writes no {'/'.join(parts[2:])}")
            elif word.startswith("runs/") and flag != "--out" and not any(
                    word == out or word.startswith(out + "/") for out in written):
                found.append(f"{line}: {word} is read before a command of the page writes it")
        if "--out" in words:
            written.add(words[words.index("--out") + 1])
        if len(words) > 1 and words[1].startswith("experiments/") and (folder := experiment_folder(words)):
            written.add(folder)
    return found


@pytest.mark.parametrize("page", DOCS, ids=[page.name for page in DOCS])
def test_every_command_of_the_page_runs_on_a_clone_after_the_downloads(page):
    assert problems(page) == []


def test_the_check_finds_what_a_clone_lacks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\n"
                    "python3 finetune.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\\n"
                    "    --dataset ../shared/data/alpaca/alpaca_data_part00_00000-03252.json --out runs/a\n"
                    "python3 finetune.py --dataset data/alpaca/alpaca_data.json --out runs/b\n"
                    "python3 data/download.py alpaca\n"
                    "python3 finetune.py --dataset data/alpaca/alpaca_data_part00_00000-03252.json --out runs/c\n"
                    "python3 evaluate.py --model runs/smollm2-alpaca --tasks piqa\n"
                    "python3 generate.py --model runs/c --prompt hi --max-tokenz 3\n"
                    "```\n")
    first = "python3 finetune.py --model SmolLM2-135M-Instruct.Q4_1.gguf --dataset ../shared/data/alpaca/" \
            "alpaca_data_part00_00000-03252.json --out runs/a"
    assert problems(page) == [
        f"{first}: SmolLM2-135M-Instruct.Q4_1.gguf is a file a clone does not have (name the model: smollm2)",
        f"{first}: ../shared/data/alpaca/alpaca_data_part00_00000-03252.json is outside a clone",
        "python3 finetune.py --dataset data/alpaca/alpaca_data.json --out runs/b: data/alpaca/alpaca_data.json is "
        "read before a data/download.py alpaca on the page",
        "python3 finetune.py --dataset data/alpaca/alpaca_data_part00_00000-03252.json --out runs/c: "
        "data/download.py alpaca writes no alpaca_data_part00_00000-03252.json",
        "python3 evaluate.py --model runs/smollm2-alpaca --tasks piqa: --model runs/smollm2-alpaca is neither "
        "smollm2, a hub id, nor a run of this page",
        "python3 generate.py --model runs/c --prompt hi --max-tokenz 3: generate.py refuses its flags: unrecognized "
        "arguments: --max-tokenz 3 (see --help)"]


def test_finetunes_help_examples_run_on_a_clone_after_the_downloads(tmp_path):
    from llama.cli import finetune

    page = tmp_path / "help.md"
    page.write_text("```bash\n" + help_examples(finetune.__doc__) + "```\n")
    assert commands(page) and problems(page) == []


def help_examples(doc: str) -> str:
    """The indented block of example commands at the top of a command's help, dedented."""
    lines = doc.split("\n\n")[1].splitlines()
    assert lines and all(line.startswith("    ") for line in lines), lines
    return "".join(line[4:].replace("python finetune.py", "python3 finetune.py", 1) + "\n" for line in lines)


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_land_on_headings():
    pages = [*DOCS, ROOT / "README.md"]
    anchors = {page.resolve(): {anchor(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines()
                                if line.startswith("#")} for page in pages}
    broken = []
    for page in pages:
        for target, fragment in re.findall(r"\]\(([\w./-]*\.md)?#([\w-]+)\)", page.read_text(encoding="utf-8")):
            linked = (page.parent / target).resolve() if target else page.resolve()
            if fragment not in anchors.get(linked, set()):
                broken.append(f"{page.name}: {target}#{fragment}")
    assert broken == []


def test_ci_runs_the_readmes_cpu_setup_and_test_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setups = [text.strip() for language, text in FENCE.findall(readme)
              if language == "bash" and text.startswith("python3 -m pip install torch")]
    assert len(setups) == 2, setups
    cpu, gpu = setups
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu and "--index-url" not in gpu
    assert cpu.replace(" --index-url https://download.pytorch.org/whl/cpu", "") == gpu
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(
        ("#", " ", "if ", "fi", "set ", "cd ", "export "))]
    assert ci[0] == cpu
    tests = [text.strip() for language, text in FENCE.findall(readme) if text.startswith("python3 -m pytest")]
    assert ci[-1] == tests[0] == "python3 -m pytest -q"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason=f"no {SHARED / 'data'} here to seed the downloads from")
@pytest.mark.parametrize("page", DOCS, ids=[page.name for page in DOCS])
def test_every_command_of_the_page_runs_as_written(page, tmp_path):
    repo = clone(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    every = commands(page)
    for at, words in enumerate(every):
        line = shlex.join(words)
        if words[:3] == ["python3", "-m", "pytest"] or words[0] == "benchmarks/gpu_suite.sh":
            continue
        if len(words) > 1 and words[1].startswith("experiments/"):
            name, folder = Path(words[1]).stem, experiment_folder(words)
            assert name in experiments_run_elsewhere(), f"experiments/{name}.py's --smoke is not run by any test"
            if folder and any(folder in word for later in every[at + 1:] for word in later):
                run_command(["python3", words[1], "--smoke", "--out", folder], repo, env, page.name)
            continue
        start = time.perf_counter()
        run_command(words, repo, env, page.name)
        print(f"{time.perf_counter() - start:6.1f} s  {line}")


def test_the_docs_speak_of_the_project_and_its_users():
    """Not of how their figures came to be made: which machine was lent, what could be carried to it, which
    session ran out of time; withdrawn and pending results are in one place, at the end of experiments.md."""
    words = re.compile(r"\blent\b|\bleases?\b|device tool|\bsessions?\b|\bcarr(y|ies|ied) to\b", re.IGNORECASE)
    said = [f"{page.name}:{number}: {line.strip()[:100]}" for page in [*DOCS, ROOT / "README.md"]
            for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1) if words.search(line)]
    assert said == []
    pending = re.compile(r"not run yet|withdrawn|still to (do|run|be)", re.IGNORECASE)
    places = {page.name for page in DOCS if pending.search(page.read_text(encoding="utf-8"))}
    assert "experiments.md" in places
    for page in places - {"experiments.md"}:  # a page that mentions one points at that list
        assert "experiments.md#withdrawn-results-and-runs-still-to-do" in (ROOT / "docs" / page).read_text(), page

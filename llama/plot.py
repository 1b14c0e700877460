"""Draw a run's loss curves from its metrics.jsonl to a PNG.

    python -m llama.plot runs/shakespeare           # writes runs/shakespeare/loss.png
    python -m llama.plot runs/a runs/b --out compare.png
    python -m llama.plot runs/tweets --metrics val_accuracy   # a classifier: its accuracy beside the loss

A run trained with --eval-tasks logs benchmark scores (eval/TASK/METRIC) with its evaluations: they are drawn
beside the loss unless --metrics chooses other numbers, with a band of one standard error where the run
logged one (METRIC_stderr); scores that are not fractions (a perplexity) get a panel of their own.
"""
from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import tasks
from .cli.usage import ArgumentParser, report
from .files import not_a_file, read_jsonl, write_text_atomically

# Each image this command draws carries this mark (PNG: a tEXt "Software" entry; PDF, SVG: their "Creator"):
# --out writes over an existing file only when it is one of ours, never over a run's files or a device.
MARK = "llama.plot"
KINDS = {"png": "Software", "pdf": "Creator", "svg": "Creator"}  # what it draws, and the entry that marks it
BENCHMARK = "eval/"  # the prefix of the benchmark scores an evaluation logs (--eval-tasks): eval/TASK/METRIC
NOT_SCORES = ("_stderr", "/truncated", "/items")  # logged beside the scores: their spread, counts of items
STYLES = ["o-", "s--", "^:", "d-."]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a run folder's metrics.jsonl. A last line that a crash
    or a full disk tore is left out, with a warning."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():  # the run folder itself when it is what cannot be reached (a loop of links)
        broken = Path(run) if os.path.lexists(run) and not Path(run).exists() else path
        raise not_a_file(broken, "pass a run folder written by train.py or finetune.py")
    records, torn = read_jsonl(path)
    if torn:
        print(f"warning: the last line of {path} is cut short (a crash or a full disk during a write); "
              "plotting the lines before it", file=sys.stderr)
    for number, record in enumerate(records, 1):
        if not isinstance(record.get("step"), int) or not all(
                isinstance(record.get(key, 0.0), (int, float)) for key in ("loss", "val_loss")) or not all(
                _number(value) for key, value in record.items() if key.startswith(BENCHMARK)):
            raise ValueError(f"{path} record {number} is not a metrics record of train.py or finetune.py "
                             "(it needs an integer step and numeric losses and scores)")
    return ([r for r in records if "loss" in r],  # an evaluation: validation numbers (val_...) or benchmark scores
            [r for r in records if "loss" not in r and any(key.startswith(("val_", BENCHMARK)) for key in r)])


def benchmark_scores(evaluations: Sequence[dict]) -> list[str]:
    """The names of the benchmark scores among evaluation records (eval/TASK/METRIC, eval/centered_accuracy),
    in the order they were logged; not their standard errors or counts of items."""
    names = dict.fromkeys(key for record in evaluations for key in record
                          if key.startswith(BENCHMARK) and not key.endswith(NOT_SCORES))
    return list(names)


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """The mean of each `window` consecutive values: len(values) - window + 1 of them."""
    sums = np.cumsum(np.asarray(values, dtype=np.float64))
    return ((sums[window - 1:] - np.concatenate([[0.0], sums[:-window]])) / window).tolist()


def plot_runs(runs: list[str | Path], out: str | Path, title: str | None = None,
              metrics: Sequence[str] = (), *, only_ours: bool = False) -> Path:
    """Training loss (a line) and validation loss (dots) against the step, each run in a pair of colours,
    one for training and one for validation; with `metrics`, names of validation numbers such as
    val_accuracy, a second panel of them (a classifier's perplexity says little). Without `metrics`, the
    benchmark scores the runs logged (eval/...), if any: the fractions in a second panel, the others (a
    perplexity) in a third on a log scale. The title names the runs unless `title` is given.

    An existing `out` is written over only when it is a regular file holding an image of its kind (never a
    run's `latest`, a folder, a device, a FIFO or a link); with `only_ours`, as the command has it, only
    when it is a plot this module drew (its mark). A caller that owns its path (the experiments' docs/img
    pictures, drawn before the mark existed) may leave only_ours out."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    kind = check_out(out, only_ours)

    read = [(Path(run).name, *read_metrics(run)) for run in runs]
    names = ", ".join(name for name, _, _ in read)
    trained = [tasks.recorded(run) for run in runs]  # the runs' own record: which task trained each
    panels = []  # (the numbers, title, y-label, log scale) of each panel beside the loss
    drawn = list(dict.fromkeys(m for t in trained if t is not None for m in t.metrics_drawn))
    if metrics or drawn:  # chosen, or what the runs' task draws by default (GRPO's rewards, say)
        metrics = list(metrics) or drawn
        where = ("benchmarks" if all(metric.startswith(BENCHMARK) for metric in metrics)
                 else "on the validation rows" if all(metric.startswith("val_") for metric in metrics) else "metrics")
        mixed = {m.startswith("val_") for m in metrics} == {True, False}  # keep val_ where both kinds are drawn
        panels.append((list(metrics), f"{where}: {names}", ", ".join(metrics if mixed else map(short_name, metrics)),
                       False))
    else:
        logged = {}  # each score: all its values, every run
        for _, _, evaluations in read:
            for score in benchmark_scores(evaluations):
                logged.setdefault(score, []).extend(r[score] for r in evaluations if score in r)
        fractions = [score for score, values in logged.items() if all(-1 <= v <= 1 for v in values)]
        others = [score for score in logged if score not in fractions]
        if fractions:
            panels.append((fractions, f"benchmarks: {names}", "score (band: one standard error)", False))
        if others:
            panels.append((others, f"benchmarks: {names}", ", ".join(map(short_name, others)),
                           all(v > 0 for score in others for v in logged[score])))
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(8 + 5 * len(panels), 4.5), dpi=120, squeeze=False)
    ax = axes[0][0]
    palette = plt.get_cmap("tab10").colors  # run i: colour 2i for training, 2i + 1 for validation
    # what the loss is, as the runs' own record says: a language model's in nats per token unless a
    # fine-tuning task trained it (a classifier's cross-entropy per example, DPO's loss per pair, ...)
    labels = {t.loss_label if t is not None else tasks.Task.loss_label for t in trained}
    for i, (name, train, evaluations) in enumerate(read):
        color, val_color = palette[(2 * i) % 10], palette[(2 * i + 1) % 10]
        val = [r for r in evaluations if "val_loss" in r]
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        window = len(train) // 50  # a long, noisy curve (batch 1, say) is read from its running mean
        if window > 1:
            ax.plot(steps, losses, color=color, alpha=0.2, lw=0.5)
            ax.plot(steps[window - 1:], running_mean(losses, window), color=color, lw=1.2,
                    label=f"{name} train (mean of {window} steps)")
        else:
            ax.plot(steps, losses, color=color, alpha=0.6, lw=1, label=f"{name} train")
        if val:
            ppl = f" (ppl {val[-1]['val_ppl']:.1f})" if "val_ppl" in val[-1] else ""
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color=val_color, ms=4,
                    label=f"{name} validation{ppl}")
        for (chosen, *_), panel in zip(panels, axes[0][1:]):
            by_metric = len(runs) == 1 and len(chosen) > 1  # one run: a colour for each number
            for j, (metric, style) in enumerate(zip(chosen, itertools.cycle(STYLES))):
                # a validation number from the evaluations, a training one (a reward) from every step's record
                logged_in = evaluations if any(metric in r for r in evaluations) else train
                mixed = {m.startswith("val_") for m in chosen} == {True, False}  # keep val_ where both kinds are drawn
                draw_metric(panel, logged_in, metric, style, palette[j % 10] if by_metric else val_color, name,
                            metric if mixed else short_name(metric))
    ax.set_xlabel("step")
    ax.set_ylabel(labels.pop() if len(labels) == 1 else "loss (each run's own)")
    ax.set_title(title or f"loss: {names}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    for (_, panel_title, ylabel, log), panel in zip(panels, axes[0][1:]):
        panel.set_xlabel("step")
        panel.set_ylabel(ylabel)
        panel.set_title(panel_title)
        if log:
            panel.set_yscale("log")
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.grid(alpha=0.3)
        panel.legend(fontsize="small")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format=kind, metadata={KINDS[kind]: MARK})
    plt.close(fig)
    write_text_atomically(out, image.getvalue())  # an old plot stays whole until the new one is complete
    return out


def check_out(out: Path, only_ours: bool = True) -> str:
    """The kind of image `out` names (png, pdf, svg; png without a suffix); ValueError unless it is a new
    file or an image this command drew (marked), which it may replace (without `only_ours`, any regular
    file holding an image of that kind). Anything else there (a run's `latest`, a folder, a device, a
    FIFO, a link) is never written over."""
    kind = out.suffix.lstrip(".").lower() or "png"
    if kind not in KINDS:
        raise ValueError(f"{out}: cannot draw a .{kind} image; name a .png, .pdf or .svg file")
    if not os.path.lexists(out):
        return kind
    if out.is_dir() and not out.is_symlink():
        raise ValueError(f"{out} is a folder; name an image file for --out, such as {out / 'loss.png'}")
    if not is_our_plot(out, kind, mark=only_ours):
        what = "a plot that llama.plot drew" if only_ours else f"a .{kind} image"
        raise ValueError(f"{out} exists and is not {what}, so it is left as it is; name a new file for --out")
    return kind


def is_our_plot(path: Path, kind: str, mark: bool = True) -> bool:
    """Whether `path` is a regular file (not a link) holding a `kind` image that carries this command's mark
    (without `mark`: any `kind` image)."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_size > 256 * 2**20:
        return False
    data = path.read_bytes()
    magic = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF", "svg": b"<?xml"}[kind]
    if not data.startswith(magic) or not mark:
        return data.startswith(magic)
    if kind != "png":
        entry = {"pdf": b"/Creator (" + MARK.encode() + b")", "svg": b"<dc:title>" + MARK.encode() + b"</dc:title>"}
        return entry[kind] in data
    position = 8
    while position + 8 <= len(data):  # chunks: length, type, data, CRC; the text entries come before IDAT
        length, name = int.from_bytes(data[position:position + 4], "big"), data[position + 4:position + 8]
        if name == b"tEXt" and data[position + 8:position + 8 + length] == f"{KINDS['png']}\0{MARK}".encode():
            return True
        if name in (b"IDAT", b"IEND"):
            return False
        position += 12 + length
    return False


def short_name(metric: str) -> str:
    """val_accuracy -> accuracy, eval/piqa/acc -> piqa/acc."""
    return metric.removeprefix("val_").removeprefix(BENCHMARK)


def draw_metric(panel, evaluations: Sequence[dict], metric: str, style: str, color, run_name: str,
                label: str | None = None) -> None:
    """One number of a run's records (its evaluations, or its training steps) against the step, with a band of
    one standard error where each point has one (METRIC_stderr, as benchmark scores do)."""
    scored = [r for r in evaluations if _number(r.get(metric))]
    if not scored:
        return
    steps, values = [r["step"] for r in scored], [r[metric] for r in scored]
    panel.plot(steps, values, style, color=color, ms=4,
               label=f"{run_name} {label or short_name(metric)} ({values[-1]:.3f} at the end)")
    errors = [r.get(f"{metric}_stderr") for r in scored]
    if all(_number(e) and math.isfinite(e) for e in errors):
        panel.fill_between(steps, [v - e for v, e in zip(values, errors)], [v + e for v, e in zip(values, errors)],
                           color=color, alpha=0.15, lw=0)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m llama.plot", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/loss.png of the first run)")
    p.add_argument("--title", default=None, help="plot title")
    p.add_argument("--metrics", nargs="+", default=(),
                   help="validation numbers to draw in a second panel, e.g. val_accuracy val_mcc of a "
                        "classifier's run, or eval/piqa/acc_norm of one with --eval-tasks (default: "
                        "the benchmark scores, eval/..., of runs that logged any)")
    try:
        args = p.parse_args(argv)
        out = plot_runs(args.runs, args.out or Path(args.runs[0]) / "loss.png", args.title, args.metrics,
                        only_ours=True)
    except (ValueError, OSError) as error:  # OSError: a read-only or full destination, ...
        return report(error)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

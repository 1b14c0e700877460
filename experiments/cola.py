"""Article C, "LLM fine-tuning workshop": is a sentence grammatical? A label head on CoLA.

    python3 experiments/cola.py --size cpu   # 2,000 training sentences, 1 epoch: about 10 min on 2 CPU cores
    python3 experiments/cola.py --size gpu   # all 8,551 sentences, the article's 3 epochs at batch 8, lr 5e-5

The article fine-tuned GPT2ForSequenceClassification (GPT-2 small, 124M, 2 labels) on GLUE's CoLA, 8,551
training sentences where label 1 means acceptable and 0 not, with the Trainer's defaults (lr 5e-5, batch 8,
3 epochs, AdamW, linear decay, no warmup), and showed its pipeline calling "sea I hill this top" not
acceptable and "See a hill on top" acceptable. Its metric is the Matthews correlation (MCC); it reports no
value.

Here SmolLM2-135M-Instruct gets a label head and is fine-tuned by finetune.py --task classify on the
in-domain training sentences (cola/raw/in_domain_train.tsv), labelled "unacceptable" and "acceptable"
for 0 and 1, with AdamW as the Trainer sets it (betas 0.9/0.999, no weight decay) but a cosine decay to 0,
our loop's schedule, in place of the linear one. It is scored on GLUE's validation set, the 527 in-domain
and 516 out-of-domain dev sentences (1,043; CoLA's test labels are not public): MCC, accuracy and
macro-F1 over all of them and over the in-domain ones alone, next to always answering the training
sentences' most common label. During training, finetune.py validates on these sentences (--size cpu: a
seeded 256 of them, to save time) for the curves. The two pipeline sentences are classified at the end.

Goal: MCC at least 0.454, the CoLA score of GPT-1 (117M parameters, the size of GPT-2 small) in Radford
et al. 2018, "Improving Language Understanding by Generative Pre-Training", Table 4 (45.4, on GLUE's test
set), since the article gives no number of its own.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from experiments import common
from llama.cli import finetune
from llama.plot import read_metrics
from llama.rows import sample_rows, write_jsonl

LABELS = ("unacceptable", "acceptable")  # CoLA's 0 and 1, in the order of the head's outputs
PIPELINE = (("sea I hill this top", "not acceptable"), ("See a hill on top", "acceptable"))
DEV_FILES = {"in-domain": "raw/in_domain_dev.tsv", "out-of-domain": "raw/out_of_domain_dev.tsv"}
ARTICLE = {"train": 8551, "validation": 1043, "first_loss": 0.63, "last_loss": 0.36}
GOAL_MCC = 0.454
LR = "5e-5"  # the Trainer's default, as the article trained
SETTINGS = {
    # rows: a seeded subset of the 8,551 training sentences (None: all); curve_rows: a seeded subset of the
    # 1,043 dev sentences that finetune.py validates on during training (None: all); all are scored at the end
    "cpu": dict(rows=2000, epochs=1, evaluations=2, batch_size=16, curve_rows=256),
    "gpu": dict(rows=None, epochs=3, evaluations=6, batch_size=8, curve_rows=None),
    "smoke": dict(rows=24, max_steps=2, evaluations=1, batch_size=4, curve_rows=8),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return common.parse_args("cola", __doc__, argv, common.add_model_flag)


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_experiment(experiment, parse_args, argv)


def read_cola(path: Path, domain: str) -> list[dict[str, str]]:
    """The rows of a raw CoLA TSV file (no header; source, label, original mark, sentence) as
    {"sentence", "label", "domain"}, the label named; a malformed line is an error naming it."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        columns = line.split("\t")
        if len(columns) != 4:
            raise common.ExperimentError(
                f"{path} line {number}: {len(columns)} tab-separated columns, expected 4 (source, label, mark, "
                "sentence); give the raw CoLA files of its PROVENANCE.md")
        if columns[1] not in ("0", "1"):
            raise common.ExperimentError(
                f"{path} line {number}: unknown label {columns[1]!r}; CoLA's labels are 0 (unacceptable) and 1 "
                "(acceptable): correct the line, or restore the file from the source in its PROVENANCE.md")
        rows.append({"sentence": columns[3], "label": LABELS[int(columns[1])], "domain": domain})
    return rows


def loss_means(run: Path) -> tuple[float, float]:
    """The mean training loss over the first and over the last sixth of the steps: the article's Trainer
    logged 500-step means, about a sixth of its 3,207 steps."""
    losses = [record["loss"] for record in read_metrics(run)[0]]
    part = max(1, len(losses) // 6)
    return sum(losses[:part]) / part, sum(losses[-part:]) / part


def experiment(args: argparse.Namespace) -> str:
    s = common.settings(args, SETTINGS)
    train_rows = read_cola(common.data_file(args, "cola", "raw/in_domain_train.tsv"), "in-domain")
    train_rows = sample_rows(train_rows, s["rows"], common.SEED)
    dev_rows = []
    for domain, name in DEV_FILES.items():
        dev_rows += read_cola(common.data_file(args, "cola", name), domain)
    curve_rows = sample_rows(dev_rows, s["curve_rows"], common.SEED)
    train_file = write_jsonl(args.out / "cola_train.jsonl", train_rows)
    curve_file = write_jsonl(args.out / "cola_validation.jsonl", curve_rows)
    model = args.model or common.smollm2_path()
    run = args.out / "smollm2"
    common.run_step("finetune", finetune.run, finetune.FinetuneSettings(
        task="classify", model=model, dataset=train_file, val_dataset=curve_file, text_field="sentence",
        label_field="label", labels=",".join(LABELS), max_len=128, batch_size=s["batch_size"], lr=float(LR),
        weight_decay=0.0, betas=(0.9, 0.999), **common.finetune_length(s, len(train_rows)), save_every=0,
        keep_last=1, seed=common.SEED, out=run, resume=True))

    answers = common.classify_texts(run, [row["sentence"] for row in dev_rows] + [text for text, _ in PIPELINE])
    dev_answers, pipeline_answers = answers[:len(dev_rows)], answers[len(dev_rows):]
    write_jsonl(args.out / "dev_predictions.jsonl", (
        {**row, "predicted": label, "probability": round(probability, 4)}
        for row, (label, probability) in zip(dev_rows, dev_answers)))

    def scores(domains: Sequence[str], always: str | None = None) -> dict[str, float]:
        pairs = [(always or label, row["label"]) for row, (label, _) in zip(dev_rows, dev_answers)
                 if row["domain"] in domains]
        return common.classification_scores(*zip(*pairs), LABELS)

    everything, in_domain = scores(list(DEV_FILES)), scores(["in-domain"])
    majority = Counter(row["label"] for row in train_rows).most_common(1)[0][0]
    baseline = scores(list(DEV_FILES), always=majority)
    first_loss, last_loss = loss_means(run)
    in_domain_count = sum(row["domain"] == "in-domain" for row in dev_rows)

    def three(numbers: dict[str, float]) -> str:
        return f"{numbers['mcc']:.3f} / {numbers['accuracy']:.3f} / {numbers['macro_f1']:.3f}"

    results = common.markdown_table(
        ["", "article: GPT-2 small (124M)", "ours: SmolLM2-135M-Instruct"],
        [["training sentences", f"{ARTICLE['train']:,}, 3 epochs, batch 8, lr 5e-5, linear decay",
          f"{len(train_rows):,}{' (a seeded subset)' if s['rows'] else ''}, {common.describe_length(s)}, batch "
          f"{s['batch_size']}, lr {LR}, cosine decay"],
         ["training loss, mean of the first -> last sixth of the steps",
          f"{ARTICLE['first_loss']} -> {ARTICLE['last_loss']}", f"{first_loss:.2f} -> {last_loss:.2f}"],
         ["scored on", f"GLUE's validation set, {ARTICLE['validation']:,} sentences",
          f"{len(dev_rows):,}: {in_domain_count:,} in-domain and {len(dev_rows) - in_domain_count:,} "
          "out-of-domain dev sentences"],
         ["**MCC**", "not reported", f"**{everything['mcc']:.3f}**"],
         ["accuracy / macro-F1", "not reported", f"{everything['accuracy']:.3f} / {everything['macro_f1']:.3f}"],
         ["MCC / accuracy / macro-F1 of the in-domain sentences alone", "", three(in_domain)],
         [f"MCC / accuracy / macro-F1 of always \"{majority}\", the training sentences' most common label", "",
          three(baseline)],
         [f"goal: MCC at least {GOAL_MCC} (GPT-1, 117M: 45.4 on GLUE's test set, Radford et al. 2018)", "",
          common.goal(everything["mcc"] >= GOAL_MCC)]])
    pipeline = common.markdown_table(
        ["sentence", "article's pipeline", "ours: label (probability)"],
        [[text, expected, f"{label} ({probability:.2f})"]
         for (text, expected), (label, probability) in zip(PIPELINE, pipeline_answers)])
    curve = "all" if s["curve_rows"] is None else f"a seeded {len(curve_rows):,} of the"
    plot = common.plot_loss(args, [run], f"SmolLM2-135M on CoLA ({args.size})", ["val_accuracy", "val_mcc"])
    return (f"{results}\n\nThe article's pipeline examples:\n\n{pipeline}\n\n"
            f"The article's run and ours start at lr 5e-5 without warmup and end at 0, linearly in the article's "
            f"Trainer, on a cosine in our loop. The curves' validation numbers are on {curve} {len(dev_rows):,} dev "
            f"sentences; every dev prediction is saved in dev_predictions.jsonl beside the run folder.\n\n{plot}\n")


if __name__ == "__main__":
    sys.exit(main())

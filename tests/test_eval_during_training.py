"""--eval-tasks: benchmark scores of the model being trained, at each evaluation of train.py and finetune.py.

Each evaluation's record carries eval/TASK/METRIC equal to llama.evaluation.run_task on the checkpoint of that
step; the task data is read once per run, before the first step; llama.plot draws the scores beside the loss;
and bad tasks, limits and missing data are refused before anything is written. The task data is PIQA's and
GSM8K's from ../shared/data (the maintainers' copies beside their checkouts), copied into a temporary folder:
the tests skip where it is absent.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from llama import Llama, LlamaConfig, Tokenizer, load_pretrained, save_pretrained
from llama import evaluation, plot
from llama.cli import common, finetune, train
from llama.evaluation import TASKS, centered_accuracy, run_task, task

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCORE_KEYS = ("items", "num_fewshot")  # what run_task returns that the flags already say: not logged


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """A data folder holding piqa/ and gsm8k/, copied from ../shared/data."""
    missing = [name for name in ("piqa", "gsm8k") if not (SHARED_DATA / name).is_dir()]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} in {SHARED_DATA}: the maintainers' task data, beside the checkout")
    folder = tmp_path_factory.mktemp("task-data")
    for name in ("piqa", "gsm8k"):
        shutil.copytree(SHARED_DATA / name, folder / name)
    return folder


def records(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def expected(model, tokenizer, data_dir, tasks):
    """What an evaluation should log for `tasks` ({name: limit}): run_task's numbers on `model`."""
    model.eval()
    results = {name: run_task(model, tokenizer, task(name), data_dir, limit=limit, progress=False)
               for name, limit in tasks.items()}
    numbers = {f"eval/{name}/{key}": value for name, result in results.items() for key, value in result.items()
               if key not in SCORE_KEYS}
    numbers["eval/centered_accuracy"] = centered_accuracy(results)
    return numbers


def logged(record):
    return {key: value for key, value in record.items() if key.startswith("eval/")}


def count_reads(monkeypatch):
    """{file name: times read} of the task data's JSONL files, from now on."""
    reads = {}
    real = evaluation.read_jsonl

    def counting(path):
        reads[Path(path).name] = reads.get(Path(path).name, 0) + 1
        return real(path)

    monkeypatch.setattr(evaluation, "read_jsonl", counting)  # PIQA's reader and every other task's call it
    return reads


# --- pretraining ------------------------------------------------------------------------------------

def train_args(tiny_world, out, data_dir, *extra):
    return ["--data", str(tiny_world / "shards"), "--out", str(out), "--preset", "tiny", "--batch-size", "4",
            "--seq-len", "32", "--max-steps", "4", "--warmup-steps", "1", "--lr", "3e-3", "--eval-every", "2",
            "--eval-tokens", "256", "--save-every", "2", "--keep-last", "0", "--sample-prompt", "",
            "--eval-tasks", "piqa:8", "--eval-data-dir", str(data_dir), *extra]


@pytest.fixture(scope="module")
def pretrained(tiny_world, task_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        reads = count_reads(monkeypatch)
        assert train.main(train_args(tiny_world, out, task_data)) == 0
    return out, reads


def test_pretraining_logs_the_scores_of_each_checkpoint_at_each_evaluation(pretrained, task_data):
    out, reads = pretrained
    evaluations = [r for r in records(out) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4]  # the validation's cadence: step 0, every 2, the end
    assert all({"eval/piqa/acc", "eval/piqa/acc_stderr", "eval/piqa/acc_norm", "eval/piqa/acc_norm_stderr",
                "eval/piqa/truncated", "eval/centered_accuracy"} == set(logged(r)) for r in evaluations)
    assert not any(logged(r) for r in records(out) if "loss" in r)  # training records carry none
    assert reads == {"valid.jsonl": 1}  # read once for the run (PIQA has no few-shot split here)
    for record in evaluations[1:]:
        model, tokenizer = load_pretrained(out / f"step_{record['step']:07d}")
        assert logged(record) == pytest.approx(expected(model, tokenizer, task_data, {"piqa": 8}), rel=1e-6)
    model, tokenizer = load_pretrained(out / "step_0000002")
    torch.manual_seed(0)  # the run's model at step 0: --seed 0's initialization
    untrained = Llama(model.config)
    assert logged(evaluations[0]) == pytest.approx(expected(untrained, tokenizer, task_data, {"piqa": 8}), rel=1e-6)


def test_the_plot_draws_the_scores_beside_the_loss(pretrained, tmp_path):
    from conftest import plotted_axes

    out, _ = pretrained
    panels = plotted_axes([out], tmp_path / "loss.png")
    assert [(panel["title"], panel["ylabel"]) for panel in panels] == [
        ("loss: run", "loss (nats per token)"), ("benchmarks: run", "score (band: one standard error)")]
    lines = panels[1]["colors"]
    assert sorted(label.split(" (")[0] for label in lines) == [
        "run centered_accuracy", "run piqa/acc", "run piqa/acc_norm"]  # no standard errors or counts
    assert len(set(lines.values())) == 3  # one run: a colour for each score
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert plot.main([str(out)]) == 0 and (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    panels = plotted_axes([out], tmp_path / "chosen.png", metrics=["eval/piqa/acc_norm"])
    assert [(panel["title"], panel["ylabel"]) for panel in panels][1] == ("benchmarks: run", "piqa/acc_norm")


def test_scores_that_are_not_fractions_get_a_log_scaled_panel(tmp_path):
    from conftest import plotted_axes

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]
    lines += [{"step": step, "eval/lambada_openai/perplexity": 900.0 / (1 + step),  # no validation loss: scores alone
               "eval/lambada_openai/acc": 0.1 * step, "eval/lambada_openai/acc_stderr": 0.01} for step in (0, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    panels = plotted_axes([run], tmp_path / "loss.png")
    assert [(panel["title"], panel["ylabel"]) for panel in panels] == [
        ("loss: run", "loss (nats per token)"), ("benchmarks: run", "score (band: one standard error)"),
        ("benchmarks: run", "lambada_openai/perplexity")]


def test_the_scores_are_taken_in_eval_mode_without_gradients_under_the_validation_autocast(
        tiny_world, task_data, tmp_path, monkeypatch):
    seen = []
    real = common.run_task

    def spy(model, *args, **kwargs):
        seen.append((model.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"),
                     torch.get_autocast_dtype("cpu"), kwargs.get("progress")))
        spy.model = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(common, "run_task", spy)
    out = tmp_path / "run"
    assert train.main(train_args(tiny_world, out, task_data, "--max-steps", "1", "--dtype", "bfloat16")) == 0
    assert seen == [(False, False, True, torch.bfloat16, False)] * 2  # steps 0 and 1, no progress bar
    assert spy.model.training  # back to training mode after each
    assert [r["step"] for r in records(out) if "eval/piqa/acc" in r] == [0, 1]


# --- fine-tuning ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tiny_world, tmp_path_factory):
    """A tiny model with a context of 320: GSM8K generates up to 256 tokens, which leaves 64 for its prompts."""
    folder = tmp_path_factory.mktemp("base") / "model"
    tokenizer = Tokenizer.load(tiny_world / "model")
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=320)),
                    tokenizer, folder, format="ours")
    return folder


def test_finetuning_scores_multiple_choice_and_generation_with_the_prompts_cut_to_fit(
        tiny_world, base, task_data, tmp_path, monkeypatch, capsys):
    reads = count_reads(monkeypatch)
    out = tmp_path / "run"
    assert finetune.main(["--model", str(base), "--dataset", str(tiny_world / "sft.jsonl"), "--out", str(out),
                          "--max-steps", "2", "--eval-every", "2", "--save-every", "2", "--keep-last", "0",
                          "--val-fraction", "0", "--sample-prompt", "", "--eval-tasks", "piqa:8,gsm8k:2",
                          "--eval-data-dir", str(task_data)]) == 0
    evaluations = [r for r in records(out) if "loss" not in r]
    assert [r["step"] for r in evaluations] == [0, 2]  # no validation rows: the evaluations score alone
    assert all("val_loss" not in r for r in evaluations)
    assert reads == {"valid.jsonl": 1, "test.jsonl": 1}  # each task's data read once, before the first step
    tasks = {"piqa": 8, "gsm8k": 2}
    for record in evaluations:
        model, tokenizer = load_pretrained(out / f"step_{record['step']:07d}" if record["step"] else base)
        assert logged(record) == pytest.approx(expected(model, tokenizer, task_data, tasks), rel=1e-6)
        # GSM8K's five-shot prompts are far longer than the 64 tokens left: they lose their left end, counted
        assert record["eval/gsm8k/truncated"] == 2 and record["eval/piqa/truncated"] == 0
        assert {"eval/gsm8k/exact_match,strict-match", "eval/gsm8k/exact_match,flexible-extract"} <= set(record)
        assert record["eval/centered_accuracy"] == pytest.approx(2 * record["eval/piqa/acc_norm"] - 1)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all(line.startswith(f"step {step}: piqa acc ") for step, line in zip((0, 2), lines))
    assert all("; gsm8k exact_match,strict-match " in line and "(2 items cut to fit the context); centered accuracy "
               in line for line in lines), lines


def test_the_tasks_may_change_on_resume(tiny_world, base, task_data, tmp_path):
    out = tmp_path / "run"
    common_args = ["--model", str(base), "--dataset", str(tiny_world / "sft.jsonl"), "--out", str(out),
                   "--eval-every", "1", "--save-every", "1", "--sample-prompt", "", "--val-fraction", "0.1",
                   "--eval-data-dir", str(task_data)]
    assert finetune.main([*common_args, "--max-steps", "1", "--eval-tasks", "piqa:2"]) == 0
    assert finetune.main([*common_args, "--max-steps", "2", "--eval-tasks", "piqa:4", "--resume"]) == 0
    evaluations = [r for r in records(out) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 1, 2] and all("eval/piqa/acc" in r for r in evaluations)


# --- bad input --------------------------------------------------------------------------------------

BAD = [  # (flags, the line)
    (["--eval-tasks", "piqa,bogus"],
     f"--eval-tasks piqa,bogus: unknown task 'bogus'; the tasks are {', '.join(TASKS)}"),
    (["--eval-tasks", "piqa:0"], "--eval-tasks piqa:0: the limit of piqa must be a whole number of items, 1 or more, "
                                 "got '0'"),
    (["--eval-tasks", "piqa:x"], "--eval-tasks piqa:x: the limit of piqa must be a whole number of items, 1 or more, "
                                 "got 'x'"),
    (["--eval-tasks", "piqa:"], "--eval-tasks piqa:: the limit of piqa must be a whole number of items, 1 or more, "
                                "got ''"),
    (["--eval-tasks", "piqa,,gsm8k"], "--eval-tasks piqa,,gsm8k: an empty entry; give TASK or TASK:LIMIT, separated "
                                      "by commas"),
    (["--eval-tasks", "piqa:5,piqa"], "--eval-tasks piqa:5,piqa: piqa is named twice"),
    (["--eval-data-dir", "{data}"], "--eval-data-dir is for --eval-tasks; name the tasks to score"),
    (["--eval-tasks", "piqa", "--fsdp"], "--eval-tasks needs the whole model in each process; --fsdp shards it, so "
                                         "leave one out"),
    (["--eval-tasks", "piqa:8,gsm8k", "--eval-data-dir", "{empty}"],
     "--eval-tasks piqa: no piqa data in {empty}/piqa: python3 data/download.py piqa (or --eval-data-dir DIR, a "
     "folder holding piqa/)"),
    (["--eval-tasks", "piqa:8,gsm8k", "--eval-data-dir", "{data}"],  # the tiny preset's context is 256
     "--eval-tasks gsm8k: gsm8k generates up to 256 tokens, which leaves no room for its prompt in the model's "
     "256-token context"),
]


@pytest.mark.parametrize("command", ["train", "finetune"])
@pytest.mark.parametrize("flags, line", BAD, ids=[f"{flags[0]} {flags[1]}" for flags, _ in BAD])
def test_bad_tasks_limits_and_missing_data_get_one_line_before_anything_is_written(
        command, flags, line, tiny_world, task_data, tmp_path, capsys):
    out, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    given = ["--data", str(tiny_world / "shards"), "--preset", "tiny", "--seq-len", "32", "--max-steps", "2"]
    if command == "finetune":
        given = ["--model", str(tiny_world / "model"), "--dataset", str(tiny_world / "sft.jsonl"), "--max-steps", "2"]
    main = train.main if command == "train" else finetune.main
    capsys.readouterr()
    flags = [flag.format(data=task_data, empty=empty) for flag in flags]
    assert main([*given, "--out", str(out), *flags]) == 2
    assert capsys.readouterr().err == "error: " + line.format(empty=empty) + "\n"
    assert not out.exists()  # a refused run leaves no folder, even one refused after the model loaded

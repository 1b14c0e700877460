"""GRPO: the loss, its gradients and metrics equal TRL's GRPOTrainer.compute_loss for every loss type; micro-batches
accumulated the Trainer's way equal one batch; the advantages' invariants; finetune.py --task grpo resumes
exactly, stops on a failing reward, and records its task."""
import copy
import json
import re

import pytest
import torch

from llama import Llama, LlamaConfig
from llama.tasks.grpo import LOSS_TYPES, SCALES, GRPOLoss, Rollouts, group_advantages, token_logps
from llama.trainer import Trainer, TrainConfig
from test_hf_parity import hf_config  # our config as transformers' LlamaConfig

PAD, EOS, GROUP, MAX_COMPLETION = 0, 2, 4, 6
CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_seq_len=64, init_std=0.1)  # init_std 0.1: distributions far from uniform


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(EOS + 1, CONFIG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# Two prompts of different lengths, four completions each: some end with EOS, some stop at the length cap
PROMPTS = [tokens(3, 1), tokens(5, 2)]
COMPLETIONS = [tokens(1, 10) + [EOS], tokens(6, 11), tokens(3, 12) + [EOS], tokens(6, 13),
               [EOS], tokens(4, 14) + [EOS], tokens(6, 15), tokens(2, 16) + [EOS]]
REWARDS = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0])
# TRL's GRPOConfig keeps gradient_checkpointing=True, which transformers' TrainingArguments warns about
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def models() -> tuple[Llama, Llama, Llama]:
    """The policy, the policy that sampled (close to it, so some ratios are clipped and most not) and the reference."""
    torch.manual_seed(0)
    policy = Llama(CONFIG)
    old, reference = copy.deepcopy(policy), copy.deepcopy(policy)
    with torch.no_grad():
        for scale, model in ((0.004, old), (0.02, reference)):
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    return policy, old, reference


def rollouts(rows=range(8), rewards=REWARDS, old: Llama | None = None, ref: Llama | None = None,
             temperature: float = 1.0) -> Rollouts:
    """The rows' prompt + completion, right-padded, with their logps under `old` and `ref` when given."""
    sequences = [PROMPTS[i // GROUP] + COMPLETIONS[i] for i in rows]
    input_ids = torch.full((len(sequences), max(map(len, sequences))), PAD)
    mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for b, (i, sequence) in enumerate(zip(rows, sequences)):
        input_ids[b, :len(sequence)] = torch.tensor(sequence)
        mask[b, len(PROMPTS[i // GROUP]):len(sequence)] = True
    with torch.no_grad():
        old_logps, ref_logps = (None if m is None else token_logps(m, input_ids, temperature) for m in (old, ref))
    advantages = group_advantages(rewards, GROUP, "group")[list(rows)]
    return Rollouts(input_ids, mask, advantages, MAX_COMPLETION, old_logps, ref_logps)


def trl_inputs(batch: Rollouts, num_items_in_batch: int | None = None) -> dict[str, torch.Tensor]:
    """The same rollouts as TRL's GRPOTrainer holds them: prompts left-padded, completions right-padded apart
    from them, per-token logps over the completion positions only."""
    starts, lengths = batch.completion_mask.int().argmax(dim=1), batch.completion_mask.sum(dim=1)
    prompt_length, completion_length = int(starts.max()), int(lengths.max())
    prompt_ids = torch.full((len(starts), prompt_length), PAD)
    prompt_mask = torch.zeros_like(prompt_ids)
    for b, start in enumerate(starts.tolist()):
        prompt_ids[b, prompt_length - start:] = batch.input_ids[b, :start]
        prompt_mask[b, prompt_length - start:] = 1
    at = (starts[:, None] + torch.arange(completion_length)).clamp(max=batch.input_ids.shape[1] - 1)
    completion_mask = (torch.arange(completion_length) < lengths[:, None]).long()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
              "completion_ids": batch.input_ids.gather(1, at) * completion_mask, "completion_mask": completion_mask,
              "advantages": batch.advantages,
              "num_items_in_batch": torch.tensor(num_items_in_batch or int(completion_mask.sum()))}
    for ours, theirs in (("old_logps", "old_per_token_logps"), ("ref_logps", "ref_per_token_logps")):
        if getattr(batch, ours) is not None:
            inputs[theirs] = getattr(batch, ours).gather(1, at) * completion_mask
    return inputs


def trl_trainer(policy: Llama, out, *, loss_type: str, beta: float = 0.0, epsilon_high: float | None = None,
                temperature: float = 1.0, kl_bias_correction: bool = True, accumulation: int = 1):
    """A GRPOTrainer over a transformers copy of `policy`, set up for compute_loss as training would."""
    trl = pytest.importorskip("trl", reason="the reference implementation needs `pip install -e .[test]`")
    transformers, datasets = pytest.importorskip("transformers"), pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    hf = transformers.LlamaForCausalLM(hf_config(CONFIG))
    missing, unexpected = hf.load_state_dict({("model." + name if not name.startswith("lm_head") else name): tensor
                                             for name, tensor in policy.state_dict().items()}, strict=False)
    assert not unexpected and all("rotary" in name for name in missing)
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(CONFIG.vocab_size)}, "t0"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token=f"t{PAD}", eos_token=f"t{EOS}")
    args = trl.GRPOConfig(output_dir=str(out), report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                          per_device_train_batch_size=len(COMPLETIONS) // accumulation,
                          gradient_accumulation_steps=accumulation, num_generations=GROUP,
                          max_completion_length=MAX_COMPLETION, loss_type=loss_type, epsilon=0.2,
                          epsilon_high=epsilon_high, temperature=temperature,
                          use_bias_correction_kl=kl_bias_correction)
    trainer = trl.GRPOTrainer(model=hf, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                              train_dataset=datasets.Dataset.from_list([{"prompt": "t3"}] * len(COMPLETIONS)),
                              processing_class=tokenizer)
    # Set after construction: with beta > 0 the constructor would load a reference model by hub id, which
    # compute_loss never reads (ref_per_token_logps come with the inputs)
    trainer.beta = beta
    trainer.current_gradient_accumulation_steps = accumulation  # what Trainer.train sets before each step
    return trainer


def gradients(model) -> dict[str, torch.Tensor]:
    return {name.removeprefix("model."): p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# --- parity with TRL --------------------------------------------------------------------------------

CASES = {**{f"{t}, on-policy": dict(loss_type=t) for t in LOSS_TYPES},
         **{f"{t}, off-policy, beta 0.04, epsilon_high 0.28": dict(loss_type=t, beta=0.04, epsilon_high=0.28)
            for t in LOSS_TYPES},
         "dapo, off-policy, beta 0.1, temperature 0.7": dict(loss_type="dapo", beta=0.1, temperature=0.7),
         "grpo, off-policy, beta 0.1, no KL bias correction": dict(loss_type="grpo", beta=0.1,
                                                                    kl_bias_correction=False)}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_loss_gradients_and_metrics_match_trls_grpo_trainer(case, models, tmp_path):
    """Our GRPOLoss on our Llama, against TRL's compute_loss on transformers' LlamaForCausalLM with the same
    weights and the same rollouts: loss, the gradient of every weight, the clip fractions and the KL. Off-policy
    rollouts carry the logps of other weights (TRL's num_iterations > 1), so the ratios differ from 1."""
    policy, old, reference = models
    off_policy = case.get("beta", 0.0) > 0
    temperature = case.get("temperature", 1.0)
    batch = rollouts(old=old if off_policy else None, ref=reference if off_policy else None, temperature=temperature)
    trainer = trl_trainer(policy, tmp_path, **case)
    inputs = trl_inputs(batch)

    theirs = trainer.compute_loss(trainer.model, inputs)
    theirs.backward()
    objective = GRPOLoss(case["loss_type"], epsilon=0.2, epsilon_high=case.get("epsilon_high"),
                         beta=case.get("beta", 0.0), temperature=temperature,
                         kl_bias_correction=case.get("kl_bias_correction", True))
    policy.zero_grad()
    loss_sum, metric_sums = objective.loss(policy, batch)
    count = objective.count(batch)
    ours = loss_sum / count
    ours.backward()

    assert abs(ours.item() - theirs.item()) <= 1e-5  # on-policy it is about 0: advantages sum to 0 in a group
    expected = gradients(trainer.model)
    for name, grad in gradients(policy).items():
        assert (grad - expected[name]).abs().max() <= 1e-5, name
    assert max(g.abs().max() for g in expected.values()) > 1e-3  # the gradients are not all ~0
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    assert sorted(metric_sums) == sorted(name for name in logged if name.endswith("_mean") or name == "kl")
    for name, value in metric_sums.items():
        assert abs((value / count).item() - logged[name]) <= 1e-6, name
    if off_policy:
        assert 0 < logged["clip_ratio/region_mean"] < 0.5 and logged["kl"] > 0
    # token_logps equals TRL's per-token log-probabilities on the completion positions
    with torch.no_grad():
        trl_logps = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1), inputs["completion_ids"].shape[1])[0]
        ours_logps = trl_inputs(Rollouts(batch.input_ids, batch.completion_mask, batch.advantages, MAX_COMPLETION,
                                         old_logps=token_logps(policy, batch.input_ids, temperature)))
    assert (ours_logps["old_per_token_logps"] - trl_logps).abs().max() <= 1e-5


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_micro_batches_accumulated_equal_one_batch_and_trls_accumulation(loss_type, models, tmp_path):
    """One group per micro-batch, of different token counts, accumulated as the Trainer does (each loss sum over
    the units of the whole step) gives one batch's loss and gradients; so does TRL's accumulation over the same
    two micro-batches, except for bnpo, which TRL normalizes per micro-batch."""
    policy, old, reference = models
    objective = GRPOLoss(loss_type, beta=0.04)
    whole = rollouts(old=old, ref=reference)
    halves = [rollouts(rows, old=old, ref=reference) for rows in (range(4), range(4, 8))]
    assert int(halves[0].completion_mask.sum()) != int(halves[1].completion_mask.sum())

    policy.zero_grad()
    loss_sum, _ = objective.loss(policy, whole)
    one = (loss_sum / objective.count(whole))
    one.backward()
    expected = gradients(policy)
    policy.zero_grad()
    counted = sum(objective.count(half) for half in halves)
    accumulated = 0.0
    for half in halves:
        part = objective.loss(policy, half)[0] / counted
        part.backward()
        accumulated += part.item()
    assert abs(accumulated - one.item()) <= 1e-6
    for name, grad in gradients(policy).items():
        assert (grad - expected[name]).abs().max() <= 1e-6, name

    trainer = trl_trainer(policy, tmp_path, loss_type=loss_type, beta=0.04, accumulation=2)
    tokens = int(whole.completion_mask.sum())
    theirs = sum(trainer.compute_loss(trainer.model, trl_inputs(half, num_items_in_batch=tokens)).item()
                 for half in halves)
    assert (abs(theirs - one.item()) <= 1e-5) == (loss_type != "bnpo")


def test_the_trainers_step_over_two_micro_batches_gives_one_batchs_loss_and_metrics(models, tmp_path):
    """Through llama.trainer.Trainer itself (grad_accum 2, one group per micro-batch): dapo's loss and its token-mean
    metrics over the step are those of the whole batch at once."""
    policy, old, reference = models
    objective = GRPOLoss("dapo", beta=0.04)
    whole = rollouts(old=old, ref=reference)
    halves = [rollouts(rows, old=old, ref=reference) for rows in (range(4), range(4, 8))]
    step = Trainer(copy.deepcopy(policy), None, iter(halves), None, TrainConfig(max_steps=1, grad_accum=2),
                   tmp_path, {}, objective=objective, device=torch.device("cpu")).train_step()
    with torch.no_grad():
        loss_sum, metric_sums = objective.loss(policy, whole)
    count = objective.count(whole)
    assert abs(step["loss"].item() - (loss_sum / count).item()) <= 1e-6
    assert sorted(step["metrics"]) == sorted(metric_sums) and "kl" in metric_sums
    for name, value in metric_sums.items():
        assert abs(step["metrics"][name].item() - (value / count).item()) <= 1e-6, name


# --- invariants -------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", SCALES)
def test_advantages_sum_to_zero_per_group_and_equal_trls(scale):
    """TRL's formula, with its own std (nanstd: Bessel-corrected); a group of equal rewards gets zeros, and a NaN
    reward (unscorable) is left out of its group's statistics and gets 0."""
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 3.0, -1.0, 4.0, 0.25, 7.0])
    advantages = group_advantages(rewards, GROUP, scale)
    grouped = rewards.view(-1, GROUP)
    std = {"group": nanstd(grouped, dim=1).repeat_interleave(GROUP), "batch": nanstd(rewards), "none": None}[scale]
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    assert torch.allclose(advantages, centered if std is None else centered / (std + 1e-4), atol=1e-6)
    assert advantages.view(-1, GROUP).sum(dim=1).abs().max() <= 1e-5
    assert (advantages[4:8] == 0).all()
    assert (group_advantages(torch.full((12,), 0.3), 6, scale) == 0).all()  # where x - x.mean() is not 0 in float32
    if scale == "group":
        assert torch.allclose(advantages.view(-1, GROUP)[[0, 2]].std(dim=1), torch.ones(2), atol=1e-3)

    with_nan = group_advantages(torch.tensor([1.0, float("nan"), 3.0, 5.0]), GROUP, scale)
    expected = group_advantages(torch.tensor([1.0, 3.0, 5.0]), 3, scale)
    assert with_nan[1] == 0 and torch.allclose(with_nan[[0, 2, 3]], expected)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_group_of_equal_rewards_contributes_no_gradient(loss_type, models):
    """Equal rewards give zero advantages: that group's loss and gradients are exactly 0 (beta 0, off-policy
    ratios), and a batch with it has the loss sum and gradients of the other group alone."""
    policy, old, _ = models
    rewards = torch.cat([REWARDS[:4], torch.full((4,), 0.7)])
    objective = GRPOLoss(loss_type)

    def loss_sum_and_gradients(rows):
        policy.zero_grad()
        loss_sum, _ = objective.loss(policy, rollouts(rows, rewards, old=old))
        loss_sum.backward()
        return loss_sum.item(), gradients(policy)

    loss, grads = loss_sum_and_gradients(range(4, 8))
    assert loss == 0 and all((g == 0).all() for g in grads.values())
    loss_both, grads_both = loss_sum_and_gradients(range(8))
    loss_first, grads_first = loss_sum_and_gradients(range(4))
    # equal up to float32 summation order (the two batches are laid out differently), the parity tests' 1e-5
    assert abs(loss_both - loss_first) <= 1e-5 and loss_first != 0
    for name, grad in grads_first.items():
        assert (grads_both[name] - grad).abs().max() <= 1e-5, name


def test_logps_outside_the_completions_are_never_read(models):
    """Garbage old and reference logps at prompt and pad positions (NaN, -1e4: exp() of it overflows) change
    nothing: the loss and its gradients are those of the same rollouts with zeros there."""
    policy, old, reference = models
    objective = GRPOLoss("grpo", beta=0.04)
    clean = rollouts(old=old, ref=reference)
    outside = ~clean.completion_mask
    dirty = Rollouts(clean.input_ids, clean.completion_mask, clean.advantages, MAX_COMPLETION,
                     clean.old_logps.masked_fill(outside, float("nan")), clean.ref_logps.masked_fill(outside, -1e4))
    results = []
    for batch in (clean, dirty):
        policy.zero_grad()
        loss_sum, _ = objective.loss(policy, batch)
        loss_sum.backward()
        results.append((loss_sum.item(), gradients(policy)))
    (loss, grads), (dirty_loss, dirty_grads) = results
    assert loss == dirty_loss and all(torch.equal(grads[name], dirty_grads[name]) for name in grads)


def test_bad_settings_and_shapes_are_errors_that_name_them():
    with pytest.raises(ValueError, match="loss_type must be one of grpo, bnpo, dr_grpo, dapo, got 'ppo'"):
        GRPOLoss("ppo")
    with pytest.raises(ValueError, match="epsilon_high must be a positive number"):
        GRPOLoss(epsilon_high=-0.1)
    with pytest.raises(ValueError, match="scale must be one of group, batch, none"):
        group_advantages(REWARDS, GROUP, "std")
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        group_advantages(REWARDS, 3)
    batch = rollouts()
    with pytest.raises(ValueError, match=r"old_logps must have input_ids' shape \(8, 11\)"):
        Rollouts(batch.input_ids, batch.completion_mask, batch.advantages, MAX_COMPLETION, old_logps=torch.zeros(8, 3))
    with pytest.raises(ValueError, match="beta=0.1 needs the reference's log-probabilities"):
        GRPOLoss(beta=0.1).loss(Llama(CONFIG), batch)


# --- finetune.py --task grpo ---------------------------------------------------------------------------

from llama import Tokenizer, load_pretrained, save_pretrained  # noqa: E402
from llama import tasks  # noqa: E402
from llama.cli import finetune  # noqa: E402
from llama.files import iter_tensors  # noqa: E402
from llama.tasks.grpo import arithmetic, arithmetic_rows, gsm8k  # noqa: E402

CALLS = {"n": 0}


def spread(prompt, completion, row):
    """A reward that differs within most groups, so that every step moves the weights."""
    return (len(completion) % 4) / 3


def raising(prompt, completion, row):
    CALLS["n"] += 1
    if CALLS["n"] > 8:  # the first step's 2 prompts x 4 completions score; the second step's fail
        return 1 / 0
    return 0.5


def nan(prompt, completion, row):
    return float("nan")


def words(prompt, completion, row):
    return "yes"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny model whose tokenizer knows the arithmetic prompts."""
    folder = tmp_path_factory.mktemp("grpo")
    texts = [f"{r['question']} {r['answer']}" for r in arithmetic_rows(200, 0)] * 3
    tokenizer = Tokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer,
                    folder / "model", format="ours")
    return folder / "model"


def grpo_args(model, out, *extra):
    return ["--task", "grpo", "--model", str(model), "--out", str(out), "--batch-size", "2", "--group-size", "4",
            "--max-completion-tokens", "6", "--max-steps", "4", "--lr", "3e-3", "--max-val-rows", "4",
            "--eval-every", "0", "--no-initial-eval", "--reward", "test_grpo:spread", *extra]


def weights(folder):
    return dict(iter_tensors(folder / "model.safetensors"))


def test_grpo_resumes_mid_generation_to_the_same_weights_and_records_its_task(small, tmp_path):
    """--iterations 3 and a checkpoint at step 2: the resumed run serves the rest of step 1's generation and
    samples step 4's with the saved generator, ending with the weights of the run that never stopped."""
    out = tmp_path / "run"
    extra = ("--iterations", "3", "--beta", "0.1", "--save-every", "2")
    assert finetune.main(grpo_args(small, out, *extra)) == 0
    straight = weights(out / "step_0000004")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"reward", "reward_std", "frac_reward_zero_std", "completion_length", "kl",
                "clip_ratio/region_mean"} <= set(r) for r in steps)
    assert steps[1]["clip_ratio/region_mean"] >= 0 and steps[1]["kl"] > 0  # off-policy by the second update
    assert "val_reward" in logged[-1]
    (out / "latest").write_text("step_0000002\n")  # as if the run had died after step 2
    assert finetune.main(grpo_args(small, out, *extra, "--resume")) == 0
    resumed = weights(out / "step_0000004")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert tasks.recorded(out).name == "grpo" and json.loads((out / "step_0000004" / "task.json").read_text()) == {
        "task": "grpo"}
    assert type(load_pretrained(out)[0]) is Llama
    from conftest import plotted_axes

    loss, metrics = plotted_axes([out], tmp_path / "loss.png")  # the task's own numbers, without --metrics
    assert loss["ylabel"] == "GRPO loss" and metrics["ylabel"] == "reward, val_reward, frac_reward_zero_std"
    assert {label.split(" (")[0] for label in metrics["colors"]} == {"run reward", "run val_reward",
                                                                    "run frac_reward_zero_std"}


@pytest.mark.parametrize("reward, said", [
    ("raising", r"raised ZeroDivisionError: division by zero on row \d+"),
    ("nan", r"returned nan on row \d+, not a finite number"),
    ("words", r"returned 'yes' on row \d+, not a finite number")])
def test_a_failing_reward_stops_the_run_naming_it_and_the_row_and_saves_nothing_of_that_step(small, tmp_path, capsys,
                                                                                          reward, said):
    CALLS["n"] = 0
    out = tmp_path / "run"
    code = finetune.main(grpo_args(small, out, "--reward", f"test_grpo:{reward}", "--save-every", "1"))
    assert code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"stopped: --reward test_grpo:{reward} {said}; nothing of this step was saved", last), last
    saved = sorted(p.name for p in out.glob("step_*"))
    assert saved == ([] if reward != "raising" else ["step_0000001"])  # the steps before it, not its own


def test_built_in_rewards_read_the_last_number_and_gsm8k_s_gold_after_its_hashes():
    assert arithmetic("What is 3 + 5?", "3 + 5 = 8", {"answer": "8"}) == 1.0
    assert arithmetic("What is 3 + 5?", "8, since it is 3 + 5", {"answer": "8"}) == 0.0  # its last number is 5
    assert gsm8k("", "She pays $1,234.", {"answer": "Some steps.\n#### 1234"}) == 1.0
    assert gsm8k("", "The answer is 12", {"answer": "#### 13"}) == 0.0
    rows = arithmetic_rows(100, 0)
    assert rows == arithmetic_rows(100, 0) and rows != arithmetic_rows(100, 1)
    assert all(int(r["answer"]) == sum(map(int, r["question"][8:-1].split(" + "))) for r in rows)


def test_an_unknown_reward_is_one_line_before_the_model_loads(small, tmp_path, capsys):
    assert finetune.main(grpo_args(small, tmp_path / "run", "--reward", "nope")) == 2
    assert capsys.readouterr().err == "error: --reward nope: give arithmetic, gsm8k or module:function\n"
    assert not (tmp_path / "run").exists()


def test_sigterm_during_sampling_saves_that_step_and_resume_ends_with_the_uninterrupted_weights(small, tmp_path,
                                                                                              monkeypatch, capsys):
    """The signal comes while step 3 samples its completions: the step finishes, is saved, and the run stops;
    --resume takes step 4 on the same generation and samples step 5's as the uninterrupted run did."""
    import os
    import signal

    from llama.tasks import grpo

    extra = ("--max-steps", "5", "--iterations", "2", "--beta", "0.05")
    assert finetune.main(grpo_args(small, tmp_path / "straight", *extra)) == 0
    generate, calls = grpo.RolloutBatches._generate, []

    def generate_then_stop(self):
        calls.append(1)
        if len(calls) == 2:  # the second generation: step 3's
            os.kill(os.getpid(), signal.SIGTERM)
        return generate(self)

    monkeypatch.setattr(grpo.RolloutBatches, "_generate", generate_then_stop)
    out = tmp_path / "stopped"
    finetune.main(grpo_args(small, out, *extra))
    assert "terminated (SIGTERM): saving step 3" in capsys.readouterr().err
    assert (out / "latest").read_text().strip() == "step_0000003"
    monkeypatch.setattr(grpo.RolloutBatches, "_generate", generate)
    assert finetune.main(grpo_args(small, out, *extra, "--resume")) == 0
    straight, resumed = weights(tmp_path / "straight" / "step_0000005"), weights(out / "step_0000005")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_grpo_with_lora_trains_adapters_against_the_model_without_them(small, tmp_path):
    """With --lora-rank the KL's reference is the same model with its adapters off: the base, as loaded."""
    from llama.lora import apply_lora
    from llama.tasks.grpo import adapters_off

    out = tmp_path / "lora"
    assert finetune.main(grpo_args(small, out, "--lora-rank", "4", "--save-adapter-only", "--beta", "0.1",
                                   "--max-steps", "2")) == 0
    assert (out / "step_0000002" / "adapter.safetensors").is_file()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2 and all(r["kl"] >= 0 for r in steps)
    base, _ = load_pretrained(small)
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = token_logps(base, ids)
        adapted = apply_lora(base, 4)
        for name, p in adapted.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.5)  # adapters that change the output
        assert not torch.allclose(token_logps(adapted, ids), expected)
        with adapters_off(adapted):
            assert torch.equal(token_logps(adapted, ids), expected)
        assert not torch.allclose(token_logps(adapted, ids), expected)  # and back on


def test_rows_without_the_prompt_field_are_one_line_naming_the_file_and_row(small, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(6, 0)[:5]) + '{"text": "hi", "answer": "1"}\n')
    assert finetune.main(grpo_args(small, tmp_path / "run", "--dataset", str(rows), "--reward", "arithmetic")) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --dataset {rows} row 5: field 'question' must be a string, got NoneType; name the prompt field "
        "with --prompt-field")  # JSON lines are read as one table: a field missing from a row is None there


def test_each_groups_prompt_runs_once_with_the_same_log_probabilities_and_gradients(models):
    """group_token_logps (the loss's path: a group's prompt once, its completions attending to its keys) equals
    token_logps (every row whole), values and gradients, for groups of shared prompts and a row alone."""
    from llama.tasks.grpo import group_token_logps

    policy, _, _ = models
    batch = rollouts(range(8))
    alone = rollouts([3])  # the last row of group 0 on its own: a group of one
    for b in (batch, alone):
        results = []
        for function in (lambda: token_logps(policy, b.input_ids, 0.9, b.completion_mask),
                         lambda: group_token_logps(policy, b.input_ids, b.completion_mask, 0.9)):
            policy.zero_grad()
            logps = function()
            (logps * torch.linspace(-1, 1, logps.numel()).view_as(logps)).sum().backward()
            results.append((logps.detach(), gradients(policy)))
        (plain, plain_grads), (grouped, grouped_grads) = results
        assert (plain - grouped).abs().max() <= 1e-5 and (grouped[~b.completion_mask.bool()] == 0).all()
        assert all((plain_grads[k] - grouped_grads[k]).abs().max() <= 1e-5 for k in plain_grads)

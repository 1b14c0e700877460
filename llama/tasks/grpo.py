"""Reinforcement learning with verifiable rewards: GRPO (finetune.py --task grpo).

Group-relative policy optimisation (Shao et al. 2024, DeepSeekMath) needs no value model and no
preference data: each step samples a group of G completions for each prompt, scores each with a reward
function, and pushes up the completions that beat their group's mean and down the others:

    advantage_i = (r_i - mean(r_group)) / std(r_group)          (--scale-rewards group; batch; none)
    loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + beta * ratio * KL_k3(policy || reference)

per completion token, where ratio = pi(token) / pi_old(token), pi_old the policy that sampled it (the
same weights unless --iterations > 1 reuses a generation for several updates). The per-token losses are
averaged as TRL's --loss-type says (grpo, bnpo, dr_grpo, dapo: GRPOLoss). A group whose rewards are all
equal has no advantage and teaches nothing; the fraction of such groups is logged.

The KL term is weighted by the ratio (TRL's use_bias_correction_kl, its default since DeepSeek-V3.2: the
KL gradient is then the unbiased reverse-KL gradient; the ratio is differentiable, so this changes the
gradient even on-policy, where its value is 1); kl_bias_correction=False gives plain beta * KL.

Only completion tokens count (up to and including the first EOS); the prompt and pads never do. The loss
types differ in how the per-token losses are averaged (TRL's names and definitions):
- "grpo": each sequence's token mean, then the mean over sequences (longer completions weigh less per token);
- "bnpo": sum over the completion tokens / their number;
- "dr_grpo": sum / (sequences * max completion length), a constant per sequence (Dr. GRPO);
- "dapo": sum / the completion tokens of the whole optimizer step (DAPO; TRL's default).

Here each is a sum of per-unit contributions over a count of units, the Trainer's objective protocol
(TokenLoss in llama/trainer.py), so a step of several micro-batches gives the same loss as one batch.

Prompts are rows of --dataset (their --prompt-field, rendered in --template, as SFT renders a user
turn), or, without --dataset, a seeded synthetic arithmetic task that needs no data. A reward is a
Python function (prompt, completion, row) -> float named by --reward: `arithmetic` and `gsm8k` are
built in (the last number of the completion against the row's answer; GSM8K's gold is the number after
its `####`, as lm-evaluation-harness extracts it), or module:function for your own.

Completions come from the KV-cache engine (llama/engine.py), all prompts of a step decoded together;
each completion's sampling seed is drawn from a generator whose state is part of the checkpoint, so
--resume samples what the uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import lora
from ..engine import Engine, SamplingParams
from ..evaluation import FLEXIBLE, STRICT, exact_match, extract
from ..model import Llama
from ..rows import RowError, text_of
from ..settings import above, at_least, fraction, option
from ..templates import user_prompt
from ..trainer import TrainingStopped
from . import Task

HEADING = "reinforcement learning with verifiable rewards (--task grpo)"
SYNTHETIC_ROWS = 2000  # prompts of the synthetic arithmetic task, without --dataset


# --- the objective, as TRL 1.16's GRPOTrainer computes it -------------------------------------

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group") -> Tensor:
    """Each reward minus its group's mean, divided by a standard deviation + 1e-4 as TRL's scale_rewards says.

    rewards [N] holds N / group_size groups, each one prompt's completions side by side. scale "group"
    divides by the group's std, "batch" by the std of all N rewards (the mean is still the group's), and
    "none" not at all (Dr. GRPO). The std is the unbiased one (Bessel's correction), as TRL's nanstd. A NaN
    reward (a completion no reward function could score) is left out of the mean and std and gets 0, and
    a group of equal rewards gets exactly 0.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if rewards.dim() != 1 or group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}, "
                         f"got {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    # Shifted by the group's largest reward first: x - mean(x) of equal rewards need not be 0 in float32
    # (six 0.3s), x - x is; otherwise the same numbers as TRL's within rounding
    grouped = grouped - grouped.nan_to_num(nan=-math.inf).amax(dim=1, keepdim=True)
    advantages = (grouped - grouped.nanmean(dim=1, keepdim=True)).flatten()
    if scale == "group":
        std = _nanstd(grouped).repeat_interleave(group_size)
    elif scale == "batch":
        std = _nanstd(rewards.float()[None]).expand_as(advantages)
    else:
        return advantages.nan_to_num(nan=0.0)
    return (advantages / (std + 1e-4)).nan_to_num(nan=0.0)


def _nanstd(rows: Tensor) -> Tensor:
    """The unbiased std of each row of [G, n] over its non-NaN values; 0 for a row of one value (TRL's
    case num_generations == 1), NaN for a row with one scorable value among several."""
    if rows.shape[1] == 1:
        return torch.zeros(len(rows), device=rows.device)
    count = (~rows.isnan()).sum(dim=1)
    return ((rows - rows.nanmean(dim=1, keepdim=True)) ** 2).nansum(dim=1).div(count - 1).sqrt()


@dataclasses.dataclass
class Rollouts:
    """One micro-batch of sampled completions, ready for GRPOLoss.

    input_ids [B, T]: each row the prompt's tokens, then the completion's, then padding at the end (right
    padding: the default causal mask serves, no attention mask). completion_mask [B, T]: 1 at the
    completion tokens that count (up to and including the first EOS). advantages [B]: group_advantages.
    completion_length: the maximum completion length sampled with (dr_grpo's constant).
    old_logps, ref_logps [B, T]: token_logps of the policy that sampled the completions (None: the current
    policy, detached, as TRL when num_iterations == 1) and of the frozen reference (needed when beta > 0).
    logps[b, t] is log p(input_ids[b, t] | input_ids[b, :t]); only completion positions are read.
    """

    input_ids: Tensor
    completion_mask: Tensor
    advantages: Tensor
    completion_length: int
    old_logps: Tensor | None = None
    ref_logps: Tensor | None = None
    stats: dict[str, float] = dataclasses.field(default_factory=dict)  # the generation's numbers, logged with the step

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"input_ids must be [B, T], got {shape}")
        for name in ("completion_mask", "old_logps", "ref_logps"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} must have input_ids' shape {shape}, got {tuple(value.shape)}")
        if tuple(self.advantages.shape) != shape[:1]:
            raise ValueError(f"advantages must be [B] = {shape[:1]}, got {tuple(self.advantages.shape)}")
        if self.completion_length < 1:
            raise ValueError(f"completion_length must be a positive number of tokens, got {self.completion_length}")

    def to(self, device: torch.device | str) -> Rollouts:
        """A copy on `device`."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), Tensor)})


def token_logps(model: Llama, input_ids: Tensor, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """log p(input_ids[b, t] | input_ids[b, :t]) under the model, [B, T] in float32; position 0 gets 0.

    The logits are divided by `temperature`, the one the completions were sampled at (TRL's does the
    same). With `mask` [B, T] (the completion tokens), the LM head runs at the positions that predict
    them alone, as TRL's logits_to_keep does, and every other position gets 0: a prompt is most of a
    short completion's row, and the head (vocabulary x hidden) is the costliest layer of a small model.
    log_softmax is the target's logit minus the logsumexp, over float32 logits.
    """
    hidden = model.hidden_states(input_ids)[:, :-1]  # position t predicts token t + 1; the last predicts nothing
    targets = input_ids[:, 1:]
    read = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out[:, 1:] = out[:, 1:].masked_scatter(read, _read_logps(model, hidden, targets, read, temperature))
    return out


def _read_logps(model: Llama, hidden: Tensor, targets: Tensor, read: Tensor, temperature: float) -> Tensor:
    """log p(target) where `read` is set: the LM head at those hidden states alone, float32 logits divided
    by the temperature, the target's logit minus the logsumexp."""
    logits = model.lm_head(hidden[read]).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(1, targets[read][:, None]).squeeze(1) - logits.logsumexp(dim=-1)


class _Keys:
    """A differentiable stand-in for KVCache in a training forward: it keeps each layer's keys and values
    (the prompt's, as one forward leaves them) and puts a continuation's after them, without writing in
    place, so autograd can go back through both."""

    def __init__(self, max_len: int, keys: list[Tensor] | None = None, values: list[Tensor] | None = None) -> None:
        self.max_len, self.positions = max_len, None
        self.keys, self.values = keys or [], values or []
        self.length = keys[0].shape[2] if keys else 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if layer == len(self.keys):  # the prompt's forward: keep them
            self.keys.append(k)
            self.values.append(v)
            return k, v
        return torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)

    def expand(self, rows: int) -> _Keys:
        """The same keys for `rows` rows (a group's completions of this prompt)."""
        return _Keys(self.max_len, [k.expand(rows, -1, -1, -1) for k in self.keys],
                     [v.expand(rows, -1, -1, -1) for v in self.values])


def group_token_logps(model: Llama, input_ids: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """token_logps(model, input_ids, temperature, mask) for rows that share prompts, each prompt run once.

    Consecutive rows whose tokens before their first counted position are the same (a group's
    completions of one prompt) are one group: its prompt runs through the model once, and its completions
    attend to those keys and values, so a group of G costs one prompt and G completions instead of G
    prompts, forward and backward. The numbers are token_logps' (up to float rounding).
    """
    starts = mask.int().argmax(dim=1).tolist()  # each row's first completion position
    lengths = mask.sum(dim=1).tolist()
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    first = 0
    while first < len(starts):
        prompt = starts[first]
        last = first + 1
        while (last < len(starts) and starts[last] == prompt
               and torch.equal(input_ids[last, :prompt], input_ids[first, :prompt])):
            last += 1
        width = int(max(lengths[first:last]))
        if prompt == 0 or width == 0:  # no prompt to share: the plain way
            out[first:last] = token_logps(model, input_ids[first:last], temperature, mask[first:last])
            first = last
            continue
        keys = _Keys(prompt + width)
        prompt_hidden = model.hidden_states(input_ids[first:first + 1, :prompt], keys)[:, -1:]
        rows = last - first
        tokens = input_ids[first:last, prompt:prompt + width]
        after = model.hidden_states(tokens[:, :-1], keys.expand(rows)) if width > 1 else prompt_hidden[:, :0]
        hidden = torch.cat([prompt_hidden.expand(rows, -1, -1), after], dim=1)  # [rows, width, H]: predicts tokens
        read = mask[first:last, prompt:prompt + width].bool()
        picked = _read_logps(model, hidden, tokens, read, temperature)
        block = torch.zeros(rows, width, dtype=torch.float32, device=input_ids.device).masked_scatter(read, picked)
        out = torch.cat([out[:first], torch.cat([out[first:last, :prompt], block, out[first:last, prompt + width:]],
                                                dim=1), out[last:]])
        first = last
    return out


class GRPOLoss:
    """The Trainer's objective for rollouts (see TokenLoss in llama/trainer.py): TRL 1.16's GRPO loss.

    loss(model, rollouts) gives the loss summed over units and its metrics, likewise summed; count(rollouts)
    the units: sequences for "grpo" (each contributes its token mean), completion tokens for "bnpo" and
    "dapo", sequences * completion_length for "dr_grpo". The Trainer divides by the units of the whole
    step, which gives TRL's number over a step of any number of micro-batches for "grpo", "dr_grpo"
    (TRL averages equal-sized micro-batches) and "dapo" (TRL divides by the tokens of the generation
    batch, which is the step's when steps_per_generation equals the accumulation steps, its default).
    "bnpo" differs across micro-batches: TRL averages each micro-batch's token mean, ours is the token
    mean of the whole step, so here it equals "dapo"; in one micro-batch the two coincide.

    epsilon_high defaults to epsilon (DAPO's paper uses 0.28); beta weighs the KL to the reference
    (0: none, TRL's default, and no ref_logps needed), times the ratio unless kl_bias_correction is False;
    temperature is the sampling temperature. The defaults are TRL's.

    Metrics, with TRL's names, as means over completion tokens: clip_ratio/low_mean (ratio below
    1 - epsilon_low where A < 0), clip_ratio/high_mean (above 1 + epsilon_high where A > 0),
    clip_ratio/region_mean (either), and kl when beta > 0 (the KL term over beta, so times the ratio, as
    TRL logs it). Where the units are tokens they are exact over the step; for "grpo" and "dr_grpo" each
    micro-batch's token mean is weighted by its units, i.e. the mean of the micro-batches' token means,
    which is what TRL logs.
    """

    perplexity = False  # exp(a policy-gradient loss) is no perplexity

    def __init__(self, loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None,
                 beta: float = 0.0, temperature: float = 1.0, kl_bias_correction: bool = True) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
        epsilon_high = epsilon if epsilon_high is None else epsilon_high
        for name, value in (("epsilon", epsilon), ("epsilon_high", epsilon_high), ("temperature", temperature)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a number >= 0, got {beta}")
        self.loss_type, self.epsilon_low, self.epsilon_high = loss_type, epsilon, epsilon_high
        self.beta, self.temperature, self.kl_bias_correction = beta, temperature, kl_bias_correction

    def loss(self, model: Llama, batch: Rollouts) -> tuple[Tensor, dict[str, Tensor]]:
        counted = batch.completion_mask.bool()
        # 0 outside the completions, as TRL's: exp() of a pad's logp (say -100) would be inf, and inf * 0 NaN
        logps = group_token_logps(model, batch.input_ids, counted, self.temperature)
        mask = counted.to(logps.dtype)
        old = logps.detach() if batch.old_logps is None else batch.old_logps.to(logps.dtype).where(counted, 0.0)
        ratio = torch.exp(logps - old)
        advantages = batch.advantages.to(logps.dtype)[:, None]
        clipped = ratio.clamp(1 - self.epsilon_low, 1 + self.epsilon_high)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        metrics = {}
        if self.beta != 0.0:
            if batch.ref_logps is None:
                raise ValueError(f"beta={self.beta} needs the reference's log-probabilities: these rollouts have "
                                 "no ref_logps")
            log_ratio = batch.ref_logps.to(logps.dtype).where(counted, 0.0) - logps
            kl = torch.exp(log_ratio) - log_ratio - 1
            if self.kl_bias_correction:
                kl = kl * ratio  # not detached: TRL's gradient flows through both factors
            per_token = per_token + self.beta * kl
            metrics["kl"] = kl.detach()
        with torch.no_grad():  # TRL's clip counts: only where the clipped side of the min is the one taken
            low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
            high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
            metrics.update({"clip_ratio/low_mean": low.float(), "clip_ratio/high_mean": high.float(),
                            "clip_ratio/region_mean": (low | high).float()})
        masked = per_token * mask
        if self.loss_type == "grpo":
            loss = (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum()
        else:
            loss = masked.sum()
        sums = {name: self._token_mean_sum(value, mask, batch) for name, value in metrics.items()}
        units = self.count(batch)
        sums.update({name: torch.as_tensor(value * units, dtype=torch.float32) for name, value in batch.stats.items()})
        return loss, sums

    def _token_mean_sum(self, value: Tensor, mask: Tensor, batch: Rollouts) -> Tensor:
        """A per-token metric summed so that the Trainer's division by the units gives a token mean."""
        total = (value * mask).sum()
        if self.loss_type in ("bnpo", "dapo"):
            return total
        return total / mask.sum().clamp(min=1.0) * self.count(batch)  # the micro-batch's token mean, times its units

    def count(self, batch: Rollouts) -> int | Tensor:
        if self.loss_type in ("bnpo", "dapo"):
            return batch.completion_mask.sum()  # on the device: no wait for it
        sequences = batch.input_ids.shape[0]
        return sequences * batch.completion_length if self.loss_type == "dr_grpo" else sequences


# --- rewards ---------------------------------------------------------------------------------------

def last_number(text: str) -> str:
    """The last number in `text` (GSM8K's flexible extraction), "[invalid]" when there is none."""
    return extract(FLEXIBLE, text, last=True)


def arithmetic(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    """1 when the completion's last number is the row's answer, else 0."""
    return float(exact_match(last_number(completion), str(row["answer"])))


def gsm8k(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    """1 when the completion's last number is the GSM8K row's answer (the number after its ####), else 0."""
    return float(exact_match(last_number(completion), extract(STRICT, str(row["answer"]), last=False)))


BUILT_IN = {"arithmetic": arithmetic, "gsm8k": gsm8k}


def reward_function(name: str) -> Callable[[str, str, Mapping[str, Any]], float]:
    """A built-in reward by name, or module:function (the module importable from the current folder)."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    module, colon, function = name.partition(":")
    if not (colon and module and function):
        raise ValueError(f"--reward {name}: give {', '.join(BUILT_IN)} or module:function")
    try:
        found = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--reward {name}: {e}") from None
    if not callable(found):
        raise ValueError(f"--reward {name} is not a function")
    return found


def arithmetic_rows(count: int, seed: int) -> list[dict[str, str]]:
    """The synthetic task: single-digit sums, 'What is 3 + 5?' -> '8', seeded."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
    return rows


# --- settings --------------------------------------------------------------------------------------

@dataclasses.dataclass
class GRPOSettings:
    """The flags of --task grpo (--beta, the KL weight, is finetune.py's: its default here is 0)."""

    reward: str = option("arithmetic", "grpo: the reward function: arithmetic, gsm8k (the last number of the "
                                       "completion against the row's answer) or module:function, called as "
                                       "f(prompt, completion, row) -> float (default: arithmetic)", group=HEADING)
    prompt_field: str = option("question", "grpo: the rows' prompt field, rendered as a user turn in --template "
                                           "(default: question)", group=HEADING)
    group_size: int = option(8, "grpo: completions sampled for each prompt, G (default: 8)", check=at_least(2),
                             group=HEADING)
    max_completion_tokens: int = option(16, "grpo: most tokens of a completion (default: 16)", check=at_least(1),
                                        group=HEADING)
    temperature: float = option(1.0, "grpo: sampling temperature of the completions (default: 1.0)", check=above(0),
                                group=HEADING)
    iterations: int = option(1, "grpo: optimizer steps on each generation (TRL's num_iterations; the clipped ratio "
                                "matters from the second) (default: 1)", check=at_least(1), group=HEADING)
    epsilon: float = option(0.2, "grpo: the ratio's clip range below 1 (default: 0.2)", check=fraction, group=HEADING)
    epsilon_high: float | None = option(None, "grpo: its clip range above 1 (default: --epsilon)", check=above(0),
                                        group=HEADING)
    loss_type: str = option("dapo", "grpo: how token losses are averaged, as TRL defines them: grpo (per completion, "
                                    "then over completions), bnpo (over the micro-batch's tokens), dr_grpo (over "
                                    "completions x --max-completion-tokens), dapo (over the step's tokens) "
                                    "(default: dapo)", choices=LOSS_TYPES, group=HEADING)
    scale_rewards: str = option("group", "grpo: divide advantages by the group's reward std (group), the batch's "
                                         "(batch), or not (none) (default: group)", choices=SCALES, group=HEADING)


# --- rollouts --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Prompts:
    """Validation prompts (their rows and ids), a batch the Trainer can move to a device."""

    rows: list[Mapping[str, Any]]
    ids: list[list[int]]
    texts: list[str]

    def to(self, device: Any) -> Prompts:
        return self


class PromptSet:
    """The prompts of a run: rows, their rendered ids and texts, and their numbers in the source."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], numbers: list[int], tokenizer, s: Any, context: int) -> None:
        self.rows, self.numbers, self.pad_id = [rows[i] for i in numbers], numbers, tokenizer.padding_id
        self.ids, self.texts = [], []
        room = context - s.max_completion_tokens
        for row, number in zip(self.rows, numbers):
            try:
                question = text_of(row, s.prompt_field)
            except ValueError as e:  # a missing or non-text field: reported with its file and row
                raise RowError(number, f"{e}; name the prompt field with --prompt-field") from None
            ids = user_prompt(tokenizer, question, s.template, response=s.output_field)
            ids = list(ids if isinstance(ids, list) else tokenizer.encode(ids))
            if len(ids) > room:
                raise RowError(number, f"its prompt has {len(ids)} tokens, more than the {room} that leave room for "
                                       f"--max-completion-tokens {s.max_completion_tokens} in the model's context")
            self.ids.append(ids)
            self.texts.append(tokenizer.decode(ids))
        self.max_len = max((len(ids) for ids in self.ids), default=0) + s.max_completion_tokens
        self.stats = f"{len(self.rows)} prompts, at most {self.max_len} positions with the completion"

    def __len__(self) -> int:
        return len(self.rows)


class RolloutBatches:
    """The Trainer's training batches for GRPO: each call gives one micro-batch of Rollouts, sampled with
    the policy being trained.

    Every `iterations` optimizer steps, the next grad_accum x batch_size prompts (a seeded order, a new
    one each epoch, this process's share under torchrun) get group_size completions each, decoded together
    by the engine; their rewards, advantages and (when needed) old and reference log-probabilities are
    computed once, and the micro-batches are served `iterations` times. state_dict() holds the prompt
    position, the sampling generator and the micro-batches still to be served, so --resume continues the
    same run.
    """

    def __init__(self, s: Any, model: Llama, tokenizer, prompts: PromptSet, reward: Callable, reward_name: str,
                 reference: Callable[[Tensor, Tensor], Tensor] | None, rank: int = 0, world_size: int = 1) -> None:
        self.s, self.model, self.tokenizer, self.prompts = s, model, tokenizer, prompts
        self.reward, self.reward_name, self.reference = reward, reward_name, reference
        self.rank, self.world_size = rank, world_size
        self.per_generation = s.batch_size * s.grad_accum  # prompts per generation, this process
        # micro-batches of this process per pass over the prompts: a generation serves `iterations` steps
        self.batches_per_epoch = max(1, len(prompts) * s.iterations // (s.batch_size * world_size))
        self.generator = torch.Generator().manual_seed(s.seed)
        self.epoch, self.position = 0, 0  # in this epoch's order, counted in prompts over all processes
        self.queue: list[Rollouts] = []  # micro-batches still to serve, each `iterations` times in all
        self.served = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.s.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _next_prompts(self) -> list[int]:
        """This process's next prompts: the next per_generation x world_size of the epoch's order, its share."""
        take = self.per_generation * self.world_size
        if self.position + take > len(self.prompts):
            self.epoch, self.position = self.epoch + 1, 0
        chosen = self._order(self.epoch)[self.position:self.position + take]
        self.position += take
        return chosen[self.rank::self.world_size]

    def __iter__(self) -> Iterator[Rollouts]:
        return self

    def __next__(self) -> Rollouts:
        if not self.queue or self.served == len(self.queue) * self.s.iterations:
            self.queue, self.served = self._generate(), 0
        batch = self.queue[self.served % len(self.queue)]
        self.served += 1
        return batch

    @torch.no_grad()
    def _generate(self) -> list[Rollouts]:
        s, model = self.s, self.model
        chosen = self._next_prompts()
        if len(chosen) < self.per_generation:
            raise ValueError(f"{len(self.prompts)} prompts are fewer than one step's {self.per_generation} "
                             "(--batch-size x --grad-accum); give more rows or a smaller batch")
        group = s.group_size
        seeds = torch.randint(0, 2**62, (len(chosen) * group,), generator=self.generator).tolist()
        completions = sample_tokens(model, self.tokenizer, [self.prompts.ids[i] for i in chosen for _ in range(group)],
                                    s.max_completion_tokens, temperature=s.temperature, seeds=seeds)
        # group_size consecutive completions per prompt
        rewards = torch.tensor([self._score(chosen[n // group], completion) for n, completion in enumerate(completions)],
                               dtype=torch.float32)
        advantages = group_advantages(rewards, group, s.scale_rewards)
        spread = rewards.view(-1, group).std(dim=1)
        stats = {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
                 "frac_reward_zero_std": (spread == 0).float().mean().item(),
                 "completion_length": sum(map(len, completions)) / len(completions)}
        batches = []
        per_batch = s.batch_size * group
        for start in range(0, len(completions), per_batch):
            rows = range(start, min(start + per_batch, len(completions)))
            prompt_ids = [self.prompts.ids[chosen[r // group]] for r in rows]
            batch = rollouts([prompt_ids[k] for k in range(len(rows))], [completions[r] for r in rows],
                             advantages[list(rows)], s.max_completion_tokens, self.prompts.pad_id)
            device = model.embed_tokens.weight.device
            if s.iterations > 1:  # the ratio's denominator: the policy as it sampled
                batch.old_logps = token_logps(model, batch.input_ids.to(device), s.temperature,
                                              batch.completion_mask.to(device)).cpu()
            if self.reference is not None:
                batch.ref_logps = self.reference(batch.input_ids.to(device), batch.completion_mask.to(device)).cpu()
            batch.stats = stats
            batches.append(batch)
        return batches

    def _score(self, prompt_index: int, completion: list[int]) -> float:
        """The reward of one completion; a reward function that fails stops the run, naming it and the row."""
        text = self.tokenizer.decode([t for t in completion if t not in self.tokenizer.stop_ids])
        row, number = self.prompts.rows[prompt_index], self.prompts.numbers[prompt_index]
        try:
            value = self.reward(self.prompts.texts[prompt_index], text, row)
        except Exception as e:  # noqa: BLE001 - the user's function: whatever it raises stops the run
            raise TrainingStopped(f"--reward {self.reward_name} raised {type(e).__name__}: {e} on row {number}; "
                                  "nothing of this step was saved") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TrainingStopped(f"--reward {self.reward_name} returned {value!r} on row {number}, not a finite "
                                  "number; nothing of this step was saved")
        return float(value)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "served": self.served,
                "generator": self.generator.get_state().tolist(),
                "queue": [encode(batch) for batch in self.queue]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.position, self.served = state["epoch"], state["position"], state["served"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.queue = [decode(batch) for batch in state["queue"]]


def complete(model: Llama, tokenizer, prompts: list[list[int]], max_tokens: int, *, temperature: float = 1.0,
             seeds: list[int] | None = None) -> list[str]:
    """The completions of `prompts` by the engine, all decoded together, as text (without the end-of-turn)."""
    return [tokenizer.decode([t for t in tokens if t not in tokenizer.stop_ids])
            for tokens in sample_tokens(model, tokenizer, prompts, max_tokens, temperature=temperature, seeds=seeds)]


def sample_tokens(model: Llama, tokenizer, prompts: list[list[int]], max_tokens: int, *, temperature: float = 1.0,
                  seeds: list[int] | None = None) -> list[list[int]]:
    """The completions' token ids (an ending end-of-turn included), decoded together in one engine; the model
    returns to the mode it was in."""
    was_training = model.training
    engine = Engine(model, tokenizer, max_batch=len(prompts), context=max(map(len, prompts)) + max_tokens)
    try:
        requests = [engine.submit(ids, SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                      seed=None if seeds is None else seeds[n]))
                    for n, ids in enumerate(prompts)]
        while engine.step():
            pass
    finally:
        engine.close(wait=False)
        model.train(was_training)
    return [r.tokens for r in requests]


def rollouts(prompts: list[list[int]], completions: list[list[int]], advantages: Tensor, completion_length: int,
             pad_id: int) -> Rollouts:
    """Right-padded rows of prompt + completion, the completion's tokens marked."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        mask[row, len(p):len(p) + len(c)] = 1
    return Rollouts(input_ids, mask, advantages.float(), completion_length)


def encode(batch: Rollouts) -> dict[str, Any]:
    """A micro-batch as JSON values (a float32 survives the round trip through a Python float)."""
    out = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return {k: v.tolist() if isinstance(v, Tensor) else v for k, v in out.items()}


def decode(data: Mapping[str, Any]) -> Rollouts:
    batch = Rollouts(torch.tensor(data["input_ids"], dtype=torch.long), torch.tensor(data["completion_mask"]),
                     torch.tensor(data["advantages"]), data["completion_length"],
                     *(None if data[k] is None else torch.tensor(data[k]) for k in ("old_logps", "ref_logps")))
    batch.stats = data["stats"]
    return batch


# --- the task --------------------------------------------------------------------------------------

class GRPO(Task):
    name = "grpo"
    summary = "sample groups of completions and reinforce those a reward function prefers"
    Settings = GRPOSettings
    DEFINES_RUN = ("beta", "reward", "prompt_field", "group_size", "max_completion_tokens", "temperature",
                   "iterations", "epsilon", "epsilon_high", "loss_type", "scale_rewards")
    loss_label = "GRPO loss"
    metrics_drawn = ("reward", "val_reward", "frac_reward_zero_std")
    units = "prompts"
    needs_dataset = False
    default_beta = 0.0
    beta_help = "the weight of the KL to the reference, 0 for none"
    needs_language_model = "GRPO needs a language model"

    def check(self, s: Any) -> None:
        reward_function(s.reward)  # an unknown reward stops the run before the model loads
        if s.pack:
            raise ValueError("--pack is for --task sft; --task grpo pads each completion")
        if s.fsdp:
            raise ValueError("--fsdp shards the model, but each process samples its completions with the whole "
                             "model; leave --fsdp out with --task grpo")

    def rows(self, s: Any) -> Any:
        """--dataset's rows, or the synthetic arithmetic task's (seeded by --seed) without one."""
        return super().rows(s) if s.dataset else arithmetic_rows(SYNTHETIC_ROWS, s.seed)

    def dataset(self, s: Any, model, tokenizer, rows, numbers: list[int], train: Any = None) -> PromptSet:
        return PromptSet(rows, numbers, tokenizer, s, model.config.max_seq_len)

    def token_ids(self, dataset: PromptSet) -> Iterator[Any]:
        return iter(dataset.ids)

    def batches(self, s: Any, model, tokenizer, train: PromptSet, dist_info: Any) -> RolloutBatches:
        """The rollouts. With --beta > 0 the KL's reference is the model as loaded (this runs before LoRA goes
        on): with LoRA, the same model with its adapters off; otherwise a frozen copy."""
        frozen = copy.deepcopy(model).requires_grad_(False).eval() if s.beta > 0 and not s.lora_rank else None

        def reference(input_ids: Tensor, mask: Tensor) -> Tensor:
            if frozen is not None:
                return token_logps(frozen.to(input_ids.device), input_ids, s.temperature, mask)
            with adapters_off(model):
                return token_logps(model, input_ids, s.temperature, mask)
        return RolloutBatches(s, model, tokenizer, train, reward_function(s.reward), s.reward,
                              reference if s.beta > 0 else None, dist_info.rank, dist_info.world_size)

    def eval_batches(self, s: Any, val: PromptSet) -> Callable[[], list[Prompts]]:
        fixed = [Prompts(val.rows[i:i + 64], val.ids[i:i + 64], val.texts[i:i + 64]) for i in range(0, len(val), 64)]
        return lambda: fixed

    def objective(self, s: Any) -> GRPOLoss:
        return GRPOLoss(s.loss_type, s.epsilon, s.epsilon_high, s.beta, s.temperature)

    def eval_metrics(self, s: Any, tokenizer) -> Callable[[Llama, Any], dict[str, float]]:
        """The mean reward of greedy completions of the validation prompts (their accuracy, for a 0/1 reward)."""
        reward = reward_function(s.reward)

        def metrics(model: Llama, batches) -> dict[str, float]:
            scores = []
            for batch in batches:
                texts = complete(model, tokenizer, batch.ids, s.max_completion_tokens, temperature=0.0)
                scores += [float(reward(prompt, text, row)) for prompt, text, row in zip(batch.texts, texts, batch.rows)]
            return {"val_reward": sum(scores) / max(len(scores), 1)}
        return metrics

    def sample(self, s: Any, tokenizer) -> Any:
        return None  # the validation's completions say more


@contextlib.contextmanager
def adapters_off(model) -> Iterator[None]:
    """The model without its LoRA adapters (each adapter's scale 0), for the reference's log-probabilities."""
    modules = lora.lora_modules(model).values()
    scales = [m.scale for m in modules]
    for m in modules:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, scale in zip(modules, scales):
            m.scale = scale


TASK = GRPO()

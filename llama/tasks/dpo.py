"""Preference tuning with DPO: preference pairs -> padded pair batches -> the DPO loss, in the one training loop.

Direct Preference Optimization (Rafailov et al. 2023) trains a policy to prefer the chosen response of
each pair over the rejected one, relative to a frozen reference model, without a reward model:

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

where pi_c is the policy's summed log-probability of the chosen response given the prompt, ref_c the
reference's, and likewise for the rejected one. Only response tokens count (the prompt and pads never
do); the EOT after each response counts, as in SFT, so the policy is also judged on where it stops.
beta * (pi - ref) is a response's implicit reward; the metrics carry TRL's names (rewards/chosen,
rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected).

The reference never changes, so its log-probabilities are computed once, in one pass before training
(`reference_log_probs`), and stored with the run; a step then costs one policy forward and backward and
no second model in memory. With LoRA the reference is the base model, whose adapters are not applied yet.

Rows come in the shapes of the common preference sets (detected from the first row):
- "alpaca": instruction, input (optional), chosen, rejected (Raschka's LLMs-from-scratch set);
- "prompt": prompt, chosen, rejected, as strings or as message lists (TRL's standard format, e.g.
  UltraFeedback binarized: the prompt a list of messages, each response one assistant message);
- "transcripts": chosen and rejected whole conversations, as message lists or as Anthropic HH-RLHF's
  "\\n\\nHuman: ... \\n\\nAssistant: ..." text; the prompt is their shared beginning, each response the
  last assistant turn that follows it.
Each response becomes an SFT row rendered by the instruction machinery (llama/examples.py, llama/templates.py) in
the run's template (alpaca, chat, model, or a format string), so preference and SFT examples of one
prompt are token for token the same.

Bad rows: a missing field is an error naming the field and the row, and so is an empty response. Pairs
whose chosen equals their rejected response teach nothing and are skipped, counted in `stats`, as are
transcripts that differ before their last assistant turn. A pair longer than max_len positions loses
the beginning of its prompt, never a response token (counted); one whose responses alone do not fit is
dropped (counted).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from ..batch import Batch, collate
from ..files import write_text_atomically
from ..linear_cross_entropy import linear_cross_entropy
from ..model import Llama
from ..rows import RowError, field_names, text_of
from ..examples import FineTuningDataset
from ..tokenizer import Tokenizer
from . import Task

SHAPES = ("alpaca", "prompt", "transcripts")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ")  # HH-RLHF's turn markers
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
UNLIMITED = sys.maxsize  # the SFT examples are cut here, by the pair rules, not by FineTuningDataset's


# --- rows -> pairs -----------------------------------------------------------------------------------

def detect_shape(row: Mapping[str, Any], instruction_field: str = "instruction") -> str:
    """'prompt' for an explicit prompt field, 'alpaca' for an instruction field, 'transcripts' otherwise."""
    if "prompt" in row:
        return "prompt"
    if instruction_field in row:
        return "alpaca"
    if "chosen" in row and "rejected" in row:
        return "transcripts"
    raise ValueError(f"cannot tell the shape of the preference rows from row 0's fields ({field_names(row)}); "
                     f"expected 'prompt', 'chosen', 'rejected' (TRL), {instruction_field!r}, 'chosen', 'rejected' "
                     "(alpaca) or 'chosen', 'rejected' whole conversations (HH-RLHF)")


def hh_messages(text: str, field: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as user and assistant messages."""
    parts = TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"field {field!r} is neither a message list nor a 'Human: ... Assistant: ...' transcript")
    return [{"role": HH_ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]


def _response(value: Any, field: str) -> str:
    """A response given as text or as a list of one assistant message."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], Mapping) or value[0].get("role") != "assistant":
            raise ValueError(f"field {field!r} must be a string or a list of one assistant message, "
                             f"got {value!r:.120}")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} must be a string or a list of one assistant message, "
                         f"got {type(value).__name__}")
    return value


def _field(row: Mapping[str, Any], field: str) -> Any:
    """row[field]; a missing one is an error that names it. None counts as missing: `datasets` fills the
    fields that a JSON row lacks but other rows have with None."""
    if row.get(field) is None:
        present = {key: value for key, value in row.items() if value is not None}
        raise ValueError(f"missing field {field!r} (fields present: {field_names(present)})")
    return row[field]


def _conversation(row: Mapping[str, Any], field: str) -> list[Any]:
    value = _field(row, field)
    if isinstance(value, str):
        return hh_messages(value, field)
    if not isinstance(value, list):
        raise ValueError(f"field {field!r} must be a conversation (a message list or HH-RLHF text), "
                         f"got {type(value).__name__}")
    return value


def sft_rows(row: Mapping[str, Any], shape: str, *, instruction_field: str = "instruction",
             output_field: str = "output") -> tuple[dict[str, Any], dict[str, Any], str] | None:
    """(chosen row, rejected row, their SFT format) for FineTuningDataset; None for transcripts that differ
    before their last assistant turn (not a pair). An empty response is an error."""
    if shape == "transcripts":
        chosen, rejected = _conversation(row, "chosen"), _conversation(row, "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if len(chosen) != shared + 1 or len(rejected) != shared + 1 or not shared:
            return None
        answers = {"chosen": _response(chosen[-1:], "chosen"), "rejected": _response(rejected[-1:], "rejected")}
        prompt: Any = chosen[:shared]
    else:
        answers = {field: _response(_field(row, field), field) for field in ("chosen", "rejected")}
        prompt = _field(row, "prompt") if shape == "prompt" else None
    for field, answer in answers.items():
        if not answer.strip():
            raise ValueError(f"the {field} response is empty; a preference pair needs two responses "
                             "(fill it in or remove the row)")
    if isinstance(prompt, list):
        return ({"messages": prompt + [{"role": "assistant", "content": answers["chosen"]}]},
                {"messages": prompt + [{"role": "assistant", "content": answers["rejected"]}]}, "chat")
    if shape == "prompt":  # a prompt string: the instruction of an alpaca row, and a field of format strings
        base = {**row, instruction_field: text_of(row, "prompt")}
    else:
        _field(row, instruction_field)
        text_of(row, instruction_field)  # a string
        base = dict(row)
    return {**base, output_field: answers["chosen"]}, {**base, output_field: answers["rejected"]}, "alpaca"


@dataclasses.dataclass
class PreferenceStats:
    """The rows that did not go into training as they were, by row number."""

    rows: int = 0
    identical: list[int] = dataclasses.field(default_factory=list)  # chosen == rejected: skipped
    unpaired: list[int] = dataclasses.field(default_factory=list)  # transcripts differ before the last turn
    truncated: list[int] = dataclasses.field(default_factory=list)  # prompt cut from the left to fit max_len
    dropped: list[int] = dataclasses.field(default_factory=list)  # the responses alone exceed max_len

    @property
    def kept(self) -> int:
        return self.rows - len(self.identical) - len(self.unpaired) - len(self.dropped)

    def __str__(self) -> str:
        return (f"{self.kept} of {self.rows} pairs kept; {len(self.identical)} skipped as chosen = rejected, "
                f"{len(self.unpaired)} as transcripts that differ before their last turn, {len(self.truncated)} "
                f"with the prompt's beginning cut to fit max_len, {len(self.dropped)} dropped as too long")


def _last_response(ids: Tensor, loss_mask: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, response ids) of an SFT example: the response is its last run of counted tokens
    (earlier assistant turns of a conversation are prompt here); what follows it is left out."""
    counted = loss_mask.numpy()
    end = int(np.flatnonzero(counted)[-1]) + 1
    start = end
    while start > 0 and counted[start - 1]:
        start -= 1
    ids = ids.numpy()
    return ids[:start + 1], ids[start + 1:end + 1]  # target t is ids[t + 1]


class PreferenceDataset(Dataset):
    """Tokenized preference pairs; item i is {"chosen", "rejected"} (SFT-shaped examples) and "reference".

    template, instruction_field, input_field and output_field are FineTuningDataset's. max_len is the
    number of positions each sequence may have. row_numbers: the rows' numbers in their source, for
    errors and stats. `reference` ([pairs, 2]: chosen, rejected) is None until set from
    reference_log_probs.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *, template: str, max_len: int,
                 drop_long: bool = False, instruction_field: str = "instruction", input_field: str = "input",
                 output_field: str = "output", row_numbers: Sequence[int] | None = None) -> None:
        if max_len < 2:
            raise ValueError(f"max_len={max_len} must be at least 2: a prompt token and a response token")
        if len(rows) == 0:
            raise ValueError("no preference pairs to train on")
        numbers = list(range(len(rows))) if row_numbers is None else list(row_numbers)
        self.max_len, self.pad_id = max_len, tokenizer.padding_id
        self.stats = PreferenceStats(rows=len(rows))
        self.shape = detect_shape(rows[0], instruction_field)
        chosen_rows, rejected_rows, paired, format = [], [], [], None
        for number, row in zip(numbers, rows):
            try:
                made = sft_rows(row, self.shape, instruction_field=instruction_field, output_field=output_field)
            except ValueError as e:
                raise RowError(number, str(e)) from None
            if made is None:
                self.stats.unpaired.append(number)
                continue
            if format is not None and made[2] != format:
                raise RowError(number, f"its prompt is a {'message list' if made[2] == 'chat' else 'text'}, unlike "
                                       "the rows before it; give every row's prompt in one form")
            chosen_rows.append(made[0])
            rejected_rows.append(made[1])
            paired.append(number)
            format = made[2]
        if not paired:
            raise ValueError(f"no usable pairs: {self.stats}")
        options = dict(template=template, max_len=UNLIMITED, format=format, instruction_field=instruction_field,
                       input_field=input_field, output_field=output_field, row_numbers=paired)
        chosen = FineTuningDataset(chosen_rows, tokenizer, **options)
        rejected = FineTuningDataset(rejected_rows, tokenizer, **options)
        self.pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (prompt, chosen, rejected) ids
        self.numbers: list[int] = []  # each pair's row number
        self.lengths: list[int] = []  # positions of the longer sequence, for length grouping
        for number, (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) in zip(
                paired, chosen.examples, rejected.examples):
            prompt, chosen_response = _last_response(chosen_ids, chosen_mask)
            rejected_prompt, rejected_response = _last_response(rejected_ids, rejected_mask)
            if not np.array_equal(prompt, rejected_prompt):
                raise RowError(number, f"the chosen and rejected sequences start differently once rendered in "
                                       f"template {template!r}; their prompts must be the same")
            if np.array_equal(chosen_response, rejected_response):
                self.stats.identical.append(number)
                continue
            excess = len(prompt) + max(len(chosen_response), len(rejected_response)) - 1 - max_len
            if excess > 0:
                if drop_long or excess >= len(prompt):  # at least one prompt token must stay
                    self.stats.dropped.append(number)
                    continue
                prompt = prompt[excess:]
                self.stats.truncated.append(number)
            self.pairs.append((prompt, chosen_response, rejected_response))
            self.numbers.append(number)
            self.lengths.append(len(prompt) + max(len(chosen_response), len(rejected_response)) - 1)
        if not self.pairs:
            raise ValueError(f"no usable pairs: {self.stats}")
        self.reference: Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def fingerprint(self) -> str:
        """A hash of every pair's token ids (prompt, chosen, rejected) in order: what the reference
        log-probabilities are of, whatever file or settings the pairs came from."""
        digest = hashlib.sha256()
        for part in (part for pair in self.pairs for part in pair):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(np.ascontiguousarray(part, dtype="<i8").tobytes())
        return digest.hexdigest()

    def __getitem__(self, i: int) -> dict[str, Any]:
        prompt, chosen, rejected = self.pairs[i]
        return {"chosen": sequence(prompt, chosen), "rejected": sequence(prompt, rejected),
                "reference": None if self.reference is None else self.reference[i]}


def sequence(prompt: np.ndarray, response: np.ndarray) -> dict[str, Tensor]:
    """prompt + response as an SFT example: only the response's tokens count."""
    ids = torch.from_numpy(np.concatenate([prompt, response]))
    loss_mask = torch.zeros(len(ids) - 1, dtype=torch.bool)
    loss_mask[len(prompt) - 1:] = True
    return {"input_ids": ids[:-1], "targets": ids[1:], "loss_mask": loss_mask}


@dataclasses.dataclass
class PreferenceBatch(Batch):
    """A Batch of 2P rows: the chosen sequences of P pairs, then their rejected ones (TRL's layout), with
    the reference log-probabilities of those rows ([2P], or None before they are computed).

    counted (the flat index of each counted position, row after row), row_of (each one's row) and
    row_sizes (counted positions per row, on the host) are made where the batch is, on the CPU, so that
    the training step picks the response positions out without reading anything back from the device.
    """

    reference: Tensor | None = None
    counted: Tensor | None = None
    row_of: Tensor | None = None
    row_sizes: tuple[int, ...] = ()

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def collate_pairs(items: Sequence[Mapping[str, Any]], pad_id: int = 0) -> PreferenceBatch:
    """Pairs into one right-padded PreferenceBatch, chosen rows first, with collate (llama/batch.py)."""
    batch = collate([item["chosen"] for item in items] + [item["rejected"] for item in items], pad_id=pad_id)
    reference = None
    if all(item["reference"] is not None for item in items):
        pairs = torch.stack([item["reference"] for item in items])
        reference = torch.cat([pairs[:, 0], pairs[:, 1]])
    counted = batch.loss_mask.flatten().nonzero().squeeze(1)
    return PreferenceBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)},
                           reference=reference, counted=counted, row_of=counted // batch.loss_mask.shape[1],
                           row_sizes=tuple(batch.loss_mask.sum(dim=1).tolist()))


# --- log-probabilities and the loss ------------------------------------------------------------------

class _SequenceLogProbs(torch.autograd.Function):
    """Each row's summed log-probability, from the final hidden states of its counted positions alone.

    hidden [N, H] and targets [N] hold the counted positions of every row, row after row: sizes[b] (host
    ints) of row b, and row_of [N] each one's row. Forward goes through Llama's chunked LM-head
    cross-entropy one row at a time, without gradients, so no [N, vocab] logits are ever held; backward
    runs it once more over all positions with each weighted by its row's incoming gradient, which gives
    the gradients of the hidden states and of the LM head in one chunked pass.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, head: Tensor, targets: Tensor, row_of: Tensor, sizes: tuple[int, ...]) -> Tensor:
        ctx.save_for_backward(hidden, head, targets, row_of)
        ones = torch.ones(len(targets), device=hidden.device)
        with torch.no_grad():
            return -torch.stack([linear_cross_entropy(h, head, t, w) for h, t, w in
                                 zip(hidden.split(sizes), targets.split(sizes), ones.split(sizes))])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        hidden, head, targets, row_of = ctx.saved_tensors
        with torch.enable_grad():
            h, w = hidden.detach().requires_grad_(), head.detach().requires_grad_()
            # d logp_row / d(CE of one of its positions) = -1: each position carries -grad[row]
            total = linear_cross_entropy(h, w, targets, -grad.float()[row_of])
            grad_hidden, grad_head = torch.autograd.grad(total, (h, w))
        return (grad_hidden if ctx.needs_input_grad[0] else None, grad_head if ctx.needs_input_grad[1] else None,
                None, None, None)


@torch.compiler.disable
def sequence_log_probs(model: Llama, batch: Batch) -> Tensor:
    """log p(counted targets of row b | what precedes them), summed per row: [B], differentiable.

    The LM head runs at the counted positions only (a pair's responses, a fraction of its tokens). A
    PreferenceBatch brings their indices from the host; for another Batch they are found here.
    """
    hidden = model.hidden_states(batch.input_ids, attn_mask=batch.attn_mask())
    counted = getattr(batch, "counted", None)
    if counted is None:
        mask = batch.loss_mask.bool()
        counted = mask.flatten().nonzero().squeeze(1)
        row_of, sizes = counted // mask.shape[1], tuple(mask.sum(dim=1).tolist())
    else:
        row_of, sizes = batch.row_of, batch.row_sizes
    return _SequenceLogProbs.apply(hidden.flatten(0, 1).index_select(0, counted), model.lm_head.weight,
                                   batch.targets.flatten().index_select(0, counted), row_of, sizes)


def dpo_loss(policy: Tensor, reference: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) from the log-probabilities of 2P rows, chosen first."""
    chosen_rewards, rejected_rewards = (beta * (policy - reference)).chunk(2)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards.detach(), rejected_rewards.detach()


class DPOLoss:
    """The Trainer's objective for preference pairs (see TokenLoss in llama/trainer.py): the DPO loss
    summed over a batch's pairs, with TRL's metrics, also summed; one unit per pair."""

    perplexity = False  # exp(DPO loss) is no perplexity

    def __init__(self, beta: float = 0.1) -> None:
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a positive number, got {beta}")
        self.beta = beta

    def loss(self, model: Llama, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.reference is None:
            raise ValueError("this preference batch has no reference log-probabilities; set the dataset's "
                             "reference from reference_log_probs before training")
        policy = sequence_log_probs(model, batch)
        losses, chosen, rejected = dpo_loss(policy, batch.reference.to(policy.device), self.beta)
        chosen_logps, rejected_logps = policy.detach().chunk(2)
        return losses.sum(), {
            "rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
            "rewards/accuracies": (chosen > rejected).float().sum(), "rewards/margins": (chosen - rejected).sum(),
            "logps/chosen": chosen_logps.sum(), "logps/rejected": rejected_logps.sum()}

    def count(self, batch: PreferenceBatch) -> int:
        return batch.pairs  # known on the host: no wait for the device

    def advice(self, before_updates: bool) -> str | None:
        """What to change when the loss or its gradient overflows (the Trainer's stop line): beta multiplies
        every gradient of the loss, so a large one overflows them before any update, whatever --lr is."""
        if before_updates or self.beta > 1:
            return f"try a smaller --beta than {self.beta:g}, which multiplies the loss's gradients; the default is 0.1"
        return None


# --- the reference -----------------------------------------------------------------------------------

@torch.no_grad()
def reference_log_probs(model: Llama, dataset: PreferenceDataset, *, batch_size: int = 8,
                        autocast_dtype: torch.dtype | None = None, desc: str = "reference log-probs") -> Tensor:
    """The model's summed log-probabilities of every pair's chosen and rejected response, [pairs, 2].

    One pass without gradients, longest pairs first, batch_size pairs at a time, on the model's device.
    """
    device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset)), key=lambda i: -dataset.lengths[i])
    table = torch.zeros(len(dataset), 2)
    saved, dataset.reference = dataset.reference, None
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", dynamic_ncols=True,
                          file=sys.stderr):
            indices = order[start:start + batch_size]
            batch = collate_pairs([dataset[i] for i in indices], dataset.pad_id).to(device)
            with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                  else contextlib.nullcontext()):
                logps = sequence_log_probs(model, batch).float().cpu()
            table[indices] = torch.stack(logps.chunk(2), dim=1)
    finally:
        dataset.reference = saved
        model.train(was_training)
    return table


def stored_reference(path: str | Path, identity: Mapping[str, Any],
                     datasets: Mapping[str, PreferenceDataset]) -> bool:
    """Set each dataset's reference from `path` if it was stored with these identity values (the file may
    hold more of them); False when it was not, or when the file does not hold what store_reference writes
    (a stop or an edit broke it): then the reference is computed anew, as for a missing file."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        stored, expected = saved.get("identity"), json.loads(json.dumps(identity))
        if not isinstance(stored, dict) or {key: stored.get(key) for key in identity} != expected:
            return False
        tables = {name: torch.tensor(saved[name], dtype=torch.float32).reshape(-1, 2) for name in datasets}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError):
        return False  # not valid JSON, not an object, an entry that is not a table of numbers: computed anew
    if any(len(tables[name]) != len(dataset) or not torch.isfinite(tables[name]).all()
           for name, dataset in datasets.items()):
        return False
    for name, dataset in datasets.items():
        dataset.reference = tables[name]
    return True


def store_reference(path: str | Path, identity: Mapping[str, Any], datasets: Mapping[str, PreferenceDataset]) -> None:
    """Write the datasets' reference log-probabilities to `path` (JSON, atomically), keyed by identity."""
    data = {"identity": identity, **{name: dataset.reference.tolist() for name, dataset in datasets.items()}}
    write_text_atomically(path, json.dumps(data) + "\n")


# --- the plug-in: finetune.py --task dpo ---------------------------------------------------------------

REFERENCE_FILE = "reference_logps.json"  # a DPO run's reference log-probabilities, in its run folder
# What those depend on: the model, and the pairs' token ids (their fingerprint: a file edited in place under
# the same name gives other ids), not the optimizer's settings
REFERENCE_DEPENDS = ("base_model",)
SFT_FLAGS = (("pack", "--pack"), ("train_on_prompt", "--train-on-prompt"),
             ("no_special_tokens", "--no-special-tokens"))


class DPO(Task):
    """Preference pairs (chosen and rejected responses to one prompt; alpaca rows with chosen/rejected,
    TRL's prompt/chosen/rejected as text or messages, or HH-RLHF transcripts) and the DPO loss. The
    reference is --model itself (with --lora-rank, the base without adapters): its log-probabilities are
    computed once before training and kept in the run folder (reference_logps.json), so a step runs one
    model and --resume reads them back. The metrics are TRL's."""

    name = "dpo"
    summary = "prefer each pair's chosen response to its rejected one"
    DEFINES_RUN = ("beta",)
    loss_label = "DPO loss per pair"
    units = "pairs"
    default_beta = 0.1
    beta_help = ("the DPO loss's beta, a response's reward being beta x (its log-probability under the model - "
                 "under the reference); a smaller one lets the model move further")
    needs_language_model = "DPO needs a language model"

    def check(self, s: Any) -> None:
        for field, flag in (*SFT_FLAGS, ("format", "--format")):
            if getattr(s, field, None) not in (False, None, "auto"):
                raise ValueError(f"{flag} is for --task sft; --task dpo pads each pair, counts the responses "
                                 "alone and reads the rows' shape from their fields")
        if not s.beta > 0:
            raise ValueError(f"--beta must be positive, got {s.beta}")

    def dataset(self, s: Any, model, tokenizer, rows, numbers: list[int], train: Any = None) -> PreferenceDataset:
        return PreferenceDataset([rows[i] for i in numbers], row_numbers=numbers, tokenizer=tokenizer,
                                 template=s.template, max_len=min(s.max_len, model.config.max_seq_len - 1),
                                 drop_long=s.drop_long, instruction_field=s.instruction_field,
                                 input_field=s.input_field, output_field=s.output_field)

    def token_ids(self, dataset: Any) -> Iterator[Any]:
        for i in range(len(dataset)):  # a preference pair holds two examples
            for example in (dataset[i]["chosen"], dataset[i]["rejected"]):
                yield example["input_ids"]
                yield example["targets"]

    def collate(self, examples, pad_id: int) -> PreferenceBatch:
        return collate_pairs(examples, pad_id)

    def before_adapters(self, s: Any, model, datasets: dict[str, Any], out: Path, identity: dict[str, Any],
                        dist_info: Any) -> Callable[[], None] | None:
        """Give the datasets their reference log-probabilities: read from the run folder when they were
        stored for this model and these pairs (a resumed run), else computed by `model` (the base: no
        adapters yet) in one pass; then returns what stores them there, which the Trainer calls once the
        run is sure to start (a refused --resume writes nothing).

        Every process computes all of them (one forward pass over the data, no gradients): no process
        waits for another, and each has the numbers for whichever batches it gets.
        """
        from ..trainer import autocast_dtype, default_device
        path = out / REFERENCE_FILE
        depends = {**{key: identity[key] for key in REFERENCE_DEPENDS},
                   "pairs": {name: dataset.fingerprint() for name, dataset in datasets.items()}}
        if stored_reference(path, depends, datasets):
            if dist_info.is_main:
                print(f"reference log-probabilities: read from {path}", file=sys.stderr)
            return None
        device = default_device(dist_info)
        model.to(device)
        for name, dataset in datasets.items():
            dataset.reference = reference_log_probs(model, dataset, batch_size=s.batch_size,
                                                    autocast_dtype=autocast_dtype(s.dtype, device),
                                                    desc=f"reference log-probs ({name})")
        return lambda: store_reference(path, depends, datasets)

    def objective(self, s: Any) -> DPOLoss:
        return DPOLoss(s.beta)


TASK = DPO()

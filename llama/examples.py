"""Supervised fine-tuning data: rows -> template segments -> masked examples -> padded or packed Batches.

What counts in the loss (loss_mask[t] is True when target t, the token after input t, is trained):
- every response token and the EOT that ends it: EOT always counts and pads never do, so the model
  learns to stop even where the pad token is the EOT token (a loss that ignores pads would drop it);
- prompt, system and user tokens only with train_on_prompt=True.
With special_tokens=False an example is its text alone, without the BOT and EOT the templates add: plain
causal-LM fine-tuning on a domain's text, where every token after the first counts and the model
learns the text but not where to stop.

Rows come in three shapes, chosen by `format`:
- "alpaca": instruction, input (optional), output;
- "chat": messages, a list of {"role", "content"} with roles system/user/assistant;
- "sharegpt": conversations, a list of {"from", "value"} with from human/gpt/system;
- "auto": from the first row's fields: messages -> chat, conversations -> sharegpt, else alpaca.

Malformed rows (a missing field, an unknown role) raise ValueError naming the row. Rows that are well
formed but cannot teach what we want are skipped and counted in `dataset.stats` instead:
- an empty response: it would teach answering with nothing, and is almost always a broken row. A
  conversation is skipped whole when any answer is empty or when it has no answer. Without special
  tokens, a text of a single token is skipped as empty too: there is nothing after it to learn;
- an example longer than max_len positions is truncated (counted), or dropped with drop_long=True.
  One whose responses all lie beyond max_len is dropped either way: nothing of it would be trained.
"""
from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .batch import Batch, collate
from .rows import RowError, field_names, text_of
from .templates import (ROLES, Segment, alpaca_prompt, chat_segments, encode_segments, format_fields,
                        model_segments, prompt_response_segments)
from .tokenizer import ENCODE_BATCH, Tokenizer

ROW_FORMATS = ("auto", "alpaca", "chat", "sharegpt")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def detect_format(row: Mapping[str, Any], instruction_field: str = "instruction", number: int = 0) -> str:
    """'chat' when the row has messages, 'sharegpt' for conversations, 'alpaca' for an instruction field.
    number: the row's number in its source, for the error."""
    for field, format in (("messages", "chat"), ("conversations", "sharegpt"), (instruction_field, "alpaca")):
        if field in row:
            return format
    raise RowError(number, f"cannot detect the format from its fields ({field_names(row)}); expected "
                     f"'messages' (chat), 'conversations' (sharegpt) or {instruction_field!r} (alpaca), "
                     "or pass format= and the *_field options")


@dataclasses.dataclass
class SFTStats:
    """The rows that did not go into training as they were, by row number, so bad data can be found."""

    rows: int = 0
    truncated: list[int] = dataclasses.field(default_factory=list)  # cut to max_len positions
    dropped: list[int] = dataclasses.field(default_factory=list)  # too long, see the module docstring
    empty: list[int] = dataclasses.field(default_factory=list)  # an empty response

    @property
    def kept(self) -> int:
        return self.rows - len(self.dropped) - len(self.empty)

    def __str__(self) -> str:
        return (f"{self.kept} of {self.rows} rows kept; {len(self.truncated)} truncated to max_len, "
                f"{len(self.dropped)} dropped as too long, {len(self.empty)} skipped for an empty response")


class FineTuningDataset(Dataset):
    """Tokenized SFT examples; item i is {"input_ids", "targets", "loss_mask"}, each [length].

    template: "alpaca", "chat" (<|role|> turns), "model" (the tokenizer's Jinja chat template), or a
    format string over the row's fields that ends with the response slot, e.g. "Q: {instruction}\\nA: {output}".
    Alpaca rows also work with "chat" and "model": instruction and input become the user's message.
    max_len is the number of positions an example may have (the model's max_seq_len at most).
    row_numbers: the rows' numbers in their source (default 0, 1, ...), which errors (RowError) and
    `stats` report, so that a bad row is found in the file even when validation rows were held out.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *, template: str, max_len: int,
                 format: str = "auto", train_on_prompt: bool = False, drop_long: bool = False,
                 special_tokens: bool = True, instruction_field: str = "instruction", input_field: str = "input",
                 output_field: str = "output", messages_field: str | None = None,
                 row_numbers: Sequence[int] | None = None) -> None:
        if special_tokens and tokenizer.eot_id is None:
            raise ValueError("the tokenizer has no eot_token, so the model could never learn to stop; load it "
                             "with eot_token set to the token that ends an answer (e.g. '[EOT]' or '<|im_end|>')")
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be at least 1")
        if format not in ROW_FORMATS:
            raise ValueError(f"unknown format {format!r}; choose one of {', '.join(ROW_FORMATS)}")
        if len(rows) == 0:
            raise ValueError("no rows to fine-tune on")
        if not special_tokens and template in ("chat", "model"):
            raise ValueError(f"template {template!r} marks its turns with special tokens; plain text without them "
                             "takes 'alpaca' or a format string such as '{text}'")
        numbers = list(row_numbers) if row_numbers is not None else list(range(len(rows)))
        self.tokenizer, self.template, self.max_len = tokenizer, template, max_len
        self.format = format
        if format == "auto":  # a format string names its own fields, which are alpaca-like by definition
            named = template in ("alpaca", "chat", "model")
            self.format = detect_format(rows[0], instruction_field, numbers[0]) if named else "alpaca"
        self.train_on_prompt, self.drop_long = train_on_prompt, drop_long
        self.instruction_field, self.input_field, self.output_field = instruction_field, input_field, output_field
        self.messages_field = messages_field or ("conversations" if self.format == "sharegpt" else "messages")
        self.prompt_fields = self._check_template()
        self.pad_id = tokenizer.padding_id
        self.stats = SFTStats(rows=len(rows))
        self.examples: list[tuple[Tensor, Tensor]] = []  # (ids [length + 1], loss_mask [length])
        self.lengths: list[int] = []  # positions per example, for length grouping and packing

        numbered: list[tuple[int, list[Segment]]] = []
        for number, row in zip(numbers, rows):
            try:
                segments = self._segments(row)
            except ValueError as e:
                raise RowError(number, str(e)) from None
            if segments is None:
                self.stats.empty.append(number)
            else:  # without special tokens only the text segments remain; BOT and EOT are the id segments
                numbered.append((number, segments if special_tokens else
                                 [segment for segment in segments if isinstance(segment[0], str)]))
        for start in range(0, len(numbered), ENCODE_BATCH):
            chunk = numbered[start:start + ENCODE_BATCH]
            encoded = encode_segments(tokenizer, [segments for _, segments in chunk], allow_special=template == "model")
            for (number, _), (ids, is_response) in zip(chunk, encoded):
                self._add(number, ids, is_response)
        if not self.examples:
            raise ValueError(f"no usable rows: {self.stats}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids, loss_mask = self.examples[i]
        return {"input_ids": ids[:-1], "targets": ids[1:], "loss_mask": loss_mask}

    def _check_template(self) -> list[str] | None:
        """A format string's prompt fields (None for a named template), after checking it fits the rows."""
        if self.template in ("chat", "model"):
            if self.template == "model" and not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("template 'model' needs the tokenizer's chat template, and this tokenizer has "
                                 "none; use template 'chat' or 'alpaca', or load a tokenizer that has one")
            return None
        fields = None if self.template == "alpaca" else format_fields(self.template, self.output_field)
        if self.format != "alpaca":
            raise ValueError(f"template {self.template!r} takes alpaca rows, but these rows are {self.format} "
                             "conversations; use template 'chat' or 'model'")
        return fields

    def _segments(self, row: Mapping[str, Any]) -> list[Segment] | None:
        """The row in the template as segments, or None when a response is empty."""
        if self.format == "alpaca":
            output = text_of(row, self.output_field)
            if not output.strip():
                return None
            if self.prompt_fields is not None:
                prompt = self.template.removesuffix("{" + self.output_field + "}").format_map(
                    {field: text_of(row, field) for field in self.prompt_fields})
                return prompt_response_segments(self.tokenizer, prompt, output)
            instruction, input = text_of(row, self.instruction_field), text_of(row, self.input_field, required=False)
            if self.template == "alpaca":
                return prompt_response_segments(self.tokenizer, alpaca_prompt(instruction, input), output)
            user = f"{instruction}\n\n{input}" if input.strip() else instruction
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        else:
            messages = self._messages(row)
            answers = [message["content"] for message in messages if message["role"] == "assistant"]
            if not answers or not all(answer.strip() for answer in answers):
                return None
        if self.template == "chat":
            return chat_segments(self.tokenizer, messages)
        return model_segments(self.tokenizer, messages)

    def _messages(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        """The row's conversation as {"role", "content"} messages, ShareGPT's roles renamed."""
        if self.messages_field not in row:
            raise ValueError(f"missing field {self.messages_field!r} (fields present: {field_names(row)}); "
                             "name the conversation field with messages_field=")
        conversation = row[self.messages_field]
        if not isinstance(conversation, list):
            raise ValueError(f"field {self.messages_field!r} must be a list of messages, "
                             f"got {type(conversation).__name__}")
        role_key, content_key, roles = (("from", "value", SHAREGPT_ROLES) if self.format == "sharegpt"
                                        else ("role", "content", {role: role for role in ROLES}))
        messages = []
        for i, message in enumerate(conversation):
            if not isinstance(message, Mapping):
                raise ValueError(f"message {i} must be a dict with {role_key!r} and {content_key!r}, "
                                 f"got {type(message).__name__}")
            for key in (role_key, content_key):
                if key not in message:
                    raise ValueError(f"message {i}: missing field {key!r} (fields present: {field_names(message)}); "
                                     f"{self.format} messages need {role_key!r} and {content_key!r}")
            if message[role_key] not in roles:
                raise ValueError(f"message {i}: unknown role {message[role_key]!r}; accepted: {', '.join(roles)}")
            if not isinstance(message[content_key], str):
                raise ValueError(f"message {i}: field {content_key!r} must be a string, "
                                 f"got {type(message[content_key]).__name__}")
            messages.append({"role": roles[message[role_key]], "content": message[content_key]})
        return messages

    def _add(self, number: int, ids: list[int], is_response: list[bool]) -> None:
        """Store one encoded example, truncating or dropping it when it is longer than max_len."""
        loss_mask = [True] * (len(ids) - 1) if self.train_on_prompt else is_response[1:]
        if not any(loss_mask):  # only possible without special tokens: a one-token text
            self.stats.empty.append(number)
            return
        if len(loss_mask) > self.max_len:
            if self.drop_long:
                self.stats.dropped.append(number)
                return
            ids, loss_mask = ids[:self.max_len + 1], loss_mask[:self.max_len]
            if not any(loss_mask):
                self.stats.dropped.append(number)
                return
            self.stats.truncated.append(number)
        # through numpy: several times faster than torch.tensor(list), which matters for 200K rows
        self.examples.append((torch.from_numpy(np.array(ids, dtype=np.int64)),
                              torch.from_numpy(np.array(loss_mask, dtype=np.bool_))))
        self.lengths.append(len(loss_mask))


def pack_examples(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: longest example first, each into the fullest row it still fits.

    Deterministic, O(n log n), and within a few percent of the lower bound on real data
    (docs/finetuning.md). The order does not matter once the sampler shuffles rows.
    """
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free positions, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if not 0 < lengths[i] <= max_len:
            raise ValueError(f"example {i} has {lengths[i]} positions; packing needs 1 to max_len={max_len}")
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k == len(room):
            rows.append([])
            free, row = max_len, len(rows) - 1
        else:
            free, row = room.pop(k)
        rows[row].append(i)
        bisect.insort(room, (free - lengths[i], row))
    return rows


class PackedDataset(Dataset):
    """A FineTuningDataset's examples packed into rows of up to max_len positions.

    doc_ids number the examples within a row, so that `Batch.attn_mask()` keeps attention inside each
    one; the loss mask is each example's own. RoPE is relative, so an example's loss does not depend
    on where in the row it sits: packed and unpacked training compute the same loss.
    """

    def __init__(self, dataset: FineTuningDataset, max_len: int | None = None) -> None:
        self.dataset, self.pad_id = dataset, dataset.pad_id
        self.rows = pack_examples(dataset.lengths, max_len or dataset.max_len)
        self.lengths = [sum(dataset.lengths[i] for i in row) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        parts = [self.dataset[j] for j in self.rows[i]]
        item = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        item["doc_ids"] = torch.cat([torch.full_like(part["input_ids"], doc) for doc, part in enumerate(parts)])
        return item


class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of examples of similar length, in an order that depends only on (seed, epoch).

    Each epoch shuffles the examples, sorts every mega-batch of `mega_batch` batches by length and cuts
    it into batches, then shuffles the batches; the one holding the longest example goes first, so an
    out-of-memory error shows at the first step rather than hours in. Like DistributedSampler, call
    set_epoch before each epoch; to resume, set_epoch(epoch, start=batches already consumed).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, mega_batch: int = 50,
                 drop_last: bool = False) -> None:
        if batch_size < 1 or mega_batch < 1:
            raise ValueError(f"batch_size={batch_size} and mega_batch={mega_batch} must be at least 1")
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.mega_batch, self.drop_last = mega_batch, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` from its batch number `start` on."""
        self.epoch, self.start = epoch, start

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of an epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.mega_batch
        batches = []
        for start in range(0, len(order), size):
            group = sorted(order[start:start + size], key=lambda i: -self.lengths[i])
            batches += [group[j:j + self.batch_size] for j in range(0, len(group), self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.start:]

    def __len__(self) -> int:
        count = len(self.lengths) // self.batch_size if self.drop_last else -(-len(self.lengths) // self.batch_size)
        return max(count - self.start, 0)


class SFTBatches:
    """The trainer's endless, resumable stream of Batches: length-grouped epochs, one after another.

    Rank r of world_size takes every world_size-th batch of an epoch (the epoch is cut to a multiple of
    world_size, so all ranks take the same number of steps). The position is (epoch, batches taken in
    it), which state_dict() saves and load_state_dict() restores. Packed batches carry doc_ids; the
    trainer passes batch.attn_mask() to the model. Any dataset with `lengths`, `pad_id` and items
    that collate_fn(items, pad_id) makes a Batch of will do (preference pairs: llama/preference.py).
    """

    def __init__(self, dataset: FineTuningDataset, batch_size: int, *, pack: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1,
                 collate_fn: Callable[[Sequence[Any], int], Batch] = collate) -> None:
        self.data = PackedDataset(dataset) if pack else dataset
        self.collate_fn = collate_fn
        self.pad_id, self.rank, self.world_size = dataset.pad_id, rank, world_size
        self.sampler = LengthGroupedSampler(self.data.lengths, batch_size, seed=seed)
        self.epoch, self.position = 0, 0
        self._cached = (0, self._rank_batches(self.sampler.batches(0)))
        # batches each rank takes per epoch: the same in every epoch, which the sampler only reorders
        self.batches_per_epoch = len(self._cached[1])
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.data)} examples make fewer than one batch for each of {world_size} "
                             "processes; lower the batch size or add data")

    def _rank_batches(self, batches: list[list[int]]) -> list[list[int]]:
        """This rank's share of an epoch's batches, the epoch cut to a multiple of world_size."""
        return batches[self.rank:len(batches) - len(batches) % self.world_size:self.world_size]

    def _epoch_batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch, planned once per epoch."""
        if self._cached[0] != self.epoch:
            self._cached = (self.epoch, self._rank_batches(self.sampler.batches(self.epoch)))
        return self._cached[1]

    def __iter__(self) -> SFTBatches:
        return self

    def __next__(self) -> Batch:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        indices = self._epoch_batches()[self.position]
        self.position += 1
        return self.collate_fn([self.data[i] for i in indices], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

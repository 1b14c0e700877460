"""Supervised fine-tuning: learn the responses of instruction or chat rows (finetune.py --task sft, the default).

Only the responses (assistant turns) count in the loss unless --train-on-prompt, and the end-of-text
token after each response always counts: the model learns to stop. --no-special-tokens instead
fine-tunes on plain text alone (--template '{text}' --output-field text), as domain fine-tuning does.
Batches are padded to their longest example and grouped by length, or packed with --pack. The examples
are llama/examples.py's (FineTuningDataset), the loss the Trainer's per-token cross-entropy.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..examples import ROW_FORMATS, FineTuningDataset
from ..settings import option
from . import Task

HEADING = "supervised fine-tuning (--task sft)"


@dataclasses.dataclass
class SFTSettings:
    """The flags of --task sft (the row fields and --template are every text task's: finetune.py's)."""

    format: str = option("auto", "sft row shape: alpaca (instruction/input/output), chat (messages of role/content), "
                                 "sharegpt (conversations of from/value), or auto from the first row (default)",
                         choices=ROW_FORMATS, group=HEADING)
    messages_field: str | None = option(None, "chat rows: the list of messages (default: messages, or "
                                              "conversations for sharegpt)", group=HEADING)
    train_on_prompt: bool = option(False, "sft: count prompt and user tokens in the loss too", group=HEADING)
    no_special_tokens: bool = option(False, "sft: add no BOT and EOT around each example, for plain-text domain "
                                            "fine-tuning (with --template '{text}'): every token after the first "
                                            "counts, and the model learns the text but not where to stop",
                                     group=HEADING)
    pack: bool = option(False, "pack several examples into each sequence; attention stays within each example",
                        group=HEADING)


class SFT(Task):
    name = "sft"
    summary = "learn the responses of instruction or chat rows"
    Settings = SFTSettings
    DEFINES_RUN = ("format", "messages_field", "train_on_prompt", "no_special_tokens", "pack")
    needs_language_model = "SFT needs a language model, or train the classifier with --task classify"

    def dataset(self, s: Any, model, tokenizer, rows, numbers: list[int], train: Any = None) -> FineTuningDataset:
        return FineTuningDataset([rows[i] for i in numbers], row_numbers=numbers, tokenizer=tokenizer,
                                 template=s.template, format=s.format,
                                 max_len=min(s.max_len, model.config.max_seq_len - 1),
                                 train_on_prompt=s.train_on_prompt, drop_long=s.drop_long,
                                 special_tokens=not s.no_special_tokens, instruction_field=s.instruction_field,
                                 input_field=s.input_field, output_field=s.output_field,
                                 messages_field=s.messages_field)


TASK = SFT()

"""Sequence classification: a Llama with a label head, trained by the same loop as everything else.

    classifier = LlamaClassifier.from_backbone(model, ["negative", "neutral", "positive"])
    classify(classifier, tokenizer, ["what a lovely day"])   # [("positive", 0.93)]

Like transformers' GPT2ForSequenceClassification, the logits are `score(h)`, where h is the final
hidden state of each row's last real token (rows are right-padded; causal attention means that token
has read the whole text) and `score` is a bias-free Linear(hidden_size, num_labels).

An example is the project's one `Batch` type: loss_mask is True only at the last real token, and
targets holds the label id there. So `LlamaClassifier.loss` has Llama.loss's signature and meaning
(cross-entropy where loss_mask counts), and the Trainer, padding, length grouping, even packing (each
packed text's last token counts), all work unchanged.

A classifier checkpoint is a model folder plus classifier.json (the label names); score.weight sits in
model.safetensors beside the backbone's weights under their usual names. load_pretrained returns a
LlamaClassifier for such a folder.

The metrics are written out here (no scikit-learn): accuracy, macro-F1 and the multi-class Matthews
correlation (Gorodkin 2004), the GLUE metric of CoLA.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .. import cpu_kernels
from ..batch import Batch, collate
from ..config import LlamaConfig
from ..model import Llama
from ..rows import RowError, field_names, text_of
from ..files import read_json
from ..settings import option
from ..tokenizer import ENCODE_BATCH, Tokenizer
from . import Task

PAIR_SEPARATOR = "\n"  # between the two texts of a sentence pair


class LlamaClassifier(Llama):
    """A Llama whose output is one logit per label, read at the last real token of each row.

    It is a Llama, not a wrapper around one, so every backbone parameter keeps its Llama name: a
    pretrained model's weights, checkpoints, LoRA, FSDP and resume all see the same names, plus
    `score.weight`. The LM head is kept (tied, it is the embedding table) but takes no part; untied,
    it is frozen so that the optimizer and DDP leave it alone.
    """

    def __init__(self, config: LlamaConfig, labels: Sequence[str]) -> None:
        super().__init__(config)
        self.labels = check_labels(labels)
        self.score = score_head(config, len(self.labels))
        if not config.tie_word_embeddings:
            self.lm_head.requires_grad_(False)

    @classmethod
    def from_backbone(cls, backbone: Llama, labels: Sequence[str]) -> LlamaClassifier:
        """A classifier on `backbone`'s weights (shared, not copied) with a new, random score head."""
        with torch.device("meta"):  # no time spent on an init that the backbone's weights replace
            classifier = cls(backbone.config, labels)
        # keep_vars: the backbone's own Parameter objects, so a tied LM head stays tied
        classifier.load_state_dict(backbone.state_dict(keep_vars=True), strict=False, assign=True)
        classifier.rope_cos, classifier.rope_sin = backbone.rope_cos, backbone.rope_sin
        weight = backbone.embed_tokens.weight
        classifier.score = score_head(backbone.config, len(classifier.labels), device=weight.device,
                                      dtype=weight.dtype)
        return classifier

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Label logits [B, num_labels]; row b's real tokens are its first lengths[b] (all when None)."""
        hidden = self.hidden_states(input_ids)
        last = (torch.full((len(input_ids),), input_ids.shape[1], device=input_ids.device)
                if lengths is None else lengths.to(input_ids.device)) - 1
        return self.score(hidden[torch.arange(len(input_ids), device=input_ids.device), last])

    def loss(self, input_ids: Tensor, targets: Tensor, loss_mask: Tensor | None = None, *,
             attn_mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """Cross-entropy of the label logits against targets where loss_mask is set (see the module
        docstring); with loss_mask None, at the last position of every row (rows without padding).

        The logits are computed at every position and masked, which keeps shapes static for
        torch.compile and costs little: num_labels is small.
        """
        if loss_mask is None:
            loss_mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            loss_mask[:, -1] = True
        return self._masked_cross_entropy(self.score.weight, "num_labels", input_ids, targets, loss_mask,
                                          attn_mask, reduction)

    def flops_per_token(self, seq_len: int) -> float:
        """Llama's count without the LM head, which classification never applies."""
        return super().flops_per_token(seq_len) - 6 * self.lm_head.weight.numel()


def score_head(config: LlamaConfig, num_labels: int, **factory: Any) -> nn.Linear:
    """A new label head: a bias-free Linear(hidden_size, num_labels), initialized like the model's weights."""
    head = nn.Linear(config.hidden_size, num_labels, bias=False, **factory)
    nn.init.normal_(head.weight, mean=0.0, std=config.init_std)
    return head


def check_labels(labels: Sequence[str]) -> list[str]:
    """The label names as a list, after checking there are two or more, all distinct non-empty strings."""
    labels = list(labels)
    if not all(isinstance(label, str) for label in labels):
        raise ValueError(f"label names must be strings, got {labels!r}")
    if len(labels) < 2 or not all(labels):
        raise ValueError(f"a classifier needs two or more labels, none of them empty, got {labels!r}")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"labels {repeated} are given more than once in {labels!r}")
    return labels


# --- data --------------------------------------------------------------------------------------------

def label_name(value: Any) -> str:
    """A row's label as a label name: strings as they are, integers (and booleans) as their digits."""
    if isinstance(value, (str, int)):
        return str(value)
    raise ValueError(f"labels must be strings or integers, got {value!r} ({type(value).__name__})")


def collect_labels(rows: Sequence[Mapping[str, Any]], label_field: str = "label",
                   row_numbers: Sequence[int] | None = None) -> list[str]:
    """The distinct labels of the rows, sorted (numerically when all are integers)."""
    values = {}
    for number, row in zip(row_numbers or range(len(rows)), rows):
        if label_field not in row:
            raise RowError(number, f"missing field {label_field!r} (fields present: {field_names(row)})")
        try:
            values[label_name(row[label_field])] = row[label_field]
        except ValueError as e:
            raise RowError(number, str(e)) from None
    numeric = all(isinstance(value, int) for value in values.values())
    names = sorted(values, key=(lambda name: values[name]) if numeric else None)
    if len(names) < 2:
        raise ValueError(f"the rows have {len(names)} label{'s' if len(names) != 1 else ''} ({names}) in field "
                         f"{label_field!r}; a classifier needs two or more, or name them with --labels")
    return names


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str | tuple[str, str]], max_len: int) -> list[list[int]]:
    """BOT + text (a pair joined by PAIR_SEPARATOR), cut to its first max_len tokens."""
    joined = [text if isinstance(text, str) else PAIR_SEPARATOR.join(text) for text in texts]
    bot = [] if tokenizer.bot_id is None else [tokenizer.bot_id]
    encoded = []
    for start in range(0, len(joined), ENCODE_BATCH):
        encoded += [(bot + ids)[:max_len] for ids in tokenizer.encode_batch(joined[start:start + ENCODE_BATCH])]
    return encoded


def example(ids: Sequence[int] | Tensor, label: int) -> dict[str, Tensor]:
    """One text as a Batch row: the loss counts only at its last token, whose target is the label."""
    input_ids = torch.as_tensor(ids, dtype=torch.int64)
    targets = torch.zeros_like(input_ids)
    targets[-1] = label
    loss_mask = torch.zeros(len(input_ids), dtype=torch.bool)
    loss_mask[-1] = True
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask}


@dataclasses.dataclass
class ClassificationStats:
    """Rows that did not go into training as they were, by row number."""

    rows: int = 0
    truncated: list[int] = dataclasses.field(default_factory=list)  # cut to max_len tokens
    empty: list[int] = dataclasses.field(default_factory=list)  # no text: skipped

    def __str__(self) -> str:
        return (f"{self.rows - len(self.empty)} of {self.rows} rows kept; {len(self.truncated)} truncated to "
                f"max_len, {len(self.empty)} skipped for an empty text")


class ClassificationDataset(Dataset):
    """Labelled texts; item i is {"input_ids", "targets", "loss_mask"}, each [length] (see `example`).

    labels: the label names in score-row order; None collects them, sorted, from these rows (give the
    training set's to the validation set, so both use the same ids). A label outside them is an error
    that names the row. row_numbers: the rows' numbers in the source, for error messages (default
    0, 1, ...). Rows whose text is empty are skipped and counted in `stats`.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *, max_len: int,
                 text_field: str = "text", text_pair_field: str | None = None, label_field: str = "label",
                 labels: Sequence[str] | None = None, row_numbers: Sequence[int] | None = None) -> None:
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be at least 1")
        if len(rows) == 0:
            raise ValueError("no rows to classify")
        row_numbers = list(row_numbers) if row_numbers is not None else list(range(len(rows)))
        self.labels = check_labels(labels) if labels is not None else collect_labels(rows, label_field, row_numbers)
        self.max_len = max_len
        self.pad_id = tokenizer.padding_id
        self.stats = ClassificationStats(rows=len(rows))
        ids_of = {label: i for i, label in enumerate(self.labels)}
        texts, label_ids, kept = [], [], []
        for number, row in zip(row_numbers, rows):
            try:
                text = [_row_text(row, field) for field in (text_field, text_pair_field) if field is not None]
                if label_field not in row:
                    raise ValueError(f"missing field {label_field!r} (fields present: {field_names(row)})")
                label = label_name(row[label_field])
                if label not in ids_of:
                    raise ValueError(f"unknown label {row[label_field]!r} in field {label_field!r}; the known "
                                     f"labels are {', '.join(self.labels)} (name them all with --labels)")
            except ValueError as e:
                raise RowError(number, str(e)) from None
            if not all(part.strip() for part in text):
                self.stats.empty.append(number)
                continue
            texts.append(text[0] if len(text) == 1 else tuple(text))
            label_ids.append(ids_of[label])
            kept.append(number)
        if not texts:
            raise ValueError(f"no usable rows: {self.stats}")
        uncut = encode_texts(tokenizer, texts, max_len + 1)  # one more token shows which were cut
        self.stats.truncated = [number for number, ids in zip(kept, uncut) if len(ids) > max_len]
        # through numpy: much faster than torch.tensor(list) for many rows
        self.examples = [(np.array(ids[:max_len], dtype=np.int64), label) for ids, label in zip(uncut, label_ids)]
        self.lengths = [len(ids) for ids, _ in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids, label = self.examples[i]
        return example(torch.from_numpy(ids), label)


def _row_text(row: Mapping[str, Any], field: str) -> str:
    """row[field] as text; an empty cell (None, as `datasets` reads a blank CSV field) is ""."""
    return "" if field in row and row[field] is None else text_of(row, field)


# --- inference and metrics ---------------------------------------------------------------------------

@torch.no_grad()
def classify(model: LlamaClassifier, tokenizer: Tokenizer, texts: str | Sequence[str | tuple[str, str]], *,
             batch_size: int = 32) -> list[tuple[str, float]]:
    """(label, probability) of the most likely label for each text or (text, pair), as transformers'
    text-classification pipeline gives. Texts longer than the context keep their first tokens."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, text in enumerate(texts):
        parts = [text] if isinstance(text, str) else list(text)
        if not (1 <= len(parts) <= 2 and all(isinstance(part, str) for part in parts)):
            raise ValueError(f"text {i} must be a string or a pair of strings, got {text!r}")
        if not all(part.strip() for part in parts):
            raise ValueError(f"text {i} is empty; give some text to classify")
    device = model.embed_tokens.weight.device
    cpu_kernels.install(model)  # bf16 on a CPU runs through llama/cpu_kernels.py; a no-op otherwise
    results = []
    encoded = encode_texts(tokenizer, texts, model.config.max_seq_len)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        batch = collate([example(ids, 0) for ids in chunk], pad_id=tokenizer.padding_id)
        lengths = torch.tensor([len(ids) for ids in chunk])
        probabilities = model(batch.input_ids.to(device), lengths).float().softmax(dim=-1)
        best, index = probabilities.max(dim=-1)
        results += [(model.labels[i], p) for i, p in zip(index.tolist(), best.tolist())]
    return results


@torch.no_grad()
def evaluate_classifier(model: LlamaClassifier, batches: Iterable[Batch]) -> dict[str, float]:
    """The mean cross-entropy, accuracy, macro-F1 and MCC of the label logits at the counted positions,
    from one forward pass per batch: the Trainer's eval_metrics."""
    predicted, actual, loss_sum = [], [], 0.0
    for batch in batches:
        hidden = model.hidden_states(batch.input_ids, attn_mask=batch.attn_mask())
        logits, targets = model.score(hidden[batch.loss_mask]).float(), batch.targets[batch.loss_mask]
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        predicted.append(logits.argmax(dim=-1))
        actual.append(targets)
    predicted, actual = torch.cat(predicted), torch.cat(actual)
    return {"val_loss": loss_sum / max(len(actual), 1), "val_accuracy": accuracy(predicted, actual),
            "val_macro_f1": macro_f1(predicted, actual, len(model.labels)),
            "val_mcc": matthews_corrcoef(predicted, actual, len(model.labels))}


def confusion_matrix(predicted: Sequence[int] | Tensor, actual: Sequence[int] | Tensor,
                     num_labels: int | None = None) -> Tensor:
    """[num_labels, num_labels] counts: row = actual label, column = predicted label (scikit-learn's layout)."""
    predicted, actual = torch.as_tensor(predicted).long().cpu(), torch.as_tensor(actual).long().cpu()
    if predicted.shape != actual.shape or predicted.dim() != 1:
        raise ValueError(f"predicted and actual must be equal-length 1-d sequences, got shapes "
                         f"{tuple(predicted.shape)} and {tuple(actual.shape)}")
    if num_labels is None:
        num_labels = int(max(predicted.max(), actual.max())) + 1 if len(actual) else 0
    if len(actual) and (min(predicted.min(), actual.min()) < 0 or max(predicted.max(), actual.max()) >= num_labels):
        raise ValueError(f"label ids must be in [0, {num_labels - 1}] for {num_labels} labels")
    return torch.bincount(actual * num_labels + predicted, minlength=num_labels * num_labels).view(num_labels, num_labels)


def accuracy(predicted: Sequence[int] | Tensor, actual: Sequence[int] | Tensor) -> float:
    """The share of predictions equal to the actual label (0 for no predictions)."""
    matrix = confusion_matrix(predicted, actual)
    return matrix.trace().item() / max(1, matrix.sum().item())


def macro_f1(predicted: Sequence[int] | Tensor, actual: Sequence[int] | Tensor, num_labels: int | None = None) -> float:
    """The unweighted mean of each label's F1 = 2TP / (2TP + FP + FN), over the labels that occur as
    actual or predicted (scikit-learn's f1_score(average="macro")); 0 for no predictions."""
    matrix = confusion_matrix(predicted, actual, num_labels).double()
    true_positives = matrix.diagonal()
    occurrences = matrix.sum(dim=0) + matrix.sum(dim=1)  # = 2TP + FP + FN
    present = occurrences > 0
    return (2 * true_positives[present] / occurrences[present]).mean().item() if present.any() else 0.0


def matthews_corrcoef(predicted: Sequence[int] | Tensor, actual: Sequence[int] | Tensor,
                      num_labels: int | None = None) -> float:
    """The Matthews correlation for any number of labels (Gorodkin's R_K), 0 where it is undefined.

    With C the confusion matrix, s samples, c = trace(C) correct, t_k actual and p_k predicted counts:
    (c s - sum p_k t_k) / sqrt((s^2 - sum p_k^2) (s^2 - sum t_k^2)). A constant prediction (or a single
    actual label) makes the denominator 0; like scikit-learn, that scores 0.
    """
    matrix = confusion_matrix(predicted, actual, num_labels).double()
    s, c = matrix.sum().item(), matrix.trace().item()
    t, p = matrix.sum(dim=1), matrix.sum(dim=0)
    denominator = (s * s - (p * p).sum().item()) * (s * s - (t * t).sum().item())
    return 0.0 if denominator == 0 else (c * s - (p * t).sum().item()) / math.sqrt(denominator)


# --- the plug-in: finetune.py --task classify ---------------------------------------------------------

CLASSIFIER_FILE = "classifier.json"  # {"labels": [...]}: the label names of a checkpoint's head
HEADING = "classification (--task classify)"


@dataclasses.dataclass
class ClassifySettings:
    """The flags of --task classify."""

    text_field: str = option("text", "the field holding the text to classify (default: text; GLUE's CoLA and SST-2 "
                                     "call it sentence)", group=HEADING)
    text_pair_field: str | None = option(None, "a second text for sentence-pair tasks, joined to the first with a "
                                               "newline (default: none)", group=HEADING)
    label_field: str = option("label", "the field holding the label, a string or an integer (default: label)",
                              group=HEADING)
    labels: str | None = option(None, "comma-separated label names in the order of the head's outputs, e.g. "
                                      "negative,neutral,positive; a row with any other label is an error (default: "
                                      "the training rows' labels, sorted; integers numerically)", group=HEADING)


class Classify(Task):
    """A new label head on the model, trained with it to give each row's text the row's label; validation
    adds accuracy, macro-F1 and the Matthews correlation. Checkpoints add classifier.json (the labels)."""

    name = "classify"
    summary = "learn each text's label with a new label head"
    Settings = ClassifySettings
    DEFINES_RUN = ("text_field", "text_pair_field", "label_field", "labels")
    generates = False
    loss_label = "loss (cross-entropy per example)"
    def check(self, s: Any) -> None:
        if s.save_adapter_only:
            raise ValueError("--save-adapter-only would leave the trained label head out of the checkpoints; "
                             "leave it out with --task classify")

    def dataset(self, s: Any, model, tokenizer, rows, numbers: list[int], train: Any = None) -> ClassificationDataset:
        if train is None:
            try:
                labels = None if s.labels is None else check_labels([name.strip() for name in s.labels.split(",")])
            except ValueError as e:
                raise ValueError(f"--labels {s.labels}: {e}") from None
        else:
            labels = train.labels
        return ClassificationDataset([rows[i] for i in numbers], labels=labels, row_numbers=numbers,
                                     tokenizer=tokenizer, max_len=min(s.max_len, model.config.max_seq_len),
                                     text_field=s.text_field, text_pair_field=s.text_pair_field,
                                     label_field=s.label_field)

    def token_ids(self, dataset: Any) -> Iterator[Any]:
        return (dataset[i]["input_ids"] for i in range(len(dataset)))  # a target is a label, checked by the dataset

    def model(self, s: Any, model, train: ClassificationDataset) -> LlamaClassifier:
        """The model with a new label head, or the model itself when it already classifies into these labels."""
        if not isinstance(model, LlamaClassifier):
            return LlamaClassifier.from_backbone(model, train.labels)
        if model.labels != train.labels:
            raise ValueError(f"{s.model} classifies into {', '.join(model.labels)}, but this run's labels are "
                             f"{', '.join(train.labels)}; pass --labels {','.join(model.labels)} to keep its head")
        return model

    def after_adapters(self, model) -> None:
        model.score.requires_grad_(True)  # the new head has nothing pretrained to adapt: it trains whole

    def eval_metrics(self, s: Any, tokenizer) -> Any:
        return evaluate_classifier

    def describe(self, model) -> str:
        return f"; labels {', '.join(model.labels)}"

    def what(self, model) -> str:
        return f"a sequence classifier (labels {', '.join(model.labels)})"

    def owns(self, model) -> bool:
        return isinstance(model, LlamaClassifier)

    def files(self, model) -> dict[str, Any]:
        return {CLASSIFIER_FILE: {"labels": model.labels}}

    FILES = (CLASSIFIER_FILE,)

    def check_hf_export(self) -> None:
        raise ValueError("a LlamaClassifier exports only in our format for now; pass format='ours'")

    def recognizes(self, folder: Path) -> bool:
        return (folder / CLASSIFIER_FILE).is_file()

    def builder(self, folder: Path):
        path = folder / CLASSIFIER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is recorded as a classifier, but it has no {CLASSIFIER_FILE}; "
                                    "copy the whole checkpoint folder")
        try:
            labels = check_labels(read_json(path).get("labels", []))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return lambda config: LlamaClassifier(config, labels)

    def not_mine(self, path) -> str:
        return (f"{path} holds a language model, not a classifier (it has no {CLASSIFIER_FILE}); train one with "
                "finetune.py --task classify")

    generate_hint = "to classify texts with it"

    def answer_lines(self, model, tokenizer, text: str) -> Iterator[str]:
        for label, probability in classify(model, tokenizer, [line for line in text.splitlines() if line.strip()]):
            yield f"{label}\t{probability:.4f}"


TASK = Classify()


def load_classifier(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> tuple[LlamaClassifier, Tokenizer]:
    """A trained classifier and its tokenizer from a checkpoint or run folder."""
    from ..hub import load_pretrained

    model, tokenizer = load_pretrained(path, dtype=dtype, device=device)
    if not isinstance(model, LlamaClassifier):
        raise ValueError(TASK.not_mine(path))
    return model, tokenizer

"""Benchmark scores that equal lm-evaluation-harness's, item by item, computed faster.

A task turns each document of its split into requests, as lm-evaluation-harness 0.4 (its `hf` backend,
plain text, no chat template) builds them:
- multiple choice (PIQA, HellaSwag, ARC, MMLU): the context `prompt(doc)` continued by " " + each choice;
  `acc` picks the choice with the highest summed log-likelihood, `acc_norm` the highest divided by the
  choice's length in characters;
- partial scoring (WinoGrande): one continuation, the sentence after the blank, under two contexts;
- last-word prediction (LAMBADA): `acc` is whether greedy decoding gives the last word, `perplexity`
  exp(-mean log-likelihood);
- generation (GSM8K): greedy until a stop string, the answer taken by the `strict-match` (`#### N`) and
  `flexible-extract` (last number) filters, each scored as exact match.
Few-shot examples come from the task's few-shot split, drawn for each document in order by one
`random.Random(1234)` (or the first k, for MMLU), as the harness draws them; where the few-shot split is
the evaluated one, the document itself is left out.

Scoring is where the speed comes from. A context and continuation are tokenized as the harness does
(trailing spaces of the context move to the continuation; the continuation's tokens are those of the
whole text after the context's), and the input is left-truncated to the model's context. Requests whose
inputs are identical (MMLU's four one-token letters) share one forward. The rest are sorted by length and
batched with right padding, which a causal model never attends to, so no mask is needed and little is
wasted; and the LM head and log-softmax run only at the positions a continuation is read from.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from .engine import Engine, SamplingParams
from .model import KVCache, Llama
from .tokenizer import Tokenizer

FEWSHOT_SEED = 1234  # lm-evaluation-harness's default --fewshot_random_seed


# --- tasks ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark as lm-evaluation-harness defines it: where its documents are and how each is asked.

    kind: "multiple_choice", "multiple_input" (WinoGrande), "loglikelihood" (LAMBADA) or "generate".
    prompt(doc) is the question text; choices(doc) the options (for multiple_input, the contexts);
    target(doc) the gold: a choice index, or for loglikelihood and multiple_input the continuation, or
    for generate the reference answer. answer(doc) is what a few-shot example shows after its prompt.
    """

    name: str
    kind: str
    folder: str  # data/FOLDER
    split: str  # the file of the scored split, in the folder
    fewshot_split: str | None  # the file of the few-shot examples (None: the scored split, doc left out)
    prompt: Callable[[dict], str]
    target: Callable[[dict], Any]
    choices: Callable[[dict], list[str]] | None = None
    answer: Callable[[dict], str] | None = None
    description: Callable[[dict], str] = lambda doc: ""
    fewshot_sampler: str = "random"  # or "first_n"
    fewshot_group: Callable[[dict], str] | None = None  # few-shot examples from the same group (MMLU's subject)
    num_fewshot: int = 0
    metrics: tuple[str, ...] = ("acc",)
    stop: tuple[str, ...] = ()
    max_gen_tokens: int = 256
    source: str = ""  # the hub dataset lm-evaluation-harness reads
    read: Callable[[Path, str], list[dict]] | None = None  # a split's documents from its file (default JSONL)


def read_jsonl(path: Path) -> list[dict]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON object: {error.msg}") from None
    return docs


def _read_piqa(folder: Path, split: str) -> list[dict]:
    """PIQA's own layout: SPLIT.jsonl of {goal, sol1, sol2} and SPLIT-labels.lst, one label a line."""
    docs = read_jsonl(folder / f"{split}.jsonl")
    labels_path = folder / f"{split}-labels.lst"
    labels = labels_path.read_text(encoding="utf-8").split()
    if len(labels) != len(docs):
        raise ValueError(f"{labels_path} has {len(labels)} labels for the {len(docs)} rows of {split}.jsonl")
    return [{**doc, "label": int(label)} for doc, label in zip(docs, labels)]


def _hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's hellaswag preprocess: WikiHow's bracketed artifacts removed."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag_query(doc: dict) -> str:
    return _hellaswag_text(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())


def _winogrande_contexts(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _winogrande_continuation(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def _mmlu_prompt(doc: dict) -> str:
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def _arc_task(name: str, folder: str, config: str) -> Task:
    return Task(name, "multiple_choice", folder, "test", "train",
                prompt=lambda doc: f"Question: {doc['question']}\nAnswer:",
                choices=lambda doc: list(doc["choices"]["text"]),
                target=lambda doc: list(doc["choices"]["label"]).index(doc["answerKey"]),
                metrics=("acc", "acc_norm"), source=f"allenai/ai2_arc ({config}, test)")


TASKS: dict[str, Task] = {task.name: task for task in [
    Task("piqa", "multiple_choice", "piqa", "valid", "train",
         prompt=lambda doc: f"Question: {doc['goal']}\nAnswer:", choices=lambda doc: [doc["sol1"], doc["sol2"]],
         target=lambda doc: doc["label"], metrics=("acc", "acc_norm"), read=_read_piqa,
         source="baber/piqa (validation); PIQA's own valid.jsonl and valid-labels.lst"),
    Task("hellaswag", "multiple_choice", "hellaswag", "validation", "train",
         prompt=_hellaswag_query, choices=lambda doc: [_hellaswag_text(e) for e in doc["endings"]],
         target=lambda doc: int(doc["label"]), metrics=("acc", "acc_norm"), source="Rowan/hellaswag (validation)"),
    _arc_task("arc_easy", "arc_easy", "ARC-Easy"),
    _arc_task("arc_challenge", "arc_challenge", "ARC-Challenge"),
    Task("winogrande", "multiple_input", "winogrande", "validation", "train",
         prompt=lambda doc: "", choices=_winogrande_contexts, target=_winogrande_continuation,
         metrics=("acc",), source="allenai/winogrande (winogrande_xl, validation)"),
    Task("lambada_openai", "loglikelihood", "lambada_openai", "test", None,
         prompt=lambda doc: " ".join(doc["text"].split(" ")[:-1]),
         target=lambda doc: " " + doc["text"].split(" ")[-1], metrics=("perplexity", "acc"),
         source="EleutherAI/lambada_openai (default, test)"),
    Task("mmlu", "multiple_choice", "mmlu", "test", "dev", prompt=_mmlu_prompt,
         choices=lambda doc: ["A", "B", "C", "D"], target=lambda doc: int(doc["answer"]),
         description=lambda doc: ("The following are multiple choice questions (with answers) about "
                                  f"{' '.join(doc['subject'].split('_'))}.\n\n"),
         fewshot_sampler="first_n", fewshot_group=lambda doc: doc["subject"], metrics=("acc",),
         source="cais/mmlu (all, test; few-shot from dev)"),
    Task("gsm8k", "generate", "gsm8k", "test", "train",
         prompt=lambda doc: f"Question: {doc['question']}\nAnswer:", target=lambda doc: doc["answer"],
         answer=lambda doc: doc["answer"], num_fewshot=5, metrics=("exact_match,strict-match",
                                                                   "exact_match,flexible-extract"),
         stop=("Question:", "</s>", "<|im_end|>"), source="openai/gsm8k (main, test; few-shot from train)"),
]}

# The chance accuracy of each multiple-choice task, for the centered accuracy (nanochat's CORE metric).
CHANCE = {"piqa": 1 / 2, "hellaswag": 1 / 4, "arc_easy": 1 / 4, "arc_challenge": 1 / 4, "winogrande": 1 / 2,
          "mmlu": 1 / 4}


def task(name: str) -> Task:
    """The task of that name; an unknown name lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    return TASKS[name]


def reader(t: Task) -> Callable[[Path, str], list[dict]]:
    """How the task reads a split's documents from its folder: its own `read`, else SPLIT.jsonl."""
    return t.read or (lambda folder, split: read_jsonl(folder / f"{split}.jsonl"))


def load_docs(t: Task, data_dir: Path) -> tuple[list[dict], list[dict] | None]:
    """The scored split's documents and the few-shot split's (None where its file is absent)."""
    folder = Path(data_dir) / t.folder
    read = reader(t)
    if not _split_exists(folder, t.split):
        raise FileNotFoundError(f"no {t.name} data in {folder}: python3 data/download.py {t.folder} "
                                f"(or --data-dir DIR, a folder holding {t.folder}/)")
    docs = read(folder, t.split)
    fewshot = read(folder, t.fewshot_split) if t.fewshot_split and _split_exists(folder, t.fewshot_split) else None
    return docs, fewshot


def _split_exists(folder: Path, split: str) -> bool:
    return (folder / f"{split}.jsonl").is_file()


# --- prompts ----------------------------------------------------------------------------------------

def shot_text(t: Task, doc: dict) -> str:
    """A few-shot example as the harness writes it: question, " ", answer, blank line."""
    if t.kind == "multiple_input":
        question, answer = t.choices(doc)[["1", "2"].index(doc["answer"])], t.target(doc)
    elif t.kind == "generate":
        question, answer = t.prompt(doc), t.answer(doc)
    elif t.kind == "loglikelihood":
        question, answer = t.prompt(doc), t.target(doc)
    else:
        question, answer = t.prompt(doc), t.choices(doc)[t.target(doc)]
    return f"{question} {answer}\n\n"


class FewShot:
    """The examples of each document, drawn in document order as lm-evaluation-harness draws them."""

    def __init__(self, t: Task, docs: list[dict], fewshot_docs: list[dict] | None, k: int, seed: int = FEWSHOT_SEED):
        self.task, self.k, self.rng = t, k, random.Random(seed)
        self.from_scored_split = fewshot_docs is None
        self.pool = docs if fewshot_docs is None else fewshot_docs
        if t.fewshot_group is not None:
            groups: dict[str, list[dict]] = {}
            for doc in self.pool:
                groups.setdefault(t.fewshot_group(doc), []).append(doc)
            self.groups = groups
        available = len(self.pool) - (1 if self.from_scored_split else 0)
        if t.fewshot_group is not None:
            available = min((len(g) for g in self.groups.values()), default=0)
        if k > available:
            where = f"{t.name}'s {'scored' if self.from_scored_split else 'few-shot'} split"
            raise ValueError(f"--num-fewshot {k} is more than the {available} examples {where} holds")

    def examples(self, doc: dict) -> list[dict]:
        if self.k == 0:
            return []
        pool = self.groups[self.task.fewshot_group(doc)] if self.task.fewshot_group is not None else self.pool
        if self.task.fewshot_sampler == "first_n":
            return [d for d in pool if d != doc][:self.k] if self.from_scored_split else pool[:self.k]
        if not self.from_scored_split:
            return self.rng.sample(pool, self.k)
        drawn = [d for d in self.rng.sample(pool, self.k + 1) if d != doc][:self.k]
        if len(drawn) < self.k:
            drawn = self.rng.sample([d for d in pool if d != doc], self.k)
        return drawn


def contexts(t: Task, doc: dict, shots: Sequence[dict]) -> list[str]:
    """The context(s) a document is asked in: the description, the examples, then its own prompt."""
    head = t.description(doc) + "".join(shot_text(t, shot) for shot in shots)
    if t.kind == "multiple_input":
        return [head + context for context in t.choices(doc)]
    return [head + t.prompt(doc)]


def requests(t: Task, doc: dict, shots: Sequence[dict]) -> list[tuple[str, str]]:
    """The (context, continuation) pairs whose log-likelihoods score a document."""
    (first, *rest) = contexts(t, doc, shots)
    if t.kind == "multiple_choice":
        return [(first, " " + choice) for choice in t.choices(doc)]
    if t.kind == "multiple_input":
        return [(context, " " + t.target(doc)) for context in [first, *rest]]
    if t.kind == "loglikelihood":
        return [(first, t.target(doc))]
    raise ValueError(f"{t.name} generates; it has no log-likelihood requests")


# --- scoring ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Score:
    """One request's result: the continuation's summed log-probability, whether greedy decoding gives it,
    its token count, and whether the input was cut on the left to fit the context."""

    loglikelihood: float
    greedy: bool
    tokens: int
    truncated: bool


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, as lm-evaluation-harness splits them: trailing spaces of
    the context go to the continuation, and the continuation is what the whole text has after the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:  # nothing to condition on: the end-of-text token stands in, as in the harness
        prefix = tokenizer.eot_id if tokenizer.eot_id is not None else tokenizer.bot_id
        return [prefix], tokenizer.encode(continuation)
    whole, head = tokenizer.encode_batch([context + continuation, context])
    return head, whole[len(head):]


@torch.no_grad()
def loglikelihoods(model: Llama, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32,
                   progress: bool = False, desc: str = "scoring") -> list[Score]:
    """Score each (context, continuation): the summed log-probability of the continuation's tokens after
    the context, and whether each is the argmax. Inputs longer than the model's context lose their left end.

    Continuations of one context (a multiple-choice item's choices) share its forward: the context runs
    once into a KV cache, which each continuation then extends. Other requests run whole, those with
    identical inputs once."""
    limit = model.config.max_seq_len
    encoded = [encode_pair(tokenizer, context, continuation) for context, continuation in pairs]
    truncated = [len(head) + len(tail) > limit + 1 for head, tail in encoded]
    by_context: dict[tuple[int, ...], list[int]] = {}
    inputs: dict[tuple[int, ...], list[int]] = {}  # input ids -> the requests it serves
    for i, (head, tail) in enumerate(encoded):
        if not tail:
            raise ValueError(f"request {i} has an empty continuation: {pairs[i][1]!r}")
        if not truncated[i] and len(tail) > 1:
            by_context.setdefault(tuple(head), []).append(i)
        else:
            inputs.setdefault(tuple((head + tail)[-(limit + 1):][:-1]), []).append(i)
    for context, members in list(by_context.items()):
        # Sharing pays where a context is long and its continuations short (HellaSwag, ARC, few-shot prompts).
        # One continuation gains nothing, and a short context with long continuations (PIQA) runs whole: the
        # continuations' padding to a batch's longest would cost more than the context saves.
        if len(members) == 1 or len(context) < max(len(encoded[i][1]) for i in members):
            del by_context[context]
            for i in members:
                inputs.setdefault(tuple((encoded[i][0] + encoded[i][1])[:-1]), []).append(i)
    results: list[Score | None] = [None] * len(pairs)
    bar = tqdm(total=len(pairs), desc=desc, unit="request", disable=not progress)

    def done(scores: list[tuple[int, float, bool, int]]) -> None:
        for i, loglikelihood, greedy, n in scores:
            results[i] = Score(loglikelihood, greedy, n, truncated[i])
        bar.update(len(scores))

    # longest first (a batch too big for memory fails at once), so that continuations of like length go together
    contexts = sorted(by_context, key=lambda c: len(c) + max(len(encoded[i][1]) for i in by_context[c]), reverse=True)
    batch: list[tuple[int, ...]] = []
    for context in contexts + [None]:  # batches of whole contexts, up to batch_size continuations each
        if batch and (context is None or sum(len(by_context[c]) for c in batch) + len(by_context[context]) > batch_size):
            done(_score_shared_contexts(model, batch, [[(i, encoded[i][1]) for i in by_context[c]] for c in batch]))
            batch = []
        if context is not None:
            batch.append(context)
    order = sorted(inputs, key=len, reverse=True)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        done(_score_whole(model, batch, [[(i, encoded[i][1]) for i in inputs[key]] for key in batch]))
    bar.close()
    return results


def _score_whole(model: Llama, batch: list[tuple[int, ...]], requests: list[list[tuple[int, list[int]]]]):
    """Requests that run whole: one row per distinct input, right-padded (a causal model never looks at it)."""
    device = model.embed_tokens.weight.device
    ids = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
    for row, key in enumerate(batch):
        ids[row, :len(key)] = torch.tensor(key)
    hidden = model.hidden_states(ids.to(device))
    rows, positions, picked = [], [], []
    for row, (key, served) in enumerate(zip(batch, requests)):
        for i, tail in served:
            tail = tail[-len(key):]  # all of it, unless truncation reached into it
            rows += [row] * len(tail)
            positions += range(len(key) - len(tail), len(key))
            picked.append((i, tail))
    return _read_scores(model, hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)], picked)


def _score_shared_contexts(model: Llama, contexts: list[tuple[int, ...]], requests: list[list[tuple[int, list[int]]]]):
    """Continuations that share a context: the contexts run once, right-padded, into a KV cache; then each
    continuation (but its last token) runs on a copy of its context's cache rows, at its own positions."""
    device = model.embed_tokens.weight.device
    width = max(len(context) for context in contexts)
    fed = max(len(tail) - 1 for served in requests for _, tail in served)
    ids = torch.zeros(len(contexts), width, dtype=torch.long)
    for row, context in enumerate(contexts):
        ids[row, :len(context)] = torch.tensor(context)
    dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)  # training's evaluation
             else model.embed_tokens.weight.dtype)
    cache = KVCache(model.config, len(contexts), width + fed, dtype=dtype, device=device)
    context_hidden = model.hidden_states(ids.to(device), cache)
    owners = [(row, i, tail) for row, served in enumerate(requests) for i, tail in served]
    rows = torch.tensor([row for row, _, _ in owners], device=device)
    branches = KVCache(model.config, len(owners), width + fed, dtype=cache.keys.dtype, device=device)
    torch.index_select(cache.keys, 1, rows, out=branches.keys)
    torch.index_select(cache.values, 1, rows, out=branches.values)
    start = torch.tensor([len(contexts[row]) for row, _, _ in owners], device=device)
    steps = torch.arange(fed, device=device)
    branches.positions = start[:, None] + steps  # padding steps write past the row's end, where no one looks
    slots = torch.arange(width + fed, device=device)
    mask = (slots < start[:, None, None]) | ((slots >= start[:, None, None]) & (slots <= branches.positions[:, :, None]))
    continuation = torch.zeros(len(owners), fed, dtype=torch.long)
    for r, (_, _, tail) in enumerate(owners):
        continuation[r, :len(tail) - 1] = torch.tensor(tail[:-1])
    hidden = model.hidden_states(continuation.to(device), branches, mask)
    picked_hidden, picked = [], []
    for r, (row, i, tail) in enumerate(owners):  # the context's last position predicts the first token
        picked_hidden += [context_hidden[row, len(contexts[row]) - 1:len(contexts[row])], hidden[r, :len(tail) - 1]]
        picked.append((i, tail))
    return _read_scores(model, torch.cat(picked_hidden), picked)


def _read_scores(model: Llama, hidden: Tensor, picked: list[tuple[int, list[int]]]) -> list[tuple[int, float, bool, int]]:
    """The LM head and a log-softmax at just the positions read: (request, log-likelihood, greedy, tokens)."""
    targets = torch.tensor([t for _, tail in picked for t in tail], device=hidden.device)
    logprobs = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].cpu()
    greedy = (logprobs.argmax(-1) == targets).cpu()
    scores, at = [], 0
    for i, tail in picked:
        n = len(tail)
        scores.append((i, float(chosen[at:at + n].sum()), bool(greedy[at:at + n].all()), n))
        at += n
    return scores


def generate_until(model: Llama, tokenizer: Tokenizer, prompts: Sequence[str], stop: Sequence[str], *,
                   max_tokens: int = 256, batch_size: int = 32, progress: bool = False,
                   desc: str = "generating") -> tuple[list[str], list[bool]]:
    """Greedy continuations of each prompt, each cut before the first stop string (or an end-of-text token),
    as lm-evaluation-harness's generate_until; and whether each prompt lost its left end to fit.

    The prompts run through the continuous-batching engine, `batch_size` at a time: a prompt whose answer
    ends frees its row for the next one at once, where a static batch would decode on until its longest
    answer ends (GSM8K's answers run from a few tokens to the whole max_tokens).
    """
    room = model.config.max_seq_len - max_tokens
    if room < 1:
        raise ValueError(f"the model's context of {model.config.max_seq_len} tokens leaves no room for a prompt "
                         f"before {max_tokens} generated tokens")
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    truncated = [len(ids) > room for ids in encoded]
    encoded = [ids[-room:] for ids in encoded]
    if not prompts:
        return [], []
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)  # the longest first
    # Each row holds its prompt and answer; a packed prefill chunk of 512 tokens keeps the masked
    # attention over the chunk's other prompts small against the model's own work.
    engine = Engine(model, tokenizer, max_batch=min(batch_size, len(prompts)), prefill_chunk=512,
                    context=len(encoded[order[0]]) + max_tokens)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=tuple(stop))
    requests = {i: engine.submit(encoded[i], params, group=desc) for i in order}
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        while engine.step():
            bar.update(engine.finished.total() - bar.n)
    engine.close()
    return [requests[i].text() for i in range(len(prompts))], truncated


# --- GSM8K's answer extraction, as lm-evaluation-harness's filters and exact_match do it ------------

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORED = (",", "\\$", "(?s).*#### ", "\\.$")


def extract(pattern: re.Pattern, text: str, last: bool) -> str:
    """The first (strict) or last (flexible) match of `pattern`, its first non-empty group; "[invalid]" if none."""
    found = pattern.findall(text)
    if not found:
        return "[invalid]"
    match = found[-1 if last else 0]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "")
    return match.strip() if match else "[invalid]"


def normalized(answer: str) -> str:
    for pattern in _IGNORED:
        answer = re.sub(pattern, "", answer)
    return answer.lower()


def exact_match(extracted: str, reference: str) -> bool:
    return normalized(extracted) == normalized(reference)


# --- running tasks ----------------------------------------------------------------------------------

def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n)), as the harness reports them."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def check_request(names: Iterable[str], limit: int | None, num_fewshot: int | None) -> list[Task]:
    """The tasks named, after the checks that need no data: known names, a positive limit, shots >= 0."""
    tasks = [task(name) for name in names]
    if not tasks:
        raise ValueError("name at least one task")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    return tasks


def run_task(model: Llama, tokenizer: Tokenizer, t: Task, data_dir: Path, *, limit: int | None = None,
             num_fewshot: int | None = None, batch_size: int = 32, progress: bool = True,
             items: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Score one task: {metric: value, metric_stderr: ..., items, truncated, num_fewshot}; each item's record
    (prompt, per-choice log-likelihoods and greediness, prediction, gold) goes to `items`."""
    docs, fewshot_docs = load_docs(t, data_dir)
    k = t.num_fewshot if num_fewshot is None else num_fewshot
    sampler = FewShot(t, docs, fewshot_docs, k)  # the whole split is the pool, whatever the limit
    docs = docs[:limit] if limit is not None else docs
    shots = [sampler.examples(doc) for doc in docs]
    records: list[dict] = []
    if t.kind == "generate":
        prompts = [contexts(t, doc, s)[0] for doc, s in zip(docs, shots)]
        texts, truncated = generate_until(model, tokenizer, prompts, t.stop, max_tokens=t.max_gen_tokens,
                                          batch_size=batch_size, progress=progress, desc=t.name)
        for i, (doc, prompt, text) in enumerate(zip(docs, prompts, texts)):
            strict, flexible = extract(STRICT, text, last=False), extract(FLEXIBLE, text, last=True)
            gold = t.target(doc)
            records.append({"task": t.name, "index": i, "prompt": prompt, "generation": text,
                            "strict": strict, "flexible": flexible, "gold": gold,
                            "exact_match,strict-match": float(exact_match(strict, gold)),
                            "exact_match,flexible-extract": float(exact_match(flexible, gold)),
                            "truncated": truncated[i]})
    else:
        per_doc = [requests(t, doc, s) for doc, s in zip(docs, shots)]
        flat = [pair for pairs in per_doc for pair in pairs]
        scores = iter(loglikelihoods(model, tokenizer, flat, batch_size=batch_size, progress=progress, desc=t.name))
        for i, (doc, pairs) in enumerate(zip(docs, per_doc)):
            got = [next(scores) for _ in pairs]
            records.append(_record(t, i, doc, pairs, got))
    for record in records:
        if items is not None:
            items(record)
    return summarize(t, records, k)


def _record(t: Task, index: int, doc: dict, pairs: list[tuple[str, str]], scores: list[Score]) -> dict:
    lls = [s.loglikelihood for s in scores]
    base = {"task": t.name, "index": index, "truncated": any(s.truncated for s in scores)}
    if t.kind == "loglikelihood":
        (context, continuation), (score,) = pairs[0], scores
        return {**base, "prompt": context, "continuation": continuation, "loglikelihood": score.loglikelihood,
                "greedy": score.greedy, "tokens": score.tokens, "acc": float(score.greedy),
                "perplexity": score.loglikelihood}
    if t.kind == "multiple_input":
        gold = ["1", "2"].index(doc["answer"])
        prediction = max(range(len(lls)), key=lambda j: (lls[j], -j))
        return {**base, "continuation": pairs[0][1], "choices": [
                    {"context": c, "loglikelihood": s.loglikelihood, "greedy": s.greedy} for (c, _), s in zip(pairs, scores)],
                "prediction": prediction, "gold": gold, "acc": float(prediction == gold)}
    choices = t.choices(doc)
    normed = [ll / len(choice) for ll, choice in zip(lls, choices)]
    prediction = max(range(len(lls)), key=lambda j: (lls[j], -j))  # the first of equal ones, as np.argmax
    prediction_norm = max(range(len(normed)), key=lambda j: (normed[j], -j))
    gold = t.target(doc)
    return {**base, "prompt": pairs[0][0], "choices": [
                {"text": choice, "loglikelihood": s.loglikelihood, "greedy": s.greedy}
                for choice, s in zip(choices, scores)],
            "prediction": prediction, "prediction_norm": prediction_norm, "gold": gold,
            "acc": float(prediction == gold), "acc_norm": float(prediction_norm == gold)}


def summarize(t: Task, records: list[dict], k: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for metric in t.metrics:
        values = [r[metric] for r in records]
        if metric == "perplexity":  # exp(-mean log-likelihood); its stderr by the delta method
            mean, stderr = mean_and_stderr(values)
            result[metric], result[f"{metric}_stderr"] = math.exp(-mean), math.exp(-mean) * stderr
        else:
            result[metric], result[f"{metric}_stderr"] = mean_and_stderr(values)
    result.update(items=len(records), truncated=sum(bool(r["truncated"]) for r in records), num_fewshot=k)
    return result


def headline(name: str, result: dict[str, Any]) -> float | None:
    """The accuracy a task is ranked by: acc_norm where the task reports it, else acc."""
    return result.get("acc_norm", result.get("acc")) if name in CHANCE else None


def centered_accuracy(results: dict[str, dict[str, Any]]) -> float | None:
    """The mean of (acc - chance) / (1 - chance) over the multiple-choice tasks that ran (nanochat's CORE)."""
    centered = [(headline(name, r) - CHANCE[name]) / (1 - CHANCE[name]) for name, r in results.items() if name in CHANCE]
    return sum(centered) / len(centered) if centered else None

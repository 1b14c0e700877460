"""What int8 and int4 weight-only quantization (llama/quant.py) cost in quality and gain in speed, on the
bundled SmolLM2-135M-Instruct (its Q4_1 GGUF file).

Quality: WikiText-2 perplexity (the test split of ../shared/data/wikitext2_valid_test, the tokenized
wiki.test.tokens variant, so the numbers compare with each other, not with published raw-text ones) in
non-overlapping windows of --context tokens, every token but each window's first scored; the same
tokens for every model. The models:

- bf16: the file dequantized to float and rounded to bf16 (the reference),
- int8: every projection int8 with a scale per row, the Q4_1 blocks requantized from their weights,
- int4: the Q4_1 blocks as stored (w = d * q + m per 32 weights), and the LM head (tied to the embedding,
  stored as Q8_0) requantized per row to int8 (`int4-head` requantizes it to int4 groups instead).

Then greedy text of a few prompts at each mode against bf16's (how many tokens agree before the first
difference), and (--speed) batch-1 decode tokens/s with 128 new tokens, greedy, through
llama.generation.generate_tokens, every mode in the same process, rounds interleaved, the median.

    python benchmarks/quant_quality.py --tokens 16384           # a few minutes; all ~300K tokens: an hour
    python benchmarks/quant_quality.py --tokens 0 --speed        # only the speed
    python benchmarks/quant_quality.py --modes bf16,int4,int4-head --threads 1

llama.evaluation scores context/continuation pairs (LAMBADA's perplexity is of the last word), not a
running text, so the windows are scored here with the model's forward: hidden_states, then lm_head.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llama import cpu_kernels, quant
from llama.generation import generate_tokens
from llama.hub import bundled_smollm2, load_pretrained

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT.parent / "shared" / "data" / "wikitext2_valid_test"
MODES = ("bf16", "int8", "int4", "int4-head", "fp32")
PROMPTS = ["The capital of France is", "Once upon a time, there was a little robot who",
           "def fibonacci(n):", "The three primary colors are", "Water boils at a temperature of"]


def load(mode: str):
    """The bundled model in `mode`, with the CPU kernels installed as generation installs them."""
    path = bundled_smollm2()
    if mode in ("bf16", "fp32"):
        model, tokenizer = load_pretrained(path, torch.bfloat16 if mode == "bf16" else torch.float32)
    elif mode == "int4-head":  # every projection int4, the LM head too
        model, tokenizer = load_pretrained(path, torch.bfloat16, quantize="int4")
        model.lm_head = quant.Int4Linear.from_float(model.embed_tokens.weight, torch.bfloat16)
    else:
        model, tokenizer = load_pretrained(path, torch.bfloat16, quantize=mode)
    return cpu_kernels.install(model.eval()), tokenizer


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int, desc: str) -> tuple[float, int]:
    """exp(mean negative log-likelihood) over non-overlapping windows of `context` tokens, and the count."""
    total, count = 0.0, 0
    for start in tqdm(range(0, len(ids) - 1, context), desc=desc, unit="window", file=sys.stderr):
        window = ids[start:start + context][None]
        if window.shape[1] < 2:
            break
        hidden = model.hidden_states(window[:, :-1])[0]
        for chunk in range(0, hidden.shape[0], 256):  # the vocabulary is wide: logits a slice at a time
            logits = model.lm_head(hidden[chunk:chunk + 256]).float()
            targets = window[0, 1 + chunk:1 + chunk + 256]
            total += float(F.cross_entropy(logits, targets, reduction="sum"))
            count += len(targets)
    return math.exp(total / count), count


def greedy(model, prompt: list[int], tokens: int) -> list[int]:
    return [int(t[0]) for t in generate_tokens(model, [prompt], max_tokens=tokens, temperature=0)]


def decode_rate(model, prompt: list[int], tokens: int) -> float:
    """Decode tokens/s after the first token (which the prefill gives), as GenerationStats counts them."""
    start, produced = None, 0
    for _ in generate_tokens(model, [prompt], max_tokens=tokens, temperature=0):
        produced += 1
        if start is None:
            start = time.perf_counter()
    return (produced - 1) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="bf16,int8,int4", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--tokens", type=int, default=16384, help="WikiText-2 tokens to score (0: none; -1: all)")
    parser.add_argument("--context", type=int, default=1024, help="tokens per perplexity window")
    parser.add_argument("--split", choices=["test", "valid"], default="test")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--text-tokens", type=int, default=32, help="greedy tokens per prompt (0: skip)")
    parser.add_argument("--speed", action="store_true", help="measure batch-1 decode tokens/s")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - set(MODES):
        parser.error(f"--modes: unknown {sorted(set(modes) - set(MODES))}; known: {', '.join(MODES)}")
    torch.set_num_threads(args.threads)
    models = {mode: load(mode) for mode in modes}
    tokenizer = next(iter(models.values()))[1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_kernels.cpu_kind()}; "
          f"SmolLM2-135M-Instruct from {bundled_smollm2().name}")

    if args.tokens:
        file = args.data / f"{args.split}.txt"
        if not file.is_file():
            print(f"perplexity skipped: {file} is not there (see {args.data / 'PROVENANCE.md'})")
        else:
            ids = torch.tensor(tokenizer.encode(file.read_text(encoding="utf-8")))
            ids = ids if args.tokens < 0 else ids[:args.tokens]
            results = {}
            for mode, (model, _) in models.items():
                start = time.perf_counter()
                results[mode] = perplexity(model, ids, args.context, mode)
                print(f"{mode:10s} perplexity {results[mode][0]:.4f} over {results[mode][1]} tokens "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            if "bf16" in results:
                base = results["bf16"][0]
                for mode, (value, _) in results.items():
                    print(f"{mode:10s} {100 * (value / base - 1):+.2f}% vs bf16")

    if args.text_tokens and "bf16" in models:
        print(f"\ngreedy text, {args.text_tokens} tokens per prompt: how many equal bf16's before the first difference")
        reference = {p: greedy(models["bf16"][0], tokenizer.encode(p), args.text_tokens) for p in PROMPTS}
        for mode, (model, _) in models.items():
            if mode == "bf16":
                continue
            agree = []
            for prompt in PROMPTS:
                ours, theirs = greedy(model, tokenizer.encode(prompt), args.text_tokens), reference[prompt]
                same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                agree.append(same)
                if same < min(len(ours), len(theirs)):
                    print(f"  {mode} {prompt!r}: bf16 {tokenizer.decode(theirs)!r}\n  {' ' * len(mode)} "
                          f"{' ' * (len(prompt) + 3)}{mode} {tokenizer.decode(ours)!r}")
            print(f"{mode:10s} {agree} of {args.text_tokens}")

    if args.speed:
        prompt = tokenizer.encode(PROMPTS[1])
        for model, _ in models.values():
            decode_rate(model, prompt, 8)  # warm-up (and the kernels' build)
        rates = {mode: [] for mode in models}
        for _ in range(args.rounds):
            for mode, (model, _) in models.items():
                rates[mode].append(decode_rate(model, prompt, args.new_tokens))
        print(f"\nbatch-1 decode, {args.new_tokens} new tokens, greedy, median of {args.rounds} rounds "
              f"({torch.get_num_threads()} threads)")
        for mode, values in rates.items():
            print(f"{mode:10s} {statistics.median(values):6.1f} tokens/s  (rounds: "
                  f"{', '.join(f'{v:.1f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

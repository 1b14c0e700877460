"""Which CPU kernels win on this machine: each of llama/cpu_kernels.py's primitives against ATen's bf16 code,
for speed and for accuracy, on SmolLM2-135M-Instruct decoding.

For every set of kernels (none = ATen alone, each primitive alone, all four, and the set this CPU uses
today), it decodes the same tokens with a KV cache after a prefill, teacher-forced along the fp32 model's
greedy text so every set sees the same inputs, and prints
- decode steps/s on the first prompt (median of --rounds, the sets alternating),
- the mean absolute difference of the logits from the fp32 model's over all the prompts, and that error
  as a multiple of ATen's bf16 error (above 1: less accurate than ATen). One prompt is not enough: two
  bf16 implementations that round in different orders drift from fp32 by chance, and on one prompt
  either can look 1.6x worse than the other;
- the share of steps whose greedy token equals fp32's.
Then fp32_linear (no kernel: MKL's other layout for a product of a few rows): its time against
F.linear's for each of the model's product shapes and 4 to 96 rows (cpu_kernels.FEW_ROWS is where it
wins), and an fp32 decode step of 16 rows with and without it.
The CPU kind (cpu_kernels.cpu_kind()), model name and flags head the output: record them with the table
in docs/benchmarks.md, and set cpu_kernels.SERVED_ON from it.

    python benchmarks/cpu_kernels.py                   # about 2 minutes on 2 cores
    python benchmarks/cpu_kernels.py --steps 64 --rounds 5
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn as nn

from llama import KVCache, cpu_kernels, load_pretrained
from llama.hub import bundled_smollm2
from llama.model import Attention, RMSNorm, apply_rope, attention

PROMPTS = ("Once upon a time, in a small village by the sea, there lived a little girl named Emma. Every morning "
           "she walked to the harbour to watch the fishing boats, and one day",
           "The capital of France is Paris. The capital of Germany is",
           "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "In 1905, Albert Einstein published four papers that changed physics. The first",
           "Q: What is 17 + 25?\nA:")


def cpu_description() -> str:
    """The CPU's model name and its bf16-relevant flags, from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}; flags: {' '.join(shown) or 'unknown'}"


def uninstall(model: nn.Module) -> None:
    """Undo cpu_kernels.install: every module back to its class's own code."""
    for module in model.modules():
        for name in ("forward", "rope", "attend"):
            vars(module).pop(name, None)
        if isinstance(module, Attention):
            assert module.rope is apply_rope and module.attend is attention
        if isinstance(module, RMSNorm):
            assert type(module).forward is RMSNorm.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=32, help="decode steps after the prompt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    model, tokenizer = load_pretrained(bundled_smollm2())
    model.eval()
    texts = []  # (prompt ids, prompt + fp32 greedy continuation, fp32 logits of each step)
    for prompt in map(tokenizer.encode, PROMPTS):
        cache, ids, logits_seen = KVCache(model.config, 1, len(prompt) + args.steps + 1), list(prompt), []
        logits = model(torch.tensor([prompt]), cache)[:, -1]
        for _ in range(args.steps):  # fp32 greedy text: the tokens every set is then fed
            logits_seen.append(logits.float())
            ids.append(int(logits.argmax()))
            logits = model(torch.tensor([[ids[-1]]]), cache)[:, -1]
        texts.append((prompt, ids, torch.cat(logits_seen)))
    model.to(torch.bfloat16)

    def decode(prompt: list[int], ids: list[int]) -> tuple[torch.Tensor, float]:
        cache = KVCache(model.config, 1, len(ids) + 1, dtype=torch.bfloat16)
        out = [model(torch.tensor([prompt]), cache)[:, -1].float()]
        start = time.perf_counter()
        for token in ids[len(prompt):-1]:
            out.append(model(torch.tensor([[token]]), cache)[:, -1].float())
        return torch.cat(out), (args.steps - 1) / (time.perf_counter() - start)

    bf16 = tuple(p for p in cpu_kernels.PRIMITIVES if p in cpu_kernels.BF16)
    sets = {"none (ATen)": (), **{name: (name,) for name in bf16},
            "all four": bf16, "this CPU's choice": tuple(sorted(cpu_kernels.chosen_primitives() & cpu_kernels.BF16))}
    results = {}
    for name, primitives in sets.items():  # warm-up (and the kernels' build), and the accuracy of each set
        uninstall(model)
        cpu_kernels.install(model, primitives)
        errors, same = [], []
        for prompt, ids, fp32 in texts:
            logits, _ = decode(prompt, ids)
            errors.append(float((logits - fp32).abs().mean()))
            same.append(float((logits.argmax(-1) == fp32.argmax(-1)).float().mean()))
        results[name] = {"error": statistics.mean(errors), "greedy": statistics.mean(same), "rates": []}
    for _ in range(args.rounds):
        for name, primitives in sets.items():
            uninstall(model)
            cpu_kernels.install(model, primitives)
            results[name]["rates"].append(decode(*texts[0][:2])[1])

    print(f"CPU: {cpu_description()}")
    print(f"cpu_kind: {cpu_kernels.cpu_kind()}; this CPU's choice: {sorted(cpu_kernels.chosen_primitives()) or 'none'}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M-Instruct bf16, "
          f"{len(PROMPTS)} prompts x {args.steps} decode steps, {args.rounds} rounds")
    aten = results["none (ATen)"]
    base_rate, base_error = statistics.median(aten["rates"]), aten["error"]
    print(f"\n{'kernels':>18} | {'steps/s':>8} | {'x ATen':>6} | {'error vs fp32':>13} | {'x ATen':>6} | greedy = fp32")
    for name, r in results.items():
        rate = statistics.median(r["rates"])
        print(f"{name:>18} | {rate:8.1f} | {rate / base_rate:6.2f} | {r['error']:13.4f} | "
              f"{r['error'] / base_error:6.2f} | {100 * r['greedy']:.0f}%")
    fp32_rows(model.float(), args.rounds)


def fp32_rows(model: nn.Module, rounds: int) -> None:
    """fp32_linear against F.linear, per product shape and row count, then in a 16-row decode step."""
    uninstall(model)
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if type(m) is nn.Linear})
    rows = (4, 8, 16, 32, 48, 64, 96)

    def best(fn, repeat: int = 20) -> float:
        fn()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            times.append((time.perf_counter() - start) / repeat)
        return min(times)

    print(f"\nfp32_linear: F.linear's time / fp32_linear's, by rows (above 1: fp32_linear wins; FEW_ROWS = "
          f"{cpu_kernels.FEW_ROWS.start}-{cpu_kernels.FEW_ROWS.stop - 1})")
    print(f"{'weight [N, K]':>14} | " + " | ".join(f"{n:>5}" for n in rows))
    for n, k in shapes:
        weight = [torch.randn(n, k) for _ in range(max(1, (64 << 20) // (n * k * 4)))]  # more than the caches hold
        cells = []
        for m in rows:
            x, turn = torch.randn(m, k), iter(range(10**9))
            aten = best(lambda: torch.nn.functional.linear(x, weight[next(turn) % len(weight)]))
            ours = best(lambda: cpu_kernels.fp32_linear(x, weight[next(turn) % len(weight)]))
            cells.append(f"{aten / ours:5.2f}")
        print(f"{str([n, k]):>14} | " + " | ".join(cells))
    cache = KVCache(model.config, 16, 64)
    model(torch.zeros(16, 8, dtype=torch.long), cache)

    def step() -> None:
        cache.length = 8
        model(torch.zeros(16, 1, dtype=torch.long), cache)

    aten = best(step, 5)
    cpu_kernels.install(model, ["fp32_linear"])
    ours = best(step, 5)
    uninstall(model)
    print(f"fp32 decode step of 16 rows: {aten * 1e3:.1f} ms with F.linear, {ours * 1e3:.1f} ms with fp32_linear "
          f"({aten / ours:.2f}x)")


if __name__ == "__main__":
    main()

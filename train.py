"""Pretrain a Llama on token shards made by data/prepare.py.

A thin shim over llama/cli/train.py, where the command line lives (python train.py --help).
"""
import sys

from llama.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

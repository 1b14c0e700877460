"""Turn a text corpus into token shards for pretraining.

A thin shim over llama/cli/prepare.py, where the command line lives (python data/prepare.py --help).
"""
import sys

from llama.cli.prepare import main

if __name__ == "__main__":
    sys.exit(main())

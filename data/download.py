"""Download the experiments' datasets from their public sources into data/ (or --out).

A thin shim over llama/cli/download.py, where the command line lives (python3 data/download.py --help).
"""
import sys

from llama.cli.download import main

if __name__ == "__main__":
    sys.exit(main())
